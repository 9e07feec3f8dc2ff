//! Parsed live state (pure parsers): the nft ruleset as JSON and `iptables-save` dumps. The
//! reading itself (exec, netlink) is in `crate::backend`.
