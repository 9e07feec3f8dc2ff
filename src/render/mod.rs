//! Renderers (DESIGN §6): what a policy becomes, as nft objects, iptables-restore text, sysctl
//! writes and accept-rule insertions. Everything here is pure: no kernel, no files.

pub mod nft_ir;
pub mod nft_script;
pub mod flow;
pub mod planner;
pub mod sysctl;
pub mod iptables;
pub mod document;
pub mod nft_batch;
pub mod nft_expr;
