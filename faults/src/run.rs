//! One run: a backend, a nemesis, a set of workers, a fenced store, for a while; then the
//! checker's counts and the after-run checks (locks left held, panics, hung workers).

use crate::checker::{check_workload, Counts};
use crate::cluster::{Backend, Kind};
use crate::nemesis::{self, Nemesis};
use crate::store::{Event, Store};
use crate::worker::{self, WorkerConfig, Workload};
use rand::Rng;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How to run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Concurrent workers.
    pub workers: usize,
    /// Lease TTL.
    pub ttl: Duration,
    /// Sleep between read and write in a critical section.
    pub work: Duration,
    /// How long the workload runs.
    pub duration: Duration,
    /// Mean time between faults (each at a random time around it).
    pub fault_every: Duration,
    /// The `dlock-fault-worker` binary.
    pub worker_bin: PathBuf,
    /// Where worker logs go (one directory per run inside it).
    pub log_dir: PathBuf,
    /// The `dlock` command (the `dlock-faults-cli` binary), for the process-tree nemesis.
    pub dlock_bin: Option<PathBuf>,
    /// Which leases the workers take.
    pub workload: Workload,
}

/// The outcome of one run.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// Backend name.
    pub backend: String,
    /// The nemesis.
    pub nemesis: Nemesis,
    /// How long the workload ran.
    pub duration: Duration,
    /// The checker's counts (a)–(e).
    pub counts: Counts,
    /// (f) 1 if the key was still held after every worker exited (and its TTL passed),
    /// and on a TTL store no new acquirer got it within that bound either.
    pub left_held: u64,
    /// Worker panics (exit status 101 or "panicked" in a log, or a panicked task).
    pub panics: u64,
    /// Workers that did not exit by themselves after the run and had to be killed.
    pub hung: u64,
    /// Worker incarnations started.
    pub incarnations: u64,
    /// dlock errors reported by workers (typed errors under faults are expected).
    pub worker_errors: u64,
    /// Whether the README allows overlap here.
    pub overlap_allowed: bool,
    /// Hostile-directory nemesis: a file outside the lock directory written or created
    /// through a planted entry, or a planted entry that worked as a lock.
    pub hostile_breaches: u64,
    /// Process-tree nemesis: a process of `dlock run`'s tree alive, or its heartbeat
    /// growing, once its lease was lost and `--kill-after` (plus a margin) passed.
    pub tree_breaches: u64,
    /// Where the logs are.
    pub logs: PathBuf,
    /// The workload that ran.
    pub workload: Workload,
}

impl RunResult {
    /// The acceptance-1 failures of this run, as sentences; empty when it passed.
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        let c = &self.counts;
        let what = format!("{} / {}", self.backend, self.nemesis.name());
        if c.out_of_order > 0 {
            out.push(format!(
                "{what}: {} writes accepted out of fence order",
                c.out_of_order
            ));
        }
        if c.lost_updates > 0 {
            out.push(format!(
                "{what}: {} lost updates of accepted writes",
                c.lost_updates
            ));
        }
        if self.left_held > 0 {
            out.push(format!("{what}: the lock was left held after the run"));
        }
        if self.panics > 0 {
            out.push(format!(
                "{what}: {} worker panics (logs in {})",
                self.panics,
                self.logs.display()
            ));
        }
        if self.hung > 0 {
            out.push(format!(
                "{what}: {} workers hung and were killed",
                self.hung
            ));
        }
        // A holder told that its lease lapsed before its successor began is the lease
        // model at work wherever overlap is otherwise promised away: a machine too loaded
        // to renew in time pauses the holder as surely as SIGSTOP does.
        let unannounced = c.overlaps - c.after_lapse.min(c.overlaps);
        if unannounced > 0 && !self.overlap_allowed {
            out.push(format!(
                "{what}: {unannounced} overlapping critical sections where the README promises none \
                 (the stale holder had not been told its lease lapsed when its successor began)"
            ));
        }
        if self.hostile_breaches > 0 {
            out.push(format!(
                "{what}: {} planted entries were followed outside the lock directory or used as locks",
                self.hostile_breaches
            ));
        }
        if self.tree_breaches > 0 {
            out.push(format!(
                "{what}: {} times dlock run's process tree ran on after its lease was lost (see tree-breaches.txt in {})",
                self.tree_breaches,
                self.logs.display()
            ));
        }
        if self.workload.holders() > 1 {
            if c.sections == 0 {
                out.push(format!(
                    "{what}: no permit was granted: the workload made no progress"
                ));
            }
        } else if c.accepted_writes == 0 {
            out.push(format!(
                "{what}: no write was accepted: the workload made no progress"
            ));
        }
        out
    }
}

