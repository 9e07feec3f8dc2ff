//! Persistence after COMMITTED (DESIGN §6 `persist`): what makes a confirmed change survive a
//! reboot. Opt-in (`apply --persist`, or `persist = true` in the policy) and acted on only once
//! a transaction is COMMITTED — never before, so a reboot during a pending transaction boots the
//! previous persisted configuration (DESIGN §2).
//!
//! A policy transaction writes:
//! - `/etc/sysctl.d/90-ctguard.conf`: the policy's sysctls with `"auto"` resolved (applied at
//!   boot by `systemd-sysctl`);
//! - `/etc/modules-load.d/ctguard.conf`: `nf_conntrack`, so those sysctls exist when applied;
//! - `/etc/modprobe.d/ctguard.conf`: `options nf_conntrack hashsize=N` when the buckets are set;
//! - `$STATE_DIR/committed-policy.toml`: the committed policy, re-applied at boot by
//!   `ctguard-restore.service` (`ctguard restore`), ordered after the host's own firewall
//!   service (Debian's `/etc/nftables.conf` begins with `flush ruleset`).
//!
//! A ruleset transaction writes the file the host's firewall service loads (`/etc/nftables.conf`
//! or `/etc/iptables/rules.v4|v6`; the `/etc/sysconfig/…` files on the Red Hat family), and
//! the previous content is returned in the [`PersistRecord`] for the journal (`ctguard show`).
//!
//! Every file is written atomically: a temp file in the same directory, fsync, rename, fsync of
//! the directory. A file whose content would not change is left alone. Paths come from
//! [`PersistPaths`], so tests write into a temp root.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::names::SysctlKey;
use crate::model::{parse_policy, Format, Policy, SysctlValue};
use crate::txn::{Kind, TargetRecord, TxnRecord};

/// File name under [`PersistPaths::sysctl_d`].
pub const SYSCTL_FILE: &str = "90-ctguard.conf";
/// File name under [`PersistPaths::modules_load_d`].
pub const MODULES_LOAD_FILE: &str = "ctguard.conf";
/// File name under [`PersistPaths::modprobe_d`].
pub const MODPROBE_FILE: &str = "ctguard.conf";
/// File name of the committed policy under [`PersistPaths::state_dir`].
pub const COMMITTED_POLICY_FILE: &str = "committed-policy.toml";
/// The key whose value becomes `options nf_conntrack hashsize=`.
pub const BUCKETS_KEY: &str = "net.netfilter.nf_conntrack_buckets";
/// Default state dir (same as the CLI's `--state-dir` default).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ctguard";

/// Errors of persistence. Nothing here is fatal to the transaction: it is COMMITTED already; the
/// caller logs the error and notes it in the journal.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// Persistence writes host files (`/etc`, read at boot by the host); a transaction on
    /// another network namespace has nothing to persist into.
    #[error("persistence applies to the host only; transaction target {label} is another network namespace")]
    NotHost {
        /// The target's label.
        label: String,
    },
    /// The record's policy could not be turned back into a policy.
    #[error("the committed policy cannot be read back: {0}")]
    BadPolicy(String),
    /// A ruleset transaction whose record holds no ruleset text.
    #[error("transaction {0} asks for persistence but its record holds no ruleset")]
    NoRuleset(String),
    /// A file could not be written, renamed, synced or removed.
    #[error("{step} {path}: {source}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Where persistence writes. [`PersistPaths::default`] is the Debian layout; [`PersistPaths::
/// under`] re-roots everything (tests); [`PersistPaths::detect`] picks the distribution's
/// firewall files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistPaths {
    /// Directory of [`SYSCTL_FILE`] (`/etc/sysctl.d`).
    pub sysctl_d: PathBuf,
    /// Directory of [`MODULES_LOAD_FILE`] (`/etc/modules-load.d`).
    pub modules_load_d: PathBuf,
    /// Directory of [`MODPROBE_FILE`] (`/etc/modprobe.d`).
    pub modprobe_d: PathBuf,
    /// ctguard's state dir, where [`COMMITTED_POLICY_FILE`] lives (`/var/lib/ctguard`).
    pub state_dir: PathBuf,
    /// The file the host's nftables service loads (`/etc/nftables.conf`).
    pub nftables_conf: PathBuf,
    /// The IPv4 file the host's iptables service loads (`/etc/iptables/rules.v4`).
    pub iptables_rules_v4: PathBuf,
    /// The IPv6 file the host's iptables service loads (`/etc/iptables/rules.v6`).
    pub iptables_rules_v6: PathBuf,
}

