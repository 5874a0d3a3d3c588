//! Exit statuses (SPEC §4, after sysexits.h and flock(1)) and one-line error messages.

use fencelock::Error;
use std::process::ExitCode;

/// COMMAND ran and this is its status: passed through.
/// The lock was not acquired: held elsewhere with `--no-wait`, or `--wait` ran out.
pub const NOT_ACQUIRED: u8 = 75; // EX_TEMPFAIL
/// The backend could not be reached or answered with an error.
pub const UNAVAILABLE: u8 = 69; // EX_UNAVAILABLE
/// Bad arguments, key, duration or URL.
pub const USAGE: u8 = 64; // EX_USAGE
/// The lease was lost while COMMAND ran; COMMAND got SIGTERM, then SIGKILL.
pub const LEASE_LOST: u8 = 76; // EX_PROTOCOL: the store took the lease away
/// COMMAND could not be executed (found but not runnable), as in shells and env(1).
pub const CANNOT_EXECUTE: u8 = 126;
/// COMMAND was not found, as in shells and env(1).
pub const NOT_FOUND: u8 = 127;

/// The exit status for a library error.
pub fn status_of(err: &Error) -> u8 {
    match err {
        Error::NotAcquired { .. } => NOT_ACQUIRED,
        Error::LeaseLost { .. } => LEASE_LOST,
        err if err.is_usage() => USAGE,
        _ => UNAVAILABLE,
    }
}

/// Prints `message` as one line on stderr, prefixed with `dlock: `, with control
/// characters made visible (see [`printable`]).
pub fn report(message: impl std::fmt::Display) {
    let text = message.to_string();
    let one_line: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    eprintln!("dlock: {}", printable(&one_line.join(" ")));
}

/// Reports `err` and returns its exit status.
pub fn fail(err: &Error) -> ExitCode {
    report(describe(err));
    ExitCode::from(status_of(err))
}

/// Reports `err` as the failure of `what` (`cannot take lock "k"`), so that the line
/// names the key as well as the backend (SPEC §4), and returns its exit status. Errors
/// whose message already names the key are reported as they are.
pub fn fail_on(what: &str, err: &Error) -> ExitCode {
    match err {
        Error::NotAcquired { .. }
        | Error::LeaseLost { .. }
        | Error::PermitMismatch { .. }
        | Error::BadKey { .. } => fail(err),
        _ => {
            report(format!("{what}: {}", describe(err)));
            ExitCode::from(status_of(err))
        }
    }
}

/// `err`'s message followed by every cause in its source chain that it does not
/// already say, with repeated parts said once: a client library's "error connecting
/// to server" gains its "Connection refused", and "Input/output error: Input/output
/// error: …" is said once.
pub fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !said.is_empty() && !text.contains(said.as_str()) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in text.split(": ") {
        // A part that repeats the one before (ignoring case and a trailing period).
        let same = |a: &str, b: &str| {
            a.trim_end_matches('.')
                .eq_ignore_ascii_case(b.trim_end_matches('.'))
        };
        if parts.last().is_some_and(|last| same(last, part)) {
            continue;
        }
        parts.push(part);
    }
    parts.join(": ")
}

/// `text` with every character a terminal would act on rather than show replaced by a
/// visible escape (`\x1b`, `\n`, `\u{202e}`): C0 controls, DEL, C1 controls and the
/// bidirectional overrides, isolates and marks, and the Unicode line and paragraph
/// separators. Keys, hosts and notes come from whoever took a lock, and raw they could
/// clear or retitle the operator's terminal, forge a table row, or reorder what is
/// shown. Backslashes are left alone, so ordinary text reads as it is.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    fn escaped(c: char) -> bool {
        matches!(c,
            '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}'
            | '\u{61c}' | '\u{200e}' | '\u{200f}'
            | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    }
    if !text.chars().any(escaped) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c < ' ' || c == '\u{7f}' => out.push_str(&format!("\\x{:02x}", u32::from(c))),
            c if escaped(c) => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::{describe, printable};

    #[derive(Debug)]
    struct Chain(&'static str, Option<Box<Chain>>);

    impl std::fmt::Display for Chain {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Chain {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|c| c as _)
        }
    }

    #[test]
    fn describe_adds_unsaid_causes_and_drops_repeats() {
        let refused = Chain(
            "cannot connect: error connecting to server",
            Some(Box::new(Chain("Connection refused (os error 111)", None))),
        );
        assert_eq!(
            describe(&refused),
            "cannot connect: error connecting to server: Connection refused (os error 111)"
        );
        let repeated = Chain(
            "backend mysql://h is unavailable: Input/output error: Input/output error: Connection refused",
            Some(Box::new(Chain(
                "Input/output error: Connection refused",
                Some(Box::new(Chain("Connection refused", None))),
            ))),
        );
        assert_eq!(
            describe(&repeated),
            "backend mysql://h is unavailable: Input/output error: Connection refused"
        );
    }

    #[test]
    fn escapes_what_a_terminal_acts_on() {
        assert_eq!(
            printable("plain key/with\\slash é"),
            "plain key/with\\slash é"
        );
        assert_eq!(
            printable("a\u{1b}[2J\r\n\t\u{7f}"),
            "a\\x1b[2J\\r\\n\\t\\x7f"
        );
        assert_eq!(printable("\u{9b}\u{85}"), "\\u{9b}\\u{85}");
        assert_eq!(printable("x\u{202e}y\u{2066}"), "x\\u{202e}y\\u{2066}");
    }
}
