//! dlock's fault-injection harness: client processes run a fenced read-modify-write
//! workload under dlock leases while nemeses kill, pause and skew clients and servers; a
//! checker counts, from the fenced store's history, overlapping critical sections,
//! out-of-order and stale writes, lost updates, silent lease losses and locks left held.
//!
//! `dlock-faults run --backend all --nemesis all --duration 10m --report docs/reliability.md`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod checker;
pub mod cluster;
pub mod nemesis;
pub mod proxy;
pub mod report;
pub mod run;
pub mod servers;
pub mod store;
pub mod tree;
pub mod worker;
