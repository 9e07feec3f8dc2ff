//! Fuzzing in the repository (issue 14): one test per parser, each a fixed small budget of
//! mutated inputs in the default suite and as many as asked with `CTGUARD_FUZZ_EXECS=N`:
//!
//! ```sh
//! cargo test --test fuzz                                   # default budget, every target
//! CTGUARD_FUZZ_EXECS=1000000 cargo test --release --test fuzz -- --nocapture --test-threads 1
//! CTGUARD_FUZZ_SEED=0x1234 cargo test --test fuzz policy   # one target, one seed
//! ```
//!
//! Inputs live in `tests/fuzz/<target>/`: `seeds/` (real inputs the mutations start from),
//! `crashes/` (written on a failure; replayed first on every run, so keep the file with the fix)
//! and `regressions/` (crashes once fixed, moved there by hand). The engine is in
//! `tests/fuzz/engine.rs`.
//!
//! Besides "no panic, no hang", each target checks cheap invariants: error messages are one
//! line and bounded; what parses re-serializes and parses back to the same value.

#[path = "fuzz/engine.rs"]
mod engine;

use std::borrow::Cow;

use ctguard::agent::proof;
use ctguard::agent::protocol::{Envelope, Request};
use ctguard::live::fw::IptVariant;
use ctguard::live::iptables_save::{self, RuleView, SaveDump};
use ctguard::live::{iptables_fw, nft_json, LiveState};
use ctguard::model::{parse_policy, Format};
use ctguard::probe::Probe;
use ctguard::txn::{self, TxnId, TxnRecord};
use engine::{check_message, class_of_message, fnv64, Target, Verdict};
use serde_json::Value;

fn text(data: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(data)
}

// ---------------------------------------------------------------------------------------------
// (1) The policy parser, TOML and JSON (DESIGN §6).

fn policy(data: &[u8]) -> Verdict {
    let s = text(data);
    let mut class = 0;
    for format in [Format::Toml, Format::Json] {
        match parse_policy(&s, format) {
            Ok(p) => {
                // An accepted policy persists (its TOML form reads back equal, checked inside)
                // and comes back from its journaled JSON form unchanged.
                ctguard::persist::policy_toml(&p, "# fuzz\n")
                    .map_err(|e| format!("{format:?}: an accepted policy has no TOML form: {e}"))?;
                let v = serde_json::to_value(&p).map_err(|e| format!("{format:?}: cannot serialize: {e}"))?;
                let back = ctguard::persist::policy_from_record(&v)
                    .map_err(|e| format!("{format:?}: the journaled form does not parse back: {e}"))?;
                if back != p {
                    return Err(format!("{format:?}: the journaled form parses back to another policy"));
                }
                class ^= fnv64(format!("ok {format:?} {} {}", p.notrack.len(), p.sysctl.len()).as_bytes());
            }
            Err(errs) => {
                let first = errs.first().ok_or_else(|| format!("{format:?}: an error without a message"))?;
                for e in errs.iter().take(64) {
                    check_message(&format!("{format:?} policy"), &e.to_string(), data.len())?;
                    if e.reason.contains('\n') {
                        return Err(format!("{format:?}: reason is not one line: {:?}", e.reason));
                    }
                }
                class ^= class_of_message(&format!("{format:?}"), &first.reason).rotate_left(7);
            }
        }
    }
    Ok(class)
}

