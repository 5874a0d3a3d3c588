//! The holder record kept inside each lock file.
//!
//! The holder writes one JSON line at the start of the file (padded with spaces to the
//! previous length, so a shorter record never leaves old bytes after its newline), under
//! the lock. Readers read it without taking the lock. The fence in it is the holder's;
//! the counter proper is the key's fence file (see the module docs of `file`), of which
//! the record is a copy for `status` and a floor should the fence file be lost.

use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Record {
    pub key: String,
    pub fence: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acquired_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewed_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// What the holder published (an election's value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// For a permit of a semaphore: the number of permits it was taken with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permits: Option<u32>,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub(crate) fn to_system_time(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// What the start of a lock file says.
pub(crate) enum Contents {
    /// A new, empty file: no fence handed out yet.
    Empty,
    Record(Record),
    /// Not a record (cut short by a crash, or written by someone else).
    Unreadable,
}

pub(crate) fn read(file: &mut File) -> io::Result<(Contents, u64)> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0))?;
    let len = file
        .read_to_string(&mut text)
        .map(|n| n as u64)
        .unwrap_or(0);
    let first_line = text.lines().next().unwrap_or("").trim();
    let contents = if text.trim().is_empty() {
        Contents::Empty
    } else {
        match serde_json::from_str::<Record>(first_line) {
            Ok(record) => Contents::Record(record),
            Err(_) => Contents::Unreadable,
        }
    };
    Ok((contents, len))
}

/// Reads the record without the lock, retrying a few times in case a holder is
/// writing it at that moment.
pub(crate) fn read_unlocked(file: &mut File) -> Option<Record> {
    for _ in 0..3 {
        if let Ok((Contents::Record(record), _)) = read(file) {
            return Some(record);
        }
    }
    None
}

/// What a fence file says.
pub(crate) enum Stored {
    /// New or emptied: nothing stored yet.
    Empty,
    Fence(u64),
    /// Not a number (cut short, or written by someone else).
    Unreadable,
}

/// Reads a fence file: one decimal number on the first line.
pub(crate) fn read_fence(file: &File) -> io::Result<Stored> {
    let mut buf = [0u8; 64];
    let n = file.read_at(&mut buf, 0)?;
    let text = String::from_utf8_lossy(&buf[..n]);
    let line = text.lines().next().unwrap_or("").trim();
    Ok(if n == 0 || text.trim().is_empty() {
        Stored::Empty
    } else {
        line.parse().map_or(Stored::Unreadable, Stored::Fence)
    })
}

/// Overwrites a fence file with `fence`. The value only grows, so the new line is never
/// shorter than a valid old one; the file is cut to the line in case it held garbage
/// (until then, reading the first line still gives the new value).
pub(crate) fn write_fence(file: &File, fence: u64) -> io::Result<()> {
    let line = format!("{fence}\n");
    file.write_all_at(line.as_bytes(), 0)?;
    file.set_len(line.len() as u64)
}

/// Microseconds since 1970: a fence floor for a counter that was lost, larger than any
/// count of acquisitions made since.
pub(crate) fn clock_floor() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Overwrites the record in one write at offset 0, padded to `old_len`.
pub(crate) fn write(file: &File, record: &Record, old_len: u64) -> io::Result<u64> {
    let mut line = serde_json::to_string(record).map_err(io::Error::other)?;
    line.push('\n');
    let want = usize::try_from(old_len).unwrap_or(usize::MAX);
    if line.len() < want {
        line.extend(std::iter::repeat_n(' ', want - line.len()));
    }
    file.write_all_at(line.as_bytes(), 0)?;
    Ok(line.len() as u64)
}
