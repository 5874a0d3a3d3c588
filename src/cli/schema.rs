//! `dlock schema`: the SQL of a database backend's tables, for administrators.

use super::exit;
use std::process::ExitCode;

pub fn print(backend: Option<String>) -> ExitCode {
    let Some(url) = backend.filter(|url| !url.is_empty()) else {
        exit::report(
            "dlock schema needs a PostgreSQL or MySQL URL: --backend postgres://… or mysql://… \
             (or DLOCK_BACKEND); the file backend has no schema (see dlock schema --help)",
        );
        return ExitCode::from(exit::USAGE);
    };
    match fencelock::schema_sql(&url) {
        Ok(Some(sql)) => {
            print!("{sql}");
            ExitCode::SUCCESS
        }
        Ok(None) => {
            println!(
                "-- {} needs no schema",
                super::exit::printable(&fencelock::redact(&url))
            );
            ExitCode::SUCCESS
        }
        Err(err) => exit::fail(&err),
    }
}
