//! Launchers for the real servers the backends talk to, started from the installed
//! binaries.

pub mod etcd;
pub mod mongodb;
pub mod mysql;
pub mod postgres;
pub mod pypi;
pub mod redis;
pub mod redis_cluster;
pub mod zookeeper;
