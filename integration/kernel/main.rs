//! Real-kernel tests. Each test builds its own network namespaces (see `integration/harness`)
//! and removes them even when it fails; nothing here touches the initial namespace's firewall.
//! Needs root; run by the README's test command.

#[path = "../harness/mod.rs"]
mod harness;

mod batch;
mod iptables;
mod traffic;
mod plan_lint;
mod ruleset_txn;

mod txn_cli;
mod policy_txn;
mod probe;
mod proof;
mod doctor;
mod ops;
mod confirm_e2e;
mod ansible;
