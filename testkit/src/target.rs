//! A backend under test: its URL, the `dlock` binary, and whatever keeps its server alive.

use dlock::Locks;
use std::any::Any;
use std::path::PathBuf;
use std::sync::Arc;

/// A backend under test.
#[derive(Clone)]
pub struct Target {
    url: String,
    cli: PathBuf,
    _keep: Vec<Arc<dyn Any + Send + Sync>>,
}

impl Target {
    /// A target for `url`; `cli` is the `dlock` binary (`env!("CARGO_BIN_EXE_dlock")`).
    pub fn new(url: impl Into<String>, cli: impl Into<PathBuf>) -> Self {
        Target {
            url: url.into(),
            cli: cli.into(),
            _keep: Vec::new(),
        }
    }

    /// Keeps `thing` (a server, a temporary directory) alive as long as the target.
    pub fn keeping(mut self, thing: Arc<dyn Any + Send + Sync>) -> Self {
        self._keep.push(thing);
        self
    }

    /// The backend URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The `dlock` binary.
    pub fn cli(&self) -> &PathBuf {
        &self.cli
    }

    /// A fresh client handle, as a new process would have.
    pub async fn locks(&self) -> Locks {
        match dlock::connect(&self.url).await {
            Ok(locks) => locks,
            Err(err) => panic!("cannot connect to the backend under test: {err}"),
        }
    }

    /// A key no other test uses, so tests can share one server.
    pub fn unique_key(&self, name: &str) -> String {
        format!("{name}-{:016x}", rand::random::<u64>())
    }
}