enum Handle {
    Process(Child),
    Task(tokio::task::JoinHandle<std::io::Result<worker::WorkerStats>>),
}

struct Worker {
    client: u32,
    handle: Handle,
    log: PathBuf,
    clock: Option<PathBuf>,
    proxies: Vec<crate::proxy::Proxy>,
    paused: bool,
}

/// A fault in progress, undone at `until`.
enum Active {
    PausedClient(u32),
    PausedServer(Vec<u32>),
    Clock(PathBuf),
    Partitioned(Vec<crate::proxy::Proxy>),
    Slowed(Vec<crate::proxy::Proxy>),
    Frozen(Vec<crate::proxy::Proxy>),
    /// The degrade sequence, at `step` (1 slow, 2 frozen, 3 cut off).
    Degrading(Vec<crate::proxy::Proxy>, u8),
    /// A burst of force-releases, running beside the drive loop (a force-release may wait
    /// on the server, and the loop must keep reaping workers meanwhile).
    ForceBurst(tokio::task::JoinHandle<()>),
    Planted(Vec<PathBuf>),
    /// A `dlock run` incarnation lost its lease (force-released, or dlock SIGKILLed): its
    /// tree must be gone by `until`.
    TreeLost(u32, Instant),
}

struct Runner<'a> {
    backend: &'a Backend,
    nemesis: Nemesis,
    config: &'a RunConfig,
    store: Store,
    key: String,
    dir: PathBuf,
    deadline: Instant,
    workers: Vec<Worker>,
    next_client: u32,
    panics: u64,
    hung: u64,
    worker_errors: u64,
    /// The harness's own connection to the backend (for force-release), made when needed.
    admin: Option<fencelock::Locks>,
    /// A force-release burst still running when the run ended.
    burst: Option<tokio::task::JoinHandle<()>>,
    hostile: Option<nemesis::Hostile>,
    hostile_breaches: u64,
    tree: Option<crate::tree::Tree>,
}

