//! mysql_async doing the least a lock costs on MySQL/MariaDB, in the two ways dlock's
//! `mysql://` backend locks:
//!
//! * session (dlock's default mode): `SELECT GET_LOCK(?, 0)` and `SELECT RELEASE_LOCK(?)`
//!   on one pool connection, which the lock keeps from acquire to release (a user-level
//!   lock belongs to the connection that took it);
//! * lease (`?mode=lease`): one `INSERT … ON DUPLICATE KEY UPDATE` that takes the key's
//!   row only if it has expired, and an owner-checked `DELETE`, on a three-column InnoDB
//!   table this client creates for its run and drops at its end.
//!
//! Both use prepared statements on pooled connections over TCP, as dlock does; the pool
//! does not reset a connection it gets back (a reset is a round trip dlock does not pay).

use super::{bounded, owner_token, Token};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder, Pool, PoolOpts};
use std::time::Duration;

#[derive(Clone)]
pub struct Mysql {
    pool: Pool,
    /// The lease table (lease mode), else `None` (session mode).
    table: Option<String>,
}

impl Mysql {
    /// dlock's `mysql://user:password@host:port/db[?mode=lease]`; other options are ignored.
    pub async fn connect(url: &str) -> Result<Mysql, String> {
        let parsed = url::Url::parse(url).map_err(|err| format!("{url}: {err}"))?;
        let lease = parsed
            .query_pairs()
            .any(|(name, value)| name == "mode" && value == "lease");
        let mut plain = parsed.clone();
        plain.set_query(None);
        let opts = Opts::from_url(plain.as_str()).map_err(|err| err.to_string())?;
        let opts = OptsBuilder::from_opts(opts)
            // mysql_async would switch to the server's Unix socket; dlock stays on TCP.
            .prefer_socket(false)
            .pool_opts(PoolOpts::default().with_reset_connection(false));
        let pool = Pool::new(opts);
        let table = if lease {
            let table = format!("dlock_bench_raw_leases_{}", std::process::id());
            create_table(&pool, &table).await?;
            Some(table)
        } else {
            None
        };
        Ok(Mysql { pool, table })
    }

    pub fn describe(&self) -> &'static str {
        match self.table {
            None => "mysql_async GET_LOCK (raw)",
            Some(_) => "mysql_async lease SQL (raw)",
        }
    }

    pub async fn acquire(&self, key: &str, ttl: Duration) -> Result<Option<Token>, String> {
        let mut conn = bounded("get a pool connection", self.pool.get_conn()).await?;
        let Some(table) = &self.table else {
            let got: Option<Option<i64>> =
                bounded("GET_LOCK", conn.exec_first("SELECT GET_LOCK(?, 0)", (key,))).await?;
            // The connection goes with the lock: only it can release it.
            return Ok((got.flatten() == Some(1)).then(|| Token::MysqlSession(Box::new(conn))));
        };
        let owner = owner_token();
        let micros = u64::try_from(ttl.as_micros()).unwrap_or(u64::MAX);
        // Assignments run left to right: expires_at goes last so both read the old expiry.
        let claim = format!(
            "INSERT INTO {table} (k, owner, expires_at) VALUES (?, ?, UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND) \
             ON DUPLICATE KEY UPDATE owner = IF(expires_at <= UTC_TIMESTAMP(6), VALUES(owner), owner), \
             expires_at = IF(expires_at <= UTC_TIMESTAMP(6), VALUES(expires_at), expires_at)"
        );
        bounded(
            "INSERT … ON DUPLICATE KEY UPDATE",
            conn.exec_drop(claim, (key, owner.as_str(), micros)),
        )
        .await?;
        // 1: inserted, 2: an expired row taken over, 0: the row was left as it was (held).
        Ok((conn.affected_rows() > 0).then_some(Token::Owner(owner)))
    }

    pub async fn release_session(&self, key: &str, mut conn: Conn) -> Result<bool, String> {
        let released: Option<Option<i64>> = bounded(
            "RELEASE_LOCK",
            conn.exec_first("SELECT RELEASE_LOCK(?)", (key,)),
        )
        .await?;
        Ok(released.flatten() == Some(1))
    }

    pub async fn release_lease(&self, key: &str, owner: &str) -> Result<bool, String> {
        let Some(table) = &self.table else {
            return Err("a lease token in session mode".to_owned());
        };
        let mut conn = bounded("get a pool connection", self.pool.get_conn()).await?;
        let delete = format!("DELETE FROM {table} WHERE k = ? AND owner = ?");
        bounded("DELETE", conn.exec_drop(delete, (key, owner))).await?;
        Ok(conn.affected_rows() == 1)
    }

    /// Drops the lease table and closes the pool's connections.
    pub async fn finish(&self) -> Result<(), String> {
        if let Some(table) = &self.table {
            let mut conn = bounded("get a pool connection", self.pool.get_conn()).await?;
            bounded("DROP TABLE", conn.query_drop(format!("DROP TABLE {table}"))).await?;
        }
        bounded("close the pool", self.pool.clone().disconnect()).await
    }
}

async fn create_table(pool: &Pool, table: &str) -> Result<(), String> {
    let mut conn = bounded("connect to MySQL", pool.get_conn()).await?;
    let create = format!(
        "CREATE TABLE IF NOT EXISTS {table} (k VARBINARY(255) PRIMARY KEY, owner VARCHAR(64) NOT NULL, \
         expires_at DATETIME(6) NOT NULL) ENGINE=InnoDB"
    );
    bounded("CREATE TABLE", conn.query_drop(create)).await
}
