//! `dlock schema`: the SQL of a database backend's tables, for administrators.

use super::exit;
use std::process::ExitCode;

pub fn print(backend: Option<String>) -> ExitCode {
    let url = match backend.map_or_else(fencelock::default_url, Ok) {
        Ok(url) => url,
        Err(err) => return exit::fail(&err),
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