static POLICY: Target = Target {
    name: "policy",
    default_execs: 2500,
    max_len: 64 << 10,
    dict: &[
        "[[notrack]]\n",
        "[sysctl]\n",
        "protocols = [\"udp\", \"tcp\"]\n",
        "ports = [53, \"1000-2000\"]\n",
        "sources = [\"192.0.2.0/24\", \"2001:db8::/32\"]\n",
        "interfaces = [\"eth0\", \"lo\"]\n",
        "\"net.netfilter.nf_conntrack_max\" = \"auto\"\n",
        "\"net.netfilter.nf_conntrack_buckets\" = 262144\n",
        "backend = \"iptables-nft\"\n",
        "side = \"querying\"\n",
        "upstreams = [\"198.51.100.0/24\"]\n",
        "persist = true\n",
        "local_only",
        "accept_untracked",
        "flush_existing",
        "\"65535-1\"",
        "\"0-65535\"",
        "\"1-\"",
        "0.0.0.0/0",
        "::/0",
        "fe80::1%eth0",
        "1.2.3.4/33",
        "\"\"\"",
        "'''",
        "\"\\u0000\"",
        "{\"notrack\":[{\"protocols\":[\"udp\"],\"ports\":[53]}]}",
        "\"sysctl\":{\"net.netfilter.nf_conntrack_max\":\"auto\"}",
        "\"ports\":[53,\"5300-5310\"]",
        "1979-05-27T07:32:00Z",
        "inf",
        "nan",
        "0o777",
        "+1",
    ],
    borrow_seeds: &[],
    run: policy,
};

#[test]
fn policy_parser() {
    engine::run(&POLICY);
}

// ---------------------------------------------------------------------------------------------
// (2) `nft -j list ruleset`.

fn nft(data: &[u8]) -> Verdict {
    let s = text(data);
    match nft_json::parse(&s) {
        Ok(r) => {
            // The same document printed another way parses to the same thing.
            if let Ok(v) = serde_json::from_str::<Value>(&s) {
                let pretty = serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?;
                let again = nft_json::parse(&pretty).map_err(|e| format!("reprinted document refused: {e}"))?;
                if again != r {
                    return Err("the reprinted document parses differently".into());
                }
            }
            let rules: usize = r.fw.chains.iter().map(|c| c.rules.len()).sum();
            let live = LiveState { nft: r, iptables: Vec::new() };
            let chains = live.chains();
            Ok(fnv64(format!("ok {} {}", chains.chains.len().min(8), rules.min(16)).as_bytes()))
        }
        Err(e) => {
            let msg = e.to_string();
            check_message("nft JSON", &msg, data.len())?;
            Ok(class_of_message("err", &msg))
        }
    }
}

static NFT_JSON: Target = Target {
    name: "nft_json",
    default_execs: 3000,
    max_len: 64 << 10,
    dict: &[
        "{\"nftables\":[",
        "{\"metainfo\":{\"version\":\"1.0.6\",\"json_schema_version\":1}},",
        "{\"table\":{\"family\":\"inet\",\"name\":\"t\",\"handle\":1}},",
        "{\"chain\":{\"family\":\"inet\",\"table\":\"t\",\"name\":\"c\",\"handle\":1,\"type\":\"filter\",\"hook\":\"input\",\"prio\":0,\"policy\":\"drop\"}},",
        "{\"rule\":{\"family\":\"inet\",\"table\":\"t\",\"chain\":\"c\",\"handle\":2,\"expr\":[",
        "{\"match\":{\"op\":\"==\",\"left\":{\"payload\":{\"protocol\":\"udp\",\"field\":\"dport\"}},\"right\":53}}",
        "{\"match\":{\"op\":\"in\",\"left\":{\"ct\":{\"key\":\"state\"}},\"right\":[\"established\",\"related\"]}}",
        "{\"match\":{\"op\":\"!=\",\"left\":{\"meta\":{\"key\":\"iifname\"}},\"right\":\"lo\"}}",
        "{\"match\":{\"op\":\"==\",\"left\":{\"payload\":{\"protocol\":\"ip\",\"field\":\"saddr\"}},\"right\":{\"prefix\":{\"addr\":\"10.0.0.0\",\"len\":8}}}}",
        "{\"match\":{\"op\":\"==\",\"left\":{\"payload\":{\"protocol\":\"tcp\",\"field\":\"dport\"}},\"right\":{\"range\":[1000,2000]}}}",
        "{\"match\":{\"op\":\"==\",\"left\":{\"payload\":{\"protocol\":\"udp\",\"field\":\"dport\"}},\"right\":\"@ports\"}}",
        "{\"match\":{\"op\":\"==\",\"left\":{\"payload\":{\"protocol\":\"udp\",\"field\":\"dport\"}},\"right\":{\"set\":[53,{\"range\":[1,2]}]}}}",
        "{\"vmap\":{\"key\":{\"meta\":{\"key\":\"l4proto\"}},\"data\":{\"set\":[[\"tcp\",{\"jump\":\"c\"}]]}}}",
        "{\"set\":{\"family\":\"inet\",\"table\":\"t\",\"name\":\"ports\",\"type\":\"inet_service\",\"elem\":[53,{\"range\":[1,65535]}]}},",
        "{\"accept\":null}",
        "{\"drop\":null}",
        "{\"reject\":null}",
        "{\"return\":null}",
        "{\"jump\":{\"target\":\"c\"}}",
        "{\"goto\":{\"target\":\"c\"}}",
        "{\"counter\":{\"packets\":0,\"bytes\":0}}",
        "{\"notrack\":null}",
        "\"hook\":\"prerouting\"",
        "\"hook\":\"output\"",
        "\"hook\":\"forward\"",
        "\"type\":\"nat\"",
        "\"prio\":-300",
        "\"len\":129",
        "\"len\":-1",
        "\"addr\":\"::\"",
        "\"family\":\"ip6\"",
    ],
    borrow_seeds: &[],
    run: nft,
};

