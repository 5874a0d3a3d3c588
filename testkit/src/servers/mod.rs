//! Launchers for the real servers the backends talk to.

pub mod redis;
