//! A hostile TCP proxy on 127.0.0.1 for the bad-input sweep: it sits in front of a real
//! server and closes connections at once, cuts the server's replies short, or passes
//! traffic through, as told.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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
}

/// A running proxy; its mode can change at any time (affects new and live connections).
#[derive(Clone)]
pub struct Proxy {
    port: u16,
    mode: Arc<AtomicU8>,
    cut: Arc<AtomicUsize>,
}

impl Proxy {
    /// Starts a proxy to 127.0.0.1:`upstream`.
    pub async fn start(upstream: u16) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let proxy = Proxy {
            port: listener.local_addr()?.port(),
            mode: Arc::new(AtomicU8::new(Mode::Pass as u8)),
            cut: Arc::new(AtomicUsize::new(1)),
        };
        let shared = proxy.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let proxy = shared.clone();
                tokio::spawn(async move {
                    let _ = proxy.serve(client, upstream).await;
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
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    fn mode(&self) -> u8 {
        self.mode.load(Ordering::SeqCst)
    }

    /// Waits while the proxy is partitioned.
    async fn heal(&self) {
        while self.mode() == Mode::Partition as u8 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    async fn serve(&self, mut client: TcpStream, upstream: u16) -> std::io::Result<()> {
        self.heal().await;
        if self.mode() == Mode::Close as u8 {
            return Ok(()); // dropped: closed
        }
        let mut server = TcpStream::connect(("127.0.0.1", upstream)).await?;
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        let up = async {
            let mut buf = [0u8; 8192];
            loop {
                self.heal().await;
                let n = cr.read(&mut buf).await?;
                self.heal().await;
                if n == 0 || self.mode() == Mode::Close as u8 {
                    return Ok::<(), std::io::Error>(());
                }
                sw.write_all(&buf[..n]).await?;
            }
        };
        let down = async {
            let mut buf = [0u8; 8192];
            let mut sent = 0usize;
            loop {
                self.heal().await;
                let n = sr.read(&mut buf).await?;
                self.heal().await;
                let mode = self.mode();
                if n == 0 || mode == Mode::Close as u8 {
                    return Ok::<(), std::io::Error>(());
                }
                if mode == Mode::Silent as u8 {
                    continue;
                }
                if mode == Mode::Truncate as u8 {
                    let cut = self.cut.load(Ordering::SeqCst);
                    let allowed = cut.saturating_sub(sent).min(n);
                    cw.write_all(&buf[..allowed]).await?;
                    sent += allowed;
                    if sent >= cut {
                        return Ok(());
                    }
                    continue;
                }
                cw.write_all(&buf[..n]).await?;
                sent += n;
            }
        };
        // Switching to Close ends live connections too, even idle ones.
        let closed = async {
            while self.mode() != Mode::Close as u8 {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        };
        // Either direction ending closes both sides.
        tokio::select! {
            r = up => r?,
            r = down => r?,
            () = closed => {}
        }
        Ok(())
    }
}
