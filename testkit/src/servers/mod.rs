//! Launchers for the real servers the backends talk to, started from the installed
//! binaries.

pub mod dynamodb;
pub mod etcd;
pub mod mongodb;
pub mod mysql;
pub mod postgres;
pub mod redis;
pub mod zookeeper;
