//! Operations: the man page and completions generated from the clap definition, the systemd
//! units (`systemd-analyze verify` where available), the package metadata, the example policy,
//! persistence into a temp root, and `restore` when nothing was persisted. No kernel state is
//! touched here (the boot re-apply in a namespace is `integration/kernel/ops.rs`).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use clap::CommandFactory;
use serde_json::json;

use ctguard::cli::args::Cli;
use ctguard::model::names::SysctlKey;
use ctguard::model::{parse_policy, Format, Policy};
use ctguard::persist::{
    persist_committed, persist_policy, persist_ruleset, wants_persist, FileAction, PersistError, PersistPaths,
    RulesetKind,
};
use ctguard::txn::{Kind, Requester, TargetRecord, TxnId, TxnRecord};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const UNITS: [&str; 3] = ["ctguard.service", "ctguard-recover.service", "ctguard-restore.service"];

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> TempDir {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("ctguard-ops-{label}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ctguard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ctguard")).args(args).env_remove("JOURNAL_STREAM").output().expect("run ctguard")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn assert_ok(o: &Output) {
    assert_eq!(o.status.code(), Some(0), "stdout: {}\nstderr: {}", stdout(o), String::from_utf8_lossy(&o.stderr));
}

fn verbs() -> Vec<String> {
    Cli::command().get_subcommands().filter(|s| !s.is_hide_set()).map(|s| s.get_name().to_string()).collect()
}

fn find_tool(name: &str) -> Option<PathBuf> {
    ["/usr/bin", "/bin", "/usr/sbin", "/sbin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

// ---------------------------------------------------------------------------------------------
// man and completions

#[test]
fn man_page_names_every_verb_and_the_exit_codes() {
    let o = ctguard(&["man"]);
    assert_ok(&o);
    let page = stdout(&o);
    assert!(page.contains(".TH ctguard 8"), "{page}");
    let verbs = verbs();
    assert!(verbs.len() >= 15, "{verbs:?}");
    for v in &verbs {
        let entry = format!("ctguard\\-{}(8)", v.replace('-', "\\-"));
        assert!(page.contains(&entry), "man page lacks {entry}");
    }
    for section in [".SH \"EXIT STATUS\"", ".SH FILES", ".SH ENVIRONMENT", ".SH \"SEE ALSO\"", ".SH VERSION"] {
        assert!(page.contains(section), "man page lacks {section}");
    }
    assert!(page.contains("committed\\-policy.toml"));
    if let Some(groff) = find_tool("groff") {
        let mut child = Command::new(groff)
            .args(["-man", "-ww", "-z"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("groff");
        std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), page.as_bytes()).expect("write");
        let out = child.wait_with_output().expect("groff output");
        assert!(out.status.success() && out.stderr.is_empty(), "groff: {}", String::from_utf8_lossy(&out.stderr));
    } else {
        eprintln!("groff not installed: man page syntax not checked");
    }
}

#[test]
fn man_out_dir_writes_one_page_per_verb() {
    let dir = TempDir::new("man");
    let out = dir.0.join("man8");
    let o = ctguard(&["man", "--out-dir", out.to_str().expect("utf8")]);
    assert_ok(&o);
    assert!(out.join("ctguard.8").is_file());
    for v in verbs() {
        let page = std::fs::read_to_string(out.join(format!("ctguard-{v}.8"))).expect("page per verb");
        assert!(page.contains(&format!(".TH ctguard-{v} 8")), "{v}: {page}");
    }
}

#[test]
fn completions_for_every_shell() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let o = ctguard(&["completions", shell]);
        assert_ok(&o);
        let text = stdout(&o);
        assert!(text.contains("apply") && text.contains("restore"), "{shell}: {text}");
    }
    let bash = stdout(&ctguard(&["completions", "bash"]));
    assert!(bash.contains("complete -F _ctguard"), "{bash}");
    if let Some(b) = find_tool("bash") {
        let dir = TempDir::new("bash");
        let f = dir.0.join("ctguard.bash");
        std::fs::write(&f, &bash).expect("write");
        let st = Command::new(b).arg("-n").arg(&f).status().expect("bash -n");
        assert!(st.success(), "bash -n failed on the completion script");
    }
    let bad = ctguard(&["completions", "tcsh"]);
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn journald_log_format_is_accepted_and_falls_back_without_a_journal() {
    let o = ctguard(&["--log-format", "journald", "completions", "bash"]);
    assert_ok(&o);
    assert!(stdout(&o).contains("_ctguard"));
}

#[test]
fn journal_stream_naming_stderr_selects_the_journal() {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::process::CommandExt;
    // Where a journal runs, ctguard is run in a mount namespace of its own with an empty
    // tmpfs over the journal's directory, so the fallback can be observed anyway (as root).
    let journal_dir = Path::new("/run/systemd/journal");
    let hide_journal = journal_dir.join("socket").exists();
    let dir = TempDir::new("journal");
    let run = |stream: &str| {
        let err = dir.0.join("stderr");
        let file = std::fs::File::create(&err).expect("stderr file");
        let md = file.metadata().expect("metadata");
        let value = if stream.is_empty() { format!("{}:{}", md.dev(), md.ino()) } else { stream.to_string() };
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ctguard"));
        cmd.args(["completions", "bash"]).env("JOURNAL_STREAM", value).stdout(std::process::Stdio::null()).stderr(file);
        if hide_journal {
            // SAFETY: only async-signal-safe system calls between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    use nix::mount::{mount, MsFlags};
                    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
                    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)?;
                    mount(Some("tmpfs"), journal_dir, Some("tmpfs"), MsFlags::empty(), None::<&str>)?;
                    Ok(())
                });
            }
        }
        let st = cmd.status().expect("run (hiding the journal needs root)");
        assert!(st.success());
        std::fs::read_to_string(&err).expect("read stderr")
    };
    // JOURNAL_STREAM names this very stderr: the journal is chosen (and, absent here, falls back).
    assert!(run("").contains("cannot reach the systemd journal"), "journald was not selected");
    // An inherited value that names something else: plain stderr, no attempt.
    assert!(run("1:2").is_empty());
}

