//! Who of a lock's queue holds it: the rules of every kind over the entries ordered by
//! create revision, as etcd's own recipes (the concurrency mutex, the read-write mutex)
//! decide them.
//!
//! A writer holds the key when its entry is the oldest; a reader when no older entry is
//! a writer (so a waiting writer keeps every later reader out: write-preferring by
//! arrival order); a permit of N when every older entry is a permit and fewer than N
//! exist. The same rules serve the contender deciding whether it may go on and `status`
//! listing who holds the key, so both always agree.

use super::names::Record;
use crate::core::backend::LockKind;
use etcd_client::KeyValue;

/// One entry of a lock's queue: its etcd key and the kind its record declares.
#[derive(Debug, Clone)]
pub struct Contender {
    pub entry: Vec<u8>,
    pub kind: LockKind,
}

impl Contender {
    /// The entry of `kv`; an entry read without its value counts as exclusive.
    pub fn of(kv: &KeyValue) -> Self {
        Contender {
            entry: kv.key().to_vec(),
            kind: Record::from_json(kv.value()).map_or(LockKind::Exclusive, |r| r.kind()),
        }
    }
}

/// What the entry at one position of the queue may do now.
#[derive(Debug, PartialEq, Eq)]
pub enum Turn {
    /// It holds the key.
    Holds,
    /// It waits until one of these older entries goes.
    Waits(Vec<Vec<u8>>),
    /// It asks for a semaphore of another number of permits than the older permits'.
    Mismatch { held_with: u32 },
}

/// The turn of the entry at `at` in `queue` (oldest first).
pub fn turn(queue: &[Contender], at: usize) -> Turn {
    let Some(me) = queue.get(at) else {
        return Turn::Waits(Vec::new());
    };
    let older = &queue[..at];
    match me.kind {
        LockKind::Shared => match older.iter().rposition(|c| c.kind != LockKind::Shared) {
            None => Turn::Holds,
            // The nearest older writer: once it goes, every older one has gone or holds
            // the key after it, and the queue is read again.
            Some(writer) => Turn::Waits(vec![older[writer].entry.clone()]),
        },
        LockKind::Semaphore { permits } => {
            let other = older.iter().find_map(|c| match c.kind {
                LockKind::Semaphore { permits: held } if held != permits => Some(held),
                _ => None,
            });
            if let Some(held_with) = other {
                return Turn::Mismatch { held_with };
            }
            let all_permits = older
                .iter()
                .all(|c| matches!(c.kind, LockKind::Semaphore { .. }));
            let room = older.len() < usize::try_from(permits).unwrap_or(usize::MAX);
            if all_permits && room {
                Turn::Holds
            } else {
                // Any older entry that goes may make room.
                Turn::Waits(older.iter().map(|c| c.entry.clone()).collect())
            }
        }
        _ => match at.checked_sub(1) {
            None => Turn::Holds,
            Some(ahead) => Turn::Waits(vec![queue[ahead].entry.clone()]),
        },
    }
}

/// The positions of the entries that hold the key now.
pub fn holders(queue: &[Contender]) -> Vec<usize> {
    (0..queue.len())
        .filter(|&at| turn(queue, at) == Turn::Holds)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(kinds: &[LockKind]) -> Vec<Contender> {
        kinds
            .iter()
            .enumerate()
            .map(|(i, kind)| Contender {
                entry: vec![u8::try_from(i).unwrap_or(0)],
                kind: *kind,
            })
            .collect()
    }

    const W: LockKind = LockKind::Exclusive;
    const R: LockKind = LockKind::Shared;

    #[test]
    fn readers_share_until_the_first_writer() {
        let q = queue(&[R, R, W, R, W]);
        assert_eq!(holders(&q), vec![0, 1]);
        assert_eq!(turn(&q, 2), Turn::Waits(vec![vec![1]]));
        assert_eq!(turn(&q, 3), Turn::Waits(vec![vec![2]]));
        assert_eq!(turn(&q, 4), Turn::Waits(vec![vec![3]]));
        assert_eq!(holders(&queue(&[W, R, R])), vec![0]);
    }

    #[test]
    fn permits_admit_the_first_n_and_type_a_mismatch() {
        let s = LockKind::Semaphore { permits: 2 };
        let q = queue(&[s, s, s]);
        assert_eq!(holders(&q), vec![0, 1]);
        assert_eq!(turn(&q, 2), Turn::Waits(vec![vec![0], vec![1]]));
        let q = queue(&[s, LockKind::Semaphore { permits: 3 }]);
        assert_eq!(turn(&q, 1), Turn::Mismatch { held_with: 2 });
        assert_eq!(holders(&queue(&[W, s])), vec![0]);
    }
}
