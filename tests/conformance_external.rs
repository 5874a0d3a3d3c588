//! The conformance suite on a backend that is not named by a URL, as a backend written
//! outside dlock would run it: here the memory store behind the call-counting wrapper.

use fencelock::backend::BackendUrl;
use fencelock::backends::counting::Counting;
use fencelock::backends::memory::MemoryBackend;
use std::sync::Arc;

async fn target() -> dlock_testkit::Target {
    let store = format!("memory://external{:x}", rand_suffix());
    dlock_testkit::Target::from_backend(move || {
        let url = BackendUrl::parse(&store).expect("a memory URL");
        let inner = MemoryBackend::open(&url).expect("the memory backend opens");
        Counting::new(Arc::new(inner))
    })
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

dlock_testkit::conformance_tests!(target());