impl Default for PersistPaths {
    /// The Debian/Ubuntu layout (`nftables.service`, `netfilter-persistent`) and the default
    /// state dir.
    fn default() -> Self {
        PersistPaths::under(Path::new("/"))
    }
}

impl PersistPaths {
    /// The Debian layout with every path under `root` (tests pass a temp dir).
    pub fn under(root: &Path) -> PersistPaths {
        let r = |p: &str| root.join(p);
        PersistPaths {
            sysctl_d: r("etc/sysctl.d"),
            modules_load_d: r("etc/modules-load.d"),
            modprobe_d: r("etc/modprobe.d"),
            state_dir: r(DEFAULT_STATE_DIR.trim_start_matches('/')),
            nftables_conf: r("etc/nftables.conf"),
            iptables_rules_v4: r("etc/iptables/rules.v4"),
            iptables_rules_v6: r("etc/iptables/rules.v6"),
        }
    }

    /// The layout of the distribution installed under `root` (`/` on a real host), with ctguard's
    /// state in `state_dir`: the Red Hat family loads `/etc/sysconfig/nftables.conf` and
    /// `/etc/sysconfig/iptables|ip6tables` (iptables-services); everything else gets the Debian
    /// paths (`/etc/nftables.conf`, `/etc/iptables/rules.v4|v6`).
    pub fn detect(root: &Path, state_dir: &Path) -> PersistPaths {
        let mut p = PersistPaths::under(root);
        p.state_dir = state_dir.to_path_buf();
        let sysconfig = root.join("etc/sysconfig");
        let red_hat = root.join("etc/redhat-release").exists() || sysconfig.join("nftables.conf").exists();
        if red_hat && !root.join("etc/nftables.conf").exists() {
            p.nftables_conf = sysconfig.join("nftables.conf");
        }
        if red_hat && !root.join("etc/iptables").is_dir() {
            p.iptables_rules_v4 = sysconfig.join("iptables");
            p.iptables_rules_v6 = sysconfig.join("ip6tables");
        }
        p
    }

    /// `$STATE_DIR/committed-policy.toml`.
    pub fn committed_policy(&self) -> PathBuf {
        self.state_dir.join(COMMITTED_POLICY_FILE)
    }

    /// `…/sysctl.d/90-ctguard.conf`.
    pub fn sysctl_file(&self) -> PathBuf {
        self.sysctl_d.join(SYSCTL_FILE)
    }

    /// `…/modules-load.d/ctguard.conf`.
    pub fn modules_load_file(&self) -> PathBuf {
        self.modules_load_d.join(MODULES_LOAD_FILE)
    }

    /// `…/modprobe.d/ctguard.conf`.
    pub fn modprobe_file(&self) -> PathBuf {
        self.modprobe_d.join(MODPROBE_FILE)
    }

    /// The firewall file a ruleset of `kind` persists into.
    pub fn ruleset_file(&self, kind: RulesetKind) -> &Path {
        match kind {
            RulesetKind::Nft => &self.nftables_conf,
            RulesetKind::IptablesV4 => &self.iptables_rules_v4,
            RulesetKind::IptablesV6 => &self.iptables_rules_v6,
        }
    }
}

/// What a ruleset file is, hence which host file it persists into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RulesetKind {
    /// An `nft -f` script → `nftables_conf`.
    Nft,
    /// An IPv4 iptables-restore dump → `iptables_rules_v4`.
    IptablesV4,
    /// An IPv6 iptables-restore dump → `iptables_rules_v6`.
    IptablesV6,
}

/// What happened to one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileAction {
    /// Written (created or replaced).
    Written,
    /// Already held exactly this content; left alone.
    Unchanged,
    /// Removed (the committed policy no longer needs it).
    Removed,
}

/// One file persistence touched, with what it held before (for the journal and `show`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedFile {
    /// Absolute path.
    pub path: String,
    /// What was done.
    pub action: FileAction,
    /// The content before, when the file existed (kept so an operator can put it back).
    #[serde(default)]
    pub previous: Option<String>,
}

