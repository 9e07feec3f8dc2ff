//! Issue 12's first finding: native nft tables named like iptables tables (`table ip nat`,
//! `table ip filter`, `table ip6 filter`, as Debian's examples and hand-written configs have
//! them) broke `plan` and `apply` ("the dump is incomplete … incompatible base-chains"). They
//! are nft's: read from nft's JSON, planned as nft, left alone by the iptables tools.

use super::txn_cli::{ok, Ctg};
use crate::harness::{udp_queries, Pair, UdpResponder, SRV4, STATEFUL};

const NATIVE: &str = "table ip nat {
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"veth9\" masquerade
  }
}
table ip filter {
  chain input {
    type filter hook input priority filter + 5; policy accept;
    ip saddr 10.9.9.9 drop
  }
}
table ip6 filter {
  chain input {
    type filter hook input priority filter + 5; policy accept;
    ip6 saddr 2001:db8::9 drop
  }
}
";

#[test]
fn native_ip_nat_and_filter_tables_beside_a_stateful_inet_table_plan_apply_and_roll_back() {
    let pair = Pair::new("native");
    pair.srv.nft(STATEFUL);
    pair.srv.nft(NATIVE);
    let _dns = UdpResponder::start(&pair.srv, (SRV4, 53).into());
    let before = pair.srv.nft_list();
    // iptables-nft calls these tables incompatible: the bug's trigger is there.
    let save = pair.srv.exec("iptables-nft-save", &[]);
    assert!(save.contains("incompatible"), "{save}");
    let ctg = Ctg::new();
    let plan = ctg.run(&["--netns", pair.srv.name(), "plan", "--check"]);
    assert_eq!(plan.status.code(), Some(0), "{}", String::from_utf8_lossy(&plan.stderr));
    let (out, id) = ctg.apply(&pair.srv, &["--timeout", "60s"]);
    ok(&out);
    let during = pair.srv.nft_list();
    assert!(
        during.contains("table ip nat") && during.contains("ip saddr 10.9.9.9 drop"),
        "native tables kept: {during}"
    );
    assert_eq!(udp_queries(&pair.cli, (SRV4, 53).into(), 100, 36000).answered, 100);
    ok(&ctg.run(&["rollback", &id]));
    assert_eq!(pair.srv.nft_list(), before, "the rollback is exact");
}

/// Every family nft lists is read; bridge, arp and netdev tables are left alone (no filter
/// hook of theirs sees the notracked IP flows the planner evaluates), beside the stateful
/// `inet` table the accept goes into.
#[test]
fn bridge_arp_and_netdev_tables_are_read_and_left_alone() {
    let pair = Pair::new("families");
    pair.srv.nft(STATEFUL);
    pair.srv.nft(
        "table bridge br {
  chain forward_ {
    type filter hook forward priority 0; policy drop;
    ether type arp accept
  }
}
table arp a {
  chain in_ {
    type filter hook input priority 0; policy accept;
    arp operation request accept
  }
}
table netdev nd {
  chain ing {
    type filter hook ingress device \"lo\" priority 0; policy accept;
    udp dport 9 drop
  }
}
",
    );
    let _dns = UdpResponder::start(&pair.srv, (SRV4, 53).into());
    let before = pair.srv.nft_list();
    let ctg = Ctg::new();
    let plan = ctg.json(&["--netns", pair.srv.name(), "plan", "--check"]);
    assert_eq!(plan["check"]["ok"], true, "{plan}");
    let chains: Vec<String> = plan["insertions"]
        .as_array()
        .map(|a| a.iter().map(|i| i["chain"].as_str().unwrap_or("").to_string()).collect())
        .unwrap_or_default();
    assert!(!chains.is_empty() && chains.iter().all(|c| c.starts_with("nft inet host")), "{chains:?}");
    let (out, id) = ctg.apply(&pair.srv, &["--timeout", "60s"]);
    ok(&out);
    assert_eq!(udp_queries(&pair.cli, (SRV4, 53).into(), 100, 37000).answered, 100);
    ok(&ctg.run(&["rollback", &id]));
    assert_eq!(pair.srv.nft_list(), before, "the rollback is exact");
}
