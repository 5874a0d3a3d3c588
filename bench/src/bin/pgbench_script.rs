//! Prints a pgbench script: `session` or `lease` runs the statements dlock sends for one
//! acquire and release in that mode (see `dlock_bench::pgbench`), `bare` a bare
//! advisory lock and unlock. `--table NAME` for a table other than the mode's default.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, table) = match args.as_slice() {
        [mode] => (mode.as_str(), None),
        [mode, flag, table] if flag == "--table" => (mode.as_str(), Some(table.as_str())),
        _ => {
            eprintln!("usage: dlock-pgbench-script session|lease|bare [--table NAME]");
            return ExitCode::from(2);
        }
    };
    if mode == "bare" {
        print!("{}", dlock_bench::pgbench::BARE);
        return ExitCode::SUCCESS;
    }
    let mut url = format!("postgres://postgres@127.0.0.1/postgres?mode={mode}");
    if let Some(table) = table {
        url.push_str(&format!("&table={table}"));
    }
    match dlock_bench::pgbench::script(&url) {
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
