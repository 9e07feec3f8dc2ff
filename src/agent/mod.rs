//! The agent (DESIGN §2–§3): the detached process that owns every dead-man timer, so a dropped
//! SSH session never leaves a bad change in place. [`client`] is the CLI's side of its socket.
//!
//! Layering (no cycles): [`server`] (socket, signals, start-up) → `owner` (every state change
//! of a target's transactions) → `guard` (committed policies kept in place) and `rollback`
//! (rollbacks, timers, retries) → `steps` (helpers that decide nothing) and [`state`] (the
//! owners and what they hold).

pub mod client;
pub mod engine;
mod guard;
mod owner;
pub mod policy_engine;
pub mod proof;
pub mod protocol;
mod rollback;
pub mod ruleset_engine;
pub mod server;
pub mod state;
mod steps;
pub mod timer;
pub mod worker;

pub use guard::guarded_record;
