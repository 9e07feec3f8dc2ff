//! `ctguard doctor`: the conntrack diagnosis of the target on one screen, as `--json`, as a
//! node_exporter textfile (`--prometheus`), or as the policy that fixes it (`--emit-policy`).
//! Reads only; changes nothing but the textfile it is asked to write.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::Path;

use super::args::{DoctorArgs, Global};
use crate::doctor::advice::{emit_policy, human_bytes, num, rate};
use crate::doctor::report::prometheus;
use crate::doctor::sources::write_atomic;
use crate::doctor::{diagnose, DoctorError, Options, Recommendation, Report, Sources};
use crate::exit::{Exit, Failure};
use crate::model::{parse_policy, Format};

pub(super) fn run(args: &DoctorArgs, global: &Global) -> Result<Exit, Vec<Failure>> {
    let prom_stdout = args.prometheus.as_deref() == Some("-");
    if prom_stdout && (global.json || args.emit_policy) {
        return Err(vec![Failure::bad_input(
            "--prometheus -: stdout carries the metrics, so it cannot also carry --json or --emit-policy; give \
             --prometheus a FILE",
        )]);
    }
    let window = parse_window(&args.window).map_err(|e| vec![Failure::bad_input(format!("--window: {e}"))])?;
    let opts = Options { sources: Sources { window, ..Sources::system() }, top: usize::from(args.top) };
    let mut report = diagnose(global.netns.as_deref(), &opts).map_err(|e| match e {
        DoctorError::BadTarget(_) => vec![Failure::bad_input(e.to_string())],
        DoctorError::Netns(_) => vec![Failure::internal(e.to_string())],
    })?;
    guard_findings(global, &mut report);
    for u in &report.unreadable {
        tracing::info!(what = %u.what, path = %u.path, "could not read: {}", u.error);
    }
    let policy = if args.emit_policy {
        let text = emit_policy(&report);
        if let Err(errs) = parse_policy(&text, Format::Toml) {
            let why: Vec<String> = errs.iter().map(ToString::to_string).collect();
            return Err(vec![Failure::internal(format!("the emitted policy does not validate: {}", why.join("; ")))]);
        }
        if report.partial {
            let what: Vec<&str> = report.unreadable.iter().map(|u| u.what.as_str()).collect();
            tracing::warn!("partial diagnosis, the policy is made without: {}", what.join(", "));
        }
        Some(text)
    } else {
        None
    };
    if let Some(dest) = &args.prometheus {
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let text = prometheus(&report, now);
        if prom_stdout {
            out(&text);
            return Ok(Exit::Ok);
        }
        write_atomic(Path::new(dest), &text)
            .map_err(|e| vec![Failure::bad_input(format!("--prometheus {dest}: cannot write: {e}"))])?;
    }
    if global.json {
        super::print_json(&json_document(&report, policy.as_deref()));
    } else if let Some(p) = &policy {
        out(p);
    } else {
        let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        out(&screen(&report, Style { on: color }));
    }
    Ok(Exit::Ok)
}

/// ctguard's own committed policy that its guard degraded (NOTRACK removed after a firewall
/// reload it could not repair safely): asked of a running agent, never starting one.
fn guard_findings(global: &Global, report: &mut crate::doctor::Report) {
    let Ok(r) = crate::agent::client::request(
        &global.run_dir,
        crate::agent::protocol::Request::Status,
        std::time::Duration::from_secs(2),
    ) else {
        return;
    };
    let here = global.netns.as_deref().unwrap_or("host");
    for c in r.data["committed"].as_array().into_iter().flatten() {
        if c["state"] != "degraded" || c["target"].as_str() != Some(here) {
            continue;
        }
        let id = c["id"].as_str().unwrap_or("?");
        report.recommendations.insert(
            0,
            crate::doctor::Recommendation::CtguardDegraded {
                reason: format!(
                    "ctguard's guard degraded committed policy {id}: {} (since {})",
                    c["reason"].as_str().unwrap_or("?"),
                    c["since"].as_str().unwrap_or("?")
                ),
                fix: format!(
                    "the service runs tracked: once the host firewall lets the accept be put back without widening access, re-apply it with `ctguard apply --from {id}`; or remove ctguard's policy with `ctguard apply --remove`"
                ),
                blackholes: Vec::new(),
            },
        );
    }
}

