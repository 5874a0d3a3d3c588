//! Backend URLs (SPEC §3): parsing, the default location, and redaction of passwords.

use crate::error::{Error, Result};
use std::path::PathBuf;
use url::Url;

/// The environment variable naming the backend URL when `--backend` is not given.
pub const BACKEND_ENV: &str = "DLOCK_BACKEND";
/// The environment variable naming the default file backend's directory.
pub const DIR_ENV: &str = "DLOCK_DIR";

/// Hides every credential in a backend URL: the password of the userinfo
/// (`user:***@`) and the value of every credential-bearing query option (`password`,
/// `sslpassword`, `token`, `secret`, `auth`, `api_key`, `aws_secret_access_key`, … and
/// any option whose name contains "password", "secret" or "token", in any case). Works
/// on URLs the `url` crate cannot parse and on multi-host URLs like `redlock://a:1,b:2`,
/// and never by searching for the secret's text, so a password that also occurs in a
/// host name leaves the host alone. Used for every message.
///
/// ```
/// assert_eq!(fencelock::redact("redis://app:s3cret@db:6379/0"), "redis://app:***@db:6379/0");
/// assert_eq!(
///     fencelock::redact("postgres://db/app?sslmode=require&Password=x"),
///     "postgres://db/app?sslmode=require&Password=***"
/// );
/// assert_eq!(fencelock::redact("file:///var/lock"), "file:///var/lock");
/// ```
pub fn redact(url: &str) -> String {
    let (head, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    let mut out = String::with_capacity(url.len());
    out.push_str(head);
    let after_authority = if head.is_empty() {
        rest
    } else {
        let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let authority = &rest[..authority_len];
        match authority.rfind('@') {
            Some(at) => {
                out.push_str(&redact_userinfo(&authority[..at]));
                out.push_str(&authority[at..]);
                &rest[authority_len..]
            }
            None if looks_like_hosts(authority) => {
                out.push_str(authority);
                &rest[authority_len..]
            }
            // Not hosts: most likely a password with an unencoded `/`, `?` or `#`, or a
            // password where a port should be. Hide everything up to the last `@` (or
            // the whole authority), erring on the side of showing too little.
            None => match (authority.find(':'), rest.rfind('@')) {
                (Some(colon), Some(at)) => {
                    out.push_str(&rest[..colon]);
                    out.push_str(":***");
                    &rest[at..]
                }
                (Some(colon), None) => {
                    out.push_str(&rest[..colon]);
                    out.push_str(":***");
                    &rest[authority_len..]
                }
                (None, _) => {
                    out.push_str(authority);
                    &rest[authority_len..]
                }
            },
        }
    };
    match after_authority.find('?') {
        Some(q) => {
            out.push_str(&after_authority[..=q]);
            let query_and_fragment = &after_authority[q + 1..];
            let query_len = query_and_fragment
                .find('#')
                .unwrap_or(query_and_fragment.len());
            let pairs: Vec<String> = query_and_fragment[..query_len]
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, _)) if is_secret_option(name) => format!("{name}=***"),
                    _ => pair.to_owned(),
                })
                .collect();
            out.push_str(&pairs.join("&"));
            out.push_str(&query_and_fragment[query_len..]);
        }
        None => out.push_str(after_authority),
    }
    out
}

/// `user:***` for `user:password`, and a bare user unchanged.
fn redact_userinfo(userinfo: &str) -> String {
    match userinfo.find(':') {
        Some(colon) => format!("{}:***", &userinfo[..colon]),
        None => userinfo.to_owned(),
    }
}