// ---------------------------------------------------------------------------------------------
// systemd units

fn unit(name: &str) -> String {
    std::fs::read_to_string(Path::new(REPO).join("contrib/systemd").join(name)).expect("unit file")
}

/// `Key=value` lines of a unit (comments dropped), all values of repeated keys joined by a space.
fn settings(text: &str) -> BTreeMap<String, String> {
    let mut m: BTreeMap<String, String> = BTreeMap::new();
    for l in text.lines().map(str::trim).filter(|l| !l.starts_with('#') && !l.starts_with('[')) {
        if let Some((k, v)) = l.split_once('=') {
            let e = m.entry(k.to_string()).or_default();
            if !e.is_empty() {
                e.push(' ');
            }
            e.push_str(v);
        }
    }
    m
}

#[test]
fn units_say_what_the_design_requires() {
    let agent = settings(&unit("ctguard.service"));
    assert_eq!(agent["ExecStart"], "/usr/bin/ctguard agent");
    assert_eq!(agent["Restart"], "always");
    assert_eq!(agent["KillMode"], "mixed");
    assert_eq!(agent["RuntimeDirectoryPreserve"], "yes", "the pins live in /run/ctguard");
    assert_eq!(agent["LimitNOFILE"], "65536", "issue 11: descriptors for clients and rollbacks");
    let caps: Vec<&str> = agent["CapabilityBoundingSet"].split_whitespace().collect();
    assert_eq!(caps, ["CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_ADMIN", "CAP_SYS_PTRACE"]);
    // Anything that gives the agent a private mount namespace would hide the namespace pins.
    for k in [
        "ProtectSystem",
        "ProtectHome",
        "PrivateMounts",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectControlGroups",
        "ReadOnlyPaths",
        "InaccessiblePaths",
        "TemporaryFileSystem",
        "PrivateNetwork",
        "MountFlags",
        "NoNewPrivileges",
    ] {
        assert!(!agent.contains_key(k), "ctguard.service must not set {k}");
    }

    let recover = settings(&unit("ctguard-recover.service"));
    assert_eq!(recover["Type"], "oneshot");
    assert_eq!(recover["ExecStart"], "/usr/bin/ctguard recover");
    assert!(recover["Before"].split_whitespace().any(|u| u == "network-pre.target"));
    assert_eq!(recover["DefaultDependencies"], "no");

    let restore = settings(&unit("ctguard-restore.service"));
    assert_eq!(restore["Type"], "oneshot");
    assert_eq!(restore["ExecStart"], "/usr/bin/ctguard restore");
    let after: Vec<&str> = restore["After"].split_whitespace().collect();
    for fw in ["nftables.service", "netfilter-persistent.service", "iptables.service", "ctguard-recover.service"] {
        assert!(after.contains(&fw), "ctguard-restore.service must be ordered after {fw}");
    }
    assert_eq!(restore["ConditionPathExists"], "/var/lib/ctguard/committed-policy.toml");
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let analyze = find_tool("systemd-analyze").expect("systemd-analyze (package systemd, integration/packages.txt)");
    // verify wants ExecStart to exist: copies pointing at the binary under test.
    let dir = TempDir::new("units");
    let mut files = Vec::new();
    for u in UNITS {
        let text = unit(u).replace("/usr/bin/ctguard", env!("CARGO_BIN_EXE_ctguard"));
        let p = dir.0.join(u);
        std::fs::write(&p, text).expect("write unit");
        files.push(p);
    }
    let out =
        Command::new(analyze).current_dir(&dir.0).args(["verify", "--man=no"]).args(&files).output().expect("verify");
    let err = String::from_utf8_lossy(&out.stderr);
    // verify exits 0 on unknown keys too: any line about our units is a failure.
    let ours: Vec<&str> = err.lines().filter(|l| l.contains("ctguard")).collect();
    assert!(out.status.success() && ours.is_empty(), "systemd-analyze verify:\n{err}");

    // The check itself works: a misspelt key is reported.
    let bad = dir.0.join("ctguard-bad.service");
    std::fs::write(
        &bad,
        unit("ctguard.service").replace("/usr/bin/ctguard", env!("CARGO_BIN_EXE_ctguard")) + "KillMod=mixed\n",
    )
    .expect("write");
    let out = Command::new(find_tool("systemd-analyze").expect("tool"))
        .current_dir(&dir.0)
        .args(["verify", "--man=no"])
        .arg(&bad)
        .output()
        .expect("verify");
    assert!(String::from_utf8_lossy(&out.stderr).contains("KillMod"), "a bad key went unnoticed");
}

