//! The dlock test kit: one conformance suite for every backend, and launchers for the
//! real servers the backends talk to (never mocks).
//!
//! A backend's test file adds only its factory:
//!
//! ```text
//! async fn target() -> dlock_testkit::Target {
//!     dlock_testkit::Target::new("memory://conformance", env!("CARGO_BIN_EXE_dlock"))
//! }
//! dlock_testkit::conformance_tests!(target());
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod cli;
pub mod conformance;
pub mod kinds;
pub mod process;
pub mod proxy;
pub mod servers;
mod target;
pub mod tls;

pub use target::Target;

/// `prefix` with a random suffix: a name (of a key, table, schema or database) that no
/// other test, nor an earlier run, uses.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}_{:012x}", rand::random::<u64>() >> 16)
}

/// Generates one `#[tokio::test]` per behaviour of the conformance suite, each calling
/// `$target` (an expression evaluating to a future of [`Target`]) for its backend.
#[macro_export]
macro_rules! conformance_tests {
    ($target:expr) => {
        $crate::conformance_tests!(@each $target;
            mutual_exclusion_under_contention,
            try_acquire_on_held_key_returns_none,
            wait_times_out_within_its_deadline,
            fences_strictly_increase_across_handles,
            wrong_owner_cannot_release_or_renew,
            renewal_keeps_lease_alive_past_several_ttls,
            ttl_expiry_frees_a_lease_that_is_not_renewed,
            extend_by_hand_keeps_lease_then_expiry_is_lost,
            lost_fires_when_lease_is_broken_from_outside,
            dropped_waiting_acquires_leave_nothing_held,
            waiter_gets_lock_at_release,
            holder_process_killed_frees_the_lock,
            bad_keys_are_typed_errors,
            hostile_keys_are_just_keys,
            status_and_list_show_the_holder,
            release_reports_whether_still_held,
            released_key_is_free_at_once_on_the_same_handle,
            with_lock_runs_work_and_releases,
            with_lock_cancels_work_when_lease_is_lost,
            release_after_keeps_the_key_until_its_time,
            hold_at_most_ends_the_lease_at_its_limit
        );
    };
    (@each $target:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let target = $target.await;
                $crate::conformance::$name(&target).await;
            }
        )*
    };
}

/// Generates one `#[tokio::test]` per behaviour of the lock kinds' conformance suite
/// ([`kinds`]): shared locks, semaphores, multi-key locks and elections. A backend's test
/// file adds it beside [`conformance_tests!`] once the backend declares the kinds; on a
/// backend that does not, the tests fail naming the missing capability.
#[macro_export]
macro_rules! conformance_kind_tests {
    ($target:expr) => {
        $crate::conformance_kind_tests!(@each $target;
            shared_readers_overlap_and_writers_exclude,
            waiting_writer_blocks_new_readers,
            writer_is_not_starved_by_a_stream_of_readers,
            semaphore_admits_exactly_its_permits,
            semaphore_permit_mismatch_is_a_typed_error,
            semaphore_permit_of_killed_holder_comes_back,
            force_release_breaks_every_reader_and_permit,
            status_shows_kind_and_every_holder,
            fences_increase_across_kinds,
            lock_all_never_deadlocks_nor_overlaps,
            election_has_one_leader_then_a_successor
        );
    };
    (@each $target:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let target = $target.await;
                $crate::kinds::$name(&target).await;
            }
        )*
    };
}
