//! Who holds a flock, read from `/proc/locks` without taking the lock.

use std::os::unix::fs::MetadataExt;

/// The holders of granted FLOCK locks, as (device, inode, pid, exclusive).
#[derive(Debug, Default)]
pub(crate) struct KernelLocks {
    held: Vec<(u64, u64, u32, bool)>,
    readable: bool,
}

impl KernelLocks {
    /// Reads `/proc/locks`. If it cannot be read, every query answers "unknown".
    pub(crate) fn read() -> Self {
        match std::fs::read_to_string("/proc/locks") {
            Ok(text) => KernelLocks {
                held: text.lines().filter_map(parse_line).collect(),
                readable: true,
            },
            Err(_) => KernelLocks::default(),
        }
    }

    /// Whether the file of `meta` is locked, and by which process (or processes: one
    /// pid per shared lock, a process holding several appearing as often).
    pub(crate) fn holder(&self, meta: &std::fs::Metadata) -> Holding {
        if !self.readable {
            return Holding::Unknown;
        }
        let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
        let dev = (u64::from(major) << 32) | u64::from(minor);
        let mut on_file = self
            .held
            .iter()
            .filter(|(d, ino, _, _)| *ino == meta.ino() && *d == dev);
        let mut readers = Vec::new();
        for (_, _, pid, exclusive) in on_file.by_ref() {
            if *exclusive {
                return Holding::HeldBy(*pid);
            }
            readers.push(*pid);
        }
        if readers.is_empty() {
            Holding::Free
        } else {
            Holding::SharedBy(readers)
        }
    }
}

/// Whether a lock file is locked, as far as the kernel tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Holding {
    HeldBy(u32),
    /// Shared (`LOCK_SH`) by these processes.
    SharedBy(Vec<u32>),
    Free,
    Unknown,
}

/// `1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF` (`READ` for a shared lock); waiters' lines have `->` after the
/// number and are skipped.
fn parse_line(line: &str) -> Option<(u64, u64, u32, bool)> {
    let mut fields = line.split_whitespace();
    fields.next()?; // "1:"
    if fields.next()? != "FLOCK" {
        return None;
    }
    fields.next()?; // ADVISORY
    let exclusive = match fields.next()? {
        "WRITE" => true,
        "READ" => false,
        _ => return None,
    };
    let pid: u32 = fields.next()?.parse().ok()?;
    let mut dev_ino = fields.next()?.split(':');
    let major = u64::from_str_radix(dev_ino.next()?, 16).ok()?;
    let minor = u64::from_str_radix(dev_ino.next()?, 16).ok()?;
    let ino: u64 = dev_ino.next()?.parse().ok()?;
    Some(((major << 32) | minor, ino, pid, exclusive))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_granted_flocks_only() {
        assert_eq!(
            parse_line("1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"),
            Some(((8 << 32) | 1, 5678, 1234, true))
        );
        assert_eq!(
            parse_line("2: -> FLOCK  ADVISORY  WRITE 99 08:01:5678 0 EOF"),
            None
        );
        assert_eq!(
            parse_line("3: POSIX  ADVISORY  WRITE 99 08:01:5678 0 EOF"),
            None
        );
        assert_eq!(
            parse_line("4: FLOCK  ADVISORY  READ 99 00:2a:5678 0 EOF"),
            Some((0x2a, 5678, 99, false))
        );
    }
}