// ---------------------------------------------------------------------------------------------
// Package metadata and shipped files

#[test]
fn example_policy_is_the_builtin_one() {
    let text = std::fs::read_to_string(Path::new(REPO).join("contrib/example-policy.toml")).expect("example");
    assert_eq!(parse_policy(&text, Format::Toml).expect("valid"), Policy::builtin());
    assert!(text.lines().filter(|l| l.trim_start().starts_with('#')).count() > 20, "the example explains its fields");
}

#[test]
fn deb_metadata_is_complete() {
    let manifest: toml::Value =
        toml::from_str(&std::fs::read_to_string(Path::new(REPO).join("Cargo.toml")).expect("Cargo.toml"))
            .expect("toml");
    let deb = &manifest["package"]["metadata"]["deb"];
    let depends = deb["depends"].as_str().expect("depends");
    assert!(depends.contains("nftables | iptables"), "{depends}");
    let assets = deb["assets"].as_array().expect("assets");
    let dests: Vec<&str> = assets.iter().filter_map(|a| a.get(1).and_then(toml::Value::as_str)).collect();
    for want in [
        "usr/bin/",
        "usr/share/man/man8/",
        "usr/share/bash-completion/completions/ctguard",
        "usr/share/ctguard/example-policy.toml",
        "usr/share/ctguard/ansible/",
    ] {
        assert!(dests.contains(&want), "no asset installs {want}: {dests:?}");
    }
    // Sources outside target/ are in the tree; target/deb-assets/ is staged by deb-test.sh.
    for a in assets {
        let src = a.get(0).and_then(toml::Value::as_str).expect("source");
        if src.starts_with("target/release/") {
            continue;
        }
        if let Some(rest) = src.strip_prefix("target/deb-assets/") {
            let script = std::fs::read_to_string(Path::new(REPO).join("integration/deb-test.sh")).expect("script");
            let dir = rest.split('/').next().unwrap_or(rest);
            assert!(script.contains(&format!("$assets/{dir}")), "deb-test.sh does not stage {src}");
            continue;
        }
        assert!(Path::new(REPO).join(src).exists(), "asset source {src} is missing");
    }
    let units = deb["systemd-units"].as_array().expect("systemd-units");
    let names: Vec<&str> = units.iter().filter_map(|u| u["unit-name"].as_str()).collect();
    assert_eq!(names, ["ctguard", "ctguard-recover", "ctguard-restore"]);
    for u in units {
        assert_eq!(u["start"].as_bool(), Some(false), "installing must not start {u}");
        assert_eq!(u["restart-after-upgrade"].as_bool(), Some(false), "an upgrade must not restart {u}");
        let dir = u["unit-scripts"].as_str().expect("unit-scripts");
        let name = u["unit-name"].as_str().expect("unit-name");
        assert!(Path::new(REPO).join(dir).join(format!("{name}.service")).is_file());
    }
    // lintian's no-changelog: a Debian changelog for this version.
    let changelog = deb["changelog"].as_str().expect("changelog");
    let text = std::fs::read_to_string(Path::new(REPO).join(changelog)).expect("Debian changelog");
    let version = manifest["package"]["version"].as_str().expect("version");
    assert!(text.starts_with(&format!("ctguard ({version}-1) ")), "{text}");
}

