//! Two workers upload the same email group's member list; their batches must not
//! interleave, or the provider ends up with a mix of both runs. Each upload runs under
//! the lock `upload:<group>`: the second worker waits until the first is done.
//!
//! `cargo run --example email_upload [-- --backend URL]` (default: a temporary file backend).

use std::sync::{Arc, Mutex};
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (url, _dir) = backend()?;
    let locks = fencelock::connect(&url).await?;
    let provider = Arc::new(Mutex::new(Vec::<String>::new())); // what the provider received
    let mut workers = Vec::new();
    for worker in ["worker-a", "worker-b"] {
        let (locks, provider) = (locks.clone(), Arc::clone(&provider));
        workers.push(tokio::spawn(async move {
            let lease = locks.lock("upload:newsletter").acquire().await?;
            println!("{worker}: uploading (fence {})", lease.fence());
            for batch in 1..=3 {
                tokio::time::sleep(Duration::from_millis(50)).await; // one API call
                provider
                    .lock()
                    .map_err(|_| "poisoned")?
                    .push(format!("{worker}#{batch}"));
            }
            lease.release().await?;
            println!("{worker}: done");
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        }));
    }
    for worker in workers {
        worker.await?.map_err(|e| e.to_string())?;
    }
    let received = provider.lock().map_err(|_| "poisoned")?.clone();
    println!("the provider received: {}", received.join(" "));
    // Each worker's three batches arrived together, never interleaved.
    let interleaved = received.chunks(3).any(|run| {
        let first = run[0].split('#').next();
        run.iter().any(|b| b.split('#').next() != first)
    });
    assert!(!interleaved, "batches interleaved");
    Ok(())
}

/// `--backend URL`, or a file backend in a temporary directory removed at exit.
fn backend() -> std::io::Result<(String, Option<tempfile::TempDir>)> {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--backend" {
            if let Some(url) = args.next() {
                return Ok((url, None));
            }
        }
    }
    let dir = tempfile::tempdir()?;
    Ok((format!("file://{}", dir.path().display()), Some(dir)))
}
