//! The checker: counts, from one recorded history, what went wrong.

use crate::store::Event;
use crate::worker::Workload;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// One critical section, on the harness clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// Worker incarnation.
    pub client: u32,
    /// Section number within the worker.
    pub section: u64,
    /// The lease's fence.
    pub fence: u64,
    /// When it began.
    pub begin: Duration,
    /// When it ended (its End, or the worker's kill/exit, or the end of the history).
    pub end: Duration,
    /// `Some(lost)` when the worker reported its end; `None` when it was killed or exited.
    pub lost_at_end: Option<bool>,
    /// Whether the lease's `release()` answered that it was no longer held.
    pub released_lost: bool,
    /// A reader's (shared) section.
    pub reader: bool,
    /// When the holder was told its lease lapsed (`lost()` fired because it could not
    /// renew in time), on the harness clock and no earlier than it really was.
    pub lapsed_at: Option<Duration>,
}

/// The counts of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Critical sections entered.
    pub sections: u64,
    /// Writes the store accepted.
    pub accepted_writes: u64,
    /// (a) pairs of critical sections (of two leases) that overlapped in time; two readers'
    /// sections do not count. For a semaphore of N permits: each time a section began with
    /// N others open.
    pub overlaps: u64,
    /// Distinct sections that a holder with a higher fence overlapped: stale holders.
    pub overtaken: u64,
    /// Of (a), the pairs whose stale holder had been told its lease lapsed before the other
    /// section began: the holder could not renew in time (a starved, paused or cut-off
    /// process), `lost()` said so, and only then did the store let a successor in. That
    /// is the lease model at work, whatever the nemesis; the naive worker writing on is
    /// what the fence is for.
    pub after_lapse: u64,
    /// (b) writes accepted with a fence lower than an earlier accepted write's.
    pub out_of_order: u64,
    /// (c) reads and writes the fence rejected as stale.
    pub stale_rejected: u64,
    /// (d) accepted writes whose update is missing: each accepted write must build on the
    /// value of the previous one, and the final value must equal the number of accepted writes.
    pub lost_updates: u64,
    /// (e) sections overtaken by another holder whose `lost()` had not fired by their end
    /// and whose `release()` did not answer "no longer held" either.
    pub silent_losses: u64,
    /// Overtaken sections whose holder learned it only from `release()` (not in (e)).
    pub learned_at_release: u64,
    /// Faults injected.
    pub faults: u64,
}