/// Runs `nemesis` against `backend` and checks the history.
pub async fn run(
    backend: &Backend,
    nemesis: Nemesis,
    config: &RunConfig,
) -> std::io::Result<RunResult> {
    let store = Store::start().await?;
    let dir = config
        .log_dir
        .join(format!("{}-{}", sanitize(&backend.name), nemesis.name()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let started = Instant::now();
    let mut runner = Runner {
        backend,
        nemesis,
        config,
        store: store.clone(),
        key: format!("faults-{}-{:08x}", nemesis.name(), rand::random::<u32>()),
        dir: dir.clone(),
        deadline: started + config.duration,
        workers: Vec::new(),
        next_client: 1,
        panics: 0,
        hung: 0,
        worker_errors: 0,
        admin: None,
        burst: None,
        hostile: None,
        hostile_breaches: 0,
        tree: None,
    };
    if nemesis == Nemesis::ProcessTree {
        let bin = config.dlock_bin.clone().filter(|b| b.is_file()).ok_or_else(|| {
            std::io::Error::other(
                "the process-tree nemesis needs the dlock command: build it with `cargo build -p dlock-faults --bin dlock-faults-cli` (or pass --dlock-bin)",
            )
        })?;
        let mut tree = crate::tree::Tree::new(bin, &backend.url, dir.clone(), config.ttl);
        tree.tick(true)?;
        runner.tree = Some(tree);
    }
    for _ in 0..config.workers {
        runner.spawn_worker().await?;
    }
    runner.drive(nemesis).await?;
    let duration = started.elapsed();
    if let Some(tree) = &mut runner.tree {
        tree.stop().await;
    }
    runner.finish().await;
    if let Some(mut burst) = runner.burst.take() {
        let limit = config.ttl * 4 + Duration::from_secs(2);
        if tokio::time::timeout(limit, &mut burst).await.is_err() {
            burst.abort();
        }
    }
    if runner.hostile.as_ref().is_some_and(|h| !h.intact()) {
        runner.hostile_breaches += 1;
    }
    let left_held = runner.left_held().await;
    let history = store.history();
    let lines: Vec<String> = history.iter().map(|e| format!("{e:?}")).collect();
    let _ = std::fs::write(dir.join("history.txt"), lines.join("\n"));
    let counts = check_workload(&history, store.value(), config.workload);
    Ok(RunResult {
        backend: match config.workload {
            Workload::Mutex => backend.name.clone(),
            other => format!("{} ({})", backend.name, other.name()),
        },
        workload: config.workload,
        nemesis,
        duration,
        counts,
        left_held,
        panics: runner.panics,
        hung: runner.hung,
        incarnations: u64::from(runner.next_client - 1),
        worker_errors: runner.worker_errors,
        overlap_allowed: backend.overlap_possible(nemesis),
        hostile_breaches: runner.hostile_breaches,
        tree_breaches: runner.tree.as_ref().map_or(0, |t| t.breaches.len() as u64),
        logs: dir,
    })
}

fn lost(incarnation: u32, until: Instant) -> (Active, Instant) {
    (Active::TreeLost(incarnation, until), until)
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// How often the drive loop looks whether a force-release burst is over.
const BURST_POLL: Duration = Duration::from_millis(50);

fn fmt_dur(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

impl Runner<'_> {
    async fn spawn_worker(&mut self) -> std::io::Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left < Duration::from_millis(300) {
            return Ok(());
        }
        let client = self.next_client;
        self.next_client += 1;
        let log = self.dir.join(format!("worker-{client}.log"));
        let config = WorkerConfig {
            client,
            key: self.key.clone(),
            ttl: self.config.ttl,
            work: self.config.work,
            store: self.store.addr().to_string(),
            run_for: left,
            workload: self.config.workload,
        };
        if self.backend.kind == Kind::Memory {
            let url = self.backend.url.clone();
            let task = tokio::spawn(async move {
                let locks = fencelock::connect(&url)
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                worker::run(locks, config).await
            });
            self.workers.push(Worker {
                client,
                handle: Handle::Task(task),
                log,
                clock: None,
                proxies: Vec::new(),
                paused: false,
            });
            return Ok(());
        }
        let mut url = self.backend.url.clone();
        let mut proxies = Vec::new();
        if let (Some(via), true) = (&self.backend.via, self.nemesis.uses_proxies()) {
            let mut ports = Vec::new();
            for &port in &via.ports {
                let proxy = crate::proxy::Proxy::start(port).await?;
                ports.push(proxy.port());
                proxies.push(proxy);
            }
            url = (via.url)(&ports);
        }
        let mut command = Command::new(&self.config.worker_bin);
        command
            .arg("--url")
            .arg(&url)
            .args(["--key", &config.key, "--store", &config.store])
            .args(["--client", &client.to_string()])
            .args([
                "--ttl",
                &fmt_dur(config.ttl),
                "--work",
                &fmt_dur(config.work),
            ])
            .args(["--run-for", &fmt_dur(config.run_for)])
            .args(["--workload", &config.workload.name()])
            .stdin(Stdio::null());
        let file = std::fs::File::create(&log)?;
        command.stdout(file.try_clone()?).stderr(file);
        let mut clock = None;
        let clock_nemesis = matches!(self.nemesis, Nemesis::Clock | Nemesis::Mixed);
        if let (Some(lib), true) = (
            nemesis::libfaketime(),
            clock_nemesis && self.backend.applicable(Nemesis::Clock).is_ok(),
        ) {
            let offset_file = self.dir.join(format!("clock-{client}"));
            nemesis::set_clock_offset(&offset_file, 0.0)?;
            command
                .env("LD_PRELOAD", lib)
                .env("FAKETIME_TIMESTAMP_FILE", &offset_file)
                .env("FAKETIME_NO_CACHE", "1")
                .env("FAKETIME_DONT_RESET", "1");
            clock = Some(offset_file);
        }
        let child = dlock_testkit::process::spawn_tied(command)?;
        self.workers.push(Worker {
            client,
            handle: Handle::Process(child),
            log,
            clock,
            proxies,
            paused: false,
        });
        Ok(())
    }

    /// Reaps workers that ended; replaces them while the run lasts.
    async fn reap(&mut self, replace: bool) -> std::io::Result<()> {
        let mut i = 0;
        while i < self.workers.len() {
            let done = match &mut self.workers[i].handle {
                Handle::Process(child) => {
                    child.try_wait()?.map(|status| status.code() == Some(101))
                }
                Handle::Task(task) if task.is_finished() => {
                    Some(matches!(task.await, Err(e) if e.is_panic()))
                }
                Handle::Task(_) => None,
            };
            match done {
                Some(panicked) => {
                    let worker = self.workers.remove(i);
                    self.store.record(|t| Event::Exited {
                        t,
                        client: worker.client,
                    });
                    let log = std::fs::read_to_string(&worker.log).unwrap_or_default();
                    if panicked || log.contains("panicked at") {
                        self.panics += 1;
                    }
                    self.worker_errors += log.matches("dlock error").count() as u64;
                    if replace {
                        self.spawn_worker().await?;
                    }
                }
                None => i += 1,
            }
        }
        Ok(())
    }

    fn pick_worker(&self) -> Option<usize> {
        let live: Vec<usize> = (0..self.workers.len())
            .filter(|&i| !self.workers[i].paused)
            .collect();
        if live.is_empty() {
            None
        } else {
            Some(live[rand::rng().random_range(0..live.len())])
        }
    }

    fn choose(&self, nemesis: Nemesis) -> Nemesis {
        if nemesis != Nemesis::Mixed {
            return nemesis;
        }
        let options: Vec<Nemesis> = nemesis::ALL
            .iter()
            .copied()
            .filter(|n| n.in_mix() && self.backend.applicable(*n).is_ok())
            .collect();
        options[rand::rng().random_range(0..options.len())]
    }

    /// A live worker with proxies of its own, and a copy of them.
    fn pick_proxies(&self) -> Option<(u32, Vec<crate::proxy::Proxy>)> {
        let worker = &self.workers[self.pick_worker()?];
        if worker.proxies.is_empty() {
            return None;
        }
        Some((worker.client, worker.proxies.clone()))
    }

    /// The harness's own connection to the backend, made at first use.
    async fn admin(&mut self) -> Option<fencelock::Locks> {
        if self.admin.is_none() {
            let until = Instant::now() + self.config.ttl * 4 + Duration::from_secs(2);
            match connect_retrying(&self.backend.url, until).await {
                Ok(locks) => self.admin = Some(locks),
                Err(err) => self
                    .store
                    .fault(format!("force-release: cannot connect: {err}")),
            }
        }
        self.admin.clone()
    }

    fn next_fault_at(&self) -> Instant {
        let mean = self.config.fault_every.as_secs_f64();
        Instant::now() + Duration::from_secs_f64(rand::rng().random_range(mean * 0.5..mean * 1.5))
    }

    /// Injects one fault; returns what to undo, and when.
    async fn inject(&mut self, nemesis: Nemesis) -> std::io::Result<Option<(Active, Instant)>> {
        let ttl = self.config.ttl;
        match self.choose(nemesis) {
            Nemesis::KillClient => {
                let Some(i) = self.pick_worker() else {
                    return Ok(None);
                };
                let worker = self.workers.remove(i);
                // The kill is recorded just before the signal (or the abort): a lock the
                // victim held may be free a microsecond after it, and a request it sent
                // just before may still reach the store afterwards (the checker places
                // such a section at the kill).
                self.store.record(|t| Event::Killed {
                    t,
                    client: worker.client,
                });
                match worker.handle {
                    Handle::Process(mut child) => {
                        nemesis::signal(child.id(), libc::SIGKILL);
                        let _ = tokio::task::spawn_blocking(move || child.wait()).await;
                    }
                    Handle::Task(task) => {
                        task.abort();
                        let _ = task.await;
                    }
                }
                self.store
                    .fault(format!("SIGKILL client {}", worker.client));
                self.spawn_worker().await?;
                Ok(None)
            }
            Nemesis::PauseClient => {
                let Some(i) = self.pick_worker() else {
                    return Ok(None);
                };
                let Handle::Process(child) = &self.workers[i].handle else {
                    return Ok(None);
                };
                nemesis::signal(child.id(), libc::SIGSTOP);
                self.workers[i].paused = true;
                let client = self.workers[i].client;
                self.store.fault(format!("SIGSTOP client {client}"));
                Ok(Some((
                    Active::PausedClient(client),
                    Instant::now() + nemesis::pause_length(ttl),
                )))
            }
            Nemesis::KillServer => {
                let servers = &self.backend.servers;
                let server = Arc::clone(&servers[rand::rng().random_range(0..servers.len())]);
                self.store
                    .fault(format!("SIGKILL+restart {}", server.name()));
                tokio::task::spawn_blocking(move || server.kill_and_restart())
                    .await
                    .map_err(|e| std::io::Error::other(format!("server restart failed: {e}")))?;
                Ok(None)
            }
            Nemesis::PauseServer => {
                let servers = &self.backend.servers;
                let server = &servers[rand::rng().random_range(0..servers.len())];
                let Some(pid) = server.pid() else {
                    return Ok(None);
                };
                let pids = nemesis::process_tree(pid);
                for &pid in &pids {
                    nemesis::signal(pid, libc::SIGSTOP);
                }
                self.store.fault(format!("SIGSTOP {}", server.name()));
                Ok(Some((
                    Active::PausedServer(pids),
                    Instant::now() + nemesis::pause_length(ttl),
                )))
            }
            Nemesis::Clock => {
                let Some(i) = self.pick_worker() else {
                    return Ok(None);
                };
                let Some(file) = self.workers[i].clock.clone() else {
                    return Ok(None);
                };
                let jump = nemesis::clock_jump(ttl).as_secs_f64();
                let forward = rand::rng().random_bool(0.5);
                let offset = if forward { jump } else { -jump };
                nemesis::set_clock_offset(&file, offset)?;
                self.store.fault(format!(
                    "clock of client {} {} by {jump:.1}s and back",
                    self.workers[i].client,
                    if forward { "forward" } else { "back" }
                ));
                Ok(Some((
                    Active::Clock(file),
                    Instant::now() + nemesis::pause_length(ttl),
                )))
            }
            Nemesis::Partition => {
                let Some(i) = self.pick_worker() else {
                    return Ok(None);
                };
                let proxies = self.workers[i].proxies.clone();
                if proxies.is_empty() {
                    return Ok(None);
                }
                for proxy in &proxies {
                    proxy.set(crate::proxy::Mode::Partition, 0);
                }
                self.store.fault(format!(
                    "partition client {} from the server(s)",
                    self.workers[i].client
                ));
                Ok(Some((
                    Active::Partitioned(proxies),
                    Instant::now() + nemesis::pause_length(ttl),
                )))
            }
            Nemesis::Slow => {
                let Some((client, proxies)) = self.pick_proxies() else {
                    return Ok(None);
                };
                for proxy in &proxies {
                    proxy.set_latency(Some(nemesis::latency()));
                }
                self.store
                    .fault(format!("slow network for client {client}"));
                Ok(Some((
                    Active::Slowed(proxies),
                    Instant::now() + nemesis::pause_length(ttl),
                )))
            }
            Nemesis::Freeze => {
                let Some((client, proxies)) = self.pick_proxies() else {
                    return Ok(None);
                };
                for proxy in &proxies {
                    proxy.set(crate::proxy::Mode::Freeze, 0);
                }
                let length = nemesis::freeze_length(ttl);
                self.store.fault(format!(
                    "freeze connections of client {client} for {}ms",
                    length.as_millis()
                ));
                Ok(Some((Active::Frozen(proxies), Instant::now() + length)))
            }
            Nemesis::Degrade => {
                let Some((client, proxies)) = self.pick_proxies() else {
                    return Ok(None);
                };
                for proxy in &proxies {
                    proxy.set_latency(Some(nemesis::latency()));
                }
                self.store
                    .fault(format!("degrade the network of client {client}: slow"));
                Ok(Some((Active::Degrading(proxies, 1), Instant::now() + ttl)))
            }
            Nemesis::ForceRelease => {
                let Some(locks) = self.admin().await else {
                    return Ok(None);
                };
                let (store, key) = (self.store.clone(), self.key.clone());
                let limit = ttl * 4 + Duration::from_secs(2);
                let count = rand::rng().random_range(2..=5);
                let burst = tokio::spawn(async move {
                    for i in 0..count {
                        if i > 0 {
                            let gap = Duration::from_millis(rand::rng().random_range(10..150));
                            tokio::time::sleep(gap).await;
                        }
                        let what =
                            match tokio::time::timeout(limit, locks.force_release(&key)).await {
                                Ok(Ok(true)) => "force-release (was held)".to_owned(),
                                Ok(Ok(false)) => "force-release (was free)".to_owned(),
                                Ok(Err(err)) => format!("force-release failed: {err}"),
                                Err(_) => "force-release timed out".to_owned(),
                            };
                        store.fault(what);
                    }
                });
                Ok(Some((
                    Active::ForceBurst(burst),
                    Instant::now() + BURST_POLL,
                )))
            }
            Nemesis::HostileDir => self.plant().await,
            Nemesis::ProcessTree => self.break_tree().await,
            Nemesis::None | Nemesis::Mixed => Ok(None),
        }
    }

    /// Breaks the running `dlock run`: SIGKILLs dlock, or force-releases its key (in turn).
    /// The tree must then be gone within `--kill-after` (after the SIGKILL; dlock's
    /// watchdog acts at once) or the TTL plus `--kill-after` (after the force-release,
    /// which dlock learns at its next renewal).
    async fn break_tree(&mut self) -> std::io::Result<Option<(Active, Instant)>> {
        let Some(tree) = &mut self.tree else {
            return Ok(None);
        };
        let Some((i, fence)) = tree.running() else {
            return Ok(None);
        };
        let promised = if tree.next_is_kill() {
            self.store
                .fault(format!("process tree {i} (fence {fence}): SIGKILL dlock"));
            tree.kill().await;
            crate::tree::KILL_AFTER
        } else {
            let (key, ttl) = (tree.key().to_owned(), tree.ttl());
            let Some(locks) = self.admin().await else {
                return Ok(None);
            };
            let limit = ttl * 4 + Duration::from_secs(2);
            let at = Instant::now();
            let (broken, what) = match tokio::time::timeout(limit, locks.force_release(&key)).await
            {
                Ok(Ok(true)) => (true, "force-release its key".to_owned()),
                Ok(Ok(false)) => (false, "force-release its key (was free)".to_owned()),
                Ok(Err(err)) => (false, format!("force-release of its key failed: {err}")),
                Err(_) => (false, "force-release of its key timed out".to_owned()),
            };
            self.store
                .fault(format!("process tree {i} (fence {fence}): {what}"));
            if !broken {
                return Ok(None);
            }
            // Counted from the request: the lease may be broken from the moment it left.
            return Ok(Some(lost(
                i,
                at + ttl + crate::tree::KILL_AFTER + crate::tree::MARGIN,
            )));
        };
        Ok(Some(lost(
            i,
            Instant::now() + promised + crate::tree::MARGIN,
        )))
    }

    /// Plants a link, FIFO or hard link in the lock directory: in place of the workers'
    /// key's fence file (the workers then get errors until it is removed, and their fences
    /// continue from the lock record), or as another key's lock file, which the harness
    /// then tries to lock, inspect and force-release: each must fail or do nothing.
    async fn plant(&mut self) -> std::io::Result<Option<(Active, Instant)>> {
        use nemesis::Plant;
        let Some(lock_dir) = self.backend.url.strip_prefix("file://").map(PathBuf::from) else {
            return Ok(None);
        };
        if self.hostile.is_none() {
            self.hostile = Some(nemesis::Hostile::new(&self.dir)?);
        }
        let Some(hostile) = &self.hostile else {
            return Ok(None);
        };
        let kinds = [Plant::Link, Plant::Dangling, Plant::Fifo, Plant::HardLink];
        let mut planted = Vec::new();
        let mut probes = Vec::new();
        // One plant in place of the workers' fence file, two as other keys' lock files.
        for own_key in [true, false, false] {
            let what = kinds[rand::rng().random_range(0..kinds.len())];
            let (key, name) = if own_key {
                (self.key.clone(), format!("{}.fence", self.key))
            } else {
                let key = format!("hostile-{:08x}", rand::random::<u32>());
                let name = format!("{key}.lock");
                (key, name)
            };
            let at = lock_dir.join(&name);
            // A hard link across file systems is impossible: that one is not planted.
            if hostile.plant(what, &at).is_err() {
                continue;
            }
            self.store.fault(format!("planted {what:?} as {name}"));
            planted.push(at);
            if !own_key {
                probes.push(key);
            }
        }
        for key in probes {
            self.hostile_breaches += probe(&self.backend.url, &key).await;
        }
        if planted.is_empty() {
            return Ok(None);
        }
        Ok(Some((
            Active::Planted(planted),
            Instant::now() + self.config.ttl,
        )))
    }

    /// Ends a fault, or moves a sequence of faults to its next step (returned with when it
    /// ends). With `ending`, the run is over: sequences stop and everything heals at once.
    async fn undo(&mut self, active: Active, ending: bool) -> Option<(Active, Instant)> {
        let ttl = self.config.ttl;
        match active {
            Active::Degrading(proxies, step) if !ending && step < 3 => {
                let (mode, what, length) = if step == 1 {
                    (
                        crate::proxy::Mode::Freeze,
                        "frozen",
                        nemesis::freeze_length(ttl),
                    )
                } else {
                    (
                        crate::proxy::Mode::Partition,
                        "cut off",
                        nemesis::pause_length(ttl),
                    )
                };
                for proxy in &proxies {
                    proxy.set(mode, 0);
                }
                self.store.fault(format!("degrade: {what}"));
                return Some((
                    Active::Degrading(proxies, step + 1),
                    Instant::now() + length,
                ));
            }
            Active::ForceBurst(burst) if !ending && !burst.is_finished() => {
                return Some((Active::ForceBurst(burst), Instant::now() + BURST_POLL));
            }
            // A force-release still waiting on the server when the run ends settles after
            // the workers have exited, so that what it did is in the history.
            Active::ForceBurst(burst) => self.burst = Some(burst),
            Active::Slowed(proxies) | Active::Frozen(proxies) | Active::Degrading(proxies, _) => {
                for proxy in proxies {
                    proxy.set_latency(None);
                    proxy.set(crate::proxy::Mode::Pass, 0);
                }
            }
            Active::PausedClient(client) => {
                if let Some(worker) = self.workers.iter_mut().find(|w| w.client == client) {
                    if let Handle::Process(child) = &worker.handle {
                        nemesis::signal(child.id(), libc::SIGCONT);
                    }
                    worker.paused = false;
                }
            }
            Active::PausedServer(pids) => {
                for pid in pids {
                    nemesis::signal(pid, libc::SIGCONT);
                }
            }
            Active::Clock(file) => {
                let _ = nemesis::set_clock_offset(&file, 0.0);
            }
            Active::Partitioned(proxies) => {
                for proxy in proxies {
                    proxy.set(crate::proxy::Mode::Pass, 0);
                }
            }
            Active::TreeLost(i, until) => {
                // At the end of the run the check still waits for the promised moment.
                tokio::time::sleep_until(until.into()).await;
                if let Some(tree) = &mut self.tree {
                    tree.check(i).await;
                }
            }
            Active::Planted(planted) => {
                for at in planted {
                    let _ = std::fs::remove_file(&at);
                }
                if self.hostile.as_ref().is_some_and(|h| !h.intact()) {
                    self.hostile_breaches += 1;
                }
            }
        }
        None
    }

    /// The run proper: reap and replace workers, inject faults at random times.
    async fn drive(&mut self, nemesis: Nemesis) -> std::io::Result<()> {
        let mut next_fault = self.next_fault_at();
        let mut active: Option<(Active, Instant)> = None;
        while Instant::now() < self.deadline {
            self.reap(true).await?;
            let respawn = self.deadline.saturating_duration_since(Instant::now())
                > Duration::from_millis(300);
            if let Some(tree) = &mut self.tree {
                tree.tick(respawn)?;
            }
            let now = Instant::now();
            if let Some((_, until)) = &active {
                if now >= *until {
                    if let Some((what, _)) = active.take() {
                        active = self.undo(what, false).await;
                    }
                    next_fault = self.next_fault_at();
                }
            } else if nemesis != Nemesis::None && now >= next_fault {
                active = self.inject(nemesis).await?;
                next_fault = self.next_fault_at();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Some((what, _)) = active.take() {
            self.undo(what, true).await;
        }
        Ok(())
    }

    /// Waits for every worker to finish by itself; kills those that do not (hung).
    async fn finish(&mut self) {
        let grace = self.config.ttl * 8 + Duration::from_secs(10);
        let until = Instant::now() + grace;
        while !self.workers.is_empty() && Instant::now() < until {
            if self.reap(false).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for worker in std::mem::take(&mut self.workers) {
            self.hung += 1;
            match worker.handle {
                Handle::Process(mut child) => {
                    nemesis::signal(child.id(), libc::SIGKILL);
                    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
                }
                Handle::Task(task) => task.abort(),
            }
            self.store.record(|t| Event::Killed {
                t,
                client: worker.client,
            });
        }
    }

    /// (f): is the key still held once every worker is gone? Session and flock backends
    /// must be free at once (a short grace for the server to notice); TTL backends within
    /// the TTL.
    async fn left_held(&self) -> u64 {
        let grace = match self.backend.kind {
            Kind::Ttl => self.config.ttl.max(self.backend.ttl_floor) * 2 + Duration::from_secs(1),
            _ => Duration::from_secs(2),
        };
        let until = Instant::now() + grace;
        // A server killed by the last fault may still be recovering (PostgreSQL replays
        // its WAL): a store that cannot answer yet is asked again, for a while, rather
        // than counted as holding the lock. Only an answer "held" after the grace counts.
        let answer_until = until + Duration::from_secs(20);
        let Ok(locks) = connect_retrying(&self.backend.url, answer_until).await else {
            return 1;
        };
        loop {
            let now = Instant::now();
            match locks.status(&self.key).await {
                Ok(None) => return 0,
                Ok(Some(_)) if now >= until => break,
                Err(_) if now >= answer_until => return 1,
                Ok(Some(_)) | Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Still shown as held: a store without a server clock (DynamoDB) drops a dead
        // holder's entry only when a waiter has watched it unrenewed for a lease. What
        // counts for users is whether a new acquirer gets the key within the bound, so
        // one is asked to, with the workload's own kind.
        if self.backend.kind != Kind::Ttl {
            return 1;
        }
        let builder = match self.config.workload {
            Workload::Semaphore { permits } => locks.semaphore(&self.key, permits),
            Workload::Mutex | Workload::ReadWrite => locks.lock(&self.key),
        }
        .ttl(self.config.ttl);
        match tokio::time::timeout(
            grace + Duration::from_secs(5),
            builder.wait_for(grace).acquire(),
        )
        .await
        {
            Ok(Ok(lease)) => {
                let _ = lease.release().await;
                0
            }
            Ok(Err(_)) | Err(_) => 1,
        }
    }
}

/// Tries to lock, inspect and force-release `key`, whose lock file is a planted entry:
/// 1 if dlock took it as a lock, else 0 (errors are the expected answers).
async fn probe(url: &str, key: &str) -> u64 {
    let limit = Duration::from_secs(10);
    let Ok(Ok(locks)) = tokio::time::timeout(limit, fencelock::connect(url)).await else {
        return 0;
    };
    let mut breaches = 0;
    let attempt = locks.lock(key).no_wait().try_acquire();
    if let Ok(Ok(Some(lease))) = tokio::time::timeout(limit, attempt).await {
        breaches += 1;
        let _ = lease.release().await;
    }
    let _ = tokio::time::timeout(limit, locks.status(key)).await;
    let _ = tokio::time::timeout(limit, locks.list()).await;
    if let Ok(Ok(true)) = tokio::time::timeout(limit, locks.force_release(key)).await {
        breaches += 1;
    }
    breaches
}

async fn connect_retrying(url: &str, until: Instant) -> fencelock::Result<fencelock::Locks> {
    loop {
        match fencelock::connect(url).await {
            Ok(locks) => return Ok(locks),
            Err(err) if Instant::now() >= until => return Err(err),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The default log directory.
pub fn default_log_dir() -> PathBuf {
    std::env::temp_dir().join(format!("dlock-faults-{}", std::process::id()))
}

/// Finds `dlock-fault-worker` next to the running executable (or its parent directory,
/// for test binaries in `target/*/deps`).
pub fn find_worker_bin(hint: Option<&Path>) -> Option<PathBuf> {
    find_bin("dlock-fault-worker", hint)
}

/// Finds the `dlock` command built by this package (`dlock-faults-cli`) as
/// [`find_worker_bin`] finds the worker.
pub fn find_dlock_bin(hint: Option<&Path>) -> Option<PathBuf> {
    find_bin("dlock-faults-cli", hint)
}

fn find_bin(name: &str, hint: Option<&Path>) -> Option<PathBuf> {
    if let Some(hint) = hint {
        return Some(hint.to_path_buf());
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join(name), dir.parent()?.join(name)]
        .into_iter()
        .find(|p| p.is_file())
}
