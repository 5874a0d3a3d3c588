//! The Markdown report: one table row per backend and nemesis, and what each backend
//! promises in plain words.

use crate::run::RunResult;
use std::fmt::Write;

/// The table of `results`.
pub fn table(results: &[RunResult]) -> String {
    let mut out = String::new();
    out.push_str("| backend | nemesis | run | sections | accepted writes | faults | (a) overlapping pairs | of which after a lapse | sections overtaken | overlap allowed | (b) out-of-order writes | (c) stale rejected | (d) lost updates | (e) overtaken, lost() silent | (f) left held | panics | hung | verdict |\n");
    out.push_str(
        "|---|---|---:|---:|---:|---:|---:|---:|---:|:-:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in results {
        let c = &r.counts;
        let verdict = if r.failures().is_empty() {
            "pass"
        } else {
            "**FAIL**"
        };
        let _ = writeln!(
            out,
            "| {} | {} | {}s | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.backend,
            r.nemesis.name(),
            r.duration.as_secs(),
            c.sections,
            c.accepted_writes,
            c.faults,
            c.overlaps,
            c.after_lapse,
            c.overtaken,
            if r.overlap_allowed { "yes" } else { "no" },
            c.out_of_order,
            c.stale_rejected,
            c.lost_updates,
            c.silent_losses,
            r.left_held,
            r.panics,
            r.hung,
            verdict
        );
    }
    out
}

/// What the columns mean and what each backend promises (kept beside the table).
pub const PROMISES: &str = include_str!("promises.md");

/// The whole report.
pub fn markdown(results: &[RunResult], command: &str, settings: &str) -> String {
    let mut out = String::new();
    out.push_str("# dlock under faults\n\n");
    out.push_str(
        "Produced by the fault-injection harness (`faults/`, crate `dlock-faults`) with:\n\n",
    );
    let _ = writeln!(out, "```sh\n{command}\n```\n");
    let _ = writeln!(out, "{settings}\n");
    out.push_str(&table(results));
    out.push('\n');
    out.push_str(PROMISES);
    out
}
