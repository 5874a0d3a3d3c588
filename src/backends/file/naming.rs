//! Key → lock file name, so that no key can name a file outside the lock directory.
//!
//! - A key made only of `[A-Za-z0-9._-]` that does not start with `.` is `<key>.lock`.
//! - Any other key is percent-escaped: every byte outside `[A-Za-z0-9_-]`, and a `.`
//!   that is the first byte, becomes `%XX` (uppercase hex), then `.lock` is added. The
//!   result never contains `/`, never starts with `.`, and is never `.` or `..`.
//! - If that name would exceed 255 bytes (the usual file-name limit), it is cut to its
//!   first 120 bytes and followed by `~` and 32 hex digits of the key's SHA-256.
//!
//! The mapping is one-to-one: plain names contain neither `%` nor `~`, escaped names
//! contain `%` but not `~` (it is escaped), and shortened names contain `~`.
//!
//! The fence counter of a key lives next to its lock file, under the same name with
//! `.fence` instead of `.lock` (shortened by the same rule when that would exceed 255
//! bytes). A fence file name never ends in `.lock`, so it is never a key's lock file.

use sha2::{Digest, Sha256};

const SUFFIX: &str = ".lock";
const FENCE_SUFFIX: &str = ".fence";
const NAME_MAX: usize = 255;
const SHORTENED_PREFIX: usize = 120;

fn is_plain(key: &str) -> bool {
    !key.starts_with('.')
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The lock file name of `key`.
pub(crate) fn file_name(key: &str) -> String {
    name_with(key, SUFFIX)
}

/// The fence file name of `key`.
pub(crate) fn fence_name(key: &str) -> String {
    name_with(key, FENCE_SUFFIX)
}

/// The name of `key`'s file with `suffix` (a permit slot, a writer intent), shortened
/// by the same rule as lock and fence files.
pub(crate) fn name_with(key: &str, suffix: &str) -> String {
    let base = if is_plain(key) {
        key.to_owned()
    } else {
        escape(key)
    };
    if base.len() + suffix.len() <= NAME_MAX {
        return base + suffix;
    }
    let mut cut = SHORTENED_PREFIX;
    // Do not split a %XX escape.
    if let Some(pos) = base[cut - 2..cut].find('%') {
        cut = cut - 2 + pos;
    }
    let digest = Sha256::digest(key.as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{}~{hex}{suffix}", &base[..cut])
}

fn escape(key: &str) -> String {
    let mut out = String::with_capacity(key.len() * 3);
    for (i, b) in key.bytes().enumerate() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && i > 0) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The key of a lock file name, when the name alone tells it (not for shortened names).
pub(crate) fn key_of(file_name: &str) -> Option<String> {
    let base = file_name.strip_suffix(SUFFIX)?;
    if base.contains('~') {
        return None;
    }
    if !base.contains('%') {
        return Some(base.to_owned());
    }
    let bytes = base.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = base.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_keys_keep_their_name() {
        assert_eq!(file_name("nightly-report_v2.1"), "nightly-report_v2.1.lock");
    }

    #[test]
    fn hostile_keys_stay_inside() {
        for key in [
            "../../etc/passwd",
            "/abs",
            ".hidden",
            ".",
            "..",
            "a/b",
            "ключ",
            "a b",
            "%41",
            "~x",
        ] {
            let name = file_name(key);
            assert!(!name.contains('/'), "{key} -> {name}");
            assert!(!name.starts_with('.'), "{key} -> {name}");
            assert!(name.len() <= NAME_MAX, "{key} -> {name}");
            assert_eq!(key_of(&name).as_deref(), Some(key), "{key} -> {name}");
        }
        assert_eq!(
            file_name("../../etc/passwd"),
            "%2E.%2F..%2Fetc%2Fpasswd.lock"
        );
    }

    #[test]
    fn long_keys_are_shortened_distinctly() {
        let a = "k".repeat(1024);
        let b = format!("{}x", "k".repeat(1023));
        let (na, nb) = (file_name(&a), file_name(&b));
        assert!(na.len() <= NAME_MAX && nb.len() <= NAME_MAX);
        assert_ne!(na, nb);
        assert!(na.contains('~'));
        assert_eq!(key_of(&na), None);
        let unicode = "ж".repeat(400);
        let n = file_name(&unicode);
        assert!(n.len() <= NAME_MAX, "{}", n.len());
    }

    #[test]
    fn fence_names_fit_and_differ_from_lock_names() {
        for key in [
            "a",
            "../x",
            &"k".repeat(250),
            &"k".repeat(249),
            &"k".repeat(1024),
        ] {
            let fence = fence_name(key);
            assert!(fence.len() <= NAME_MAX, "{}", fence.len());
            assert!(fence.ends_with(".fence") && !fence.starts_with('.'));
            assert_eq!(key_of(&fence), None);
        }
        assert_eq!(fence_name("nightly"), "nightly.fence");
        assert_ne!(fence_name(&"k".repeat(250)), fence_name(&"k".repeat(251)));
    }

    #[test]
    fn distinct_keys_distinct_names() {
        let keys = ["a", "a.", "%61", "a%", ".a", "%2Ea", "a~", "A"];
        let names: std::collections::HashSet<_> = keys.iter().map(|k| file_name(k)).collect();
        assert_eq!(names.len(), keys.len());
    }
}