#[test]
fn nft_json_parser() {
    engine::run(&NFT_JSON);
}

// ---------------------------------------------------------------------------------------------
// (3) `iptables-save` / `ip6tables-save`.

/// The dump printed back in save form (declarations, then rules), when every name survives
/// that (a chain named by a quoted `-A` may hold whitespace a declaration cannot).
fn reprint(d: &SaveDump) -> Option<String> {
    let mut out = String::new();
    for t in &d.tables {
        out.push_str(&format!("*{}\n", t.name));
        for c in &t.chains {
            if c.name.is_empty() || c.name.contains(char::is_whitespace) || c.name.starts_with('#') {
                return None;
            }
            out.push_str(&format!(":{} {} [0:0]\n", c.name, c.policy.as_deref().unwrap_or("-")));
        }
        for c in &t.chains {
            for r in &c.rules {
                out.push_str(&r.line);
                out.push('\n');
            }
        }
        out.push_str("COMMIT\n");
    }
    Some(out)
}

/// A rule without its line number: chain, arguments, line.
type RuleShape = (String, Vec<String>, String);
/// A table without line numbers: name, then each chain's name, policy and rules.
type TableShape = (String, Vec<(String, Option<String>, Vec<RuleShape>)>);

/// The dump without line numbers (they change when it is reprinted).
fn shape(d: &SaveDump) -> Vec<TableShape> {
    d.tables
        .iter()
        .map(|t| {
            let chains = t
                .chains
                .iter()
                .map(|c| {
                    let rules = c.rules.iter().map(|r| (r.chain.clone(), r.args.clone(), r.line.clone())).collect();
                    (c.name.clone(), c.policy.clone(), rules)
                })
                .collect();
            (t.name.clone(), chains)
        })
        .collect()
}

