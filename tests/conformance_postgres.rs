//! The conformance suite on `postgres://`, in both modes (session mode also with `sessions=shared`), against a private cluster.
#![cfg(feature = "postgres")]

use dlock_testkit::servers::postgres::Postgres;

mod session {
    use super::*;

    async fn target() -> dlock_testkit::Target {
        dlock_testkit::Target::new(Postgres::shared().url(""), env!("CARGO_BIN_EXE_dlock"))
    }

    dlock_testkit::conformance_tests!(target());
    dlock_testkit::conformance_kind_tests!(target());
}

mod lease {
    use super::*;

    async fn target() -> dlock_testkit::Target {
        dlock_testkit::Target::new(
            Postgres::shared().url("mode=lease"),
            env!("CARGO_BIN_EXE_dlock"),
        )
    }

    dlock_testkit::conformance_tests!(target());
    dlock_testkit::conformance_kind_tests!(target());
}

/// Session mode with exclusive leases sharing connections.
mod shared_sessions {
    use super::*;

    async fn target() -> dlock_testkit::Target {
        dlock_testkit::Target::new(
            Postgres::shared().url("sessions=shared"),
            env!("CARGO_BIN_EXE_dlock"),
        )
    }

    dlock_testkit::conformance_tests!(target());
    dlock_testkit::conformance_kind_tests!(target());
}
