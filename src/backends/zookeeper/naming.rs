//! Key → znode name, so that every key is exactly one path component under `/dlock`.
//!
//! ZooKeeper refuses `/`, the components `.` and `..`, NUL, control characters and some
//! Unicode ranges in paths. Every byte of the key's UTF-8 outside `[A-Za-z0-9_.-]`, and
//! a `.` that is the first byte, becomes `%XX` (uppercase hex). The result is plain
//! ASCII, never contains `/`, never starts with `.`, and decodes back to the key: `%`
//! itself is escaped, so the mapping is one-to-one. A 1024-byte key becomes at most
//! 3072 bytes, far below ZooKeeper's 1 MB request limit, so no key is shortened.

/// The znode name of `key`.
pub(crate) fn node_name(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for (i, b) in key.bytes().enumerate() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && i > 0) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The key of a znode name made by [`node_name`]; `None` for names it cannot have made.
pub(crate) fn key_of(name: &str) -> Option<String> {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = name.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().filter(|key| !key.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_keys_keep_their_name() {
        assert_eq!(node_name("nightly-report_v2.1"), "nightly-report_v2.1");
    }

    #[test]
    fn every_key_is_one_component_and_decodes() {
        for key in [
            "../../etc/passwd",
            "/abs",
            ".",
            "..",
            ".hidden",
            "a/b",
            "zookeeper",
            "ключ 🔒",
            "%41",
            "a\u{1}b\u{7f}\u{9f}\u{fff0}",
            "x'); DROP TABLE locks;--",
        ] {
            let name = node_name(key);
            assert!(!name.contains('/'), "{key} -> {name}");
            assert!(!name.starts_with('.'), "{key} -> {name}");
            assert!(
                name.bytes().all(|b| b.is_ascii_graphic()),
                "{key} -> {name}"
            );
            assert_eq!(key_of(&name).as_deref(), Some(key), "{key} -> {name}");
        }
        assert_eq!(node_name(".."), "%2E.");
    }

    #[test]
    fn distinct_keys_distinct_names() {
        let keys = ["a", "a.", "%61", "a%", ".a", "%2Ea", "A", "a b", "a%20b"];
        let names: std::collections::HashSet<_> = keys.iter().map(|k| node_name(k)).collect();
        assert_eq!(names.len(), keys.len());
    }

    #[test]
    fn the_longest_key_is_not_shortened() {
        let key = "é".repeat(512);
        let name = node_name(&key);
        assert_eq!(name.len(), 3 * 1024);
        assert_eq!(key_of(&name), Some(key));
    }
}
