//! A deploy starts three instances at once, and each runs the database migrations at
//! startup. They wait for the lock `migrations`; the first applies what is missing and
//! records the version, the others then find the schema current and go on.
//!
//! `cargo run --example migration_at_deploy [-- --backend URL]` (default: a temporary file backend).

use std::sync::{Arc, Mutex};
use std::time::Duration;

const MIGRATIONS: [&str; 3] = ["001_create_users", "002_add_email", "003_index_email"];

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (url, _dir) = backend()?;
    let locks = fencelock::connect(&url).await?;
    let applied = Arc::new(Mutex::new(Vec::<&str>::new())); // the schema's version table
    let mut instances = Vec::new();
    for instance in ["instance-a", "instance-b", "instance-c"] {
        let (locks, applied) = (locks.clone(), Arc::clone(&applied));
        instances.push(tokio::spawn(async move {
            let lease = locks
                .lock("migrations")
                .wait_for(Duration::from_secs(30))
                .acquire()
                .await?;
            let done = applied.lock().map_err(|_| "poisoned")?.len();
            if done == MIGRATIONS.len() {
                println!("{instance}: schema is current, starting");
            }
            for migration in &MIGRATIONS[done..] {
                tokio::time::sleep(Duration::from_millis(50)).await; // the DDL
                applied.lock().map_err(|_| "poisoned")?.push(migration);
                println!("{instance}: applied {migration} (fence {})", lease.fence());
            }
            lease.release().await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        }));
    }
    for instance in instances {
        instance.await?.map_err(|e| e.to_string())?;
    }
    let applied = applied.lock().map_err(|_| "poisoned")?.clone();
    println!("applied once each: {}", applied.join(", "));
    assert_eq!(applied, MIGRATIONS);
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