/// `--window D`: `0` for one sample, else a duration of at most a minute.
fn parse_window(s: &str) -> Result<std::time::Duration, String> {
    if s.trim_end_matches('s') == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    let d = crate::duration::parse_duration(s)?;
    if d > std::time::Duration::from_secs(60) {
        return Err(format!("{s:?} is longer than 60s"));
    }
    Ok(d)
}

/// The one JSON document `doctor --json` prints (the report, and the policy with
/// `--emit-policy`): built here only, so a common envelope can wrap it.
pub(super) fn json_document(report: &Report, policy: Option<&str>) -> serde_json::Value {
    let mut j = report.to_json();
    if let (Some(p), Some(obj)) = (policy, j.as_object_mut()) {
        obj.insert("policy".to_string(), serde_json::Value::String(p.to_string()));
    }
    j
}

/// Writes to stdout; a reader that went away (`| head`) is not an error worth a panic.
fn out(text: &str) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(text.as_bytes()).and_then(|()| o.flush());
}

/// ANSI styling, or nothing when the output is not a terminal.
#[derive(Clone, Copy)]
struct Style {
    on: bool,
}

impl Style {
    fn paint(self, code: &str, s: &str) -> String {
        if self.on {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }
    fn bold(self, s: &str) -> String {
        self.paint("1", s)
    }
    fn red(self, s: &str) -> String {
        self.paint("31", s)
    }
    fn yellow(self, s: &str) -> String {
        self.paint("33", s)
    }
    fn green(self, s: &str) -> String {
        self.paint("32", s)
    }
    fn dim(self, s: &str) -> String {
        self.paint("2", s)
    }
    fn level(self, usage: f64, s: &str) -> String {
        if usage >= 0.8 {
            self.red(s)
        } else if usage >= 0.5 {
            self.yellow(s)
        } else {
            self.green(s)
        }
    }
}

const BAR_WIDTH: usize = 32;
const WRAP: usize = 100;

/// `[#####...........]` for a ratio.
fn bar(usage: f64) -> String {
    let filled = ((usage.clamp(0.0, 1.0) * BAR_WIDTH as f64).round() as usize).min(BAR_WIDTH);
    let filled = if usage > 0.0 && filled == 0 { 1 } else { filled };
    format!("{}{}", "#".repeat(filled), ".".repeat(BAR_WIDTH - filled))
}

/// Word-wraps `text` to [`WRAP`] columns; continuation lines start with `indent`.
fn wrap(text: &str, first: &str, indent: &str) -> String {
    let mut out = String::new();
    let mut line = first.to_string();
    let mut empty = true;
    for word in text.split_whitespace() {
        if !empty && line.chars().count() + 1 + word.chars().count() > WRAP {
            out.push_str(line.trim_end());
            out.push('\n');
            line = indent.to_string();
            empty = true;
        }
        if !empty {
            line.push(' ');
        }
        line.push_str(word);
        empty = false;
    }
    out.push_str(line.trim_end());
    out.push('\n');
    out
}

fn opt(v: Option<u64>) -> String {
    v.map_or("?".to_string(), num)
}

fn percent(u: f64) -> String {
    if u > 0.0 && u < 0.001 {
        "<0.1%".to_string()
    } else {
        format!("{:.1}%", u * 100.0)
    }
}

/// The human screen.
fn screen(r: &Report, st: Style) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{} {}", st.bold("ctguard doctor:"), r.target);
    let _ = writeln!(s);
    let _ = writeln!(s, "{}", st.bold("Conntrack table"));
    let label = |s: &mut String, l: &str, v: String| {
        let _ = writeln!(s, "  {l:<13}{v}");
    };
    match (r.count, r.max, r.usage) {
        (Some(c), Some(m), Some(u)) => label(
            &mut s,
            "entries",
            format!("{} of {}   [{}] {}", num(c), num(m), st.level(u, &bar(u)), st.level(u, &percent(u))),
        ),
        (c, m, _) => label(&mut s, "entries", format!("{} of {}", opt(c), opt(m))),
    }
    let buckets = match (r.buckets, r.max) {
        (Some(b), Some(m)) if b > 0 => {
            format!("{}   ({:.1} entries a bucket at a full table)", num(b), m as f64 / b as f64)
        }
        (b, _) => opt(b),
    };
    label(&mut s, "buckets", buckets);
    let size = match (r.entry_bytes, r.memory.current_max_bytes) {
        (Some(e), Some(m)) => {
            format!("{e} bytes an entry (nf_conntrack slab); a full table costs up to {}", human_bytes(m))
        }
        (Some(e), None) => format!("{e} bytes an entry (nf_conntrack slab)"),
        (None, _) => "?".to_string(),
    };
    label(&mut s, "entry size", size);
    let drops = match &r.drops {
        Some(d) => {
            let v = |n: u64| if n > 0 { st.red(&num(n)) } else { num(n) };
            format!(
                "drop {}   early_drop {}   insert_failed {}   invalid {}   {}",
                v(d.drop),
                v(d.early_drop),
                v(d.insert_failed),
                d.invalid.map_or("?".to_string(), v),
                st.dim(&format!("(totals since the namespace started, summed over {} CPUs)", d.cpus))
            )
        }
        None => "?".to_string(),
    };
    label(&mut s, "drops", drops);
    match &r.rates {
        Some(rt) => {
            let moving: Vec<String> = rt
                .counters
                .iter()
                .filter(|c| matches!(c.counter.as_str(), "drop" | "early_drop" | "insert_failed" | "invalid"))
                .map(|c| {
                    let t = format!("{} +{} ({}/s)", c.counter, num(c.during_window), rate(c.per_second));
                    if c.during_window > 0 {
                        st.red(&t)
                    } else {
                        t
                    }
                })
                .collect();
            label(
                &mut s,
                "now",
                format!(
                    "{}   {}",
                    moving.join("   "),
                    st.dim(&format!("(during a {:.1} s window)", rt.window_seconds))
                ),
            );
            for c in rt.counters.iter().filter(|c| c.total > 0 && c.during_window == 0) {
                if matches!(c.counter.as_str(), "drop" | "early_drop" | "insert_failed" | "invalid") {
                    let _ =
                        writeln!(s, "  {:<13}{}", "", st.dim(&format!("{}: last moved {}", c.counter, c.last_moved)));
                }
            }
        }
        None => label(&mut s, "now", st.dim("not sampled (--window 0): the counters above are totals")),
    }
    match &r.table_full_events {
        Some(t) => {
            let since =
                t.log_since_seconds.map(|x| format!("; the log goes back to {x:.0} s after boot")).unwrap_or_default();
            let head = if t.count == 0 {
                format!("no \"table full, dropping packet\" event {}", st.dim(&format!("(host-wide log{since})")))
            } else {
                st.red(&format!("{} \"table full, dropping packet\" events", num(t.count)))
                    + &st.dim(&format!(" (host-wide log{since})"))
            };
            label(&mut s, "kernel log", head);
            let shown: Vec<&crate::doctor::report::LogEvent> = t.events.iter().rev().take(5).collect();
            for e in shown.iter().rev() {
                let when = e.time.clone().unwrap_or_default();
                let _ = writeln!(s, "  {:<13}  {when} ({:.1} s after boot)", "", e.seconds_since_boot);
            }
            if t.events.len() > 5 {
                let _ = writeln!(s, "  {:<13}  … the latest 5 of {} shown", "", num(t.count));
            }
            if t.ratelimit_suppressed > 0 {
                let _ = writeln!(
                    s,
                    "  {:<13}{}",
                    "",
                    st.dim(&format!(
                        "net_ratelimit: {} callbacks suppressed (every rate-limited network message, not only conntrack's)",
                        num(t.ratelimit_suppressed)
                    ))
                );
            }
        }
        None => label(&mut s, "kernel log", "?".to_string()),
    }
    let t = &r.udp_timeouts;
    label(
        &mut s,
        "tcp timeout",
        format!(
            "{} s for ESTABLISHED (nf_conntrack_tcp_timeout_established)",
            r.tcp_timeout_established.map_or("?".into(), num)
        ),
    );
    label(
        &mut s,
        "udp timeouts",
        format!(
            "{} s, {} s for streams",
            t.udp_timeout.map_or("?".into(), |v| v.to_string()),
            t.udp_timeout_stream.map_or("?".into(), |v| v.to_string())
        ),
    );

