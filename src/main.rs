//! The `dlock` command: flock(1) for a fleet.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
