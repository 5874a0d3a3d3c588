//! A hostile TCP proxy on 127.0.0.1, in front of a real server: it closes connections at
//! once, cuts the server's replies short, black-holes them, stops moving bytes (a partition,
//! or a freeze of the connections already open), delays them (latency with jitter), or
//! passes traffic through, as told. The bad-input sweep and the network nemeses use it.

use rand::Rng;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What the proxy does to new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Forward both ways.
    Pass = 0,
    /// Accept and close at once.
    Close = 1,
    /// Forward the client's bytes, but only the first `cut` bytes of the server's reply,
    /// then close both sides.
    Truncate = 2,
    /// Forward the client's bytes and never answer (a black hole).
    Silent = 3,
    /// A network partition: nothing moves either way (bytes wait in the buffers, as TCP
    /// segments would be retransmitted) until the mode changes back to [`Mode::Pass`].
    Partition = 4,
    /// A stalled path: the connections open when the freeze began stop moving bytes either
    /// way, without being closed, until the mode changes back to [`Mode::Pass`]; new
    /// connections pass, so a client that gives up on a stuck connection and dials again
    /// gets through.
    Freeze = 5,
}

/// A running proxy; its mode can change at any time (affects new and live connections).
#[derive(Clone)]
pub struct Proxy {
    port: u16,
    mode: Arc<AtomicU8>,
    cut: Arc<AtomicUsize>,
    /// Added delay per chunk and direction, in ms: the low and high 32 bits are the
    /// shortest and the longest delay (both 0: none).
    latency: Arc<AtomicU64>,
    next_conn: Arc<AtomicU64>,
    /// Under [`Mode::Freeze`], the connections numbered below this one are frozen.
    frozen_below: Arc<AtomicU64>,
}

/// A chunk of bytes and when it may be written.
type Chunk = (Instant, Vec<u8>);

