//! The conformance suite on `file://`.

use std::sync::{Arc, OnceLock};

fn dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("dlock-conformance-")
            .tempdir()
            .unwrap()
    })
}

async fn target() -> dlock_testkit::Target {
    let url = format!("file://{}", dir().path().display());
    dlock_testkit::Target::new(url, env!("CARGO_BIN_EXE_dlock")).keeping(Arc::new(()))
}

dlock_testkit::conformance_tests!(target());
dlock_testkit::conformance_kind_tests!(target());
