//! The conformance suite on `memory://`.

async fn target() -> dlock_testkit::Target {
    dlock_testkit::Target::new("memory://conformance", env!("CARGO_BIN_EXE_dlock"))
}

dlock_testkit::conformance_tests!(target());
dlock_testkit::conformance_kind_tests!(target());
