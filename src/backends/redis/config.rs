//! URL options shared by `redis://`, `rediss://` and `redlock://`, and the redis-rs
//! client of one node.

use crate::error::{Error, Result};
use std::time::Duration;
use url::Url;

/// The key prefix unless `?prefix=` says otherwise (SPEC §3).
pub const DEFAULT_PREFIX: &str = "dlock:";
/// How long connecting to a node may take unless `?connect_timeout=` says otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one command may take unless `?command_timeout=` says otherwise.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// The query options every Redis URL takes.
pub const KNOWN_OPTIONS: &[&str] = &["prefix", "connect_timeout", "command_timeout", "ca_file"];

/// Options read from the query string of a Redis URL.
#[derive(Debug, Clone)]
pub struct Options {
    /// Prepended to every lock key (`?prefix=`, default `dlock:`).
    pub prefix: String,
    /// Timeout of one connection attempt (`?connect_timeout=`, default 5 s).
    pub connect_timeout: Duration,
    /// Timeout of one command (`?command_timeout=`, default 2 s).
    pub command_timeout: Duration,
    /// PEM file of the CA that signed the server's certificate, for `rediss://` servers
    /// whose certificate the system's trust store does not know (`?ca_file=`).
    pub ca_file: Option<String>,
}

impl Options {
    /// Reads the options from `url`; `redacted` names the URL in errors.
    pub fn parse(url: &Url, redacted: &str) -> Result<Options> {
        let bad = |reason: String| Error::BadUrl {
            url: redacted.to_owned(),
            reason,
        };
        let mut options = Options {
            prefix: DEFAULT_PREFIX.to_owned(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            ca_file: None,
        };
        for (name, value) in url.query_pairs() {
            match name.as_ref() {
                "prefix" => options.prefix = value.into_owned(),
                "connect_timeout" | "command_timeout" => {
                    let duration = crate::parse_duration(&value)
                        .map_err(|err| bad(format!("option {name}: {err}")))?;
                    if duration.is_zero() {
                        return Err(bad(format!("option {name} must be above zero")));
                    }
                    if name == "connect_timeout" {
                        options.connect_timeout = duration;
                    } else {
                        options.command_timeout = duration;
                    }
                }
                "ca_file" => options.ca_file = Some(value.into_owned()),
                other => {
                    return Err(bad(format!(
                        "unknown option {other:?}; known options: {}",
                        KNOWN_OPTIONS.join(", ")
                    )))
                }
            }
        }
        Ok(options)
    }
}

/// Everything needed to connect to one Redis node (`C = redis::Client`) or to one Redis
/// Cluster (`C = redis::cluster::ClusterClient`).
#[derive(Clone)]
pub struct NodeConfig<C = redis::Client> {
    /// The redis-rs client (holds the password; never printed).
    pub client: C,
    /// `redis://[user:***@]host:port/db`, for messages.
    pub describe: String,
    /// Timeouts and prefix.
    pub options: Options,
}

impl<C> std::fmt::Debug for NodeConfig<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeConfig")
            .field("describe", &self.describe)
            .finish_non_exhaustive()
    }
}

impl NodeConfig {
    /// A node from a `redis://` or `rediss://` URL whose query holds the options.
    /// `redacted` names the URL as the user gave it, for errors.
    pub fn from_url(url: &Url, redacted: &str, options: &Options) -> Result<NodeConfig> {
        let bad = |reason: String| Error::BadUrl {
            url: redacted.to_owned(),
            reason,
        };
        let tls = match url.scheme() {
            "redis" => false,
            "rediss" => true,
            other => return Err(bad(format!("not a Redis URL scheme: {other}"))),
        };
        if url.host_str().is_none_or(str::is_empty) {
            return Err(bad(
                "the URL names no host; expected redis://host:6379".to_owned()
            ));
        }
        let db = match url.path().trim_matches('/') {
            "" => 0,
            text => text.parse::<u16>().map_err(|_| {
                bad(format!(
                    "the path must be a database number like /0, not /{text}"
                ))
            })?,
        };
        // A clean URL for redis-rs: no query options (they are ours), no fragment.
        let mut clean = url.clone();
        clean.set_query(None);
        clean.set_fragment(None);
        clean.set_path(&format!("/{db}"));
        let text = clean.to_string();
        if tls {
            // rustls needs a process-wide crypto provider; another part of the program
            // may have installed one already, which is fine.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = match (&options.ca_file, tls) {
            (Some(path), true) => {
                let pem = std::fs::read(path)
                    .map_err(|err| bad(format!("cannot read ca_file {path:?}: {err}")))?;
                redis::Client::build_with_tls(
                    text.as_str(),
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                )
            }
            (Some(_), false) => {
                return Err(bad("option ca_file needs a rediss:// (TLS) URL".to_owned()))
            }
            (None, _) => redis::Client::open(text.as_str()),
        }
        .map_err(|err| {
            bad(format!(
                "redis client rejected the URL: {}",
                err.kind_text()
            ))
        })?;
        let mut shown = clean;
        shown.set_query(None);
        let describe = crate::redact(shown.as_str());
        Ok(NodeConfig {
            client,
            describe,
            options: options.clone(),
        })
    }
}

/// Splits a multi-host URL, `SCHEME://[user:password@]h1:p1,h2:p2[/db][?options]`, into
/// one single-node URL per host (`NODE_SCHEME://[user:password@]host[/db][?options]`,
/// the same credentials and options for all), in the order given. `scheme` is the prefix
/// the caller has already recognized (case-insensitively), `example` a correct URL for
/// the message when the host list is malformed, and `redacted` names the URL in errors.
pub fn split_hosts(
    text: &str,
    scheme: &str,
    node_scheme: &str,
    example: &str,
    redacted: &str,
) -> Result<Vec<Url>> {
    let bad = |reason: String| Error::BadUrl {
        url: redacted.to_owned(),
        reason,
    };
    let rest = text
        .get(scheme.len()..)
        .filter(|_| {
            text.get(..scheme.len())
                .is_some_and(|s| s.eq_ignore_ascii_case(scheme))
        })
        .ok_or_else(|| bad(format!("not a {scheme} URL")))?;
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (format!("{userinfo}@"), hosts),
        None => (String::new(), authority),
    };
    let hosts: Vec<&str> = hosts.split(',').map(str::trim).collect();
    if hosts.iter().any(|h| h.is_empty()) {
        return Err(bad(format!(
            "expected a comma-separated list of host:port, e.g. {example}"
        )));
    }
    let unique: std::collections::BTreeSet<&str> = hosts.iter().copied().collect();
    if unique.len() != hosts.len() {
        return Err(bad("a node is listed twice".to_owned()));
    }
    hosts
        .iter()
        .map(|host| {
            Url::parse(&format!("{node_scheme}://{userinfo}{host}{tail}"))
                .map_err(|err| bad(format!("node {host:?}: {err}")))
        })
        .collect()
}

/// The text of a redis-rs error without anything that could echo a URL.
pub(super) trait KindText {
    fn kind_text(&self) -> String;
}

impl KindText for redis::RedisError {
    fn kind_text(&self) -> String {
        let detail = self.detail().unwrap_or("");
        crate::redact(&format!("{:?}: {detail}", self.kind()))
    }
}