/// Removing the package stops the agent, which rolls back what is pending: the description
/// and the prerm (before the generated stop) say so.
#[test]
fn deb_removal_behaviour_is_documented_in_the_package() {
    let manifest: toml::Value =
        toml::from_str(&std::fs::read_to_string(Path::new(REPO).join("Cargo.toml")).expect("Cargo.toml"))
            .expect("toml");
    let deb = &manifest["package"]["metadata"]["deb"];
    let description = deb["extended-description"].as_str().expect("extended-description");
    assert!(description.contains("Removing this package stops the agent, which rolls back"), "{description}");
    let dir = deb["maintainer-scripts"].as_str().expect("maintainer-scripts");
    let prerm = std::fs::read_to_string(Path::new(REPO).join(dir).join("prerm")).expect("prerm");
    let (before, _) = prerm.split_once("#DEBHELPER#").expect("prerm keeps cargo-deb's generated part");
    assert!(before.contains("rolls back every pending transaction"), "{prerm}");
    let readme = std::fs::read_to_string(Path::new(REPO).join("README.md")).expect("README");
    assert!(readme.contains("**Removing the package**"), "the operator guide says nothing");
    if let Some(sh) = find_tool("sh") {
        let o = Command::new(sh).args(["-n"]).arg(Path::new(REPO).join(dir).join("prerm")).output().expect("sh -n");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

#[test]
fn vagrantfile_is_valid_ruby() {
    let ruby = find_tool("ruby").expect("ruby (integration/packages.txt)");
    let out = Command::new(ruby).arg("-c").arg(Path::new(REPO).join("vagrant/Vagrantfile")).output().expect("ruby -c");
    assert!(out.status.success(), "ruby -c: {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout(&out).contains("Syntax OK"));
}

// ---------------------------------------------------------------------------------------------
// Persistence into a temp root

fn key(s: &str) -> SysctlKey {
    SysctlKey::parse(s).expect("key")
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o7777
}

fn leftovers(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(leftovers(&p));
        } else if p.to_string_lossy().contains("ctguard-tmp") {
            out.push(p.display().to_string());
        }
    }
    out
}

const RICH: &str = r#"backend = "nft"
persist = true
[[notrack]]
protocols = ["udp", "tcp"]
ports = [53, "5300-5310"]
sources = ["198.18.0.0/15"]
[sysctl]
"net.netfilter.nf_conntrack_max" = 1048576
"net.netfilter.nf_conntrack_buckets" = "auto"
"net.netfilter.nf_conntrack_udp_timeout" = 25
"#;

#[test]
fn persist_policy_writes_every_file_atomically_and_idempotently() {
    let root = TempDir::new("persist");
    let paths = PersistPaths::under(&root.0);
    let policy = parse_policy(RICH, Format::Toml).expect("valid");
    let mut sysctls = BTreeMap::new();
    sysctls.insert(key("net.netfilter.nf_conntrack_max"), 1_048_576);
    sysctls.insert(key("net.netfilter.nf_conntrack_buckets"), 1_048_576);
    sysctls.insert(key("net.netfilter.nf_conntrack_udp_timeout"), 25);
    // An older hand-made modprobe file is replaced, and kept in the record.
    std::fs::create_dir_all(&paths.modprobe_d).expect("mkdir");
    std::fs::write(paths.modprobe_file(), "options nf_conntrack hashsize=1024\n").expect("write");

    let rec = persist_policy(&paths, &policy, &sysctls, "20261123-120000-abcd").expect("persist");
    assert!(rec.warnings.is_empty(), "{:?}", rec.warnings);
    assert_eq!(rec.files.len(), 4);
    assert!(rec.files.iter().all(|f| f.action == FileAction::Written), "{rec:?}");
    let sysctl = std::fs::read_to_string(paths.sysctl_file()).expect("sysctl.d");
    assert!(sysctl.contains("20261123-120000-abcd"));
    let values: Vec<&str> = sysctl.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        values,
        [
            "net.netfilter.nf_conntrack_buckets = 1048576",
            "net.netfilter.nf_conntrack_max = 1048576",
            "net.netfilter.nf_conntrack_udp_timeout = 25",
        ]
    );
    assert_eq!(paths.sysctl_file(), root.0.join("etc/sysctl.d/90-ctguard.conf"));
    let modules = std::fs::read_to_string(root.0.join("etc/modules-load.d/ctguard.conf")).expect("modules-load.d");
    assert_eq!(modules.lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>(), ["nf_conntrack"]);
    let modprobe = std::fs::read_to_string(root.0.join("etc/modprobe.d/ctguard.conf")).expect("modprobe.d");
    assert_eq!(
        modprobe.lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>(),
        ["options nf_conntrack hashsize=1048576"]
    );
    let prev = rec.files.iter().find(|f| f.path.ends_with("modprobe.d/ctguard.conf")).expect("modprobe entry");
    assert_eq!(prev.previous.as_deref(), Some("options nf_conntrack hashsize=1024\n"));
    assert_eq!(mode(&paths.sysctl_file()), 0o644);
    let saved =
        std::fs::read_to_string(root.0.join("var/lib/ctguard/committed-policy.toml")).expect("committed policy");
    assert_eq!(parse_policy(&saved, Format::Toml).expect("saved policy parses"), policy);
    assert_eq!(mode(&paths.committed_policy()), 0o600);
    assert!(leftovers(&root.0).is_empty(), "{:?}", leftovers(&root.0));

    // The same again: nothing rewritten.
    let again = persist_policy(&paths, &policy, &sysctls, "20261123-120000-abcd").expect("persist");
    assert!(again.files.iter().all(|f| f.action == FileAction::Unchanged), "{again:?}");

    // A later persisted policy without sysctls removes the sysctl and modprobe files.
    let plain =
        parse_policy("persist = true\n[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\n", Format::Toml).expect("ok");
    let later = persist_policy(&paths, &plain, &BTreeMap::new(), "20261123-130000-beef").expect("persist");
    assert!(!paths.sysctl_file().exists() && !paths.modprobe_file().exists());
    let removed: Vec<&str> =
        later.files.iter().filter(|f| f.action == FileAction::Removed).map(|f| f.path.as_str()).collect();
    assert_eq!(removed.len(), 2, "{later:?}");
    let text = later.describe().join("\n");
    assert!(text.contains("removed ") && text.contains("net.netfilter.nf_conntrack_udp_timeout = 25"), "{text}");
    assert!(paths.modules_load_file().exists(), "nf_conntrack is still loaded at boot");
}