/// What one persistence did. Serializable: the agent stores it in the transaction's journal
/// record so `ctguard show TXID` can print it (previous contents included).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistRecord {
    /// Every file considered, in the order handled.
    pub files: Vec<PersistedFile>,
    /// Things that were not persisted, and why (one line each).
    #[serde(default)]
    pub warnings: Vec<String>,
}

impl PersistRecord {
    /// Lines for `ctguard show`: one per file (`written /etc/sysctl.d/90-ctguard.conf`), each
    /// followed by the previous content indented, then the warnings.
    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        for f in &self.files {
            let verb = match f.action {
                FileAction::Written => "written",
                FileAction::Unchanged => "unchanged",
                FileAction::Removed => "removed",
            };
            out.push(format!("{verb} {}", f.path));
            if f.action != FileAction::Unchanged {
                match &f.previous {
                    Some(p) => {
                        out.push("  previous content:".to_string());
                        out.extend(p.lines().map(|l| format!("    {l}")));
                    }
                    None => out.push("  (did not exist before)".to_string()),
                }
            }
        }
        out.extend(self.warnings.iter().map(|w| format!("warning: {w}")));
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Atomic files

fn io_err(step: &'static str, path: &Path) -> impl FnOnce(io::Error) -> PersistError {
    let path = path.to_path_buf();
    move |source| PersistError::Io { step, path, source }
}

/// Reads a file; `None` when it does not exist.
fn read_existing(path: &Path) -> Result<Option<String>, PersistError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(String::from_utf8_lossy(&b).into_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("cannot read", path)(e)),
    }
}

/// Writes `content` to `path` crash-safely: `.NAME.ctguard-tmp` in the same directory, fsync,
/// rename over `path`, fsync the directory. The parent directory is created (0755) when
/// missing. An existing file keeps its mode; a new one gets `mode`. After `Ok` the new content
/// survives a crash; before, the old one does — never a torn file.
pub fn write_atomic(path: &Path, content: &[u8], mode: u32) -> Result<(), PersistError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        fs::DirBuilder::new().recursive(true).mode(0o755).create(dir).map_err(io_err("cannot create", dir))?;
        // The agent's unit runs with UMask=0077; the host's services read these directories.
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).map_err(io_err("cannot chmod", dir))?;
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.ctguard-tmp"));
    let mode = fs::metadata(path).map(|m| m.permissions().mode() & 0o7777).unwrap_or(mode);
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_err("cannot create", &tmp))?;
        f.set_permissions(fs::Permissions::from_mode(mode)).map_err(io_err("cannot chmod", &tmp))?;
        f.write_all(content).map_err(io_err("cannot write", &tmp))?;
        f.sync_all().map_err(io_err("cannot fsync", &tmp))?;
        drop(f);
        fs::rename(&tmp, path).map_err(io_err("cannot rename over", path))
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("cannot fsync directory", dir))
}

/// Puts `content` into `path` unless it already holds exactly that; records what it held.
fn put(rec: &mut PersistRecord, path: &Path, content: &str, mode: u32) -> Result<(), PersistError> {
    let previous = read_existing(path)?;
    let action = if previous.as_deref() == Some(content) {
        FileAction::Unchanged
    } else {
        write_atomic(path, content.as_bytes(), mode)?;
        FileAction::Written
    };
    let previous = if action == FileAction::Unchanged { None } else { previous };
    rec.files.push(PersistedFile { path: path.display().to_string(), action, previous });
    Ok(())
}

/// Removes `path` if it exists (then fsyncs the directory); records what it held.
fn remove(rec: &mut PersistRecord, path: &Path) -> Result<(), PersistError> {
    let Some(previous) = read_existing(path)? else { return Ok(()) };
    fs::remove_file(path).map_err(io_err("cannot remove", path))?;
    if let Some(dir) = path.parent() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("cannot fsync directory", dir))?;
    }
    rec.files.push(PersistedFile {
        path: path.display().to_string(),
        action: FileAction::Removed,
        previous: Some(previous),
    });
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Policies

fn header(what: &str, txid: &str) -> String {
    format!(
        "# Written by ctguard when transaction {txid} was committed with persistence.\n\
         # {what}\n\
         # Replaced by the next persisted ctguard commit; remove it to stop persisting.\n"
    )
}