fn iptables(data: &[u8]) -> Verdict {
    let s = text(data);
    match iptables_save::parse(&s) {
        Ok(d) => {
            let mut unknown = 0;
            for r in d.tables.iter().flat_map(|t| t.chains.iter()).flat_map(|c| c.rules.iter()) {
                unknown += RuleView::from_args(&r.args).unknown.len();
            }
            for variant in [IptVariant::Nft, IptVariant::Legacy] {
                for v6 in [false, true] {
                    let _ = iptables_fw::convert(&d, variant, v6);
                }
            }
            if let Some(printed) = reprint(&d) {
                let again =
                    iptables_save::parse(&printed).map_err(|e| format!("reprinted dump refused: {e}\n{printed}"))?;
                if shape(&again) != shape(&d) {
                    return Err(format!("the reprinted dump parses differently:\n{printed}"));
                }
            }
            let rules: usize = d.tables.iter().flat_map(|t| t.chains.iter()).map(|c| c.rules.len()).sum();
            Ok(fnv64(format!("ok {} {} {}", d.tables.len().min(4), rules.min(16), unknown.min(8)).as_bytes()))
        }
        Err(e) => {
            let msg = e.to_string();
            check_message("iptables-save", &msg, data.len())?;
            Ok(class_of_message("err", &msg))
        }
    }
}

static IPTABLES_SAVE: Target = Target {
    name: "iptables_save",
    default_execs: 2500,
    max_len: 64 << 10,
    dict: &[
        "*filter\n",
        "*raw\n",
        "*nat\n",
        "COMMIT\n",
        ":INPUT DROP [0:0]\n",
        ":CHAIN - [0:0]\n",
        "[12:3456] ",
        "-A INPUT ",
        "-A ",
        "-p udp ",
        "-p 6 ",
        "-p all ",
        "! ",
        "-s 10.0.0.0/255.0.0.0 ",
        "-d 2001:db8::/129 ",
        "-i eth+ ",
        "-o lo ",
        "-m udp --dport 53 ",
        "--sport 1000:2000 ",
        "--dport :65535 ",
        "-m multiport --dports 53,1000:2000,65535 ",
        "-m multiport --ports 1:0 ",
        "-m conntrack --ctstate RELATED,ESTABLISHED ",
        "-m state --state NEW,UNTRACKED ",
        "-m comment --comment \"a \\\"b\\\" c\" ",
        "-m limit --limit 5/min ",
        "-m set --match-set blk src ",
        "-j ACCEPT",
        "-j DROP",
        "-j REJECT --reject-with icmp-port-unreachable",
        "-j CT --notrack",
        "-g CHAIN",
        "-j CHAIN",
        "\"\"",
        "# Table `filter' is incompatible, use 'nft' tool.\n",
        "# Generated by iptables-save v1.8.9 (nf_tables)\n",
    ],
    borrow_seeds: &[],
    run: iptables,
};

#[test]
fn iptables_save_parser() {
    engine::run(&IPTABLES_SAVE);
}

// ---------------------------------------------------------------------------------------------
// (4) Journal records (`TxnRecord::from_json`): untrusted input (issue 14), so the pure
// functions the agent runs on a loaded record are run too.

/// `v` with every float replaced by null (serde_json's default float parsing is not exactly
/// round-trip; records hold floats only inside opaque values).
fn without_floats(v: &mut Value) {
    match v {
        Value::Number(n) if n.is_f64() => *v = Value::Null,
        Value::Array(a) => a.iter_mut().for_each(without_floats),
        Value::Object(o) => o.values_mut().for_each(without_floats),
        _ => {}
    }
}

