//! The fenced resource: a tiny line-protocol TCP server on 127.0.0.1 inside the harness
//! process. It holds one counter, rejects any read or write whose fence is lower than the
//! highest fence it has seen, and records every operation (and the workers' critical
//! section begin/end events) with a timestamp from one clock: the harness's `Instant`.
//!
//! Protocol, one request per line, one answer per line:
//!
//! ```text
//! B <client> <section> <fence> [<reader>] -> OK           critical section begins; reader
//!                                                          = 1 for a shared lease
//! R <client> <section> <fence>            -> V <value>     read (registers the fence)
//!                                         -> S <highest>   stale: rejected
//! Q <client> <section> <fence>            -> V <value>     a reader's read: rejected only
//!                                         -> S <highest>   below a writer's fence
//! W <client> <section> <fence> <value>    -> A             write accepted
//!                                         -> S <highest>   stale: rejected
//! E <client> <section> <fence> <lost> [<lapsed_us>]
//!                                         -> OK            section ends; lost = 1 if the
//!                                                          lease's lost() had fired;
//!                                                          lapsed_us: when lost() fired
//!                                                          because the holder could not
//!                                                          renew in time, that many µs
//!                                                          after the worker sent B
//! X <client> <section> <fence> <held>     -> OK            the lease was released; held =
//!                                                          1 if release() said it was
//!                                                          still held, 0 if it said it
//!                                                          was lost, 2 if it failed
//! ```
//!
//! Reads are fenced too: a read with fence F raises the highest fence seen to F, so a
//! stale holder that read before a newer holder and writes after it is rejected, and
//! read-modify-write by the fenced holders loses no update. A reader's read (`Q`) is
//! checked against writers' fences only, since readers share the key, and raises the
//! floor that writers' operations are checked against: a writer's fence exceeds every
//! earlier reader's, so a stale writer cannot write under a newer reader.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// One recorded event, stamped with the harness clock (time since the store started).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A worker entered its critical section holding `fence`.
    Begin {
        /// Harness time.
        t: Duration,
        /// Worker incarnation.
        client: u32,
        /// Section number within that worker.
        section: u64,
        /// The lease's fence.
        fence: u64,
        /// A reader's (shared) lease.
        reader: bool,
    },
    /// A worker left its critical section.
    End {
        /// Harness time.
        t: Duration,
        /// Worker incarnation.
        client: u32,
        /// Section number within that worker.
        section: u64,
        /// The lease's fence.
        fence: u64,
        /// Whether the lease's `lost()` had fired by then.
        lost: bool,
        /// When `lost()` fired because the holder could not renew in time (the lease may
        /// have expired, or renewals kept failing): this long after the worker sent its
        /// Begin. The worker measures it on its own clock, so adding it to the Begin's
        /// harness time gives a moment no earlier than the real one.
        lapsed_after: Option<Duration>,
    },
    /// A worker released the lease of a section (after its End).
    Released {
        /// Harness time.
        t: Duration,
        /// Worker incarnation.
        client: u32,
        /// Section number within that worker.
        section: u64,
        /// The lease's fence.
        fence: u64,
        /// What `release()` answered: `Some(true)` still held, `Some(false)` already lost
        /// (the holder learned it was overtaken), `None` an error or a timeout.
        held: Option<bool>,
    },
    /// A fenced read.
    Read {
        /// Harness time.
        t: Duration,
        /// Worker incarnation.
        client: u32,
        /// The reader's fence.
        fence: u64,
        /// The value returned, or `None` when the read was rejected as stale.
        value: Option<u64>,
    },
    /// A fenced write.
    Write {
        /// Harness time.
        t: Duration,
        /// Worker incarnation.
        client: u32,
        /// The writer's fence.
        fence: u64,
        /// The value written.
        value: u64,
        /// Accepted, or rejected as stale.
        accepted: bool,
    },
    /// The harness SIGKILLed (or aborted) a worker: its open section ends here.
    Killed {
        /// Harness time.
        t: Duration,
        /// Worker incarnation.
        client: u32,
    },
    /// A worker exited (normally or not): any open section ends here.
    Exited {
        /// Harness time.
        t: Duration,
        /// Worker incarnation.
        client: u32,
    },
    /// A fault was injected.
    Fault {
        /// Harness time.
        t: Duration,
        /// What was done.
        what: String,
    },
}

#[derive(Debug, Default)]
struct State {
    value: u64,
    /// The highest fence of a writer's read or write.
    highest: u64,
    /// The highest fence of any read or write, readers' included.
    highest_any: u64,
    history: Vec<Event>,
}

/// The fenced store, shared between its server task and the harness.
#[derive(Clone)]
pub struct Store {
    base: Instant,
    state: Arc<Mutex<State>>,
    addr: std::net::SocketAddr,
}

