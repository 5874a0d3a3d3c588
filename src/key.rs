//! Lock keys: validated once, then passed around as [`Key`].

use crate::error::{Error, Result};
use std::fmt;
use std::sync::Arc;

/// The longest key accepted, in bytes (SPEC §2).
pub const MAX_KEY_BYTES: usize = 1024;

/// A validated lock key: 1 to [`MAX_KEY_BYTES`] bytes of UTF-8 without NUL.
///
/// Keys are data, never code: every backend passes them as parameters or
/// escapes them, so `x'); DROP TABLE locks;--` is just a key.
///
/// ```
/// use fencelock::Key;
/// assert!(Key::new("nightly-report").is_ok());
/// assert!(Key::new("").is_err());
/// assert!(Key::new("a\0b").is_err());
/// assert!(Key::new("x".repeat(1025)).is_err());
/// ```
// Shared text: a key is copied into its lease, its local queue and its store-side
// handle, and a clone costs no allocation.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(Arc<str>);

impl Key {
    /// Checks `key` against the rules of SPEC §2.
    pub fn new(key: impl Into<String>) -> Result<Self> {
        let key = key.into();
        let reason = if key.is_empty() {
            Some("a key must not be empty".to_owned())
        } else if key.len() > MAX_KEY_BYTES {
            Some(format!(
                "a key is at most {MAX_KEY_BYTES} bytes, this one has {} bytes",
                key.len()
            ))
        } else if key.contains('\0') {
            Some("a key must not contain a NUL character".to_owned())
        } else {
            None
        };
        match reason {
            Some(reason) => Err(Error::BadKey {
                key: preview(&key),
                reason,
            }),
            None => Ok(Key(Arc::from(key))),
        }
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The key shortened for messages, so a 2000-byte key does not flood a terminal.
fn preview(key: &str) -> String {
    const SHOWN: usize = 40;
    if key.len() <= SHOWN {
        return key.to_owned();
    }
    let mut end = SHOWN;
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &key[..end])
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Key {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for Key {
    type Error = Error;
    fn try_from(value: &str) -> Result<Self> {
        Key::new(value)
    }
}

impl TryFrom<String> for Key {
    type Error = Error;
    fn try_from(value: String) -> Result<Self> {
        Key::new(value)
    }
}

impl TryFrom<&String> for Key {
    type Error = Error;
    fn try_from(value: &String) -> Result<Self> {
        Key::new(value.as_str())
    }
}

impl TryFrom<&Key> for Key {
    type Error = Error;
    fn try_from(value: &Key) -> Result<Self> {
        Ok(value.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_key_error_is_shortened() {
        let err = Key::new("é".repeat(600)).unwrap_err().to_string();
        assert!(err.len() < 200, "{err}");
        assert!(err.contains("1200 bytes"), "{err}");
    }

    #[test]
    fn limits_are_inclusive() {
        assert!(Key::new("k".repeat(MAX_KEY_BYTES)).is_ok());
        assert!(Key::new("k").is_ok());
    }
}
