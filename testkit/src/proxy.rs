//! A TCP proxy on 127.0.0.1 in front of a real server, for fault tests. It can add
//! latency to every byte in each direction, freeze the traffic as a hung server or a
//! network partition would (connections stay open, new ones are accepted but reach the
//! server only at the thaw, and bytes and closes already in flight are held until then),
//! hold only the server's replies (requests still reach it), and cut every open
//! connection.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

struct State {
    latency: Mutex<Duration>,
    frozen: watch::Sender<bool>,
    /// Holds the server-to-client direction only.
    replies_frozen: watch::Sender<bool>,
    /// Bumped by [`Proxy::cut`]: every connection open at that moment is closed.
    cuts: watch::Sender<u64>,
}

impl State {
    fn latency(&self) -> Duration {
        *self.latency.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Resolves at once while the proxy forwards, else at the thaw.
    async fn thawed(&self) {
        wait_until_clear(&self.frozen).await;
    }

    /// The same for the server's replies, which [`Proxy::freeze_replies`] also holds.
    async fn replies_thawed(&self) {
        loop {
            self.thawed().await;
            wait_until_clear(&self.replies_frozen).await;
            if !*self.frozen.borrow() {
                return;
            }
        }
    }
}

async fn wait_until_clear(flag: &watch::Sender<bool>) {
    let mut set = flag.subscribe();
    while *set.borrow_and_update() {
        if set.changed().await.is_err() {
            return;
        }
    }
}

/// A running proxy; stops, and closes its connections, when dropped.
pub struct Proxy {
    port: u16,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `127.0.0.1:upstream`, on the
    /// current tokio runtime.
    pub async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("cannot bind the proxy");
        let port = listener.local_addr().expect("no proxy address").port();
        let state = Arc::new(State {
            latency: Mutex::new(Duration::ZERO),
            frozen: watch::channel(false).0,
            replies_frozen: watch::channel(false).0,
            cuts: watch::channel(0).0,
        });
        let upstream = SocketAddr::from(([127, 0, 0, 1], upstream));
        let shared = Arc::clone(&state);
        let accept = tokio::spawn(async move {
            // Owned by this task: aborting it (on drop) closes every connection.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let state = Arc::clone(&shared);
                let mut cuts = state.cuts.subscribe();
                cuts.mark_unchanged();
                connections.spawn(async move {
                    let connect = async {
                        state.thawed().await;
                        TcpStream::connect(upstream).await
                    };
                    let server = tokio::select! {
                        server = connect => server,
                        _ = cuts.changed() => return,
                    };
                    if let Ok(server) = server {
                        relay(client, server, state, cuts).await;
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
        *self
            .state
            .latency
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = latency;
    }

    /// Holds every byte and close in both directions, and new connections, until
    /// [`thaw`](Self::thaw).
    pub fn freeze(&self) {
        self.state.frozen.send_replace(true);
    }

    /// Holds every byte the server sends (its replies, and its closes) until
    /// [`thaw`](Self::thaw), while the client's requests still reach the server: a
    /// store that has run a command but whose answer is still on its way.
    pub fn freeze_replies(&self) {
        self.state.replies_frozen.send_replace(true);
    }

    /// Forwards again, starting with what was held while frozen.
    pub fn thaw(&self) {
        self.state.frozen.send_replace(false);
        self.state.replies_frozen.send_replace(false);
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

async fn relay(
    client: TcpStream,
    server: TcpStream,
    state: Arc<State>,
    mut cuts: watch::Receiver<u64>,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(client_read, server_write, Arc::clone(&state), Direction::Up);
    let down = pump(server_read, client_write, state, Direction::Down);
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        _ = cuts.changed() => {}
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Direction {
    /// Client to server.
    Up,
    /// Server to client.
    Down,
}

/// Copies one direction: a reader that stamps each chunk with its due time, and a
/// writer that sends it then, and only while the proxy is not frozen; the end of the
/// stream is passed on the same way.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    state: Arc<State>,
    direction: Direction,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = {
        let state = Arc::clone(&state);
        async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match from.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let due = Instant::now() + state.latency();
                        if tx.send((due, buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            open_for(&state, direction).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        open_for(&state, direction).await;
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

async fn open_for(state: &State, direction: Direction) {
    match direction {
        Direction::Up => state.thawed().await,
        Direction::Down => state.replies_thawed().await,
    }
}

#[cfg(test)]
mod tests {
    use super::Proxy;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// An echo server on loopback, for the proxy to stand in front of.
    async fn echo() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = conn.read(&mut buf).await {
                        if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        port
    }

    async fn round_trip(conn: &mut tokio::net::TcpStream, what: &[u8]) -> Vec<u8> {
        conn.write_all(what).await.unwrap();
        let mut got = vec![0u8; what.len()];
        conn.read_exact(&mut got).await.unwrap();
        got
    }

    #[tokio::test]
    async fn latency_keeps_bytes_in_order_and_a_freeze_holds_them_until_the_thaw() {
        let proxy = Proxy::start(echo().await).await;
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port()))
            .await
            .unwrap();
        proxy.set_latency(Duration::from_millis(20));
        for i in 0..20u8 {
            assert_eq!(round_trip(&mut conn, &[i; 3]).await, vec![i; 3]);
        }
        proxy.set_latency(Duration::ZERO);
        proxy.freeze();
        conn.write_all(b"held").await.unwrap();
        let mut got = [0u8; 4];
        let early = tokio::time::timeout(Duration::from_millis(300), conn.read_exact(&mut got));
        assert!(early.await.is_err(), "bytes crossed a frozen proxy");
        // A connection opened during the freeze gets no answer either.
        let mut late = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port()))
            .await
            .unwrap();
        late.write_all(b"late").await.unwrap();
        let mut got_late = [0u8; 4];
        let early =
            tokio::time::timeout(Duration::from_millis(300), late.read_exact(&mut got_late));
        assert!(
            early.await.is_err(),
            "a new connection crossed a frozen proxy"
        );
        proxy.thaw();
        conn.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"held");
        late.read_exact(&mut got_late).await.unwrap();
        assert_eq!(&got_late, b"late");
    }

    #[tokio::test]
    async fn frozen_replies_hold_the_answers_but_not_the_requests() {
        // An echo server that also reports what reached it.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            while let Ok(n) = conn.read(&mut buf).await {
                if n == 0 {
                    return;
                }
                let _ = seen_tx.send(buf[..n].to_vec());
                if conn.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        });
        let proxy = Proxy::start(port).await;
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port()))
            .await
            .unwrap();
        assert_eq!(round_trip(&mut conn, b"a").await, b"a");
        assert_eq!(seen.recv().await.unwrap(), b"a");
        proxy.freeze_replies();
        conn.write_all(b"b").await.unwrap();
        let reached = tokio::time::timeout(Duration::from_secs(10), seen.recv()).await;
        assert_eq!(reached.expect("the request was held").unwrap(), b"b");
        let mut got = [0u8; 1];
        let early = tokio::time::timeout(Duration::from_millis(300), conn.read_exact(&mut got));
        assert!(
            early.await.is_err(),
            "a reply crossed while replies were frozen"
        );
        proxy.thaw();
        conn.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"b");
    }

    #[tokio::test]
    async fn a_cut_closes_open_connections_only() {
        let proxy = Proxy::start(echo().await).await;
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port()))
            .await
            .unwrap();
        assert_eq!(round_trip(&mut conn, b"a").await, b"a");
        proxy.cut();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
            .await
            .expect("a cut connection stayed open");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        let mut next = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port()))
            .await
            .unwrap();
        assert_eq!(round_trip(&mut next, b"b").await, b"b");
    }
}
