//! Reading the live nft ruleset (issue 16; `cargo bench --bench read`, as root): ctguard's
//! netlink reader (`backend::nft_read::read`) next to `nft -j list ruleset` + `nft_json::parse`
//! (the previous reader) and the plain `nft list ruleset`, at 1k, 10k, 50k and 100k rules
//! (`ip saddr X drop` in an inet input chain plus a stateful accept of udp 53). Each size runs
//! in a fresh network namespace that dies with its thread; nothing touches the host firewall.
//! Prints a Markdown table (median of `CTGUARD_READ_RUNS`, default 3). Only `cargo bench`
//! (which passes `--bench`) measures; a plain build prints "not run".

use std::time::{Duration, Instant};

use ctguard::backend::exec::Tool;
use ctguard::backend::nft_read;
use ctguard::live::nft_json;
use nix::sched::{unshare, CloneFlags};

fn ruleset(n: usize) -> String {
    let mut s =
        String::from("table inet host {\n chain input {\n  type filter hook input priority 0; policy accept;\n");
    for i in 0..n {
        s.push_str(&format!("  ip saddr 10.{}.{}.{} drop\n", (i >> 16) & 255, (i >> 8) & 255, i & 255));
    }
    s.push_str("  udp dport 53 ct state new accept\n }\n}\n");
    s
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..runs {
        let t = Instant::now();
        last = Some(f());
        times.push(t.elapsed());
    }
    (median(times), last.expect("at least one run"))
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("read bench: not run (use `cargo bench --bench read`, as root)");
        return;
    }
    let runs: usize = std::env::var("CTGUARD_READ_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3).max(1);
    let sizes: Vec<usize> = std::env::var("CTGUARD_READ_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000, 10_000, 50_000, 100_000]);
    println!(
        "| rules | netlink read (ctguard) | `nft -j list ruleset` + parse | `nft list ruleset` | JSON / netlink |"
    );
    println!("|---|---|---|---|---|");
    for n in sizes {
        let row = std::thread::scope(|s| {
            s.spawn(|| {
                unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET) (run as root)");
                let nft = Tool::find("nft").expect("nft installed");
                nft.run(&["-f", "-"], Some(ruleset(n).as_bytes())).expect("load the ruleset");
                let (nl, a) = time(runs, || nft_read::read().expect("netlink read"));
                let (js, b) = time(runs, || {
                    nft_json::parse(&nft.run(&["-j", "list", "ruleset"], None).expect("nft -j")).expect("parse")
                });
                let (plain, _) = time(runs, || nft.run(&["list", "ruleset"], None).expect("nft list").len());
                let rules = a.fw.chains.iter().map(|c| c.rules.len()).sum::<usize>();
                assert_eq!(rules, b.fw.chains.iter().map(|c| c.rules.len()).sum::<usize>(), "both readers agree");
                format!(
                    "| {n} | {} | {} | {} | {:.1}× |",
                    ms(nl),
                    ms(js),
                    ms(plain),
                    js.as_secs_f64() / nl.as_secs_f64().max(1e-9)
                )
            })
            .join()
            .expect("bench thread")
        });
        println!("{row}");
    }
}
