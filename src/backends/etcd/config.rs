//! `etcd://[user:password@]h1:p1[,h2:p2,…][?options]`: parsing, and the client options.
//!
//! The `url` crate cannot parse a list of hosts, so the authority is split here; the
//! query is parsed as usual.

use crate::error::{Error, Result};
use crate::location::redact;
use std::time::Duration;

/// The key prefix unless `?prefix=` says otherwise.
pub const DEFAULT_PREFIX: &str = "dlock/";
/// The client port of etcd, for endpoints given without a port.
pub const DEFAULT_PORT: u16 = 2379;
/// How long connecting to an endpoint may take unless `?connect_timeout=` says otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one request may take unless `?command_timeout=` says otherwise. A leader
/// election takes about one election timeout (1 s by default); this leaves room for it.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// The query options an etcd URL takes.
pub const KNOWN_OPTIONS: &[&str] = &[
    "prefix",
    "connect_timeout",
    "command_timeout",
    "ca_file",
    "cert_file",
    "key_file",
    "domain",
];

/// A parsed `etcd://` URL.
#[derive(Clone)]
pub struct Config {
    /// `host:port` of every endpoint, in the order given.
    pub endpoints: Vec<String>,
    /// User and password for etcd's authentication, if given.
    pub credentials: Option<(String, String)>,
    /// Prepended to every etcd key (`?prefix=`, default `dlock/`).
    pub prefix: String,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    /// PEM file of the CA that signed the servers' certificates: turns TLS on.
    pub ca_file: Option<String>,
    /// PEM files of a client certificate and its key, for servers that ask for one.
    pub client_identity: Option<(String, String)>,
    /// The name to check the servers' certificates against, if not the endpoint's host.
    pub domain: Option<String>,
    /// The URL with the password replaced by `***`.
    pub describe: String,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("describe", &self.describe)
            .finish_non_exhaustive()
    }
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl Config {
    /// Parses `url`; errors never show the password.
    pub fn parse(url: &str) -> Result<Config> {
        let describe = redact(url);
        let bad = |reason: String| Error::BadUrl {
            url: describe.clone(),
            reason,
        };
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(bad("expected etcd://host:port[,host:port…]".into()));
        };
        if !scheme.eq_ignore_ascii_case("etcd") {
            return Err(bad(format!("expected the scheme etcd://, not {scheme}://")));
        }
        let rest = rest.split('#').next().unwrap_or("");
        let (before_query, query) = match rest.split_once('?') {
            Some((before, query)) => (before, Some(query)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.find('/') {
            Some(slash) => before_query.split_at(slash),
            None => (before_query, ""),
        };
        if !path.is_empty() && path != "/" {
            return Err(bad(format!(
                "an etcd URL has no path ({path:?}); choose the key prefix with ?prefix="
            )));
        }
        let (userinfo, hosts) = match authority.rfind('@') {
            Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
            None => (None, authority),
        };
        let credentials = match userinfo {
            None => None,
            Some(userinfo) => {
                let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                let user = percent_decode(user).ok_or_else(|| {
                    bad("the user name is not valid percent-encoded UTF-8".into())
                })?;
                let password = percent_decode(password)
                    .ok_or_else(|| bad("the password is not valid percent-encoded UTF-8".into()))?;
                if user.is_empty() {
                    return Err(bad(
                        "the user name is empty; write etcd://user:password@host:port".into(),
                    ));
                }
                Some((user, password))
            }
        };
        let mut endpoints = Vec::new();
        for host in hosts.split(',') {
            endpoints.push(endpoint(host).map_err(&bad)?);
        }
        let mut config = Config {
            endpoints,
            credentials,
            prefix: DEFAULT_PREFIX.to_owned(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            ca_file: None,
            client_identity: None,
            domain: None,
            describe: describe.trim_end_matches('/').to_owned(),
        };
        let mut cert_file = None;
        let mut key_file = None;
        for (name, value) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match name.as_ref() {
                "prefix" => config.prefix = value.into_owned(),
                "connect_timeout" | "command_timeout" => {
                    let duration = crate::parse_duration(&value)
                        .map_err(|err| bad(format!("option {name}: {err}")))?;
                    if duration.is_zero() {
                        return Err(bad(format!("option {name} must be above zero")));
                    }
                    if name == "connect_timeout" {
                        config.connect_timeout = duration;
                    } else {
                        config.command_timeout = duration;
                    }
                }
                "ca_file" => config.ca_file = Some(value.into_owned()),
                "cert_file" => cert_file = Some(value.into_owned()),
                "key_file" => key_file = Some(value.into_owned()),
                "domain" => config.domain = Some(value.into_owned()),
                other => {
                    return Err(bad(format!(
                        "unknown option {other:?}; known options: {}",
                        KNOWN_OPTIONS.join(", ")
                    )))
                }
            }
        }
        config.client_identity = match (cert_file, key_file) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => return Err(bad("cert_file and key_file go together".into())),
        };
        if config.ca_file.is_none() && (config.client_identity.is_some() || config.domain.is_some())
        {
            return Err(bad(
                "TLS needs ca_file (the CA that signed the servers' certificates)".into(),
            ));
        }
        Ok(config)
    }

    /// True if the endpoints speak TLS.
    pub fn tls(&self) -> bool {
        self.ca_file.is_some()
    }
}

/// `host:port` of one endpoint (`[v6]:port` for IPv6; the port defaults to 2379).
fn endpoint(text: &str) -> std::result::Result<String, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("an endpoint is empty; write etcd://host:port[,host:port…]".into());
    }
    let (host, port) = if let Some(v6) = text.strip_prefix('[') {
        let Some((host, after)) = v6.split_once(']') else {
            return Err(format!("endpoint {text:?}: unclosed [ of an IPv6 address"));
        };
        (format!("[{host}]"), after.strip_prefix(':'))
    } else {
        match text.rsplit_once(':') {
            Some((host, port)) => (host.to_owned(), Some(port)),
            None => (text.to_owned(), None),
        }
    };
    if host.is_empty() || host == "[]" {
        return Err(format!("endpoint {text:?} has no host"));
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("endpoint {text:?}: {port:?} is not a port number"))?,
    };
    Ok(format!("{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_credentials_and_options() {
        let config =
            Config::parse("etcd://app:s%40cret@a:1,b,[::1]:3/?prefix=x/&command_timeout=2s")
                .unwrap();
        assert_eq!(config.endpoints, ["a:1", "b:2379", "[::1]:3"]);
        assert_eq!(
            config.credentials,
            Some(("app".to_owned(), "s@cret".to_owned()))
        );
        assert_eq!(config.prefix, "x/");
        assert_eq!(config.command_timeout, Duration::from_secs(2));
        assert!(!config.describe.contains("cret"), "{}", config.describe);
        assert!(!config.tls());
    }

    #[test]
    fn bad_urls_are_bad_urls_without_password() {
        for url in [
            "etcd://u:pw@a:1/path",
            "etcd://u:pw@a:x",
            "etcd://u:pw@a:1,,b:2",
            "etcd://u:pw@a:1?nosuch=1",
            "etcd://u:pw@a:1?cert_file=c",
            "etcd://u:pw@a:1?cert_file=c&key_file=k",
            "etcd://:pw@a:1",
        ] {
            let err = Config::parse(url).unwrap_err();
            assert!(matches!(err, Error::BadUrl { .. }), "{url}: {err:?}");
            assert!(!err.to_string().contains("pw"), "{err}");
        }
    }
}
