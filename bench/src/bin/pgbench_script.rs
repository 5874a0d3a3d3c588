//! Prints a pgbench script: `session` or `lease` runs the statements dlock sends for one
//! acquire and release in that mode (see `dlock_bench::pgbench`), `bare` a bare
//! advisory lock and unlock, `lease-minimal` the least SQL a lease costs, on a table of
//! its own that `lease-minimal --setup` creates and `lease-minimal --teardown` drops
//! (SQL to run with psql before and after pgbench). `--table NAME` for a table other
//! than the mode's default (session and lease).

use dlock_bench::pgbench;
use std::process::ExitCode;

const USAGE: &str = "usage: dlock-pgbench-script session|lease|bare [--table NAME]\n       \
                     dlock-pgbench-script lease-minimal [--setup|--teardown]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let fixed = match args.as_slice() {
        ["bare"] => Some(pgbench::BARE),
        ["lease-minimal"] => Some(pgbench::LEASE_MINIMAL),
        ["lease-minimal", "--setup"] => Some(pgbench::LEASE_MINIMAL_SETUP),
        ["lease-minimal", "--teardown"] => Some(pgbench::LEASE_MINIMAL_TEARDOWN),
        _ => None,
    };
    if let Some(sql) = fixed {
        print!("{sql}");
        return ExitCode::SUCCESS;
    }
    let (mode, table) = match args.as_slice() {
        [mode @ ("session" | "lease")] => (*mode, None),
        [mode @ ("session" | "lease"), "--table", table] => (*mode, Some(*table)),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut url = format!("postgres://postgres@127.0.0.1/postgres?mode={mode}");
    if let Some(table) = table {
        url.push_str(&format!("&table={table}"));
    }
    match pgbench::script(&url) {
        Ok(script) => {
            print!("{script}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("dlock-pgbench-script: {err}");
            ExitCode::from(2)
        }
    }
}
