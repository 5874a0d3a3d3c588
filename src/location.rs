//! Backend URLs (SPEC §3): parsing, the default location, and redaction of passwords.

use crate::error::{Error, Result};
use std::path::PathBuf;
use url::Url;

/// The environment variable naming the backend URL when `--backend` is not given.
pub const BACKEND_ENV: &str = "DLOCK_BACKEND";
/// The environment variable naming the default file backend's directory.
pub const DIR_ENV: &str = "DLOCK_DIR";

/// Replaces the password of a URL (if any) by `***`, also in URLs the `url` crate cannot
/// parse and in multi-host URLs like `redlock://a:1,b:2`. Used for every message.
///
/// ```
/// assert_eq!(dlock::redact("redis://app:s3cret@db:6379/0"), "redis://app:***@db:6379/0");
/// assert_eq!(dlock::redact("file:///var/lock"), "file:///var/lock");
/// ```
pub fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest_start = scheme_end + 3;
    let rest = &url[rest_start..];
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_len];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    match userinfo.find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..rest_start],
            &userinfo[..colon],
            &url[rest_start + at..]
        ),
        None => url.to_owned(),
    }
}

/// A parsed backend URL, with its redacted form for messages.
#[derive(Debug, Clone)]
pub struct BackendUrl {
    url: Url,
    redacted: String,
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
    if let Some(state) = non_empty_env("XDG_STATE_HOME") {
        return absolute(PathBuf::from(state).join("dlock"));
    }
    match non_empty_env("HOME") {
        Some(home) => absolute(PathBuf::from(home).join(".local/state/dlock")),
        None => Err(Error::BadUrl {
            url: String::new(),
            reason: format!(
                "no backend given and neither {BACKEND_ENV}, {DIR_ENV}, XDG_STATE_HOME nor HOME is set"
            ),
        }),
    }
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
    fn parse_error_hides_password() {
        let err = BackendUrl::parse("redis://u:topsecret@[bad")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("topsecret"), "{err}");
    }
}
