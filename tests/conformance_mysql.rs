//! The conformance suite on `mysql://`, in both modes (session mode also with `sessions=shared`), against a private MariaDB server.
#![cfg(feature = "mysql")]

use dlock_testkit::servers::mysql::Mysql;

mod session {
    use super::*;

    async fn target() -> dlock_testkit::Target {
        dlock_testkit::Target::new(Mysql::shared().url(""), env!("CARGO_BIN_EXE_dlock"))
    }

    dlock_testkit::conformance_tests!(target());
}

mod lease {
    use super::*;

    async fn target() -> dlock_testkit::Target {
        dlock_testkit::Target::new(
            Mysql::shared().url("mode=lease"),
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
            Mysql::shared().url("sessions=shared"),
            env!("CARGO_BIN_EXE_dlock"),
        )
    }

    dlock_testkit::conformance_tests!(target());
}