/// The policy as a TOML document in the DESIGN §6 schema (the form `ctguard apply` reads), with
/// `header` lines (each already starting with `#`) on top. Checked: the text parses back to
/// exactly `policy`.
pub fn policy_toml(policy: &Policy, header: &str) -> Result<String, PersistError> {
    let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string());
    let list = |items: Vec<String>| format!("[{}]", items.join(", "));
    let mut s = String::from(header);
    let _ = writeln!(s, "backend = {}", q(policy.backend.as_str()));
    let _ = writeln!(s, "persist = {}", policy.persist);
    for n in &policy.notrack {
        let _ = writeln!(s, "\n[[notrack]]");
        let _ = writeln!(s, "protocols = {}", list(n.protocols.iter().map(|p| q(p.as_str())).collect()));
        let ports = n.ports.iter().map(|r| if r.is_single() { r.lo.to_string() } else { q(&r.to_string()) }).collect();
        let _ = writeln!(s, "ports = {}", list(ports));
        let _ = writeln!(s, "sources = {}", list(n.sources.iter().map(|p| q(&p.to_string())).collect()));
        let _ = writeln!(s, "interfaces = {}", list(n.interfaces.iter().map(|i| q(i.as_str())).collect()));
        if n.side != crate::model::Side::Serving {
            let _ = writeln!(s, "side = {}", q(n.side.as_str()));
            let _ = writeln!(s, "upstreams = {}", list(n.upstreams.iter().map(|p| q(&p.to_string())).collect()));
        }
        let _ = writeln!(s, "local_only = {}", n.local_only);
        let _ = writeln!(s, "accept_untracked = {}", n.accept_untracked);
        let _ = writeln!(s, "flush_existing = {}", n.flush_existing);
    }
    if !policy.sysctl.is_empty() {
        let _ = writeln!(s, "\n[sysctl]");
        for (k, v) in &policy.sysctl {
            let v = match v {
                SysctlValue::Int(n) => n.to_string(),
                SysctlValue::Auto => q("auto"),
            };
            let _ = writeln!(s, "{} = {v}", q(k.as_str()));
        }
    }
    match parse_policy(&s, Format::Toml) {
        Ok(back) if back == *policy => Ok(s),
        Ok(_) => Err(PersistError::BadPolicy("the TOML form does not read back as the same policy".into())),
        Err(e) => Err(PersistError::BadPolicy(e.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))),
    }
}

/// Turns a journaled policy (`TxnRecord::policy`: the serialized validated [`Policy`], whose
/// port ranges are `{"lo": …, "hi": …}` objects) back into a validated policy. Documents
/// already in the DESIGN §6 schema are accepted as they are.
pub fn policy_from_record(v: &Value) -> Result<Policy, PersistError> {
    let mut doc = v.clone();
    if let Some(entries) = doc.get_mut("notrack").and_then(Value::as_array_mut) {
        for e in entries {
            if let Some(ports) = e.get_mut("ports").and_then(Value::as_array_mut) {
                for p in ports.iter_mut() {
                    let range = (p.get("lo").and_then(Value::as_u64), p.get("hi").and_then(Value::as_u64));
                    if let (Some(lo), Some(hi)) = range {
                        *p = if lo == hi { Value::from(lo) } else { Value::from(format!("{lo}-{hi}")) };
                    }
                }
            }
        }
    }
    let text = serde_json::to_string(&doc).map_err(|e| PersistError::BadPolicy(e.to_string()))?;
    parse_policy(&text, Format::Json)
        .map_err(|e| PersistError::BadPolicy(e.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")))
}

/// Persists a committed policy (DESIGN §6): the sysctl.d file with `sysctls` (the policy's keys
/// with `"auto"` already resolved; keys absent from the map are not persisted), modules-load.d
/// (`nf_conntrack`), modprobe.d (`hashsize=` the buckets value, removed when the policy sets
/// none), and the committed policy in the state dir (always with `persist = true`). A sysctl.d
/// file from an earlier persisted policy is removed when this one sets no sysctl.
///
/// Guarantees: each file is replaced atomically or left as it was; files already holding the
/// right content are not rewritten. Not atomic across files: on error, the files before the
/// failing one are already written (each of them consistent), which the error names.
pub fn persist_policy(
    paths: &PersistPaths,
    policy: &Policy,
    sysctls: &BTreeMap<SysctlKey, u64>,
    txid: &str,
) -> Result<PersistRecord, PersistError> {
    let mut rec = PersistRecord::default();
    for k in policy.sysctl.keys().filter(|k| !sysctls.contains_key(*k)) {
        rec.warnings.push(format!("sysctl {k} not persisted: its value could not be resolved"));
    }
    // modules-load.d first: the module must load before systemd-sysctl applies the values.
    let modules = format!(
        "{}nf_conntrack\n",
        header("Loads nf_conntrack at boot so the net.netfilter sysctls exist when systemd-sysctl runs.", txid)
    );
    put(&mut rec, &paths.modules_load_file(), &modules, 0o644)?;
    let buckets = sysctls.iter().find(|(k, _)| k.as_str() == BUCKETS_KEY).map(|(_, v)| *v);
    match buckets {
        Some(n) => {
            let text = format!(
                "{}options nf_conntrack hashsize={n}\n",
                header("Conntrack hash table size at module load (the nf_conntrack_buckets of the policy).", txid)
            );
            put(&mut rec, &paths.modprobe_file(), &text, 0o644)?;
        }
        None => remove(&mut rec, &paths.modprobe_file())?,
    }
    if sysctls.is_empty() {
        remove(&mut rec, &paths.sysctl_file())?;
    } else {
        let mut text = header("Applied at boot by systemd-sysctl (after modules-load.d/ctguard.conf).", txid);
        for (k, v) in sysctls {
            let _ = writeln!(text, "{k} = {v}");
        }
        put(&mut rec, &paths.sysctl_file(), &text, 0o644)?;
    }
    let mut saved = policy.clone();
    saved.persist = true;
    let head = header("Re-applied at boot by ctguard-restore.service (ctguard restore).", txid);
    let toml = policy_toml(&saved, &head)?;
    if !paths.state_dir.is_dir() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&paths.state_dir)
            .map_err(io_err("cannot create", &paths.state_dir))?;
    }
    put(&mut rec, &paths.committed_policy(), &toml, 0o600)?;
    Ok(rec)
}

