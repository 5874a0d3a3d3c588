//! `mongodb://` URLs: the options dlock reads itself, and the connection string the
//! driver gets (everything else, with bounded timeouts unless the URL sets its own).

use crate::error::{Error, Result};
use crate::location::redact;
use std::time::Duration;

/// The collection unless `?collection=` says otherwise.
pub const DEFAULT_COLLECTION: &str = "dlock_locks";
/// How long one operation may take unless `?command_timeout=` says otherwise.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// The driver waits this long for a usable server unless the URL says otherwise; its
/// own default (30 s) would let a call to an unreachable store outlast every TTL.
const DEFAULT_SERVER_SELECTION_TIMEOUT_MS: &str = "5000";
/// The same for opening one connection (the driver's default is 10 s).
const DEFAULT_CONNECT_TIMEOUT_MS: &str = "3000";

/// A parsed `mongodb://` URL.
#[derive(Clone)]
pub struct Settings {
    /// The connection string for the driver (holds the password; never printed).
    pub driver_url: String,
    /// The URL with its password replaced by `***`.
    pub describe: String,
    /// The database named by the path.
    pub database: String,
    /// `?collection=`.
    pub collection: String,
    /// `?command_timeout=`.
    pub command_timeout: Duration,
    /// The password, to scrub from the driver's messages.
    password: Option<String>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("describe", &self.describe)
            .field("database", &self.database)
            .field("collection", &self.collection)
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// Parses `url`. The `url` crate cannot parse seed lists (`h1:1,h2:2`), so the URL is
    /// split by hand: authority, `/database`, `?query`.
    pub fn parse(url: &str) -> Result<Settings> {
        let describe = redact(url);
        let bad = |reason: String| Error::BadUrl {
            url: describe.clone(),
            reason,
        };
        let Some(rest) = url
            .strip_prefix("mongodb://")
            .or_else(|| url.strip_prefix("MONGODB://"))
        else {
            return Err(bad(
                "expected mongodb://[user:password@]host:port[,host:port…]/database[?options]; mongodb+srv:// is not supported"
                    .to_owned(),
            ));
        };
        let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
        let before_query = before_query.split('#').next().unwrap_or(before_query);
        let (authority, path) = before_query.split_once('/').unwrap_or((before_query, ""));
        if authority.is_empty() {
            return Err(bad(
                "no host: expected mongodb://host:27017/database".to_owned()
            ));
        }
        let database = percent_decode(path);
        if database.is_empty() {
            return Err(bad(
                "no database: name it in the path, e.g. mongodb://host:27017/app".to_owned(),
            ));
        }
        if database.contains(['/', '\\', '.', ' ', '"', '$']) {
            return Err(bad(format!("{database:?} is not a valid database name")));
        }
        let password = authority.rsplit_once('@').and_then(|(userinfo, _)| {
            userinfo
                .split_once(':')
                .map(|(_, password)| percent_decode(password))
        });
        let mut collection = DEFAULT_COLLECTION.to_owned();
        let mut command_timeout = DEFAULT_COMMAND_TIMEOUT;
        let mut passed = url::form_urlencoded::Serializer::new(String::new());
        let (mut has_selection, mut has_connect) = (false, false);
        for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
            match name.as_ref() {
                "collection" => {
                    if value.is_empty() || value.contains('$') || value.starts_with("system.") {
                        return Err(bad(format!("{value:?} is not a valid collection name")));
                    }
                    collection = value.into_owned();
                }
                "command_timeout" => {
                    let duration = crate::parse_duration(&value)
                        .map_err(|err| bad(format!("option command_timeout: {err}")))?;
                    if duration.is_zero() {
                        return Err(bad("option command_timeout must be above zero".to_owned()));
                    }
                    command_timeout = duration;
                }
                other => {
                    // Connection-string options are case-insensitive.
                    has_selection |= other.eq_ignore_ascii_case("serverSelectionTimeoutMS");
                    has_connect |= other.eq_ignore_ascii_case("connectTimeoutMS");
                    passed.append_pair(other, &value);
                }
            }
        }
        if !has_selection {
            passed.append_pair(
                "serverSelectionTimeoutMS",
                DEFAULT_SERVER_SELECTION_TIMEOUT_MS,
            );
        }
        if !has_connect {
            passed.append_pair("connectTimeoutMS", DEFAULT_CONNECT_TIMEOUT_MS);
        }
        Ok(Settings {
            driver_url: format!("mongodb://{authority}/{path}?{}", passed.finish()),
            describe,
            database,
            collection,
            command_timeout,
            password,
        })
    }

    /// `text` with the URL's password (if any) replaced by `***`.
    pub fn scrub(&self, text: &str) -> String {
        match &self.password {
            Some(password) if !password.is_empty() => text.replace(password.as_str(), "***"),
            _ => text.to_owned(),
        }
    }
}

fn percent_decode(text: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", text.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, value)| value.into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_options_are_taken_out_and_timeouts_bounded() {
        let s = Settings::parse(
            "mongodb://u:p%40ss@h1:1,h2:2/app?collection=locks&replicaSet=rs&command_timeout=2s",
        )
        .unwrap();
        assert_eq!(s.database, "app");
        assert_eq!(s.collection, "locks");
        assert_eq!(s.command_timeout, Duration::from_secs(2));
        assert_eq!(
            s.describe,
            "mongodb://u:***@h1:1,h2:2/app?collection=locks&replicaSet=rs&command_timeout=2s"
        );
        assert_eq!(
            s.driver_url,
            "mongodb://u:p%40ss@h1:1,h2:2/app?replicaSet=rs&serverSelectionTimeoutMS=5000&connectTimeoutMS=3000"
        );
        assert_eq!(s.scrub("auth failed for p@ss"), "auth failed for ***");
    }

    #[test]
    fn timeouts_given_in_the_url_are_kept() {
        let s = Settings::parse("mongodb://h/app?serverselectiontimeoutms=100&connectTimeoutMS=50")
            .unwrap();
        assert_eq!(
            s.driver_url,
            "mongodb://h/app?serverselectiontimeoutms=100&connectTimeoutMS=50"
        );
        assert_eq!(s.collection, DEFAULT_COLLECTION);
    }

    #[test]
    fn bad_urls_are_typed_errors() {
        for url in [
            "mongodb://h:1",
            "mongodb://h:1/",
            "mongodb:///app",
            "mongodb+srv://h/app",
            "mongodb://h/app?collection=",
            "mongodb://h/app?command_timeout=0s",
            "mongodb://h/a.b",
        ] {
            let err = Settings::parse(url).unwrap_err();
            assert!(matches!(err, Error::BadUrl { .. }), "{url}: {err:?}");
        }
    }
}
