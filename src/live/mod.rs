//! Parsed live state (pure parsers): the nft ruleset as JSON and `iptables-save` dumps. The
//! reading itself (exec, netlink) is in `crate::backend`.

pub mod fw;
pub mod iptables_fw;
pub mod nft_json;
pub mod nft_text;

use fw::{FwTables, IptVariant, Owner};

/// One `iptables-save` / `ip6tables-save` dump of one variant, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptDump {
    /// Which tools produced it.
    pub variant: IptVariant,
    /// `ip6tables-*-save` when true.
    pub v6: bool,
    /// The text as saved (kept for the scratch-namespace check and the journal).
    pub text: String,
    /// Its chains in the neutral model.
    pub fw: FwTables,
}

/// Everything ctguard reads of a target before planning (DESIGN §7): the nft ruleset and the
/// iptables dumps of both variants and both families (those whose tools exist).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveState {
    /// `nft -j list ruleset`, parsed.
    pub nft: nft_json::NftRuleset,
    /// The iptables dumps.
    pub iptables: Vec<IptDump>,
}

impl LiveState {
    /// All chains to evaluate, each once: tables that iptables-nft owns are taken from its
    /// dump (compat matches are opaque in nft's JSON), every other nft table from the JSON.
    pub fn chains(&self) -> FwTables {
        let ipt_nft_owned = |family: &str, table: &str| {
            self.iptables.iter().any(|d| {
                d.variant == IptVariant::Nft
                    && (if d.v6 { family == "ip6" } else { family == "ip" })
                    && d.fw.chains.iter().any(|c| matches!(&c.owner, Owner::Iptables { table: t, .. } if t == table))
            })
        };
        let mut out = FwTables::default();
        for c in &self.nft.fw.chains {
            if let Owner::Nft { family, table } = &c.owner {
                if ipt_nft_owned(family, table) {
                    continue;
                }
            }
            out.chains.push(c.clone());
        }
        for d in &self.iptables {
            out.chains.extend(d.fw.chains.iter().cloned());
        }
        out
    }
}
pub mod iptables_save;