/// Persists a committed ruleset: writes `text` into the file the host's firewall service loads
/// for `kind` ([`PersistPaths::ruleset_file`]), keeping the previous content in the returned
/// record. The file is what was applied, byte for byte; an nft script without `flush ruleset`
/// is written too, with a warning (at boot it loads onto whatever the boot loaded before it).
/// A new file gets mode 0644 (nftables) or 0640 (iptables dumps); an existing one keeps its mode.
pub fn persist_ruleset(paths: &PersistPaths, kind: RulesetKind, text: &str) -> Result<PersistRecord, PersistError> {
    let mut rec = PersistRecord::default();
    let mode = match kind {
        RulesetKind::Nft => {
            let flushes = text.lines().any(|l| l.split('#').next().unwrap_or("").trim() == "flush ruleset");
            if !flushes {
                rec.warnings.push(
                    "the nft script has no `flush ruleset`: at boot it is loaded on top of whatever was loaded before it"
                        .into(),
                );
            }
            0o644
        }
        RulesetKind::IptablesV4 | RulesetKind::IptablesV6 => 0o640,
    };
    put(&mut rec, paths.ruleset_file(kind), text, mode)?;
    Ok(rec)
}

// ---------------------------------------------------------------------------------------------
// The agent's confirm path

/// True when the committed transaction `rec` asks for persistence: `apply --persist` (the
/// record's `options.persist`, or `"persist": true` in its undo record), or a policy transaction
/// whose policy says `persist = true`.
pub fn wants_persist(rec: &TxnRecord) -> bool {
    let flag = |v: Option<&Value>| v.and_then(|v| v.get("persist")).and_then(Value::as_bool).unwrap_or(false);
    rec.options.persist || flag(Some(&rec.undo)) || (rec.kind == Kind::Policy && flag(rec.policy.as_ref()))
}

/// True when `target` is the initial network namespace (that of PID 1), whose boot-time
/// configuration the files under `/etc` describe.
pub fn target_is_host(target: &TargetRecord) -> bool {
    crate::netns::is_initial_id((target.dev, target.ino))
}

/// Reads a sysctl in the initial network namespace (from a thread that enters it), whatever
/// namespace the caller is in. `None` when it cannot be read.
pub fn read_host_sysctl(key: &SysctlKey) -> Option<u64> {
    let host = crate::netns::Target::open(&crate::netns::TargetSpec::Path(PathBuf::from("/proc/1/ns/net"))).ok()?;
    host.run(|| crate::sysctl::read(key)).ok()?.ok()?
}

