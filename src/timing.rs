//! Phase timings for the operator waiting on a big host: `RUST_LOG=ctguard::timing=debug`
//! (or `-vv`) logs how long each phase of a transaction took. Logging only: nothing depends
//! on it.

use std::time::Instant;

/// Logs, when dropped, the time since [`Lap::start`] under its phase name (debug level,
/// target `ctguard::timing`).
#[must_use = "a lap logs when it is dropped"]
pub struct Lap {
    what: &'static str,
    start: Instant,
}

impl Lap {
    /// Starts timing phase `what`.
    pub fn start(what: &'static str) -> Lap {
        Lap { what, start: Instant::now() }
    }
}

impl Drop for Lap {
    fn drop(&mut self) {
        let us = self.start.elapsed().as_micros();
        tracing::debug!(target: "ctguard::timing", "{}: {}.{:03} ms", self.what, us / 1000, us % 1000);
    }
}
