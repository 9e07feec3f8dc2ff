//! The agent (DESIGN §2–§3): the detached process that owns every dead-man timer, so a dropped
//! SSH session never leaves a bad change in place. [`client`] is the CLI's side of its socket.

mod apply;
pub mod client;
mod decide;
pub mod engine;
mod lifecycle;
pub mod policy_engine;
pub mod proof;
pub mod protocol;
pub mod ruleset_engine;
pub mod server;
pub mod timer;
pub mod worker;