fn journal(data: &[u8]) -> Verdict {
    match TxnRecord::from_json(data) {
        Ok(r) => {
            let bytes = r.to_json().map_err(|e| format!("a loaded record does not serialize: {e}"))?;
            let back = TxnRecord::from_json(&bytes).map_err(|e| format!("a serialized record does not load: {e}"))?;
            if back != r {
                let (mut a, mut b) = (
                    serde_json::to_value(&r).map_err(|e| e.to_string())?,
                    serde_json::to_value(&back).map_err(|e| e.to_string())?,
                );
                without_floats(&mut a);
                without_floats(&mut b);
                if a != b {
                    return Err("a record does not survive a write and a read".into());
                }
            }
            for now in [0, 1_000_000_000, u64::MAX] {
                let _ = txn::recovery_action(&r, &r.boot_id, now);
                let _ = txn::recovery_action(&r, "another-boot", now);
                let _ = txn::status_entry(&r, now);
                let _ = r.seconds_left(now);
            }
            let _ = txn::history_entry(&r);
            let _ = r.state.outcome();
            let _ = txn::format_rfc3339(r.created_wall);
            let _ = ctguard::persist::wants_persist(&r);
            if let Some(p) = &r.policy {
                let _ = ctguard::persist::policy_from_record(p);
            }
            Ok(fnv64(format!("ok {:?} {}", r.kind, r.state.name()).as_bytes()))
        }
        Err(e) => {
            let msg = e.to_string();
            check_message("journal record", &msg, data.len())?;
            Ok(class_of_message("err", &msg))
        }
    }
}

static JOURNAL: Target = Target {
    name: "journal",
    default_execs: 3000,
    max_len: 64 << 10,
    dict: &[
        "\"version\":1",
        "\"version\":2",
        "\"kind\":\"ruleset\"",
        "\"kind\":\"policy\"",
        "\"state\":{\"name\":\"PENDING\"}",
        "\"state\":{\"name\":\"ROLLED_BACK\",\"reason\":\"timeout\"}",
        "\"state\":{\"name\":\"ROLLBACK_FAILED\",\"error\":\"x\",\"attempts\":4294967295}",
        "\"state\":{\"name\":\"COMMITTED\"}",
        "\"deadline\":{\"boottime_ns\":18446744073709551615,\"boot_id\":\"b\",\"wall_unix\":18446744073709551615}",
        "\"created_wall\":18446744073709551615",
        "\"id\":\"99991231-235959-ffff\"",
        "\"id\":\"../../etc/passwd\"",
        "\"origin\":{\"ssh\":{\"conn\":{\"client\":\"[::1]:22\",\"server\":\"1.2.3.4:22\"},\"sshd_pid\":-1,\"via\":\"env\"}}",
        "\"origin\":\"local\"",
        "\"policy\":{\"notrack\":[{\"protocols\":[\"udp\"],\"ports\":[{\"lo\":1,\"hi\":0}]}]}",
        "\"undo\":{\"persist\":true}",
        "\"options\":{\"probes\":[\"tcp:1.2.3.4:0\"],\"probe_interval_secs\":0}",
        "\"events\":[{\"wall_unix\":0,\"state\":\"X\",\"note\":\"\\u001b[2J\"}]",
        "\"genid_before\":4294967296",
        "\"pid\":-2147483648",
    ],
    borrow_seeds: &[],
    run: journal,
};

#[test]
fn journal_record_parser() {
    engine::run(&JOURNAL);
}

// ---------------------------------------------------------------------------------------------
// (5) The agent's request decoder, as `src/agent/server.rs` does it (one line), then the
// parsing the agent does next on the fields (probe specs, transaction ids, the policy).