/// The ruleset kind of a ruleset record: from the undo record's `apply` (format and family) when
/// present, else detected from the text.
fn ruleset_kind(rec: &TxnRecord, text: &str) -> RulesetKind {
    let apply = rec.undo.get("apply");
    let format = apply.and_then(|a| a.get("format")).and_then(Value::as_str);
    let family = apply.and_then(|a| a.get("family")).and_then(Value::as_str);
    let (format, family) = match (format, family) {
        (Some(f), fam) => (f.to_string(), fam.map(str::to_string)),
        (None, _) => match crate::snapshot::resolve_format("", text) {
            Ok((crate::snapshot::RulesetFormat::Nft, _)) => ("nft".into(), None),
            Ok((_, Some(crate::snapshot::Family::V6))) => ("iptables".into(), Some("v6".into())),
            _ => ("iptables".into(), Some("v4".into())),
        },
    };
    match (format.as_str(), family.as_deref()) {
        ("nft", _) => RulesetKind::Nft,
        (_, Some("v6")) => RulesetKind::IptablesV6,
        _ => RulesetKind::IptablesV4,
    }
}

/// [`on_committed`] without the host check, with sysctl values that the transaction did not
/// write (already at their target) read through `live`. Policy: every explicit value as given;
/// every `"auto"` from the undo record's `sysctls[].new` when the transaction wrote it, else
/// `live(key)`. Ruleset: the record's ruleset text.
pub fn persist_committed(
    rec: &TxnRecord,
    paths: &PersistPaths,
    live: &dyn Fn(&SysctlKey) -> Option<u64>,
) -> Result<Option<PersistRecord>, PersistError> {
    if !wants_persist(rec) {
        return Ok(None);
    }
    match rec.kind {
        Kind::Ruleset => {
            let text = rec.ruleset.as_deref().ok_or_else(|| PersistError::NoRuleset(rec.id.to_string()))?;
            persist_ruleset(paths, ruleset_kind(rec, text), text).map(Some)
        }
        Kind::Policy => {
            let v = rec.policy.as_ref().ok_or_else(|| PersistError::BadPolicy("the record holds no policy".into()))?;
            let policy = policy_from_record(v)?;
            let written: BTreeMap<String, u64> = rec
                .undo
                .get("sysctls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|s| Some((s.get("key")?.as_str()?.to_string(), s.get("new")?.as_u64()?)))
                .collect();
            let mut resolved = BTreeMap::new();
            for (k, v) in &policy.sysctl {
                let value = match v {
                    SysctlValue::Int(n) => Some(*n),
                    SysctlValue::Auto => written.get(k.as_str()).copied().or_else(|| live(k)),
                };
                if let Some(n) = value {
                    resolved.insert(k.clone(), n);
                }
            }
            persist_policy(paths, &policy, &resolved, rec.id.as_str()).map(Some)
        }
    }
}

/// Called by the agent once `rec` is COMMITTED (and journaled). Does nothing (`Ok(None)`) unless
/// the record asks for persistence ([`wants_persist`]); refuses a target other than the host
/// ([`PersistError::NotHost`]); otherwise persists ([`persist_committed`], `"auto"` values the
/// transaction left unchanged read in the initial namespace) and returns what was written, for
/// the caller to store in the record (e.g. `undo["persisted"]`) so `ctguard show` prints it.
pub fn on_committed(rec: &TxnRecord, paths: &PersistPaths) -> Result<Option<PersistRecord>, PersistError> {
    if !wants_persist(rec) {
        return Ok(None);
    }
    if !target_is_host(&rec.target) {
        return Err(PersistError::NotHost { label: rec.target.label.clone() });
    }
    persist_committed(rec, paths, &read_host_sysctl)
}

/// What `apply --remove` applies on target `id`: nothing to notrack (so ctguard's table, raw
/// chains and accepts go) and every sysctl ctguard's committed policy transactions changed there
/// back to its value before the first of them (since the last removal). Pure over the journal's
/// records. Errs (a one-line reason) when ctguard has nothing committed on the target.
pub fn removal_policy(records: &[crate::txn::TxnRecord], id: (u64, u64)) -> Result<Policy, String> {
    use crate::agent::engine::Undo;
    use crate::model::names::SysctlKey;
    use crate::txn::{Kind, State};
    let mut committed: Vec<&crate::txn::TxnRecord> = records
        .iter()
        .filter(|r| (r.target.dev, r.target.ino) == id && r.kind == Kind::Policy && r.state == State::Committed)
        .collect();
    if let Some(last_removal) = committed.iter().rposition(|r| r.options.remove) {
        committed.drain(..=last_removal);
    }
    let Some(last) = committed.last() else {
        return Err("--remove: ctguard has no committed policy on this target".into());
    };
    let mut policy = Policy::builtin();
    policy.notrack.clear();
    policy.sysctl.clear();
    policy.persist = false;
    if let Some(p) = last.policy.as_ref().and_then(|v| policy_from_record(v).ok()) {
        policy.backend = p.backend;
    }
    // Per key, the value before ctguard: the `old` that no committed write produced (a chain
    // 30 → 10 → 5 gives 30 whatever order the records list in).
    let mut writes: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    for r in &committed {
        let Ok(Undo::Policy(u)) = Undo::from_record(Kind::Policy, &r.undo) else { continue };
        for s in &u.sysctls {
            writes.entry(s.key.clone()).or_default().push((s.old, s.new));
        }
    }
    for (key, w) in writes {
        let original = w.iter().find(|(old, _)| !w.iter().any(|(o2, new)| new == old && o2 != old)).or(w.first());
        if let (Ok(k), Some((old, _))) = (SysctlKey::parse(&key), original) {
            policy.sysctl.insert(k, SysctlValue::Int(*old));
        }
    }
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_toml_round_trips() {
        let p = Policy::builtin();
        let t = policy_toml(&p, "# h\n").expect("toml");
        assert!(t.starts_with("# h\nbackend = \"auto\"\npersist = false\n"), "{t}");
        let v = serde_json::to_value(&p).expect("json");
        assert_eq!(policy_from_record(&v).expect("back"), p);
    }

    #[test]
    fn rich_policy_round_trips() {
        let text = r#"backend = "nft"
persist = true
[[notrack]]
protocols = ["udp"]
ports = [53, "1000-2000", 5353]
sources = ["198.18.0.0/15", "fd42::/64", "192.0.2.7"]
interfaces = ["eth0", "lo"]
local_only = false
accept_untracked = true
flush_existing = true
[[notrack]]
protocols = ["tcp"]
ports = [853]
[[notrack]]
protocols = ["udp", "tcp"]
ports = [53]
side = "both"
upstreams = ["198.18.0.2/32", "2001:db8:53::/48"]
[[notrack]]
protocols = ["udp"]
ports = [53]
side = "querying"
upstreams = ["192.0.2.0/24"]
[sysctl]
"net.netfilter.nf_conntrack_max" = 1048576
"net.netfilter.nf_conntrack_udp_timeout" = 10
"net.netfilter.nf_conntrack_buckets" = "auto"
"#;
        let p = parse_policy(text, Format::Toml).expect("valid");
        let t = policy_toml(&p, "").expect("toml");
        assert_eq!(parse_policy(&t, Format::Toml).expect("reparse"), p);
        let v = serde_json::to_value(&p).expect("json");
        assert_eq!(policy_from_record(&v).expect("back"), p);
    }

    #[test]
    fn detect_red_hat_layout() {
        let root = std::env::temp_dir().join(format!("ctguard-persist-detect-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("etc/sysconfig")).expect("mkdir");
        let deb = PersistPaths::detect(&root, Path::new("/s"));
        assert_eq!(deb.nftables_conf, root.join("etc/nftables.conf"));
        fs::write(root.join("etc/redhat-release"), "Rocky Linux release 9.4\n").expect("write");
        let rh = PersistPaths::detect(&root, Path::new("/s"));
        assert_eq!(rh.nftables_conf, root.join("etc/sysconfig/nftables.conf"));
        assert_eq!(rh.iptables_rules_v4, root.join("etc/sysconfig/iptables"));
        assert_eq!(rh.iptables_rules_v6, root.join("etc/sysconfig/ip6tables"));
        assert_eq!(rh.state_dir, Path::new("/s"));
        let _ = fs::remove_dir_all(&root);
    }
}
