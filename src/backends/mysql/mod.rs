//! `mysql://`: locks in MySQL or MariaDB.

use crate::core::locks::Locks;
use crate::error::Result;
use crate::location::BackendUrl;

/// Opens a MySQL backend from its URL.
pub async fn open(url: &BackendUrl) -> Result<Locks> {
    Err(url.error("not yet"))
}
