//! The insertion planner alone (pure; no namespace): `plan` of the built-in policy over an nft
//! input chain of N blocklist rules (`ip saddr X drop`) then a stateful accept of udp/53, and
//! over a kube-proxy-like layout (N/10 user chains reached through conditional jumps). Prints
//! milliseconds per plan at each size, and per 1k rules (linearity).
//!
//! `cargo bench --bench planner` (`CTGUARD_BENCH_SIZES=1000,10000`).

use std::time::Instant;

use ctguard::live::fw::{ChainKind, Cond, FwChain, FwHook, FwRule, FwTables, Owner, Verdict};
use ctguard::live::LiveState;
use ctguard::model::names::Tag;
use ctguard::model::{Policy, PortRange, Prefix};

fn rule(conds: Vec<Cond>, verdict: Verdict, i: usize) -> FwRule {
    FwRule { conds, verdict, handle: Some(i as u64 + 10), index: i + 1, text: format!("rule {i}"), comment: None }
}

fn blocklist(n: usize) -> FwTables {
    let owner = Owner::Nft { family: "inet".into(), table: "host".into() };
    let mut rules = vec![rule(
        vec![Cond::CtState { neg: false, states: vec!["established".into(), "related".into()] }],
        Verdict::Accept,
        0,
    )];
    for i in 0..n {
        let a = std::net::Ipv4Addr::from(0x0a00_0000u32 + i as u32);
        rules.push(rule(
            vec![Cond::Family { v6: false }, Cond::Saddr { neg: false, prefixes: vec![Prefix::V4(a, 32)] }],
            Verdict::Drop,
            rules.len(),
        ));
    }
    rules.push(rule(
        vec![
            Cond::Proto { neg: false, protos: vec![17] },
            Cond::Dport { neg: false, ranges: vec![PortRange::single(53)] },
            Cond::CtState { neg: false, states: vec!["new".into()] },
        ],
        Verdict::Accept,
        rules.len(),
    ));
    let input = FwChain {
        owner,
        name: "input".into(),
        hook: Some(FwHook::Input),
        kind: ChainKind::Filter,
        priority: 0,
        policy_accept: Some(false),
        rules,
    };
    FwTables { chains: vec![input] }
}

/// Base chain jumps to N/10 service chains on a destination match; each holds 9 rules.
fn jumps(n: usize) -> FwTables {
    let owner = Owner::Nft { family: "ip".into(), table: "kube".into() };
    let services = (n / 10).max(1);
    let mut chains = Vec::new();
    let mut base =
        vec![rule(vec![Cond::CtState { neg: false, states: vec!["established".into()] }], Verdict::Accept, 0)];
    for s in 0..services {
        let a = std::net::Ipv4Addr::from(0x0a60_0000u32 + s as u32);
        base.push(rule(
            vec![Cond::Daddr { neg: false, prefixes: vec![Prefix::V4(a, 32)] }],
            Verdict::Jump(format!("svc{s}")),
            base.len(),
        ));
        let mut rules = Vec::new();
        for k in 0..9 {
            rules.push(rule(vec![Cond::Opaque(format!("numgen {k}"))], Verdict::Jump("sep".into()), k));
        }
        chains.push(FwChain {
            owner: owner.clone(),
            name: format!("svc{s}"),
            hook: None,
            kind: ChainKind::Filter,
            priority: 0,
            policy_accept: None,
            rules,
        });
    }
    chains.push(FwChain {
        owner: owner.clone(),
        name: "sep".into(),
        hook: None,
        kind: ChainKind::Filter,
        priority: 0,
        policy_accept: None,
        rules: vec![rule(vec![], Verdict::Accept, 0)],
    });
    base.push(rule(
        vec![
            Cond::Proto { neg: false, protos: vec![17] },
            Cond::Dport { neg: false, ranges: vec![PortRange::single(53)] },
            Cond::CtState { neg: false, states: vec!["new".into()] },
        ],
        Verdict::Accept,
        base.len(),
    ));
    chains.push(FwChain {
        owner,
        name: "input".into(),
        hook: Some(FwHook::Input),
        kind: ChainKind::Filter,
        priority: 0,
        policy_accept: Some(false),
        rules: base,
    });
    FwTables { chains }
}

fn time(label: &str, n: usize, tables: &FwTables, policy: &Policy) {
    let live = LiveState {
        nft: ctguard::live::nft_json::NftRuleset { tables: Vec::new(), fw: tables.clone() },
        iptables: Vec::new(),
    };
    let tag = Tag::preview();
    let runs = if n >= 50_000 { 3 } else { 5 };
    let mut best = f64::MAX;
    let mut ins = 0;
    for _ in 0..runs {
        let t = Instant::now();
        let p = ctguard::render::planner::plan(policy, &live, &tag);
        best = best.min(t.elapsed().as_secs_f64() * 1e3);
        ins = p.insertions.len();
    }
    println!(
        "{label:<10} {n:>7} rules: {best:>9.1} ms ({:.2} ms per 1k rules), {ins} insertion(s)",
        best / (n as f64 / 1000.0)
    );
}

fn main() {
    let sizes: Vec<usize> = std::env::var("CTGUARD_BENCH_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000, 10_000, 50_000, 100_000]);
    let policy = Policy::builtin();
    println!("planner (pure, min of runs), built-in policy");
    for &n in &sizes {
        time("blocklist", n, &blocklist(n), &policy);
    }
    for &n in &sizes {
        time("jumps", n, &jumps(n), &policy);
    }
}