    let _ = writeln!(s);
    match &r.entries {
        Some(e) => {
            let _ = writeln!(
                s,
                "{} {} entries from {} in {:.0} ms",
                st.bold("What fills the table:"),
                num(e.scan.scanned),
                e.source,
                e.seconds * 1000.0
            );
            if r.top_flows.is_empty() {
                let _ = writeln!(s, "  (empty)");
            } else {
                let rows: Vec<[String; 6]> = r
                    .top_flows
                    .iter()
                    .map(|g| {
                        let share = if e.scan.scanned > 0 { g.count as f64 / e.scan.scanned as f64 } else { 0.0 };
                        [
                            g.proto.clone(),
                            g.port.map_or("-".to_string(), |p| p.to_string()),
                            g.direction.as_str().to_string(),
                            g.state.clone(),
                            num(g.count),
                            percent(share),
                        ]
                    })
                    .collect();
                let head = ["PROTO", "PORT", "SIDE", "STATE", "ENTRIES", "SHARE"];
                let mut w = head.map(|h| h.len());
                for row in &rows {
                    for (i, c) in row.iter().enumerate() {
                        w[i] = w[i].max(c.chars().count());
                    }
                }
                let line = |c: &[String; 6]| {
                    format!(
                        "  {:<w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {:>w4$}  {:>w5$}",
                        c[0],
                        c[1],
                        c[2],
                        c[3],
                        c[4],
                        c[5],
                        w0 = w[0],
                        w1 = w[1],
                        w2 = w[2],
                        w3 = w[3],
                        w4 = w[4],
                        w5 = w[5]
                    )
                };
                let _ = writeln!(s, "{}", st.dim(&line(&head.map(str::to_string))));
                for row in &rows {
                    let _ = writeln!(s, "{}", line(row));
                }
                let _ = writeln!(
                    s,
                    "  {}",
                    st.dim(
                        "SIDE: server = the original destination is this host's address, client = its source is \
                         (this host's own queries), local = both, forwarded = neither"
                    )
                );
                if !e.scan.exact {
                    let _ = writeln!(
                        s,
                        "  {}",
                        st.dim(&format!("(lower bounds, at most {} below the truth)", e.scan.max_error))
                    );
                }
            }
        }
        None => {
            let _ = writeln!(s, "{} ?", st.bold("What fills the table:"));
        }
    }

