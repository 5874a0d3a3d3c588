//! A TCP proxy on 127.0.0.1 in front of a real server that can freeze: while frozen it
//! stops forwarding both ways without closing anything, as a hung server or a network
//! partition would (connections stay open, new ones are accepted but get no answer, and
//! bytes already in flight are held until the thaw).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Flowing,
    Frozen,
    Closed,
}

/// A running proxy; it forwards until [`freeze`](Self::freeze)d, and closes every
/// connection when dropped.
pub struct FreezingProxy {
    port: u16,
    state: watch::Sender<State>,
    acceptor: tokio::task::AbortHandle,
}

impl FreezingProxy {
    /// Starts a proxy to 127.0.0.1:`upstream`, on the current tokio runtime.
    pub async fn start(upstream: u16) -> FreezingProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("cannot bind the proxy's port");
        let port = listener.local_addr().expect("proxy address").port();
        let (state, states) = watch::channel(State::Flowing);
        let acceptor = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(serve(client, upstream, states.clone()));
            }
        })
        .abort_handle();
        FreezingProxy {
            port,
            state,
            acceptor,
        }
    }

    /// The proxy's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops forwarding, on live and new connections, without closing any.
    pub fn freeze(&self) {
        self.state.send_replace(State::Frozen);
    }

    /// Forwards again, starting with what was held while frozen.
    pub fn thaw(&self) {
        self.state.send_replace(State::Flowing);
    }
}

impl Drop for FreezingProxy {
    fn drop(&mut self) {
        self.state.send_replace(State::Closed);
        self.acceptor.abort();
    }
}

/// Waits while frozen; false once the proxy is closed.
async fn flowing(states: &mut watch::Receiver<State>) -> bool {
    loop {
        match *states.borrow_and_update() {
            State::Flowing => return true,
            State::Closed => return false,
            State::Frozen => {}
        }
        if states.changed().await.is_err() {
            return false;
        }
    }
}

async fn closed(mut states: watch::Receiver<State>) {
    while *states.borrow_and_update() != State::Closed {
        if states.changed().await.is_err() {
            return;
        }
    }
}

async fn serve(client: TcpStream, upstream: u16, states: watch::Receiver<State>) {
    let mut gate = states.clone();
    if !flowing(&mut gate).await {
        return;
    }
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // Either direction ending closes both sides.
    tokio::select! {
        () = pump(client_read, server_write, states.clone()) => {}
        () = pump(server_read, client_write, states.clone()) => {}
        () = closed(states) => {}
    }
}

async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut states: watch::Receiver<State>) {
    let mut buf = [0u8; 8192];
    loop {
        if !flowing(&mut states).await {
            return;
        }
        let read = from.read(&mut buf).await;
        // What arrived during a freeze (data or a close) is held until the thaw.
        if !flowing(&mut states).await {
            return;
        }
        match read {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
