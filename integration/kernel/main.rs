//! Real-kernel tests. Each test builds its own network namespaces (see `integration/harness`)
//! and removes them even when it fails; nothing here touches the initial namespace's firewall.
//! Needs root; run by the README's test command.

#[path = "../harness/mod.rs"]
mod harness;

mod batch;
mod corpus;
mod iptables;
mod plan_lint;
mod plan_ruleset;
mod ruleset_txn;
mod traffic;

mod ansible;
mod confirm_e2e;
mod doctor;
mod from;
mod guard;
mod inputs;
mod journal_store;
mod native_tables;
mod nft_read;
mod ops;
mod policy_txn;
mod policy_txn_cas;
mod probe;
mod proof;
mod races;
mod resolver;
mod trust;
mod txn_cli;
mod user_chains;
