//! Renderers (DESIGN §6): what a policy becomes, as nft objects, iptables-restore text, sysctl
//! writes and accept-rule insertions. Everything here is pure: no kernel, no files.

pub mod conntrack_flush;
pub mod document;
pub mod flow;
pub mod ipt_edit;
pub mod ipt_sim;
pub mod iptables;
pub mod nft_batch;
pub mod nft_expr;
pub mod nft_ir;
pub mod nft_script;
pub mod planner;
pub mod sysctl;