fn protocol(data: &[u8]) -> Verdict {
    let end = data.iter().position(|&b| b == b'\n').map_or(data.len(), |i| i + 1);
    let line = text(&data[..end]);
    match serde_json::from_str::<Envelope>(&line) {
        Ok(env) => {
            let a = serde_json::to_string(&env).map_err(|e| format!("a decoded request does not encode: {e}"))?;
            let again = serde_json::from_str::<Envelope>(&a)
                .map_err(|e| format!("an encoded request does not decode: {e}: {a}"))?;
            let b = serde_json::to_string(&again).map_err(|e| e.to_string())?;
            if a != b {
                return Err(format!("a request changes on a second encode:\n{a}\n{b}"));
            }
            let txid = match &env.request {
                Request::Apply(apply) => {
                    for p in &apply.options.probes {
                        if let Err(e) = Probe::parse(p) {
                            check_message("probe", &e.to_string(), p.len())?;
                        }
                    }
                    if let Some(text) = &apply.policy_text {
                        let format =
                            if apply.policy_format.as_deref() == Some("json") { Format::Json } else { Format::Toml };
                        let _ = parse_policy(text, format);
                    }
                    None
                }
                Request::Confirm { txid, .. } | Request::Extend { txid, .. } | Request::Rollback { txid, .. } => {
                    txid.as_deref()
                }
                Request::Ping | Request::Status => None,
            };
            if let Some(t) = txid {
                if let Err(e) = TxnId::parse(t) {
                    check_message("txid", &e.to_string(), t.len())?;
                }
            }
            let op = a.split("\"op\":\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("").to_string();
            Ok(fnv64(format!("ok {op} {}", txid.is_some()).as_bytes()))
        }
        Err(e) => {
            // serde_json echoes the offending text raw (a variant name may hold a newline); the
            // agent sends it back as is and the CLI escapes it when it prints it
            // (`exit::error_lines`), so the check is on the message as shown.
            let msg = format!("malformed request: {e}");
            check_message("request", &ctguard::exit::escape_for_terminal(&msg), data.len())?;
            Ok(class_of_message("err", &msg))
        }
    }
}

static PROTOCOL: Target = Target {
    name: "protocol",
    default_execs: 3000,
    max_len: 64 << 10,
    dict: &[
        "{\"v\":1,",
        "\"v\":4294967296",
        "\"op\":\"apply\"",
        "\"op\":\"confirm\"",
        "\"op\":\"extend\"",
        "\"op\":\"rollback\"",
        "\"op\":\"status\"",
        "\"op\":\"ping\"",
        "\"op\":\"APPLY\"",
        "\"by_secs\":18446744073709551615",
        "\"by_secs\":-1",
        "\"timeout_secs\":0",
        "\"txid\":\"20250101-120000-0a1b\"",
        "\"txid\":\"20250230-250000-zzzz\"",
        "\"netns\":\"/proc/self/ns/net\"",
        "\"netns_id\":[18446744073709551615,0]",
        "\"netns_id\":[1,2,3]",
        "\"probes\":[\"exec:'\\\\\"\",\"udp-dns:[::1]:53:a..b\"]",
        "\"ruleset\":{\"text\":\"\",\"format\":\"nft\"}",
        "\"policy_format\":\"json\"",
        "\"force\":1",
        "\"persist\":true",
        "\"auto_confirm\":true",
    ],
    borrow_seeds: &[],
    run: protocol,
};

#[test]
fn agent_request_decoder() {
    engine::run(&PROTOCOL);
}

// ---------------------------------------------------------------------------------------------
// Cheap extras: durations, probe specs, transaction ids, the /proc parsers of the proof.

fn duration(data: &[u8]) -> Verdict {
    let s = text(data);
    match ctguard::duration::parse_duration(&s) {
        Ok(d) => {
            if d.is_zero() || d > ctguard::duration::MAX_DURATION {
                return Err(format!("{s:?} gave {d:?}, outside 1 s ..= 7 days"));
            }
            if ctguard::duration::parse_duration(&d.as_secs().to_string()) != Ok(d) {
                return Err(format!("{s:?} gave {d:?}, but {} seconds does not", d.as_secs()));
            }
            Ok(1)
        }
        Err(e) => {
            check_message("duration", &e, data.len())?;
            Ok(class_of_message("err", &e))
        }
    }
}

static DURATION: Target = Target {
    name: "duration",
    default_execs: 5000,
    max_len: 256,
    dict: &["s", "m", "h", "d", "604800", "604801", "10080m", "168h", "169h", "18446744073709551615h"],
    borrow_seeds: &[],
    run: duration,
};

#[test]
fn duration_parser() {
    engine::run(&DURATION);
}

fn probe(data: &[u8]) -> Verdict {
    let s = text(data);
    match Probe::parse(&s) {
        Ok(p) => {
            let printed = p.to_string();
            match Probe::parse(&printed) {
                Ok(q) if q.to_string() == printed => Ok(fnv64(p.kind().as_bytes())),
                Ok(q) => Err(format!("{s:?} prints as {printed:?}, which parses to {q:?}, not {p:?}")),
                Err(e) => Err(format!("{s:?} prints as {printed:?}, which does not parse: {e}")),
            }
        }
        Err(e) => {
            let msg = e.to_string();
            check_message("probe", &msg, data.len())?;
            Ok(class_of_message("err", &msg))
        }
    }
}

static PROBE: Target = Target {
    name: "probe",
    default_execs: 5000,
    max_len: 4096,
    dict: &[
        "tcp:",
        "udp-dns:",
        "icmp:",
        "exec:",
        "[",
        "]",
        "::1",
        "fe80::1%lo",
        "::ffff:1.2.3.4",
        "0",
        "65536",
        ".",
        "..",
        "-a",
        "a-",
        "'",
        "\"",
        "\\",
        "\\\"",
        "''",
        "\"\"",
    ],
    borrow_seeds: &[],
    run: probe,
};

#[test]
fn probe_spec_parser() {
    engine::run(&PROBE);
}

fn txn_id(data: &[u8]) -> Verdict {
    let s = text(data);
    match TxnId::parse(&s) {
        Ok(id) => {
            if id.as_str().len() != 20 || id.as_str() != s.to_ascii_lowercase() {
                return Err(format!("{s:?} became {:?}", id.as_str()));
            }
            if TxnId::parse(id.as_str()).ok().as_ref() != Some(&id) {
                return Err(format!("{:?} does not parse back", id.as_str()));
            }
            let via_serde: Result<TxnId, _> = serde_json::from_value(Value::String(s.to_string()));
            if via_serde.ok().as_ref() != Some(&id) {
                return Err(format!("{s:?}: serde and parse disagree"));
            }
            Ok(1)
        }
        Err(e) => {
            let msg = e.to_string();
            check_message("txid", &msg, data.len())?;
            if serde_json::from_value::<TxnId>(Value::String(s.to_string())).is_ok() {
                return Err(format!("{s:?}: serde accepts what parse refuses"));
            }
            Ok(class_of_message("err", &msg))
        }
    }
}

static TXN_ID: Target = Target {
    name: "txn_id",
    default_execs: 5000,
    max_len: 64,
    dict: &["0229", "1231", "0230", "2359", "2400", "6060", "-", "ffff", "FFFF", "é"],
    borrow_seeds: &[],
    run: txn_id,
};

#[test]
fn txn_id_parser() {
    engine::run(&TXN_ID);
}

fn proc_files(data: &[u8]) -> Verdict {
    let s = text(data);
    let mut class = 0u64;
    match proof::parse_stat(&s) {
        Ok(st) => class ^= fnv64(format!("stat {}", proof::is_sshd_comm(&st.comm)).as_bytes()),
        Err(e) => check_message("stat", &e.to_string(), data.len() + 256)?,
    }
    match proof::parse_proc_net_tcp(&s) {
        Ok(v) => class ^= fnv64(format!("tcp {}", v.len().min(4)).as_bytes()).rotate_left(1),
        Err(e) => check_message("tcp", &e.to_string(), data.len() + 256)?,
    }
    let cmdline = proof::parse_cmdline(data);
    class ^= fnv64(format!("{:?}", proof::classify_sshd(&cmdline)).as_bytes()).rotate_left(2);
    let mut conns = vec![s.to_string()];
    conns.extend(proof::environ_var(data, "SSH_CONNECTION"));
    for c in conns {
        match proof::parse_ssh_connection(&c) {
            Ok(conn) => {
                let again = proof::parse_ssh_connection(&conn.to_env_value())
                    .map_err(|e| format!("{c:?} gave {conn}, whose SSH_CONNECTION form does not parse: {e}"))?;
                if again != conn {
                    return Err(format!("{c:?} gave {conn}, which reads back as {again}"));
                }
                class ^= 1 << 40;
            }
            Err(e) => check_message("ssh", &e.to_string(), c.len() + 256)?,
        }
    }
    if proof::socket_inode(&s).is_some() {
        class ^= 1 << 41;
    }
    Ok(class)
}

static PROC: Target = Target {
    name: "proc",
    default_execs: 4000,
    max_len: 16 << 10,
    dict: &[
        "(",
        ")",
        "sshd",
        "sshd-session",
        "sshd: root [priv]",
        "sshd: root@notty",
        "[listener]",
        "SSH_CONNECTION=",
        "\0",
        "socket:[",
        "0100007F:0016",
        "00000000000000000000000001000000:0035",
        " 01 ",
        " 0A ",
    ],
    borrow_seeds: &[],
    run: proc_files,
};

#[test]
fn proc_parsers() {
    engine::run(&PROC);
}

// ---------------------------------------------------------------------------------------------
// What the parsed live state feeds: the insertion planner (flow evaluation follows jumps and
// gotos). An nft JSON document (starting with `{`) or an iptables-save dump (read as
// iptables-nft, IPv4 and IPv6), planned for the built-in policy and a richer one.

fn planner_policies() -> &'static [ctguard::model::Policy] {
    static POLICIES: std::sync::OnceLock<Vec<ctguard::model::Policy>> = std::sync::OnceLock::new();
    POLICIES.get_or_init(|| {
        let rich = r#"
[[notrack]]
protocols = ["udp", "tcp"]
ports = [53, "5300-5310"]
sources = ["192.0.2.0/24", "2001:db8::/32"]
interfaces = ["eth0"]
local_only = false
[[notrack]]
protocols = ["udp"]
ports = [123]
"#;
        let rich = parse_policy(rich, Format::Toml).unwrap_or_else(|e| panic!("the planner policy: {e:?}"));
        vec![ctguard::model::Policy::builtin(), rich]
    })
}