impl Proxy {
    /// Starts a proxy to 127.0.0.1:`upstream`.
    pub async fn start(upstream: u16) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let proxy = Proxy {
            port: listener.local_addr()?.port(),
            mode: Arc::new(AtomicU8::new(Mode::Pass as u8)),
            cut: Arc::new(AtomicUsize::new(1)),
            latency: Arc::new(AtomicU64::new(0)),
            next_conn: Arc::new(AtomicU64::new(0)),
            frozen_below: Arc::new(AtomicU64::new(0)),
        };
        let shared = proxy.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let proxy = shared.clone();
                let conn = proxy.next_conn.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let _ = proxy.serve(client, upstream, conn).await;
                });
            }
        });
        Ok(proxy)
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Sets the mode (and, for [`Mode::Truncate`], how many reply bytes get through).
    pub fn set(&self, mode: Mode, cut: usize) {
        self.cut.store(cut, Ordering::SeqCst);
        if mode == Mode::Freeze {
            let open = self.next_conn.load(Ordering::SeqCst);
            self.frozen_below.store(open, Ordering::SeqCst);
        }
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    /// Delays every chunk, each way, by a random time between `min` and `max`, in order (a
    /// chunk never overtakes the one ahead of it); `None` forwards at once. Independent of
    /// the mode: a slow path can also freeze or be cut.
    pub fn set_latency(&self, range: Option<(Duration, Duration)>) {
        let ms = |d: Duration| d.as_millis().min(u128::from(u32::MAX)) as u64;
        let packed = range.map_or(0, |(min, max)| (ms(max.max(min)) << 32) | ms(min));
        self.latency.store(packed, Ordering::SeqCst);
    }

    fn delay(&self) -> Duration {
        let packed = self.latency.load(Ordering::SeqCst);
        let (min, max) = (packed & 0xffff_ffff, packed >> 32);
        if max == 0 {
            return Duration::ZERO;
        }
        Duration::from_millis(rand::rng().random_range(min..=max))
    }

    fn mode(&self) -> u8 {
        self.mode.load(Ordering::SeqCst)
    }

    fn stalled(&self, conn: u64) -> bool {
        match self.mode() {
            m if m == Mode::Partition as u8 => true,
            m if m == Mode::Freeze as u8 => conn < self.frozen_below.load(Ordering::SeqCst),
            _ => false,
        }
    }

    /// Waits while this connection may not move bytes (partitioned, or frozen).
    async fn heal(&self, conn: u64) {
        while self.stalled(conn) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Reads from one side and queues what may pass, each chunk with its due time. With
    /// `reply`, this is the server's side, to which Silent and Truncate apply.
    async fn read_side(
        &self,
        conn: u64,
        mut from: impl AsyncRead + Unpin,
        queue: mpsc::UnboundedSender<Chunk>,
        reply: bool,
    ) -> std::io::Result<()> {
        let mut buf = [0u8; 8192];
        let mut sent = 0usize;
        let mut last_due = Instant::now();
        loop {
            self.heal(conn).await;
            let n = from.read(&mut buf).await?;
            self.heal(conn).await;
            let mode = self.mode();
            if n == 0 || mode == Mode::Close as u8 {
                return Ok(());
            }
            if reply && mode == Mode::Silent as u8 {
                continue;
            }
            let truncate = reply && mode == Mode::Truncate as u8;
            let cut = self.cut.load(Ordering::SeqCst);
            let allowed = if truncate {
                cut.saturating_sub(sent).min(n)
            } else {
                n
            };
            last_due = (Instant::now() + self.delay()).max(last_due);
            if queue.send((last_due, buf[..allowed].to_vec())).is_err() {
                return Ok(());
            }
            sent += allowed;
            if truncate && sent >= cut {
                return Ok(());
            }
        }
    }

    /// Writes the queued chunks to the other side, each not before its due time and not
    /// while the connection is stalled; ends when the reading side has ended and the queue
    /// is drained.
    async fn write_side(
        &self,
        conn: u64,
        mut queue: mpsc::UnboundedReceiver<Chunk>,
        mut to: impl AsyncWrite + Unpin,
    ) -> std::io::Result<()> {
        while let Some((due, bytes)) = queue.recv().await {
            tokio::time::sleep_until(due).await;
            self.heal(conn).await;
            to.write_all(&bytes).await?;
        }
        Ok(())
    }

    async fn serve(&self, mut client: TcpStream, upstream: u16, conn: u64) -> std::io::Result<()> {
        self.heal(conn).await;
        if self.mode() == Mode::Close as u8 {
            return Ok(()); // dropped: closed
        }
        let mut server = TcpStream::connect(("127.0.0.1", upstream)).await?;
        let (cr, cw) = client.split();
        let (sr, sw) = server.split();
        let (up_tx, up_rx) = mpsc::unbounded_channel();
        let (down_tx, down_rx) = mpsc::unbounded_channel();
        let up = async {
            tokio::try_join!(
                self.read_side(conn, cr, up_tx, false),
                self.write_side(conn, up_rx, sw)
            )
        };
        let down = async {
            tokio::try_join!(
                self.read_side(conn, sr, down_tx, true),
                self.write_side(conn, down_rx, cw)
            )
        };
        // Switching to Close ends live connections too, even idle ones.
        let closed = async {
            while self.mode() != Mode::Close as u8 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        // Either direction ending closes both sides.
        tokio::select! {
            r = up => { r?; }
            r = down => { r?; }
            () = closed => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on loopback; returns its port.
    async fn echo() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        port
    }

    async fn roundtrip(stream: &mut TcpStream, bytes: &[u8]) -> Vec<u8> {
        stream.write_all(bytes).await.unwrap();
        let mut back = vec![0u8; bytes.len()];
        stream.read_exact(&mut back).await.unwrap();
        back
    }

    #[tokio::test]
    async fn latency_keeps_the_bytes_in_order() {
        let proxy = Proxy::start(echo().await).await.unwrap();
        proxy.set_latency(Some((Duration::from_millis(1), Duration::from_millis(30))));
        let mut stream = TcpStream::connect(("127.0.0.1", proxy.port()))
            .await
            .unwrap();
        let sent: Vec<u8> = (0..200u8).collect();
        for chunk in sent.chunks(7) {
            stream.write_all(chunk).await.unwrap();
        }
        let mut back = vec![0u8; sent.len()];
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!(back, sent);
    }

    #[tokio::test]
    async fn freeze_stalls_open_connections_only_until_thawed() {
        let proxy = Proxy::start(echo().await).await.unwrap();
        let mut old = TcpStream::connect(("127.0.0.1", proxy.port()))
            .await
            .unwrap();
        assert_eq!(roundtrip(&mut old, b"ping").await, b"ping");
        proxy.set(Mode::Freeze, 0);
        old.write_all(b"held").await.unwrap();
        let mut buf = [0u8; 4];
        let stalled = tokio::time::timeout(Duration::from_millis(300), old.read_exact(&mut buf));
        assert!(stalled.await.is_err(), "a frozen connection moved bytes");
        // A connection opened during the freeze passes.
        let mut fresh = TcpStream::connect(("127.0.0.1", proxy.port()))
            .await
            .unwrap();
        assert_eq!(roundtrip(&mut fresh, b"new!").await, b"new!");
        proxy.set(Mode::Pass, 0);
        let thawed = tokio::time::timeout(Duration::from_secs(10), old.read_exact(&mut buf));
        thawed.await.unwrap().unwrap();
        assert_eq!(&buf, b"held");
    }
}
