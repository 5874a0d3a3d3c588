//! The conformance suite on `file://`.

use std::path::Path;
use std::sync::OnceLock;

/// One lock directory for the whole test binary, removed when it exits.
fn dir() -> &'static Path {
    static DIR: OnceLock<&'static Path> = OnceLock::new();
    DIR.get_or_init(|| dlock_testkit::process::temp_dir_until_exit("dlock-conformance-"))
}

async fn target() -> dlock_testkit::Target {
    let url = format!("file://{}", dir().display());
    dlock_testkit::Target::new(url, env!("CARGO_BIN_EXE_dlock"))
}

dlock_testkit::conformance_tests!(target());
dlock_testkit::conformance_kind_tests!(target());
