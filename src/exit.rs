//! Exit codes of the CLI contract (DESIGN §5). Every error that leaves the binary maps to one.

use std::borrow::Cow;
use std::fmt;

/// A documented process exit code. The numbers are part of the public contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: success.
    Ok = 0,
    /// 1: internal error (a bug, or an unexpected failure of the machine).
    Internal = 1,
    /// 2: bad input, unknown id or failed precondition; nothing changed.
    BadInput = 2,
    /// 3: refused by the kernel, a backend, a check or a lint error; nothing changed.
    Refused = 3,
    /// 4: another transaction is pending or the lock is held.
    Busy = 4,
    /// 5: the transaction was rolled back instead of doing what was asked.
    RolledBack = 5,
    /// 6: the agent is unreachable.
    AgentUnreachable = 6,
    /// 7: rollback failed; state unknown, operator needed.
    RollbackFailed = 7,
    /// 8: confirmation refused (not a new connection).
    ConfirmRefused = 8,
}

impl Exit {
    /// The numeric code passed to `std::process::exit`.
    pub fn code(self) -> i32 {
        self as i32
    }

    /// The exit a numeric code stands for (an agent answer carries the number); unknown codes
    /// are internal errors.
    pub fn from_code(c: i32) -> Exit {
        match c {
            0 => Exit::Ok,
            2 => Exit::BadInput,
            3 => Exit::Refused,
            4 => Exit::Busy,
            5 => Exit::RolledBack,
            6 => Exit::AgentUnreachable,
            7 => Exit::RollbackFailed,
            8 => Exit::ConfirmRefused,
            _ => Exit::Internal,
        }
    }
}

/// An error that carries the exit code it must produce and a one-line message for stderr.
#[derive(Debug)]
pub struct Failure {
    /// Which documented exit code this failure maps to.
    pub exit: Exit,
    /// One line, no trailing newline; names the field or object and the reason.
    pub message: String,
}

impl Failure {
    /// A failure with the given code and message.
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        Failure { exit, message: message.into() }
    }
    /// Exit 2: bad input or failed precondition.
    pub fn bad_input(message: impl Into<String>) -> Self {
        Self::new(Exit::BadInput, message)
    }
    /// Exit 3: refused by the kernel, a backend, a check or the lint.
    pub fn refused(message: impl Into<String>) -> Self {
        Self::new(Exit::Refused, message)
    }
    /// Exit 1: internal error.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Exit::Internal, message)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// True for characters that must not reach a terminal raw: control characters (C0, DEL, C1:
/// newlines, carriage returns, escape sequences) and the Unicode bidirectional controls that
/// reorder what is shown.
fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every control character escaped (`\n`, `\r`, `\t`, else `\u{1b}`), so that a
/// user-supplied string shown in a message stays on its line and cannot drive the terminal
/// (no forged second `ctguard: error:` line, no escape sequences). Everything else is kept.
pub fn escape_for_terminal(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// At most this many `ctguard: error:` lines are printed; the rest are counted.
pub const MAX_ERROR_LINES: usize = 20;

/// The stderr lines for `failures`: one per failure, escaped, at most [`MAX_ERROR_LINES`],
/// then `ctguard: error: … and N more`.
pub fn error_lines(failures: &[Failure]) -> Vec<String> {
    let mut lines: Vec<String> = failures
        .iter()
        .take(MAX_ERROR_LINES)
        .map(|f| format!("ctguard: error: {}", escape_for_terminal(&f.message)))
        .collect();
    if failures.len() > MAX_ERROR_LINES {
        lines.push(format!("ctguard: error: … and {} more", failures.len() - MAX_ERROR_LINES));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert!(matches!(escape_for_terminal("plain naïve – text"), Cow::Borrowed(_)));
        assert_eq!(escape_for_terminal("a\nctguard: error: forged"), "a\\nctguard: error: forged");
        assert_eq!(escape_for_terminal("\x1b[31mred\x1b[0m"), "\\u{1b}[31mred\\u{1b}[0m");
        assert_eq!(escape_for_terminal("\r\t\x7f\u{85}\u{202e}"), "\\r\\t\\u{7f}\\u{85}\\u{202e}");
    }

    #[test]
    fn at_most_twenty_lines() {
        let many: Vec<Failure> = (0..100_000).map(|i| Failure::bad_input(format!("e{i}"))).collect();
        let lines = error_lines(&many);
        assert_eq!(lines.len(), MAX_ERROR_LINES + 1);
        assert_eq!(lines[19], "ctguard: error: e19");
        assert_eq!(lines[20], "ctguard: error: … and 99980 more");
        assert_eq!(error_lines(&many[..20]).len(), 20);
    }
}
