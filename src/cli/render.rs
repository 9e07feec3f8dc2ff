//! `ctguard render`: what the policy itself becomes (pure, DESIGN §5).

use serde_json::json;

use super::args::{Global, RenderArgs, RenderFormat};
use crate::exit::{Exit, Failure};
use crate::model::auto::MachineFacts;
use crate::model::names::Tag;
use crate::render::document::{render_document, sysctl_writes, DocFormat};

pub(super) fn run(args: &RenderArgs, global: &Global) -> Result<Exit, Vec<Failure>> {
    let policy = super::load_policy(args.policy.as_deref())?.policy;
    let format = match args.format {
        Some(RenderFormat::Nft) => DocFormat::Nft,
        Some(RenderFormat::Iptables) => DocFormat::Iptables,
        Some(RenderFormat::Ip6tables) => DocFormat::Ip6tables,
        None => DocFormat::for_backend(policy.backend),
    };
    let ram = crate::sysctl::mem_total_bytes()
        .ok_or_else(|| vec![Failure::internal("cannot read MemTotal from /proc/meminfo")])?;
    let facts = MachineFacts::with_ram(ram);
    let text = render_document(&policy, format, &Tag::preview(), facts);
    if global.json {
        let sysctl: Vec<_> =
            sysctl_writes(&policy, facts).into_iter().map(|(k, v, _)| json!({"key": k, "value": v})).collect();
        let name = match format {
            DocFormat::Nft => "nft",
            DocFormat::Iptables => "iptables",
            DocFormat::Ip6tables => "ip6tables",
        };
        super::print_json(&json!({"format": name, "text": text, "sysctl": sysctl, "policy": policy}));
    } else {
        print!("{text}");
    }
    Ok(Exit::Ok)
}
