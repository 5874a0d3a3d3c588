//! Private database servers for tests, started from the installed binaries.

pub mod mysql;
pub mod postgres;
