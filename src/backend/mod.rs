//! Side effects against the kernel of the current thread's network namespace: exec of `nft`
//! and the iptables tools, netlink. Callers run these inside `crate::netns::Target::run`.
pub mod exec;
pub mod ipt_nft_rule;
pub mod iptables;
pub mod live;
pub mod netlink;
pub mod nft_fingerprint;
pub mod nft_monitor;
pub mod nft_read;
pub mod nft_stream;
pub mod policy_txn;
pub mod ruleset_txn;
