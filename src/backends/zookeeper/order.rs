//! The kinds of a key's queue of ephemeral sequential znodes, and who of it holds the key.
//!
//! A child's name carries its kind before its sequence number: `…-lock-<seq>` for a
//! writer (the name Curator's `InterProcessMutex` uses, so its clients and ours exclude
//! each other), `…-read-<seq>` for a reader, `…-sem<N>-<seq>` for a permit of an
//! N-permit semaphore. The queue's order is the sequence number, which the servers
//! assign per key across every kind, so one listing of the children decides everything:
//!
//! - a writer holds the key when its child is the first, and waits for the one just
//!   before it (Curator's `InterProcessReadWriteLock` write lock);
//! - a reader holds it when no earlier child is a writer, and waits for the nearest
//!   earlier writer (so a waiting writer keeps later readers out: write-preferring in
//!   arrival order);
//! - a permit of N holds when every earlier child is a permit and fewer than N precede
//!   it (Curator's `InterProcessSemaphoreV2` admits the first N leases), and waits for any
//!   earlier child to go; an earlier permit of another N is a mismatch.

use crate::core::backend::LockKind;

/// The tag a child of `kind` carries before its sequence number.
pub(crate) fn tag(kind: LockKind) -> String {
    match kind {
        LockKind::Shared => "read".to_owned(),
        LockKind::Semaphore { permits } => format!("sem{permits}"),
        _ => "lock".to_owned(),
    }
}

/// The sequence number and kind of a lock child, `None` for other znodes.
pub(crate) fn parse(child: &str) -> Option<(i64, LockKind)> {
    let (head, seq) = child.rsplit_once('-')?;
    if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seq = seq.parse().ok()?;
    let (_, tag) = head.rsplit_once('-')?;
    let kind = match tag {
        "lock" => LockKind::Exclusive,
        "read" => LockKind::Shared,
        other => LockKind::Semaphore {
            permits: other.strip_prefix("sem")?.parse().ok()?,
        },
    };
    Some((seq, kind))
}

/// Lock children in queue order, with their kinds.
pub(crate) fn queue(children: Vec<String>) -> Vec<(String, LockKind)> {
    let mut ordered: Vec<(i64, String, LockKind)> = children
        .into_iter()
        .filter_map(|c| parse(&c).map(|(seq, kind)| (seq, c, kind)))
        .collect();
    ordered.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    ordered.into_iter().map(|(_, c, k)| (c, k)).collect()
}

/// What the child at one position of the queue may do now.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Turn {
    /// It holds the key.
    Holds,
    /// It waits until one of these earlier children goes.
    Waits(Vec<String>),
    /// It asks for a semaphore of another number of permits than the earlier permits'.
    Mismatch { held_with: u32 },
}

/// The turn of the child at `at` in `queue`.
pub(crate) fn turn(queue: &[(String, LockKind)], at: usize) -> Turn {
    let Some((_, kind)) = queue.get(at) else {
        return Turn::Waits(Vec::new());
    };
    let earlier = &queue[..at];
    match *kind {
        LockKind::Shared => match earlier.iter().rposition(|(_, k)| *k != LockKind::Shared) {
            None => Turn::Holds,
            Some(writer) => Turn::Waits(vec![earlier[writer].0.clone()]),
        },
        LockKind::Semaphore { permits } => {
            let other = earlier.iter().find_map(|(_, k)| match *k {
                LockKind::Semaphore { permits: held } if held != permits => Some(held),
                _ => None,
            });
            if let Some(held_with) = other {
                return Turn::Mismatch { held_with };
            }
            let all_permits = earlier
                .iter()
                .all(|(_, k)| matches!(k, LockKind::Semaphore { .. }));
            let room = earlier.len() < usize::try_from(permits).unwrap_or(usize::MAX);
            if all_permits && room {
                Turn::Holds
            } else {
                Turn::Waits(earlier.iter().map(|(c, _)| c.clone()).collect())
            }
        }
        _ => match at.checked_sub(1) {
            None => Turn::Holds,
            Some(ahead) => Turn::Waits(vec![queue[ahead].0.clone()]),
        },
    }
}

/// The positions of the children that hold the key now.
pub(crate) fn holders(queue: &[(String, LockKind)]) -> Vec<usize> {
    (0..queue.len())
        .filter(|&at| turn(queue, at) == Turn::Holds)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_kind() {
        assert_eq!(
            parse("_c_ab-cd-lock-0000000002"),
            Some((2, LockKind::Exclusive))
        );
        assert_eq!(parse("_c_ab-read-0000000010"), Some((10, LockKind::Shared)));
        assert_eq!(
            parse("_c_ab-sem3-0000000011"),
            Some((11, LockKind::Semaphore { permits: 3 }))
        );
        assert_eq!(parse("foreign"), None);
        assert_eq!(parse("_c_ab-semx-0000000011"), None);
        assert_eq!(
            parse(&format!(
                "_c_x-{}-7",
                tag(LockKind::Semaphore { permits: 5 })
            )),
            Some((7, LockKind::Semaphore { permits: 5 }))
        );
    }

    #[test]
    fn readers_wait_for_earlier_writers_and_permits_for_room() {
        let q = queue(vec![
            "a-read-0000000001".to_owned(),
            "b-read-0000000002".to_owned(),
            "c-lock-0000000003".to_owned(),
            "d-read-0000000004".to_owned(),
        ]);
        assert_eq!(holders(&q), vec![0, 1]);
        assert_eq!(
            turn(&q, 3),
            Turn::Waits(vec!["c-lock-0000000003".to_owned()])
        );
        let q = queue(vec![
            "a-sem2-0000000001".to_owned(),
            "b-sem2-0000000002".to_owned(),
            "c-sem2-0000000003".to_owned(),
            "d-sem3-0000000004".to_owned(),
        ]);
        assert_eq!(holders(&q), vec![0, 1]);
        assert_eq!(turn(&q, 3), Turn::Mismatch { held_with: 2 });
    }
}
