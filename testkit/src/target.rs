//! A backend under test: how to open a fresh handle on it, and (for backends named by a
//! URL) its URL and the `dlock` binary, for the behaviours that need other processes.

use fencelock::backend::Backend;
use fencelock::Locks;
use std::any::Any;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

type Connect = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Locks> + Send>> + Send + Sync>;

/// A backend under test.
#[derive(Clone)]
pub struct Target {
    connect: Connect,
    url: Option<String>,
    cli: Option<PathBuf>,
    _keep: Vec<Arc<dyn Any + Send + Sync>>,
}

impl Target {
    /// A target for `url`; `cli` is the `dlock` binary (`env!("CARGO_BIN_EXE_dlock")`).
    pub fn new(url: impl Into<String>, cli: impl Into<PathBuf>) -> Self {
        let url = url.into();
        let for_connect = url.clone();
        let connect: Connect = Arc::new(move || {
            let url = for_connect.clone();
            Box::pin(async move {
                match fencelock::connect(&url).await {
                    Ok(locks) => locks,
                    Err(err) => panic!("cannot connect to the backend under test: {err}"),
                }
            })
        });
        Target {
            connect,
            url: Some(url),
            cli: Some(cli.into()),
            _keep: Vec::new(),
        }
    }

    /// A target for a backend that is not named by a URL (one written outside dlock):
    /// `open` makes a fresh backend on the same store each time it is called, as a new
    /// process would. The behaviours that start other processes need a URL and the
    /// `dlock` binary, and fail with a message saying so on such a target.
    pub fn from_backend<B, F>(open: F) -> Self
    where
        B: Backend,
        F: Fn() -> B + Send + Sync + 'static,
    {
        let open = Arc::new(open);
        let connect: Connect = Arc::new(move || {
            let open = Arc::clone(&open);
            Box::pin(async move { Locks::from_backend(open()) })
        });
        Target {
            connect,
            url: None,
            cli: None,
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
        match &self.url {
            Some(url) => url,
            None => panic!(
                "this behaviour runs `dlock` in other processes and needs a backend URL: build the target with Target::new"
            ),
        }
    }

    /// True if the target can be run by the `dlock` binary (it has a URL).
    pub fn has_cli(&self) -> bool {
        self.url.is_some() && self.cli.is_some()
    }

    /// The `dlock` binary.
    pub fn cli(&self) -> &PathBuf {
        match &self.cli {
            Some(cli) => cli,
            None => panic!(
                "this behaviour runs the `dlock` binary and needs it: build the target with Target::new"
            ),
        }
    }

    /// A fresh client handle, as a new process would have.
    pub async fn locks(&self) -> Locks {
        (self.connect)().await
    }

    /// A key no other test uses, so tests can share one server.
    pub fn unique_key(&self, name: &str) -> String {
        format!("{name}-{:016x}", rand::random::<u64>())
    }
}
