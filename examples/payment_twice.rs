//! A customer clicks "Pay" twice: two requests for the same order arrive at once, maybe
//! on two servers. Each takes the lock `payment:<order>` without waiting; the second
//! finds it taken and answers "already in progress" instead of charging again, and the
//! ledger accepts a charge only with a fence newer than any it has seen.
//!
//! `cargo run --example payment_twice [-- --backend URL]` (default: a temporary file backend).

use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The protected store: it remembers the highest fence it accepted per order.
#[derive(Default)]
struct Ledger {
    charges: Vec<(String, u64)>,
    highest_fence: u64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (url, _dir) = backend()?;
    let locks = fencelock::connect(&url).await?;
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut clicks = Vec::new();
    for click in ["click 1", "click 2"] {
        let (locks, ledger) = (locks.clone(), Arc::clone(&ledger));
        clicks.push(tokio::spawn(async move {
            let Some(lease) = locks.lock("payment:order-1042").try_acquire().await? else {
                println!("{click}: payment already in progress, not charging again");
                return Ok(());
            };
            // Only one request gets here; it checks the order is unpaid, then charges.
            let paid = !ledger.lock().map_err(|_| "poisoned")?.charges.is_empty();
            if !paid {
                tokio::time::sleep(Duration::from_millis(100)).await; // the card network
                let mut ledger = ledger.lock().map_err(|_| "poisoned")?;
                if lease.fence() > ledger.highest_fence {
                    ledger.highest_fence = lease.fence();
                    ledger
                        .charges
                        .push(("order-1042".to_owned(), lease.fence()));
                    println!("{click}: charged order-1042 (fence {})", lease.fence());
                }
            }
            lease.release().await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        }));
    }
    for click in clicks {
        click.await?.map_err(|e| e.to_string())?;
    }
    let charges = ledger.lock().map_err(|_| "poisoned")?.charges.len();
    println!("charges for order-1042: {charges}");
    assert_eq!(charges, 1, "the order was charged {charges} times");
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