#[test]
fn persist_ruleset_keeps_the_previous_file() {
    let root = TempDir::new("ruleset");
    let paths = PersistPaths::under(&root.0);
    std::fs::create_dir_all(root.0.join("etc")).expect("mkdir");
    let old = "#!/usr/sbin/nft -f\nflush ruleset\ntable inet filter {}\n";
    std::fs::write(&paths.nftables_conf, old).expect("write");
    std::fs::set_permissions(&paths.nftables_conf, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let new = "flush ruleset\ntable inet host {\n  chain input {\n    type filter hook input priority filter; policy accept;\n  }\n}\n";
    let rec = persist_ruleset(&paths, RulesetKind::Nft, new).expect("persist");
    assert_eq!(std::fs::read_to_string(&paths.nftables_conf).expect("read"), new);
    assert_eq!(mode(&paths.nftables_conf), 0o755, "an existing file keeps its mode");
    assert_eq!(rec.files[0].previous.as_deref(), Some(old));
    assert!(rec.warnings.is_empty());
    assert!(rec.describe().iter().any(|l| l.trim() == "table inet filter {}"));

    let partial = persist_ruleset(&paths, RulesetKind::Nft, "add table inet x\n").expect("persist");
    assert_eq!(partial.warnings.len(), 1, "an nft script without flush ruleset is flagged");

    let dump = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p udp --dport 53 -j ACCEPT\nCOMMIT\n";
    let rec = persist_ruleset(&paths, RulesetKind::IptablesV6, dump).expect("persist");
    assert_eq!(std::fs::read_to_string(root.0.join("etc/iptables/rules.v6")).expect("rules.v6"), dump);
    assert_eq!(mode(&root.0.join("etc/iptables/rules.v6")), 0o640);
    assert_eq!(mode(&root.0.join("etc/iptables")), 0o755, "a created directory is readable by the host's services");
    assert_eq!(rec.files[0].previous, None);
    assert!(!root.0.join("etc/iptables/rules.v4").exists());
}

fn record(kind: Kind) -> TxnRecord {
    let target = TargetRecord { label: "host".into(), path: "/proc/1/ns/net".into(), pin: None, dev: 0, ino: 0 };
    let requester = Requester { uid: 0, pid: 1, ssh: None, origin: None, person: None };
    TxnRecord::new(TxnId::generate(1_700_000_000, 0xbeef), kind, target, requester, "boot".into(), 1_700_000_000)
}

#[test]
fn committed_records_persist_only_when_asked() {
    let root = TempDir::new("record");
    let paths = PersistPaths::under(&root.0);
    let no_live = |_: &SysctlKey| -> Option<u64> { None };

    // The built-in policy does not ask.
    let mut rec = record(Kind::Policy);
    rec.policy = Some(serde_json::to_value(Policy::builtin()).expect("json"));
    assert!(!wants_persist(&rec));
    assert!(persist_committed(&rec, &paths, &no_live).expect("ok").is_none());
    assert!(!root.0.join("etc").exists(), "nothing may be written without persistence");

    // `persist = true`: "auto" values come from what the transaction wrote, else from `live`.
    let mut policy = Policy::builtin();
    policy.persist = true;
    rec.policy = Some(serde_json::to_value(&policy).expect("json"));
    rec.undo = json!({"sysctls": [{"key": "net.netfilter.nf_conntrack_max", "old": 65536, "new": 262144}]});
    let live = |k: &SysctlKey| (k.as_str() == "net.netfilter.nf_conntrack_buckets").then_some(262_144u64);
    let out = persist_committed(&rec, &paths, &live).expect("persist").expect("asked");
    assert!(out.warnings.is_empty(), "{:?}", out.warnings);
    let sysctl = std::fs::read_to_string(paths.sysctl_file()).expect("sysctl.d");
    assert!(sysctl.contains("net.netfilter.nf_conntrack_max = 262144"), "{sysctl}");
    assert!(sysctl.contains("net.netfilter.nf_conntrack_buckets = 262144"), "{sysctl}");
    assert!(std::fs::read_to_string(paths.modprobe_file()).expect("modprobe").contains("hashsize=262144"));

    // A value that cannot be resolved is left out, with a warning.
    rec.undo = json!({});
    let out = persist_committed(&rec, &paths, &no_live).expect("persist").expect("asked");
    assert_eq!(out.warnings.len(), 2, "{:?}", out.warnings);

    // `apply --persist` marks the record's options (or, in older records, the undo record).
    let mut rec = record(Kind::Policy);
    rec.policy = Some(serde_json::to_value(Policy::builtin()).expect("json"));
    assert!(!wants_persist(&rec));
    rec.options.persist = true;
    assert!(wants_persist(&rec));
    rec.options.persist = false;
    rec.undo = json!({"persist": true});
    assert!(wants_persist(&rec));

    // A ruleset transaction: the applied file goes where the firewall service loads it.
    let mut rs = record(Kind::Ruleset);
    rs.ruleset = Some("*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n".into());
    assert!(persist_committed(&rs, &paths, &no_live).expect("ok").is_none());
    rs.undo = json!({"persist": true, "apply": {"format": "iptables", "family": "v4"}});
    let out = persist_committed(&rs, &paths, &no_live).expect("persist").expect("asked");
    assert_eq!(out.files[0].path, paths.iptables_rules_v4.display().to_string());
    rs.ruleset = None;
    assert!(matches!(persist_committed(&rs, &paths, &no_live), Err(PersistError::NoRuleset(_))));

    // on_committed refuses a target that is not the initial namespace (dev/ino 0/0 here).
    rec.undo = json!({"persist": true});
    match ctguard::persist::on_committed(&rec, &paths) {
        Err(PersistError::NotHost { label }) => assert_eq!(label, "host"),
        other => panic!("expected NotHost, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// restore without anything persisted

#[test]
fn restore_without_a_persisted_policy_does_nothing() {
    let dir = TempDir::new("restore");
    let state = dir.0.join("state");
    let run = dir.0.join("run");
    let (s, r) = (state.to_str().expect("utf8"), run.to_str().expect("utf8"));
    let o = ctguard(&["--state-dir", s, "--run-dir", r, "restore"]);
    assert_ok(&o);
    assert!(stdout(&o).contains("nothing persisted"), "{}", stdout(&o));
    let o = ctguard(&["--state-dir", s, "--run-dir", r, "--json", "restore"]);
    assert_ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["exit"], 0, "{v}");
    assert_eq!(v["data"]["changed"], false, "{v}");
    assert_eq!(v["data"]["persisted"], false, "{v}");
    assert!(!run.exists(), "no agent may be started for nothing");
    let missing = dir.0.join("nope.toml");
    let o = ctguard(&["--state-dir", s, "--run-dir", r, "restore", "--policy-file", missing.to_str().expect("utf8")]);
    assert_eq!(o.status.code(), Some(2), "an explicit file that does not exist is bad input");
}
