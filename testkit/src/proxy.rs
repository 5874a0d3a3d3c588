//! A TCP proxy on loopback between a client and a private server, for fault tests: it
//! can add latency to every byte in each direction, freeze the traffic (bytes are held,
//! connections stay open, as on a stalled network) and cut every open connection.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

struct State {
    latency: Mutex<Duration>,
    frozen: watch::Sender<bool>,
    /// Bumped by [`Proxy::cut`]: every connection open at that moment is closed.
    cuts: watch::Sender<u64>,
}

/// A running proxy; stops (and closes its connections) when dropped.
pub struct Proxy {
    port: u16,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `127.0.0.1:upstream`.
    pub async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("cannot bind the proxy");
        let port = listener.local_addr().expect("no proxy address").port();
        let state = Arc::new(State {
            latency: Mutex::new(Duration::ZERO),
            frozen: watch::channel(false).0,
            cuts: watch::channel(0).0,
        });
        let upstream = SocketAddr::from(([127, 0, 0, 1], upstream));
        let shared = Arc::clone(&state);
        let accept = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let state = Arc::clone(&shared);
                connections.spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        relay(client, server, state).await;
                    }
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Proxy {
            port,
            state,
            accept,
        }
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Delays every chunk by `latency` in each direction from now on.
    pub fn set_latency(&self, latency: Duration) {
        *self.state.latency.lock().unwrap() = latency;
    }

    /// Holds every byte in both directions until [`thaw`](Self::thaw).
    pub fn freeze(&self) {
        self.state.frozen.send_replace(true);
    }

    /// Lets the held bytes go on.
    pub fn thaw(&self) {
        self.state.frozen.send_replace(false);
    }

    /// Freezes the traffic for `duration`, then thaws it.
    pub async fn freeze_for(&self, duration: Duration) {
        self.freeze();
        tokio::time::sleep(duration).await;
        self.thaw();
    }

    /// Closes every connection open now; later ones are served as usual.
    pub fn cut(&self) {
        self.state.cuts.send_modify(|n| *n += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn relay(client: TcpStream, server: TcpStream, state: Arc<State>) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let mut cuts = state.cuts.subscribe();
    cuts.mark_unchanged();
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(client_read, server_write, Arc::clone(&state));
    let down = pump(server_read, client_write, state);
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        _ = cuts.changed() => {}
    }
}

/// Copies one direction: a reader that stamps each chunk with its due time, and a
/// writer that sends it then, and only while the proxy is not frozen.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<State>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let latency = {
        let state = Arc::clone(&state);
        move || *state.latency.lock().unwrap()
    };
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + latency(), buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        let mut frozen = state.frozen.subscribe();
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            while *frozen.borrow_and_update() {
                if frozen.changed().await.is_err() {
                    return;
                }
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