fn planner(data: &[u8]) -> Verdict {
    let s = text(data);
    let live = if s.trim_start().starts_with('{') {
        match nft_json::parse(&s) {
            Ok(nft) => LiveState { nft, iptables: Vec::new() },
            Err(_) => return Ok(1),
        }
    } else {
        let Ok(dump) = iptables_save::parse(&s) else { return Ok(2) };
        let iptables = [false, true]
            .into_iter()
            .map(|v6| ctguard::live::IptDump {
                variant: IptVariant::Nft,
                v6,
                text: String::new(),
                fw: iptables_fw::convert(&dump, IptVariant::Nft, v6),
            })
            .collect();
        LiveState { nft: Default::default(), iptables }
    };
    let tag = ctguard::model::names::Tag::preview();
    let mut class = 0u64;
    for policy in planner_policies() {
        let plan = ctguard::render::planner::plan(policy, &live, &tag);
        class = class.rotate_left(5)
            ^ fnv64(format!("{} {}", plan.decisions.len().min(8), plan.insertions.len().min(8)).as_bytes());
    }
    Ok(class)
}

static PLANNER: Target = Target {
    name: "planner",
    default_execs: 1500,
    max_len: 64 << 10,
    dict: &[
        "{\"jump\":{\"target\":\"c\"}}",
        "{\"goto\":{\"target\":\"c\"}}",
        "-j CHAIN",
        "-g CHAIN",
        ":CHAIN - [0:0]\n",
        "-A CHAIN -j CHAIN\n",
        "-A INPUT -m limit --limit 1/s -j CHAIN\n",
    ],
    borrow_seeds: &["nft_json", "iptables_save"],
    run: planner,
};

#[test]
fn planner_on_parsed_rulesets() {
    engine::run(&PLANNER);
}