    let _ = writeln!(s);
    if r.recommendations.is_empty() {
        let _ = writeln!(s, "{} none", st.bold("Recommendations:"));
    } else {
        let _ = writeln!(s, "{}", st.bold("Recommendations"));
        for (i, rec) in r.recommendations.iter().enumerate() {
            let title = match rec {
                Recommendation::RaiseConntrackMax { recommended, .. } => format!("nf_conntrack_max = {recommended}"),
                Recommendation::Buckets { recommended, .. } => format!("nf_conntrack_buckets = {recommended}"),
                Recommendation::UdpTimeouts { sysctl, .. } => sysctl
                    .iter()
                    .map(|t| format!("{} = {}", t.key.rsplit('.').next().unwrap_or(&t.key), t.recommended))
                    .collect::<Vec<_>>()
                    .join(", "),
                Recommendation::Notrack { proto, port, .. } => format!("NOTRACK {proto}/{port}"),
                Recommendation::ClientFlows { proto, port, .. } => {
                    format!("client side {proto}/{port} (this host's queries)")
                }
                Recommendation::TcpTimeout { sysctl, .. } => {
                    format!("{} = {}", sysctl.key.rsplit('.').next().unwrap_or(&sysctl.key), sysctl.recommended)
                }
                Recommendation::Blackhole { flow, .. } => format!("blackhole: NOTRACK {flow}"),
                Recommendation::UntrackedOpen { flow, .. } => format!("open ports: NOTRACK {flow}"),
                Recommendation::CtguardDegraded { .. } => "ctguard's policy is degraded".to_string(),
            };
            let first = format!("  {}. {}: ", i + 1, st.yellow(&title));
            // Width of the visible prefix, without escape codes.
            let visible = format!("  {}. {title}: ", i + 1);
            let text = wrap(rec.reason(), &" ".repeat(visible.chars().count()), "     ");
            s.push_str(&first);
            s.push_str(text.trim_start());
            if let Recommendation::Notrack { warning, .. } = rec {
                s.push_str(&wrap(warning, &format!("     {} ", st.yellow("warning:")), "     "));
            }
            if let Some(fix) = rec.fix() {
                s.push_str(&wrap(fix, &format!("     {} ", st.green("fix:")), "     "));
            }
        }
    }
    if !r.notes.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(s, "{}", st.bold("Notes"));
        for n in &r.notes {
            s.push_str(&wrap(n, "  - ", "    "));
        }
    }
    if !r.unreadable.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(s, "{}", st.bold("Could not read (the report is partial)"));
        for u in &r.unreadable {
            s.push_str(&wrap(&format!("{}: {}", u.what, u.error), "  - ", "    "));
        }
    }
    if !r.recommendations.is_empty() {
        let ns = r.netns.as_ref().map(|n| format!(" --netns {n}")).unwrap_or_default();
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{}",
            st.dim(&format!("Next: ctguard doctor{ns} --emit-policy > fix.toml && ctguard plan --check{ns} fix.toml"))
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_screen_says_what_is_missing() {
        use crate::doctor::{analyze, sources::collect, MachineBits, TargetInfo};
        let root = std::env::temp_dir().join(format!("ctguard-doctor-screen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("dir");
        let obs = collect(&Sources::fake(&root, Some(root.join("kmsg"))), 64);
        let info = TargetInfo { label: "fake".into(), netns: Some("x".into()), initial: false, inode: None };
        let r = analyze(info, obs, MachineBits { pointer_bits: 64, page_size: 4096 }, 10);
        let plain = screen(&r, Style { on: false });
        assert!(plain.contains("Could not read (the report is partial)"), "{plain}");
        assert!(plain.contains("entries      ? of ?"), "{plain}");
        assert!(!plain.contains('\x1b'));
        assert!(screen(&r, Style { on: true }).contains('\x1b'));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn bar_and_wrap() {
        assert_eq!(bar(0.0), ".".repeat(BAR_WIDTH));
        assert_eq!(bar(0.0001).matches('#').count(), 1);
        assert_eq!(bar(1.5), "#".repeat(BAR_WIDTH));
        let w = wrap(&"word ".repeat(60), "  - ", "    ");
        assert!(w.lines().all(|l| l.chars().count() <= WRAP));
        assert!(w.lines().skip(1).all(|l| l.starts_with("    ")));
    }
}
