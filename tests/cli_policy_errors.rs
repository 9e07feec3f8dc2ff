//! Malformed and hostile policies through the real binary (DESIGN §5, §6): `ctguard render
//! --format nft FILE` must exit 2, print nothing on stdout, and print one `ctguard: error:` line
//! per problem on stderr, each naming the field path (`notrack[0].ports[2]`). `render` is pure,
//! so these tests touch no firewall and need no privilege.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

const BIN: &str = env!("CARGO_BIN_EXE_ctguard");

/// A directory of its own for this test process, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ctguard-cli-policy-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }
    fn file(&self, name: &str, content: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        fs::write(&p, content).expect("write policy file");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn ctguard(args: &[&str]) -> Output {
    Command::new(BIN).args(args).env("LC_ALL", "C").env_remove("RUST_LOG").output().expect("run ctguard")
}

fn render_nft(path: &Path) -> Output {
    ctguard(&["render", "--format", "nft", &path.to_string_lossy()])
}

/// Where a problem is expected: a field path, or the document as a whole.
#[derive(Clone, Copy)]
enum At {
    /// `PATH: reason`.
    Field(&'static str),
    /// The whole document (syntax errors, size): `policy: reason` or a reading error.
    Document,
}

struct Case {
    name: &'static str,
    /// File name (the extension picks TOML or JSON, as for users).
    file: &'static str,
    content: Vec<u8>,
    /// One entry per expected stderr line, in order.
    expect: Vec<At>,
    /// A word each message must contain (case-insensitive), checked on the first line.
    reason: &'static str,
}

fn case(name: &'static str, file: &'static str, content: &str, expect: Vec<At>, reason: &'static str) -> Case {
    Case { name, file, content: content.as_bytes().to_vec(), expect, reason }
}

/// A `[[notrack]]` entry with one field replaced or added.
fn entry(extra: &str) -> String {
    let mut protocols = "protocols = [\"udp\"]\n";
    let mut ports = "ports = [53]\n";
    if extra.starts_with("protocols") {
        protocols = "";
    }
    if extra.starts_with("ports") {
        ports = "";
    }
    format!("[[notrack]]\n{protocols}{ports}{extra}\n")
}

fn cases() -> Vec<Case> {
    use At::{Document, Field};
    let huge = {
        let mut s = String::from("# padding\n");
        while s.len() <= ctguard::model::MAX_POLICY_BYTES {
            s.push_str("# ................................................................\n");
        }
        s.push_str(&entry(""));
        s
    };
    let mut v = vec![
        case("unknown top-level field", "p.toml", "colour = \"blue\"\n", vec![Field("colour")], "unknown field"),
        case(
            "unknown field in notrack",
            "p.toml",
            &entry("colour = 1"),
            vec![Field("notrack[0].colour")],
            "unknown field",
        ),
        case(
            "unknown field in JSON notrack",
            "p.json",
            r#"{"notrack":[{"protocols":["udp"],"ports":[53],"local-only":true}]}"#,
            vec![Field("notrack[0].local-only")],
            "unknown field",
        ),
        case(
            "port 70000",
            "p.toml",
            "[[notrack]]\nprotocols = [\"udp\"]\nports = [53, 80, 70000]\n",
            vec![Field("notrack[0].ports[2]")],
            "70000",
        ),
        case(
            "querying without upstreams",
            "p.toml",
            &entry("side = \"querying\""),
            vec![Field("notrack[0].upstreams")],
            "any packet with that source port",
        ),
        case(
            "both without upstreams (JSON)",
            "p.json",
            r#"{"notrack":[{"protocols":["udp"],"ports":[53],"side":"both"}]}"#,
            vec![Field("notrack[0].upstreams")],
            "spoofed",
        ),
        case(
            "upstream with host bits",
            "p.toml",
            &entry("side = \"querying\"\nupstreams = [\"198.18.0.2/24\"]"),
            vec![Field("notrack[0].upstreams[0]")],
            "host bits",
        ),
        case("unknown side", "p.toml", &entry("side = \"client\""), vec![Field("notrack[0].side")], "unknown variant"),
        case("port 0", "p.toml", &entry("ports = [0]"), vec![Field("notrack[0].ports[0]")], "not a port"),
        case("negative port", "p.toml", &entry("ports = [-53]"), vec![Field("notrack[0].ports[0]")], "not a port"),
        case(
            "reversed range",
            "p.toml",
            &entry("ports = [\"9-3\"]"),
            vec![Field("notrack[0].ports[0]")],
            "empty range",
        ),
        case("junk range", "p.toml", &entry("ports = [\"1-2-3\"]"), vec![Field("notrack[0].ports[0]")], "range"),
        case(
            "range past 65535",
            "p.toml",
            &entry("ports = [\"60000-70000\"]"),
            vec![Field("notrack[0].ports[0]")],
            "not a port",
        ),
        case(
            "float port (JSON)",
            "p.json",
            r#"{"notrack":[{"protocols":["udp"],"ports":[53, 53.5]}]}"#,
            vec![Field("notrack[0].ports[1]")],
            "float",
        ),
        case("ports is a string", "p.toml", &entry("ports = \"53\""), vec![Field("notrack[0].ports")], "invalid type"),
        case("ports missing", "p.toml", "[[notrack]]\nprotocols = [\"udp\"]\n", vec![Field("notrack[0]")], "ports"),
        case("protocols = []", "p.toml", &entry("protocols = []"), vec![Field("notrack[0].protocols")], "at least one"),
        case("ports = []", "p.toml", &entry("ports = []"), vec![Field("notrack[0].ports")], "at least one"),
        case(
            "protocol icmp",
            "p.toml",
            &entry("protocols = [\"udp\", \"icmp\"]"),
            vec![Field("notrack[0].protocols[1]")],
            "icmp",
        ),
        case(
            "interface with quote injection",
            "p.toml",
            &entry(r#"interfaces = ["eth0\" accept"]"#),
            vec![Field("notrack[0].interfaces[0]")],
            "interface names may use only",
        ),
        case(
            "interface with semicolon",
            "p.toml",
            &entry(r#"interfaces = ["eth0", "e1;flush"]"#),
            vec![Field("notrack[0].interfaces[1]")],
            "interface names may use only",
        ),
        case(
            "interface with newline (JSON)",
            "p.json",
            r#"{"notrack":[{"protocols":["udp"],"ports":[53],"interfaces":["e0\n-j ACCEPT"]}]}"#,
            vec![Field("notrack[0].interfaces[0]")],
            "interface names may use only",
        ),
        case(
            "interface of 16 bytes",
            "p.toml",
            &entry(r#"interfaces = ["abcdefghijklmnop"]"#),
            vec![Field("notrack[0].interfaces[0]")],
            "IFNAMSIZ",
        ),
        case(
            "interface ..",
            "p.toml",
            &entry(r#"interfaces = [".."]"#),
            vec![Field("notrack[0].interfaces[0]")],
            "not a valid interface name",
        ),
        case(
            "interface empty",
            "p.toml",
            &entry(r#"interfaces = [""]"#),
            vec![Field("notrack[0].interfaces[0]")],
            "empty",
        ),
        case(
            "source with host bits",
            "p.toml",
            &entry(r#"sources = ["192.0.2.0/24", "10.0.0.1/8"]"#),
            vec![Field("notrack[0].sources[1]")],
            "host bits",
        ),
        case(
            "source not an address",
            "p.toml",
            &entry(r#"sources = ["dns.example"]"#),
            vec![Field("notrack[0].sources[0]")],
            "not an IPv4 or IPv6 address",
        ),
        case(
            "source prefix too long",
            "p.toml",
            &entry(r#"sources = ["fd42::/129"]"#),
            vec![Field("notrack[0].sources[0]")],
            "longer than 128",
        ),
        case(
            "sysctl key outside net.netfilter",
            "p.toml",
            "[sysctl]\n\"net.ipv4.ip_forward\" = 1\n",
            vec![Field("sysctl.\"net.ipv4.ip_forward\"")],
            "net.netfilter",
        ),
        case(
            "sysctl key with ../",
            "p.toml",
            "[sysctl]\n\"net.netfilter.../../../kernel/core_pattern\" = 1\n",
            vec![Field("sysctl.\"net.netfilter.../../../kernel/core_pattern\"")],
            "not a sysctl name",
        ),
        case(
            "sysctl auto without formula",
            "p.toml",
            "[sysctl]\n\"net.netfilter.nf_conntrack_udp_timeout\" = \"auto\"\n",
            vec![Field("sysctl.\"net.netfilter.nf_conntrack_udp_timeout\"")],
            "no formula",
        ),
        case(
            "negative sysctl value",
            "p.toml",
            "[sysctl]\n\"net.netfilter.nf_conntrack_max\" = -1\n",
            vec![Field("sysctl.\"net.netfilter.nf_conntrack_max\"")],
            "not a valid value",
        ),
        case(
            "sysctl value is a word",
            "p.toml",
            "[sysctl]\n\"net.netfilter.nf_conntrack_max\" = \"lots\"\n",
            vec![Field("sysctl.\"net.netfilter.nf_conntrack_max\"")],
            "not an integer",
        ),
        case("backend pf", "p.toml", "backend = \"pf\"\n", vec![Field("backend")], "unknown variant"),
        case("persist is a string", "p.toml", "persist = \"yes\"\n", vec![Field("persist")], "invalid type"),
        case("invalid TOML syntax", "p.toml", "[[notrack]\nprotocols = [\"udp\"]\n", vec![Document], "line 1"),
        case("duplicate TOML key", "p.toml", "backend = \"nft\"\nbackend = \"auto\"\n", vec![Document], "duplicate"),
        case(
            "JSON with trailing garbage",
            "p.json",
            "{\"notrack\": []} {\"backend\": \"pf\"}",
            vec![Document],
            "trailing",
        ),
        case("JSON a string", "p.json", "\"nft\"", vec![Document], "invalid type"),
        case("JSON null", "p.json", "null", vec![Document], "invalid type"),
        case(
            "JSON nested too deep",
            "p.json",
            &format!(
                "{{\"sysctl\": {{\"net.netfilter.nf_conntrack_max\": {}1{}}}}}",
                "[".repeat(5000),
                "]".repeat(5000)
            ),
            // Refused at the first `[`: no value anywhere takes nested data.
            vec![Field("sysctl.\"net.netfilter.nf_conntrack_max\"")],
            "invalid type",
        ),
        case(
            "TOML nested too deep",
            "p.toml",
            &format!("[[notrack]]\nprotocols = [\"udp\"]\nports = {}{}\n", "[".repeat(100_000), "]".repeat(100_000)),
            vec![Document],
            "recurs",
        ),
        case("huge file", "p.toml", &huge, vec![Document], "byte limit"),
    ];
    v.push(Case {
        name: "not UTF-8",
        file: "p.toml",
        content: b"backend = \"\xff\xfe\"\n".to_vec(),
        expect: vec![At::Document],
        reason: "UTF-8",
    });
    v.push(case("65 notrack entries", "p.toml", &entry("").repeat(65), vec![Field("notrack")], "limit"));
    // Several problems in one document: one line each, in document order.
    v.push(case(
        "every problem reported",
        "p.toml",
        "[[notrack]]\nprotocols = [\"udp\", \"sctp\"]\nports = [53, 0, \"9-3\"]\nsources = [\"10.0.0.1/8\"]\ninterfaces = [\"a;b\"]\n\
         [[notrack]]\nprotocols = [\"tcp\"]\nports = [70000]\n[sysctl]\n\"net.core.somaxconn\" = 1\n",
        vec![
            Field("notrack[0].protocols[1]"),
            Field("notrack[0].ports[1]"),
            Field("notrack[0].ports[2]"),
            Field("notrack[0].sources[0]"),
            Field("notrack[0].interfaces[0]"),
            Field("notrack[1].ports[0]"),
            Field("sysctl.\"net.core.somaxconn\""),
        ],
        "",
    ));
    v
}

/// Checks one refused policy; returns a report of what was wrong ("" when right).
fn check(c: &Case, path: &Path, out: &Output) -> String {
    let mut bad = Vec::new();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() != Some(2) {
        bad.push(format!("exit {:?}, expected 2", out.status.code()));
    }
    if !stdout.is_empty() {
        bad.push(format!("stdout not empty: {:?}", stdout.chars().take(200).collect::<String>()));
    }
    let lines: Vec<&str> = stderr.lines().collect();
    if lines.len() != c.expect.len() {
        bad.push(format!("{} stderr lines, expected {}", lines.len(), c.expect.len()));
    }
    let file = path.to_string_lossy();
    for (i, (line, at)) in lines.iter().zip(&c.expect).enumerate() {
        let Some(msg) = line.strip_prefix("ctguard: error: ") else {
            bad.push(format!("line {} does not start with `ctguard: error: `: {line:?}", i + 1));
            continue;
        };
        let Some(rest) = msg.strip_prefix(&format!("policy {file}: ")) else {
            bad.push(format!("line {} does not name the file: {line:?}", i + 1));
            continue;
        };
        match at {
            At::Field(p) if !rest.starts_with(&format!("{p}: ")) => {
                bad.push(format!("line {} does not name {p}: {line:?}", i + 1));
            }
            At::Document if rest.starts_with("notrack") || rest.starts_with("sysctl") => {
                bad.push(format!("line {} names a field for a document error: {line:?}", i + 1));
            }
            _ => {}
        }
        if line.len() > 1000 {
            bad.push(format!("line {} is {} bytes long", i + 1, line.len()));
        }
    }
    if let Some(first) = lines.first() {
        if !first.to_lowercase().contains(&c.reason.to_lowercase()) {
            bad.push(format!("first line does not say {:?}: {first:?}", c.reason));
        }
    }
    if bad.is_empty() {
        String::new()
    } else {
        format!("case {:?}:\n  {}\n  stderr: {stderr:?}\n", c.name, bad.join("\n  "))
    }
}

#[test]
fn malformed_policies_are_refused_with_field_paths() {
    let scratch = Scratch::new();
    let all = cases();
    assert!(all.len() >= 20);
    let mut report = String::new();
    for (i, c) in all.iter().enumerate() {
        let path = scratch.file(&format!("{i:02}-{}", c.file), &c.content);
        report.push_str(&check(c, &path, &render_nft(&path)));
    }
    assert!(report.is_empty(), "{report}");
}

/// `plan` validates the same way before it reads any live state. As root it runs from a thread
/// in a network namespace of its own, so even a regression that read (or wrote) the firewall
/// first could not reach the host's; without root it cannot change anything anyway.
#[test]
fn plan_refuses_the_same_policies() {
    let scratch = Scratch::new();
    for c in
        cases().into_iter().filter(|c| ["port 70000", "interface with quote injection", "backend pf"].contains(&c.name))
    {
        let path = scratch.file(c.file, &c.content);
        let arg = path.to_string_lossy().into_owned();
        // SAFETY: geteuid has no preconditions and cannot fail.
        let out = if unsafe { libc::geteuid() } == 0 {
            std::thread::spawn(move || {
                let before = fs::read_link("/proc/thread-self/ns/net").expect("netns");
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
                assert_ne!(before, fs::read_link("/proc/thread-self/ns/net").expect("netns"));
                ctguard(&["plan", &arg])
            })
            .join()
            .expect("plan thread")
        } else {
            ctguard(&["plan", &arg])
        };
        let report = check(&c, &path, &out);
        assert!(report.is_empty(), "plan: {report}");
    }
}

#[test]
fn missing_file_is_bad_input() {
    let scratch = Scratch::new();
    let path = scratch.0.join("does-not-exist.toml");
    let out = render_nft(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(out.stdout.is_empty());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with(&format!("ctguard: error: policy {}: cannot read", path.display())), "{stderr}");
}

#[test]
fn a_directory_is_bad_input() {
    let scratch = Scratch::new();
    let out = render_nft(&scratch.0);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("ctguard: error: policy "));
}

/// Decision: an empty document is a valid, empty policy (every top-level field has a default,
/// `notrack` defaults to none). `render` says no table would be created and exits 0.
#[test]
fn empty_file_is_an_empty_policy() {
    let scratch = Scratch::new();
    for (name, content) in [("empty.toml", ""), ("blank.toml", "\n# only a comment\n"), ("empty.json", "{}")] {
        let out = render_nft(&scratch.file(name, content.as_bytes()));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(stdout, "# no [[notrack]] entries: ctguard creates no table\n", "{name}");
    }
}

#[test]
fn policy_on_stdin_is_validated_too() {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new(BIN)
        .args(["render", "--format", "nft", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ctguard");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"[[notrack]]\nprotocols = [\"udp\"]\nports = [65536]\n")
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(out.stdout.is_empty());
    assert_eq!(stderr, "ctguard: error: policy -: notrack[0].ports[0]: 65536 is not a port (1-65535)\n");
}

/// Duplicate keys in a JSON object are as ambiguous as in TOML (which refuses them), and the
/// sysctl map is where they would go unnoticed.
#[test]
fn duplicate_json_sysctl_key_is_refused() {
    let scratch = Scratch::new();
    let path = scratch.file(
        "dup.json",
        br#"{"sysctl": {"net.netfilter.nf_conntrack_max": 1, "net.netfilter.nf_conntrack_max": 999}}"#,
    );
    let out = render_nft(&path);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stdout));
}

/// serde's derived `Deserialize` also takes a struct as a sequence of its fields in order, so
/// `["nft"]` (JSON) or `notrack = [[["udp"], [53]]]` (TOML) pass as policies: fields without
/// names, which "unknown fields refused" cannot check. Only maps should be accepted.
#[test]
fn positional_form_is_refused() {
    let scratch = Scratch::new();
    for (name, content) in [
        ("top.json", r#"["nft", true, [{"protocols":["udp"],"ports":[53]}], {}]"#),
        ("entry.json", r#"{"notrack": [[["udp"], [53]]]}"#),
        ("entry.toml", "notrack = [[[\"udp\"], [53]]]\n"),
    ] {
        let out = render_nft(&scratch.file(name, content.as_bytes()));
        assert_eq!(out.status.code(), Some(2), "{name}: {}", String::from_utf8_lossy(&out.stdout));
    }
}

#[test]
fn render_builtin_policy() {
    for format in ["nft", "iptables", "ip6tables"] {
        let out = ctguard(&["render", "--format", format]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{format}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(out.stderr.is_empty(), "{format}: {}", String::from_utf8_lossy(&out.stderr));
        match format {
            "nft" => assert!(stdout.starts_with("table inet ctguard {\n"), "{stdout}"),
            _ => assert!(stdout.starts_with("*raw\n") && stdout.contains("-j CT --notrack"), "{stdout}"),
        }
        assert!(stdout.contains("# sysctl net.netfilter.nf_conntrack_max = "), "{stdout}");
    }
    // Without --format the policy's backend decides: the built-in one is auto, i.e. nft.
    let out = ctguard(&["render"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("table inet ctguard"));
}