/// Rebuilds the critical sections from the history.
pub fn sections(history: &[Event]) -> Vec<Section> {
    let mut open: HashMap<(u32, u64), (u64, Duration, bool)> = HashMap::new();
    // When each killed or exited worker died.
    let mut dead: HashMap<u32, Duration> = HashMap::new();
    let mut done = Vec::new();
    let mut released_lost: HashSet<(u32, u64)> = HashSet::new();
    let last_t = history
        .iter()
        .map(|e| match e {
            Event::Begin { t, .. }
            | Event::End { t, .. }
            | Event::Read { t, .. }
            | Event::Write { t, .. }
            | Event::Released { t, .. }
            | Event::Killed { t, .. }
            | Event::Exited { t, .. }
            | Event::Fault { t, .. } => *t,
        })
        .max()
        .unwrap_or_default();
    let close_client = |open: &mut HashMap<(u32, u64), (u64, Duration, bool)>,
                        done: &mut Vec<Section>,
                        who: u32,
                        at: Duration| {
        let keys: Vec<(u32, u64)> = open.keys().filter(|(c, _)| *c == who).copied().collect();
        for key in keys {
            if let Some((fence, begin, reader)) = open.remove(&key) {
                done.push(Section {
                    client: key.0,
                    section: key.1,
                    fence,
                    begin,
                    end: at,
                    lost_at_end: None,
                    released_lost: false,
                    reader,
                    lapsed_at: None,
                });
            }
        }
    };
    for event in history {
        match event {
            Event::Begin {
                client,
                section,
                fence,
                reader,
                ..
            } if dead.contains_key(client) => {
                // Sent before the worker was killed, received after: the section began
                // and ended at the kill, before the store heard of it.
                let at = dead[client];
                done.push(Section {
                    client: *client,
                    section: *section,
                    fence: *fence,
                    begin: at,
                    end: at,
                    lost_at_end: None,
                    released_lost: false,
                    reader: *reader,
                    lapsed_at: None,
                });
            }
            Event::Begin {
                t,
                client,
                section,
                fence,
                reader,
            } => {
                open.insert((*client, *section), (*fence, *t, *reader));
            }
            Event::End {
                client, section, ..
            } if dead.contains_key(client) && !open.contains_key(&(*client, *section)) => {}
            Event::End {
                t,
                client,
                section,
                fence,
                lost,
                lapsed_after,
            } => {
                let (begin, reader) = open
                    .remove(&(*client, *section))
                    .map_or((*t, false), |(_, b, r)| (b, r));
                done.push(Section {
                    client: *client,
                    section: *section,
                    fence: *fence,
                    begin,
                    end: *t,
                    lost_at_end: Some(*lost),
                    released_lost: false,
                    reader,
                    lapsed_at: lapsed_after.map(|after| begin + after),
                });
            }
            Event::Released {
                client,
                section,
                held: Some(false),
                ..
            } => {
                released_lost.insert((*client, *section));
            }
            Event::Killed { t, client } | Event::Exited { t, client } => {
                dead.entry(*client).or_insert(*t);
                close_client(&mut open, &mut done, *client, *t);
            }
            _ => {}
        }
    }
    let clients: Vec<u32> = open.keys().map(|(c, _)| *c).collect();
    for client in clients {
        close_client(&mut open, &mut done, client, last_t);
    }
    for s in &mut done {
        s.released_lost = released_lost.contains(&(s.client, s.section));
    }
    done.sort_by_key(|s| (s.begin, s.end));
    done
}

/// Whether `stale`'s holder was told its lease lapsed before `successor` began.
fn lapsed_before(stale: &Section, successor: &Section) -> bool {
    stale.lapsed_at.is_some_and(|at| at <= successor.begin)
}

/// Counts (a)–(e) over a history of the mutex workload; `final_value` is the store's
/// value at the end.
pub fn check(history: &[Event], final_value: u64) -> Counts {
    check_workload(history, final_value, Workload::Mutex)
}

