//! ctguard: safe, atomic, dead-man-timed firewall and conntrack changes on Linux.
//!
//! Layout (DESIGN §9): pure logic lives in [`model`], [`render`], [`live`] and [`lint`];
//! side effects (exec, netlink, `/proc/sys`, namespaces) live in [`backend`], [`netns`] and
//! [`sysctl`]; [`cli`] glues them together.

#![warn(missing_docs)]

pub mod agent;
pub mod backend;
pub mod cli;
pub mod compress;
pub mod diff;
pub mod doctor;
pub mod duration;
pub mod exit;
pub mod fault;
pub mod journal;
pub mod lint;
pub mod live;
pub mod model;
pub mod netns;
pub mod origin;
pub mod persist;
pub mod probe;
pub mod render;
pub mod snapshot;
pub mod sysctl;
pub mod timing;
pub mod trust;
pub mod txn;