/// True if `authority` (without userinfo) is a comma-separated list of `host`,
/// `host:port`, `[v6]` or `[v6]:port`, i.e. has no place a password could hide in.
fn looks_like_hosts(authority: &str) -> bool {
    authority.split(',').all(|item| {
        let port = match item.strip_prefix('[') {
            Some(v6) => match v6.split_once(']') {
                Some((_, after)) => after.strip_prefix(':').or(after.is_empty().then_some("")),
                None => None,
            },
            None => item
                .split_once(':')
                .map_or(Some(""), |(_, port)| Some(port)),
        };
        port.is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// Query options whose value is a credential, by exact name (compared without case,
/// `-` and `_`).
const SECRET_OPTIONS: &[&str] = &[
    "pass",
    "passwd",
    "pwd",
    "passphrase",
    "auth",
    "accesskey",
    "secretkey",
    "apikey",
    "credential",
    "credentials",
];

/// True if query option `name` (possibly percent-encoded) carries a credential.
fn is_secret_option(name: &str) -> bool {
    let decoded: String = url::form_urlencoded::parse(name.as_bytes())
        .map(|(k, v)| format!("{k}{v}"))
        .collect();
    let folded: String = decoded
        .chars()
        .filter(|c| !matches!(c, '-' | '_'))
        .flat_map(char::to_lowercase)
        .collect();
    ["password", "secret", "token"]
        .iter()
        .any(|word| folded.contains(word))
        || SECRET_OPTIONS.contains(&folded.as_str())
}

/// A parsed backend URL, with its redacted form for messages.
#[derive(Clone)]
pub struct BackendUrl {
    url: Url,
    redacted: String,
}

impl std::fmt::Debug for BackendUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("BackendUrl").field(&self.redacted).finish()
    }
}

impl BackendUrl {
    /// Parses `text`; errors never show a password.
    pub fn parse(text: &str) -> Result<Self> {
        let redacted = redact(text);
        let url = Url::parse(text).map_err(|err| Error::BadUrl {
            url: redacted.clone(),
            reason: format!(
                "{err}; expected e.g. file:///var/lock/dlock, memory://, redis://host:6379"
            ),
        })?;
        Ok(BackendUrl { url, redacted })
    }

    /// The parsed URL (with its password, for connecting).
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The scheme, lowercase.
    pub fn scheme(&self) -> &str {
        self.url.scheme()
    }

    /// The URL as given, password replaced by `***`.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// A [`Error::BadUrl`] about this URL.
    pub fn error(&self, reason: impl Into<String>) -> Error {
        Error::BadUrl {
            url: self.redacted.clone(),
            reason: reason.into(),
        }
    }

    /// The value of query option `name`, if given.
    pub fn option(&self, name: &str) -> Option<String> {
        self.url
            .query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }

    /// Fails on query options not in `known`, so that a typo is not silently ignored.
    pub fn reject_unknown_options(&self, known: &[&str]) -> Result<()> {
        for (name, _) in self.url.query_pairs() {
            if !known.contains(&name.as_ref()) {
                let list = if known.is_empty() {
                    "this backend takes no options".to_owned()
                } else {
                    format!("known options: {}", known.join(", "))
                };
                return Err(self.error(format!("unknown option {name:?}; {list}")));
            }
        }
        Ok(())
    }
}

/// The backend URL used when none is given: `$DLOCK_BACKEND`, else the file backend in
/// `$DLOCK_DIR`, else `$XDG_STATE_HOME/dlock`, else `~/.local/state/dlock` (SPEC §3).
pub fn default_url() -> Result<String> {
    if let Some(url) = non_empty_env(BACKEND_ENV) {
        return Ok(url);
    }
    let dir = default_dir()?;
    Url::from_directory_path(&dir)
        .map(|url| url.to_string().trim_end_matches('/').to_owned())
        .map_err(|()| Error::BadUrl {
            url: dir.display().to_string(),
            reason: "the lock directory must be an absolute path".to_owned(),
        })
}

fn default_dir() -> Result<PathBuf> {
    if let Some(dir) = non_empty_env(DIR_ENV) {
        return absolute(PathBuf::from(dir));
    }
    match implicit_dir() {
        Some(dir) => absolute(dir),
        None => Err(Error::BadUrl {
            url: String::new(),
            reason: format!(
                "no backend given and neither {BACKEND_ENV}, {DIR_ENV}, XDG_STATE_HOME nor HOME is set"
            ),
        }),
    }
}

/// The default lock directory when `DLOCK_DIR` does not name one:
/// `$XDG_STATE_HOME/dlock`, else `~/.local/state/dlock`. The file backend creates it
/// with its missing parents; a directory the user names (a `file://` URL, `DLOCK_DIR`)
/// gets only its last component created.
pub(crate) fn implicit_dir() -> Option<PathBuf> {
    if let Some(state) = non_empty_env("XDG_STATE_HOME") {
        return Some(PathBuf::from(state).join("dlock"));
    }
    non_empty_env("HOME").map(|home| PathBuf::from(home).join(".local/state/dlock"))
}

fn absolute(path: PathBuf) -> Result<PathBuf> {
    std::path::absolute(&path).map_err(|err| Error::BadUrl {
        url: path.display().to_string(),
        reason: format!("cannot make the lock directory absolute: {err}"),
    })
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_everywhere() {
        assert_eq!(redact("redis://:pw@h:1"), "redis://:***@h:1");
        assert_eq!(redact("postgres://u:p@ss@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("redlock://u:pw@a:1,b:2"), "redlock://u:***@a:1,b:2");
        assert_eq!(redact("redis://user@h"), "redis://user@h");
        assert_eq!(redact("no scheme at all"), "no scheme at all");
        assert_eq!(redact("mysql://u:p w@h/x?y=@"), "mysql://u:***@h/x?y=@");
    }

    #[test]
    fn redacts_credential_options() {
        assert_eq!(
            redact("postgres://h/db?sslmode=require&password=pw&PassWord=pw#f"),
            "postgres://h/db?sslmode=require&password=***&PassWord=***#f"
        );
        for name in [
            "pass",
            "passwd",
            "pwd",
            "sslpassword",
            "secret",
            "token",
            "auth",
            "access_key",
            "secret_key",
            "aws_secret_access_key",
            "session_token",
            "apikey",
            "api_key",
            "API-KEY",
            "db_password_file",
            "clientSecret",
            "AuthToken",
            "pass%77ord",
        ] {
            let text = format!("mysql://h/db?a=1&{name}=pw&b=2");
            assert_eq!(redact(&text), format!("mysql://h/db?a=1&{name}=***&b=2"));
        }
        for name in [
            "user",
            "sslmode",
            "table",
            "prefix",
            "authsource",
            "keepalives",
        ] {
            let text = format!("mysql://h/db?{name}=pw");
            assert_eq!(redact(&text), text);
        }
    }

    #[test]
    fn redacts_passwords_that_break_the_authority() {
        assert_eq!(redact("redis://u:pa/ss@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redact("redis://u:pa?ss@h:1"), "redis://u:***@h:1");
        assert_eq!(redact("redis://h:secret"), "redis://h:***");
        assert_eq!(
            redact("redlock://a:1,b:2,[::1]:3/0"),
            "redlock://a:1,b:2,[::1]:3/0"
        );
        assert_eq!(redact("file:///var/a@b"), "file:///var/a@b");
    }

    #[test]
    fn debug_hides_password() {
        let url = BackendUrl::parse("postgres://u:hunter2@h/db?password=hunter3").unwrap();
        let text = format!("{url:?}");
        assert!(!text.contains("hunter"), "{text}");
    }

    #[test]
    fn parse_error_hides_password() {
        let err = BackendUrl::parse("redis://u:topsecret@[bad")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("topsecret"), "{err}");
    }
}