/// Counts (a)–(e) over a history of `workload`.
pub fn check_workload(history: &[Event], final_value: u64, workload: Workload) -> Counts {
    let sections = sections(history);
    let mut counts = Counts {
        sections: sections.len() as u64,
        ..Counts::default()
    };

    // (a) overlap, and (e) which sections were overtaken: a sweep over sections sorted by
    // their beginning, keeping those still running.
    let mut overtaken = vec![false; sections.len()];
    let mut active: Vec<usize> = Vec::new();
    for (i, s) in sections.iter().enumerate() {
        active.retain(|&k| sections[k].end > s.begin);
        match workload {
            Workload::Semaphore { .. } => {
                // One permit too many: which holder's permit lapsed the history cannot
                // say; the longest-running is the one whose lease most likely ran out.
                let excess = (active.len() + 1).saturating_sub(workload.holders());
                for &k in active.iter().take(excess) {
                    overtaken[k] = true;
                    counts.after_lapse += u64::from(lapsed_before(&sections[k], s));
                }
                counts.overlaps += excess as u64;
            }
            _ => {
                for &k in &active {
                    if !(s.reader && sections[k].reader) {
                        // Of two overlapping sections the one with the lower fence is the
                        // stale holder: the newer holder overtook it, whichever of the two
                        // the store heard begin first (a broken holder's "begin" may
                        // arrive just after its successor's).
                        let stale = if sections[k].fence <= s.fence { k } else { i };
                        overtaken[stale] = true;
                        counts.overlaps += 1;
                        let other = if stale == k { i } else { k };
                        counts.after_lapse +=
                            u64::from(lapsed_before(&sections[stale], &sections[other]));
                    }
                }
            }
        }
        active.push(i);
    }
    counts.overtaken = overtaken.iter().filter(|o| **o).count() as u64;
    // A holder learns it was overtaken from lost() (a refused or failed renewal, an ended
    // session) or, if no renewal fell inside its section, from release() answering that
    // the lease was no longer held. Only the holders that learned neither way are silent.
    let unaware: Vec<&Section> = sections
        .iter()
        .zip(&overtaken)
        .filter(|(s, o)| **o && s.lost_at_end == Some(false))
        .map(|(s, _)| s)
        .collect();
    counts.learned_at_release = unaware.iter().filter(|s| s.released_lost).count() as u64;
    counts.silent_losses = unaware.len() as u64 - counts.learned_at_release;

    // (b), (c), (d) from the operations, in the order the store applied them.
    let mut max_accepted_fence = 0u64;
    let mut current = 0u64;
    for event in history {
        match event {
            Event::Write {
                fence,
                value,
                accepted: true,
                ..
            } => {
                counts.accepted_writes += 1;
                if *fence < max_accepted_fence {
                    counts.out_of_order += 1;
                }
                max_accepted_fence = max_accepted_fence.max(*fence);
                if *value != current + 1 {
                    counts.lost_updates += 1;
                }
                current = *value;
            }
            Event::Write {
                accepted: false, ..
            }
            | Event::Read { value: None, .. } => counts.stale_rejected += 1,
            Event::Fault { .. } => counts.faults += 1,
            _ => {}
        }
    }
    // A writer's fence is its own: a section sharing its fence with another counts as out
    // of order. Readers and permits, which share the key, may tie with one another (two
    // Redlock readers granted at once by overlapping majorities do).
    let mut fences: HashMap<u64, bool> = HashMap::new();
    for s in &sections {
        let exclusive = !s.reader && workload.holders() == 1;
        match fences.get_mut(&s.fence) {
            Some(seen_exclusive) => {
                if exclusive || *seen_exclusive {
                    counts.out_of_order += 1;
                }
                *seen_exclusive |= exclusive;
            }
            None => {
                fences.insert(s.fence, exclusive);
            }
        }
    }
    if final_value != counts.accepted_writes && counts.lost_updates == 0 {
        counts.lost_updates = counts.accepted_writes.abs_diff(final_value);
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn section(client: u32, fence: u64, begin: u64, end: u64, lost: bool) -> Vec<Event> {
        vec![
            Event::Begin {
                t: ms(begin),
                client,
                section: 1,
                fence,
                reader: false,
            },
            Event::End {
                t: ms(end),
                client,
                section: 1,
                fence,
                lost,
                lapsed_after: None,
            },
        ]
    }

    fn by_time(h: &mut [Event]) {
        h.sort_by_key(|e| match e {
            Event::Begin { t, .. } | Event::End { t, .. } => *t,
            _ => Duration::ZERO,
        });
    }

    /// A section whose holder was told, `after` ms into it, that its lease lapsed.
    fn lapsed(client: u32, fence: u64, begin: u64, end: u64, after: u64) -> Vec<Event> {
        let mut h = section(client, fence, begin, end, true);
        if let Event::End { lapsed_after, .. } = &mut h[1] {
            *lapsed_after = Some(ms(after));
        }
        h
    }

    #[test]
    fn a_successor_after_the_holders_lapse_is_told_apart() {
        // Told at 40 ms that its lease lapsed; the successor begins at 50 ms.
        let mut h = lapsed(1, 1, 0, 100, 40);
        h.extend(section(2, 2, 50, 60, false));
        by_time(&mut h);
        let c = check(&h, 0);
        assert_eq!((c.overlaps, c.after_lapse, c.silent_losses), (1, 1, 0));
    }

    #[test]
    fn a_successor_before_the_holders_lapse_is_an_overlap() {
        // Told only at 70 ms; the successor began at 50 ms, while it still held.
        let mut h = lapsed(1, 1, 0, 100, 70);
        h.extend(section(2, 2, 50, 60, false));
        by_time(&mut h);
        let c = check(&h, 0);
        assert_eq!((c.overlaps, c.after_lapse), (1, 0));
    }

    #[test]
    fn a_semaphore_holder_beyond_its_permits_after_a_lapse_is_told_apart() {
        let mut h = lapsed(1, 1, 0, 100, 10);
        h.extend(section(2, 2, 20, 90, false));
        h.extend(section(3, 3, 30, 40, false));
        by_time(&mut h);
        let c = check_workload(&h, 0, Workload::Semaphore { permits: 2 });
        assert_eq!((c.overlaps, c.after_lapse), (1, 1));
    }

    #[test]
    fn disjoint_sections_do_not_overlap() {
        let mut h = section(1, 1, 0, 10, false);
        h.extend(section(2, 2, 10, 20, false));
        let c = check(&h, 0);
        assert_eq!((c.sections, c.overlaps, c.silent_losses), (2, 0, 0));
    }

    #[test]
    fn overlapping_sections_are_counted_and_silent_losses_found() {
        let mut h = section(1, 1, 0, 100, false);
        h.extend(section(2, 2, 50, 60, false));
        h.sort_by_key(|e| match e {
            Event::Begin { t, .. } | Event::End { t, .. } => *t,
            _ => Duration::ZERO,
        });
        let c = check(&h, 0);
        assert_eq!(c.overlaps, 1);
        assert_eq!(c.silent_losses, 1);
    }

    #[test]
    fn a_release_that_finds_the_lease_lost_is_not_silent() {
        let mut h = section(1, 1, 0, 100, false);
        h.extend(section(2, 2, 50, 60, false));
        h.sort_by_key(|e| match e {
            Event::Begin { t, .. } | Event::End { t, .. } => *t,
            _ => Duration::ZERO,
        });
        h.push(Event::Released {
            t: ms(101),
            client: 1,
            section: 1,
            fence: 1,
            held: Some(false),
        });
        let c = check(&h, 0);
        assert_eq!(c.overlaps, 1);
        assert_eq!((c.silent_losses, c.learned_at_release), (0, 1));
    }

    #[test]
    fn a_release_that_still_held_the_lease_stays_silent() {
        let mut h = section(1, 1, 0, 100, false);
        h.extend(section(2, 2, 50, 60, false));
        h.sort_by_key(|e| match e {
            Event::Begin { t, .. } | Event::End { t, .. } => *t,
            _ => Duration::ZERO,
        });
        for (client, fence) in [(1, 1), (2, 2)] {
            h.push(Event::Released {
                t: ms(101),
                client,
                section: 1,
                fence,
                held: Some(true),
            });
        }
        let c = check(&h, 0);
        assert_eq!((c.silent_losses, c.learned_at_release), (1, 0));
    }

    #[test]
    fn killed_worker_section_ends_at_the_kill() {
        let h = vec![
            Event::Begin {
                t: ms(0),
                client: 1,
                section: 1,
                fence: 1,
                reader: false,
            },
            Event::Killed {
                t: ms(5),
                client: 1,
            },
            Event::Begin {
                t: ms(6),
                client: 2,
                section: 1,
                fence: 2,
                reader: false,
            },
        ];
        let c = check(&h, 0);
        assert_eq!((c.sections, c.overlaps), (2, 0));
    }

    #[test]
    fn begin_received_after_the_kill_does_not_stay_open() {
        let h = vec![
            Event::Killed {
                t: ms(5),
                client: 1,
            },
            Event::Begin {
                t: ms(6),
                client: 1,
                section: 1,
                fence: 1,
                reader: false,
            },
            Event::Begin {
                t: ms(7),
                client: 2,
                section: 1,
                fence: 2,
                reader: false,
            },
            Event::End {
                t: ms(9),
                client: 2,
                section: 1,
                fence: 2,
                lost: false,
                lapsed_after: None,
            },
            Event::Begin {
                t: ms(10),
                client: 3,
                section: 1,
                fence: 3,
                reader: false,
            },
        ];
        let c = check(&h, 0);
        assert_eq!((c.sections, c.overlaps), (3, 0));
    }

    #[test]
    fn lost_update_and_out_of_order_are_found() {
        let w = |fence, value, accepted| Event::Write {
            t: ms(0),
            client: 1,
            fence,
            value,
            accepted,
        };
        let h = vec![w(2, 1, true), w(1, 2, true), w(3, 2, true), w(1, 9, false)];
        let c = check(&h, 2);
        assert_eq!(c.out_of_order, 1);
        assert_eq!(c.lost_updates, 1);
        assert_eq!(c.stale_rejected, 1);
        assert_eq!(c.accepted_writes, 3);
    }

    fn reader(client: u32, fence: u64, begin: u64, end: u64) -> Vec<Event> {
        let mut events = section(client, fence, begin, end, false);
        if let Event::Begin { reader, .. } = &mut events[0] {
            *reader = true;
        }
        events
    }

    #[test]
    fn readers_overlap_each_other_but_not_a_writer() {
        let mut h = reader(1, 1, 0, 10);
        h.extend(reader(2, 2, 5, 15));
        let c = check_workload(&h, 0, Workload::ReadWrite);
        assert_eq!((c.sections, c.overlaps), (2, 0));
        h.extend(section(3, 3, 12, 20, false));
        let c = check_workload(&h, 0, Workload::ReadWrite);
        assert_eq!((c.overlaps, c.overtaken), (1, 1));
    }

    #[test]
    fn a_semaphore_counts_only_holders_beyond_its_permits() {
        let mut h = section(1, 1, 0, 30, false);
        h.extend(section(2, 2, 5, 30, false));
        let c = check_workload(&h, 0, Workload::Semaphore { permits: 2 });
        assert_eq!(c.overlaps, 0);
        h.extend(section(3, 3, 10, 30, false));
        let c = check_workload(&h, 0, Workload::Semaphore { permits: 2 });
        assert_eq!((c.overlaps, c.overtaken), (1, 1));
    }

    #[test]
    fn a_writers_fence_given_to_another_lease_is_out_of_order() {
        let mut h = reader(1, 4, 0, 10);
        h.extend(reader(2, 4, 5, 15));
        let c = check_workload(&h, 0, Workload::ReadWrite);
        assert_eq!(c.out_of_order, 0, "readers may share a fence");
        h.extend(section(3, 4, 20, 30, false));
        let c = check_workload(&h, 0, Workload::ReadWrite);
        assert_eq!(c.out_of_order, 1);
    }

    #[test]
    fn the_stale_holder_is_the_lower_fence_whichever_began_first() {
        // The broken holder (fence 1) is heard to begin just after its successor (fence 2).
        let mut h = section(2, 2, 0, 20, false);
        h.extend(section(1, 1, 1, 10, false));
        let c = check(&h, 0);
        assert_eq!((c.overlaps, c.overtaken, c.silent_losses), (1, 1, 1));
        let stale = sections(&h)
            .into_iter()
            .find(|s| s.fence == 1)
            .expect("the section of fence 1");
        assert_eq!(stale.client, 1);
        // The successor, still holding its lease, is not counted as overtaken.
        let mut h = section(2, 2, 0, 20, false);
        h.extend(section(1, 1, 1, 10, true));
        let c = check(&h, 0);
        assert_eq!((c.overtaken, c.silent_losses), (1, 0));
    }
}
