//! Exit codes of the CLI contract (DESIGN §5). Every error that leaves the binary maps to one.

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