impl Store {
    /// Starts the store on a free loopback port.
    pub async fn start() -> std::io::Result<Store> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let store = Store {
            base: Instant::now(),
            state: Arc::new(Mutex::new(State::default())),
            addr: listener.local_addr()?,
        };
        let server = store.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let store = server.clone();
                tokio::spawn(async move {
                    let _ = store.serve(stream).await;
                });
            }
        });
        Ok(store)
    }

    /// Where workers connect.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Harness time now.
    pub fn now(&self) -> Duration {
        self.base.elapsed()
    }

    fn with<T>(&self, f: impl FnOnce(&mut State, Duration) -> T) -> T {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let t = self.base.elapsed();
        f(&mut state, t)
    }

    /// Records an event from the harness (kills, exits, faults).
    pub fn record(&self, make: impl FnOnce(Duration) -> Event) {
        self.with(|state, t| state.history.push(make(t)));
    }

    /// Records that the harness injected a fault.
    pub fn fault(&self, what: impl Into<String>) {
        let what = what.into();
        self.record(|t| Event::Fault { t, what });
    }

    /// The history so far.
    pub fn history(&self) -> Vec<Event> {
        self.with(|state, _| state.history.clone())
    }

    /// The counter's current value.
    pub fn value(&self) -> u64 {
        self.with(|state, _| state.value)
    }

    /// Handles one request line; returns the answer line.
    pub fn handle(&self, line: &str) -> String {
        let parts: Vec<&str> = line.split_ascii_whitespace().collect();
        let num = |i: usize| parts.get(i).and_then(|p| p.parse::<u64>().ok());
        let (Some(client), Some(section), Some(fence)) = (num(1), num(2), num(3)) else {
            return "ERR bad request".into();
        };
        let client = client as u32;
        self.with(|state, t| match parts[0] {
            "B" => {
                state.history.push(Event::Begin {
                    t,
                    client,
                    section,
                    fence,
                    reader: num(4) == Some(1),
                });
                "OK".into()
            }
            "E" => {
                state.history.push(Event::End {
                    t,
                    client,
                    section,
                    fence,
                    lost: num(4) == Some(1),
                    lapsed_after: num(5).map(Duration::from_micros),
                });
                "OK".into()
            }
            "X" => {
                state.history.push(Event::Released {
                    t,
                    client,
                    section,
                    fence,
                    held: match num(4) {
                        Some(1) => Some(true),
                        Some(0) => Some(false),
                        _ => None,
                    },
                });
                "OK".into()
            }
            "R" | "Q" => {
                let reader = parts[0] == "Q";
                let floor = if reader {
                    state.highest
                } else {
                    state.highest_any
                };
                if fence < floor {
                    state.history.push(Event::Read {
                        t,
                        client,
                        fence,
                        value: None,
                    });
                    format!("S {floor}")
                } else {
                    if !reader {
                        state.highest = fence;
                    }
                    state.highest_any = state.highest_any.max(fence);
                    state.history.push(Event::Read {
                        t,
                        client,
                        fence,
                        value: Some(state.value),
                    });
                    format!("V {}", state.value)
                }
            }
            "W" => {
                let Some(value) = num(4) else {
                    return "ERR bad write".into();
                };
                let accepted = fence >= state.highest_any;
                if accepted {
                    state.highest = fence;
                    state.highest_any = fence;
                    state.value = value;
                }
                state.history.push(Event::Write {
                    t,
                    client,
                    fence,
                    value,
                    accepted,
                });
                if accepted {
                    "A".into()
                } else {
                    format!("S {}", state.highest_any)
                }
            }
            _ => "ERR unknown request".into(),
        })
    }

    async fn serve(&self, stream: TcpStream) -> std::io::Result<()> {
        stream.set_nodelay(true)?;
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        while let Some(line) = lines.next_line().await? {
            let mut answer = self.handle(&line);
            answer.push('\n');
            write.write_all(answer.as_bytes()).await?;
        }
        Ok(())
    }
}

/// A worker's connection to the store.
pub struct StoreClient {
    lines: tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
    write: tokio::net::tcp::OwnedWriteHalf,
}

impl StoreClient {
    /// Connects to the store at `addr`.
    pub async fn connect(addr: &str) -> std::io::Result<StoreClient> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (read, write) = stream.into_split();
        Ok(StoreClient {
            lines: BufReader::new(read).lines(),
            write,
        })
    }

    /// Sends one request and returns the answer.
    pub async fn call(&mut self, request: &str) -> std::io::Result<String> {
        self.write
            .write_all(format!("{request}\n").as_bytes())
            .await?;
        self.lines
            .next_line()
            .await?
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "store closed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readers_are_fenced_against_writers_only() {
        let store = Store::start().await.unwrap();
        assert_eq!(store.handle("R 1 1 3"), "V 0");
        assert_eq!(store.handle("W 1 1 3 1"), "A");
        // Two readers read in either fence order: they share the key.
        assert_eq!(store.handle("Q 2 1 6"), "V 1");
        assert_eq!(store.handle("Q 3 1 5"), "V 1");
        // A reader older than the last writer is stale.
        assert_eq!(store.handle("Q 4 1 2"), "S 3");
        // A writer older than a reader that read is stale, reading or writing.
        assert_eq!(store.handle("R 5 1 4"), "S 6");
        assert_eq!(store.handle("W 5 1 4 2"), "S 6");
        assert_eq!(store.handle("R 6 1 7"), "V 1");
        assert_eq!(store.handle("W 6 1 7 2"), "A");
        assert_eq!(store.handle("Q 7 1 6"), "S 7");
    }
}
