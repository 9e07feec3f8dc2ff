//! Data-plane benchmark (`cargo bench --bench dataplane`, as root; issue 16). Not a timed test:
//! it measures what the built-in policy buys a busy DNS server — answered queries per second,
//! conntrack entries and softirq time — with and without the policy applied by `ctguard`, in
//! the same run.
//!
//! Two throwaway namespaces `ctg-dp-PID-0` (client) and `ctg-dp-PID-1` (server), joined by a
//! veth pair (198.18.0.1/24 ↔ 198.18.0.2/24); nothing reaches the host's conntrack table or
//! firewall. The server carries a usual stateful firewall (`integration/stateful.nft`: policy
//! drop, `ct state established,related accept`, `udp dport 53 ct state new accept`), so every
//! query is tracked until ctguard's built-in policy (NOTRACK for udp/tcp 53 plus the inserted
//! `ct state untracked` accept) is applied with `ctguard apply --netns SERVER`.
//!
//! - Responder (server namespace, one thread): a UDP socket on 198.18.0.2:53, `recvmmsg` /
//!   `sendmmsg` in batches of 64; each query is answered with its question and one A record.
//! - Sender (client namespace, one thread): a raw socket (`IPPROTO_RAW`) sending DNS queries
//!   with `sendmmsg`, each from a new source address and port (198.19.0.0/16 × ports), as the
//!   clients of a real resolver do: every query is a new conntrack entry when tracked. The
//!   replies (routed back to 198.19.0.0/16 over the veth) are counted and dropped by an nft
//!   ingress counter on the client's veth.
//! - Per mode (no policy / policy) and rate (max, then an equal fixed rate for both modes) it
//!   runs `CTGUARD_DP_SECONDS` (default 5) after 1 s of warm-up, and reads: answers received per
//!   second (the client's counter), answers sent (the responder), conntrack entries in the server
//!   namespace (`nf_conntrack_count`, per namespace) at the end, and the softirq share of all CPU
//!   time from `/proc/stat` (the `softirq` column, all CPUs) plus `/proc/softirqs` NET_RX. The
//!   conntrack table is flushed in the server namespace between measurements.
//! - Modes alternate; `CTGUARD_DP_ROUNDS` rounds (default 3); min / median reported. The fixed
//!   rate is `CTGUARD_DP_RATE` q/s, or 50 % of the lower of the two max-rate medians.
//! - Every `ctguard rollback` is checked byte-identical (`nft list ruleset` of the server).
//! - `nf_conntrack_max` is global: it is left alone unless `CTGUARD_DP_CONNTRACK_MAX=N` opts in;
//!   then it is set to N for the run and restored at the end (also on failure).
//!
//! Only `cargo bench` measures (it passes `--bench`).

#[path = "common.rs"]
mod common;
use common::{exec, min_median, reap_stale_namespaces, BenchNs};

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CLIENT: [u8; 4] = [198, 18, 0, 1];
const SERVER: [u8; 4] = [198, 18, 0, 2];
const BATCH: usize = 64;
const STATEFUL_NFT: &str = include_str!("../stateful.nft");
/// The client's reply counter: counts and drops every answer arriving on its veth.
const CLIENT_NFT: &str = "table netdev dpc {
\tcounter replies { }
\tchain in {
\t\ttype filter hook ingress device \"veth-c\" priority 0; policy accept;
\t\tip protocol udp udp sport 53 counter name \"replies\" drop
\t}
}
";

fn env_num(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

// ---------------------------------------------------------------------------------------------
// Responder and sender

/// The answer appended to each query: a pointer to the question name, type A, class IN,
/// TTL 60, 4 bytes of address.
const ANSWER: [u8; 16] = [0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 198, 51, 100, 7];

/// A UDP socket on 198.18.0.2:53, created in the calling thread's namespace (the server's).
fn responder_socket() -> Result<OwnedFd, String> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", errno()));
    }
    // SAFETY: fd is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let big: libc::c_int = 8 << 20;
    let tv = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
    // SAFETY: option values point to live locals of the right size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&big as *const libc::c_int).cast(),
            4,
        );
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            (&big as *const libc::c_int).cast(),
            4,
        );
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
    }
    let sa = sockaddr(SERVER, 53);
    // SAFETY: sa is a valid sockaddr_in.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    if r != 0 {
        return Err(format!("bind 198.18.0.2:53: {}", errno()));
    }
    Ok(fd)
}

fn sockaddr(ip: [u8; 4], port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(ip) },
        sin_zero: [0; 8],
    }
}

/// Answers queries until `stop`; counts the answers sent into `answered`.
fn respond(fd: OwnedFd, stop: Arc<AtomicBool>, answered: Arc<AtomicU64>) -> Result<(), String> {
    let mut bufs = vec![[0u8; 512]; BATCH];
    // SAFETY: all-zero sockaddr_in / iovec / mmsghdr are valid values (filled below).
    let mut addrs: Vec<libc::sockaddr_in> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut iov: Vec<libc::iovec> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut hdr: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
    while !stop.load(Ordering::Relaxed) {
        for i in 0..BATCH {
            iov[i] = libc::iovec { iov_base: bufs[i].as_mut_ptr().cast(), iov_len: 512 - ANSWER.len() };
            hdr[i].msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_in).cast();
            hdr[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
            hdr[i].msg_hdr.msg_iov = &mut iov[i];
            hdr[i].msg_hdr.msg_iovlen = 1;
            hdr[i].msg_len = 0;
        }
        // SAFETY: every header points to live buffers of the stated sizes.
        let n = unsafe {
            libc::recvmmsg(fd.as_raw_fd(), hdr.as_mut_ptr(), BATCH as u32, libc::MSG_WAITFORONE, std::ptr::null_mut())
        };
        if n < 0 {
            let e = errno();
            match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR) => continue,
                _ => return Err(format!("recvmmsg: {e}")),
            }
        }
        let n = n as usize;
        let mut k = 0;
        for i in 0..n {
            let len = hdr[i].msg_len as usize;
            if len < 12 {
                continue;
            }
            let b = &mut bufs[i];
            b[2] |= 0x80; // QR: a response
            b[3] = 0x80; // RA, NOERROR
            b[6] = 0;
            b[7] = 1; // ANCOUNT 1
            b[len..len + ANSWER.len()].copy_from_slice(&ANSWER);
            iov[i].iov_len = len + ANSWER.len();
            if k != i {
                hdr.swap(k, i);
            }
            k += 1;
        }
        let mut off = 0;
        while off < k {
            // SAFETY: as above; msg_name holds the sender's address from recvmmsg.
            let s = unsafe { libc::sendmmsg(fd.as_raw_fd(), hdr[off..].as_mut_ptr(), (k - off) as u32, 0) };
            if s < 0 {
                let e = errno();
                match e.raw_os_error() {
                    Some(libc::EAGAIN | libc::EINTR | libc::ENOBUFS) => continue,
                    // A reply dropped by netfilter (conntrack table full) fails with EPERM:
                    // that answer is lost, the rest are sent.
                    Some(libc::EPERM) => {
                        off += 1;
                        continue;
                    }
                    _ => return Err(format!("sendmmsg: {e}")),
                }
            }
            off += s as usize;
            answered.fetch_add(s as u64, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// A raw IPv4 socket (`IPPROTO_RAW`: we write the IP header), in the client's namespace.
fn sender_socket() -> Result<OwnedFd, String> {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(format!("raw socket: {}", errno()));
    }
    // SAFETY: fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let big: libc::c_int = 8 << 20;
    // SAFETY: option value points to a live c_int.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            (&big as *const libc::c_int).cast(),
            4,
        );
    }
    Ok(fd)
}

/// The DNS query for `example.com. A`, with the UDP and IPv4 headers around it filled for
/// query number `k`: source 198.19.(k mod 2^16), port 1024 + (k / 2^16) mod 64000.
fn build_query(p: &mut [u8; 64], k: u64) -> usize {
    const Q: &[u8] = b"\x07example\x03com\x00\x00\x01\x00\x01";
    let dns_len = 12 + Q.len();
    let udp_len = 8 + dns_len;
    let tot = 20 + udp_len;
    let src = [198, 19, ((k >> 8) & 255) as u8, (k & 255) as u8];
    let sport = 1024 + ((k >> 16) % 64000) as u16;
    p[0] = 0x45;
    p[1] = 0;
    p[2..4].copy_from_slice(&(tot as u16).to_be_bytes());
    p[4..6].copy_from_slice(&[0, 0]);
    p[6..8].copy_from_slice(&[0x40, 0]); // DF
    p[8] = 64;
    p[9] = 17;
    p[10..12].copy_from_slice(&[0, 0]); // the kernel fills the checksum
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&SERVER);
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&53u16.to_be_bytes());
    p[24..26].copy_from_slice(&(udp_len as u16).to_be_bytes());
    p[26..28].copy_from_slice(&[0, 0]); // no UDP checksum (IPv4)
    p[28..30].copy_from_slice(&((k & 0xffff) as u16).to_be_bytes());
    p[30..32].copy_from_slice(&[0x01, 0x00]); // RD
    p[32..34].copy_from_slice(&[0, 1]);
    p[34..40].copy_from_slice(&[0; 6]);
    p[40..40 + Q.len()].copy_from_slice(Q);
    tot
}

/// Sends queries until `stop`: as fast as it can (`rate` None), or paced to `rate` q/s.
/// Counts the queries the kernel took into `sent`; `next` is the query number to start from.
fn send(
    fd: OwnedFd,
    rate: Option<u64>,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    mut next: u64,
) -> Result<u64, String> {
    let mut pkts = vec![[0u8; 64]; BATCH];
    // SAFETY: all-zero iovec / mmsghdr are valid (filled below).
    let mut iov: Vec<libc::iovec> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut hdr: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut dst = sockaddr(SERVER, 0);
    let start = Instant::now();
    let mut total: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        if let Some(r) = rate {
            let due = (start.elapsed().as_secs_f64() * r as f64) as u64;
            if total >= due {
                let ahead = (total + BATCH as u64 - due) as f64 / r as f64;
                std::thread::sleep(Duration::from_secs_f64(ahead.min(0.001)));
                continue;
            }
        }
        for i in 0..BATCH {
            let len = build_query(&mut pkts[i], next + i as u64);
            iov[i] = libc::iovec { iov_base: pkts[i].as_mut_ptr().cast(), iov_len: len };
            hdr[i].msg_hdr.msg_name = (&mut dst as *mut libc::sockaddr_in).cast();
            hdr[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
            hdr[i].msg_hdr.msg_iov = &mut iov[i];
            hdr[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: headers point to live packets and the destination address.
        let s = unsafe { libc::sendmmsg(fd.as_raw_fd(), hdr.as_mut_ptr(), BATCH as u32, 0) };
        if s < 0 {
            let e = errno();
            match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR | libc::ENOBUFS) => {
                    std::thread::yield_now();
                    continue;
                }
                _ => return Err(format!("sendmmsg (raw): {e}")),
            }
        }
        // The queries not taken are skipped (their numbers are not reused).
        next += BATCH as u64;
        total += s as u64;
        sent.fetch_add(s as u64, Ordering::Relaxed);
    }
    Ok(next)
}

// ---------------------------------------------------------------------------------------------
// Measurements

#[derive(Clone, Copy, Default)]
struct CpuStat {
    total: u64,
    softirq: u64,
}

/// `/proc/stat`: the line of `cpu` (`cpuN`), or the sum of all CPUs.
fn cpu_stat(cpu: Option<usize>) -> CpuStat {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let head = match cpu {
        Some(n) => format!("cpu{n} "),
        None => "cpu ".to_string(),
    };
    let Some(l) = s.lines().find(|l| l.starts_with(&head)) else { return CpuStat::default() };
    let v: Vec<u64> = l.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest and guest_nice are inside user/nice)
    let total = v.iter().take(8).sum();
    CpuStat { total, softirq: v.get(6).copied().unwrap_or(0) }
}

fn net_rx() -> u64 {
    let s = std::fs::read_to_string("/proc/softirqs").unwrap_or_default();
    s.lines()
        .find(|l| l.trim_start().starts_with("NET_RX:"))
        .map(|l| l.split_whitespace().skip(1).filter_map(|x| x.parse::<u64>().ok()).sum())
        .unwrap_or(0)
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

struct Sample {
    /// Queries the sender's kernel took, per second.
    offered: f64,
    /// Answers the client received, per second.
    answered: f64,
    /// Answers the responder sent, per second.
    responded: f64,
    /// `nf_conntrack_count` of the server namespace at the end.
    conntrack: u64,
    /// Softirq time over all CPU time (all CPUs), %.
    softirq_pct: f64,
    /// Softirq CPU time per 1000 answers, ms.
    softirq_ms_per_k: f64,
    /// NET_RX softirqs per second (all CPUs).
    net_rx_per_s: f64,
    /// Answers per CPU-second spent on them: the sender's and the responder's threads (user +
    /// system, softirq excluded by the kernel's irq time accounting) plus the softirq time of the
    /// measured CPU(s). What one dedicated CPU would answer; less sensitive than q/s to other
    /// load on a shared machine.
    per_cpu_s: f64,
}

/// utime + stime of thread `tid` of this process, in clock ticks.
fn thread_ticks(tid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap_or_default();
    let Some((_, rest)) = s.rsplit_once(") ") else { return 0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime 14, stime 15 (1-based over the whole line).
    let get = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(14) + get(15)
}

fn replies(client: &BenchNs) -> Result<u64, String> {
    let out = client.run(|| exec("nft", &["list", "counter", "netdev", "dpc", "replies"], None))??;
    out.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or(format!("no packet count in {out:?}"))
}

fn conntrack_count(server: &BenchNs) -> Result<u64, String> {
    server.run(|| {
        std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")
            .map_err(|e| e.to_string())
            .and_then(|s| s.trim().parse::<u64>().map_err(|e| e.to_string()))
    })?
}

fn flush_conntrack(server: &BenchNs) -> Result<(), String> {
    // `conntrack -F` (conntrack-tools) in the server namespace; entries of an empty table are fine.
    server.run(|| exec("conntrack", &["-F"], None).map(drop))??;
    Ok(())
}

struct Net {
    client: BenchNs,
    server: BenchNs,
    next_query: u64,
}

/// Pins the calling thread to `cpu`.
fn pin(cpu: Option<usize>) -> Result<(), String> {
    let Some(n) = cpu else { return Ok(()) };
    let mut set = nix::sched::CpuSet::new();
    set.set(n).map_err(|e| format!("cpu {n}: {e}"))?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).map_err(|e| format!("pinning to cpu {n}: {e}"))
}

fn measure(net: &mut Net, rate: Option<u64>, secs: f64, cpu: Option<usize>) -> Result<Sample, String> {
    flush_conntrack(&net.server)?;
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let (rtid, stid) = (Arc::new(AtomicI32::new(0)), Arc::new(AtomicI32::new(0)));
    let rfd = net.server.run(responder_socket)??;
    let sfd = net.client.run(sender_socket)??;
    let rt = {
        let (stop, answered) = (stop.clone(), answered.clone());
        let tid = rtid.clone();
        std::thread::spawn(move || {
            tid.store(nix::unistd::gettid().as_raw(), Ordering::Relaxed);
            pin(cpu)?;
            respond(rfd, stop, answered)
        })
    };
    let st = {
        let (stop, sent, next) = (stop.clone(), sent.clone(), net.next_query);
        let tid = stid.clone();
        std::thread::spawn(move || {
            tid.store(nix::unistd::gettid().as_raw(), Ordering::Relaxed);
            pin(cpu)?;
            send(sfd, rate, stop, sent, next)
        })
    };
    let run = (|| -> Result<Sample, String> {
        std::thread::sleep(Duration::from_secs(1));
        let tids = [rtid.load(Ordering::Relaxed), stid.load(Ordering::Relaxed)];
        let (a0, s0, r0, c0, n0) = (
            answered.load(Ordering::Relaxed),
            sent.load(Ordering::Relaxed),
            replies(&net.client)?,
            cpu_stat(cpu),
            net_rx(),
        );
        let t0_ticks: u64 = tids.iter().map(|&t| thread_ticks(t)).sum();
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(secs));
        let (a1, s1, c1, n1) =
            (answered.load(Ordering::Relaxed), sent.load(Ordering::Relaxed), cpu_stat(cpu), net_rx());
        let dt = t0.elapsed().as_secs_f64();
        let t1_ticks: u64 = tids.iter().map(|&t| thread_ticks(t)).sum();
        let r1 = replies(&net.client)?;
        let conntrack = conntrack_count(&net.server)?;
        let total = (c1.total - c0.total).max(1) as f64;
        let soft = (c1.softirq - c0.softirq) as f64;
        let answers = (r1 - r0) as f64;
        Ok(Sample {
            offered: (s1 - s0) as f64 / dt,
            answered: answers / dt,
            responded: (a1 - a0) as f64 / dt,
            conntrack,
            softirq_pct: 100.0 * soft / total,
            softirq_ms_per_k: if answers > 0.0 { soft / clk_tck() * 1000.0 / (answers / 1000.0) } else { f64::NAN },
            net_rx_per_s: (n1 - n0) as f64 / dt,
            per_cpu_s: {
                let cpu_s = (t1_ticks.saturating_sub(t0_ticks) as f64 + soft) / clk_tck();
                if cpu_s > 0.0 {
                    answers / cpu_s
                } else {
                    f64::NAN
                }
            },
        })
    })();
    stop.store(true, Ordering::Relaxed);
    let sres = st.join().map_err(|_| "sender panicked".to_string())?;
    let rres = rt.join().map_err(|_| "responder panicked".to_string())?;
    net.next_query = sres?;
    rres?;
    run
}

// ---------------------------------------------------------------------------------------------
// ctguard

struct Cli {
    exe: PathBuf,
    state: PathBuf,
    run: PathBuf,
}

impl Cli {
    fn cmd(&self, args: &[&str]) -> Result<serde_json::Value, String> {
        let out = Command::new(&self.exe)
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--run-dir")
            .arg(&self.run)
            .arg("--json")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{}: {e}", self.exe.display()))?;
        if !out.status.success() {
            return Err(format!(
                "`ctguard {}` failed ({}): {} {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("`ctguard {}`: not JSON: {e}", args.join(" ")))
    }

    fn stop_agent(&self) {
        let Ok(p) = std::fs::read_to_string(self.run.join("agent.lock")) else { return };
        let Ok(pid) = p.trim().parse::<i32>() else { return };
        if std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "ctguard") {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
            for _ in 0..500 {
                let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| !s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')));
                if !alive {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Sets the global `nf_conntrack_max` for the run (opt-in) and restores it on drop.
struct ConntrackMax(Option<String>);

impl Drop for ConntrackMax {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            if let Err(e) = std::fs::write("/proc/sys/net/netfilter/nf_conntrack_max", old) {
                eprintln!("dataplane: restoring nf_conntrack_max to {}: {e}", old.trim());
            } else {
                eprintln!("dataplane: nf_conntrack_max restored to {}", old.trim());
            }
        }
    }
}

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Ok(dir) = std::fs::read_dir(self.0.join("run").join("ns")) {
            for e in dir.flatten() {
                let _ = nix::mount::umount2(&e.path(), nix::mount::MntFlags::MNT_DETACH);
            }
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn setup() -> Result<Net, String> {
    let client = BenchNs::new("ctg-dp")?;
    let server = BenchNs::new("ctg-dp")?;
    exec(
        "ip",
        &[
            "link",
            "add",
            "veth-c",
            "netns",
            &client.name,
            "type",
            "veth",
            "peer",
            "name",
            "veth-s",
            "netns",
            &server.name,
        ],
        None,
    )?;
    client.run(|| -> Result<(), String> {
        exec("ip", &["addr", "add", "198.18.0.1/24", "dev", "veth-c"], None)?;
        exec("ip", &["link", "set", "veth-c", "up"], None)?;
        exec("nft", &["-f", "-"], Some(CLIENT_NFT.as_bytes()))?;
        Ok(())
    })??;
    server.run(|| -> Result<(), String> {
        exec("ip", &["addr", "add", "198.18.0.2/24", "dev", "veth-s"], None)?;
        exec("ip", &["link", "set", "veth-s", "up"], None)?;
        exec("ip", &["route", "add", "198.19.0.0/16", "via", "198.18.0.1"], None)?;
        for k in ["all", "default", "veth-s"] {
            let _ = std::fs::write(format!("/proc/sys/net/ipv4/conf/{k}/rp_filter"), "0");
        }
        exec("nft", &["-f", "-"], Some(STATEFUL_NFT.as_bytes()))?;
        Ok(())
    })??;
    let _ = CLIENT;
    Ok(Net { client, server, next_query: 0 })
}

fn fmt_rate(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v >= 1000.0 {
        format!("{:.1}k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") && !std::env::var("CTGUARD_BENCH").is_ok_and(|v| v == "1") {
        println!("dataplane bench: not run (use `cargo bench --bench dataplane`, as root)");
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("dataplane bench: needs root");
        std::process::exit(1);
    }
    let quick = std::env::var("CTGUARD_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let secs = env_num("CTGUARD_DP_SECONDS").unwrap_or(if quick { 2 } else { 5 }) as f64;
    let rounds = env_num("CTGUARD_DP_ROUNDS").unwrap_or(if quick { 1 } else { 3 }) as usize;
    reap_stale_namespaces("ctg-dp");
    let base = Scratch(std::env::temp_dir().join(format!("ctg-dp-{}", std::process::id())));
    for d in ["", "state", "run"] {
        let p = base.0.join(d);
        let _ = std::fs::create_dir_all(&p);
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700));
    }
    let _max_guard = match env_num("CTGUARD_DP_CONNTRACK_MAX") {
        Some(n) => {
            let old = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max").unwrap_or_default();
            match std::fs::write("/proc/sys/net/netfilter/nf_conntrack_max", n.to_string()) {
                Ok(()) => {
                    eprintln!("dataplane: nf_conntrack_max {} → {n} for this run (opt-in)", old.trim());
                    ConntrackMax(Some(old))
                }
                Err(e) => {
                    eprintln!("dataplane: setting nf_conntrack_max: {e}");
                    std::process::exit(1);
                }
            }
        }
        None => ConntrackMax(None),
    };
    let cli =
        Cli { exe: PathBuf::from(env!("CARGO_BIN_EXE_ctguard")), state: base.0.join("state"), run: base.0.join("run") };
    let load0 = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let started = Instant::now();
    // Both threads on one CPU by default: the server's receive path (conntrack included) runs
    // in softirq on the sending CPU, so only a shared CPU makes its cost compete with the
    // responder, as a NIC's softirq competes with the DNS server on a real host.
    let cpu = match std::env::var("CTGUARD_DP_CPU") {
        Ok(v) if v == "none" => None,
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) => Some(n),
            Err(_) => {
                eprintln!("dataplane: CTGUARD_DP_CPU={v}: a CPU number or `none`");
                std::process::exit(2);
            }
        },
        Err(_) => Some(0),
    };
    let res = run(&cli, secs, rounds, cpu);
    cli.stop_agent();
    let load1 = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    match res {
        Ok(report) => {
            println!("# ctguard data-plane bench{}", if quick { " (QUICK smoke run)" } else { "" });
            println!();
            print!("{report}");
            println!();
            println!(
                "{rounds} round(s) of {secs:.0} s per measurement (after 1 s warm-up); sender and responder {}; softirq share of {}; nf_conntrack_max {}; took {:.0} s; loadavg at the start: {}; at the end: {}",
                cpu.map_or("not pinned".to_string(), |n| format!("pinned to CPU {n}")),
                cpu.map_or("all CPUs".to_string(), |n| format!("CPU {n}")),
                std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max").unwrap_or_default().trim(),
                started.elapsed().as_secs_f64(),
                load0.trim(),
                load1.trim()
            );
        }
        Err(e) => {
            eprintln!("dataplane bench: FAILED: {e}");
            drop(base);
            std::process::exit(1);
        }
    }
}

type Samples = [Vec<Sample>; 2];

fn run(cli: &Cli, secs: f64, rounds: usize, cpu: Option<usize>) -> Result<String, String> {
    let mut net = setup()?;
    let before = net.server.run(|| exec("nft", &["list", "ruleset"], None))??;
    let ns = net.server.name.clone();
    // mode 0: no policy (tracked); mode 1: ctguard's built-in policy applied.
    let with_policy =
        |net: &mut Net, mode: usize, f: &mut dyn FnMut(&mut Net) -> Result<(), String>| -> Result<(), String> {
            if mode == 0 {
                return f(net);
            }
            let v = cli.cmd(&["apply", "--netns", &ns, "--timeout", "10m"])?;
            let txid = v["data"]["txid"].as_str().ok_or(format!("apply answered {v}"))?.to_string();
            let r = f(net);
            cli.cmd(&["rollback", &txid])?;
            let after = net.server.run(|| exec("nft", &["list", "ruleset"], None))??;
            if after != before {
                return Err(format!(
                    "ROLLBACK NOT EXACT: the server's ruleset after `ctguard rollback {txid}` differs from before"
                ));
            }
            r
        };
    let mut max: Samples = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        for k in 0..2 {
            let mode = (round + k) % 2;
            eprintln!("dataplane: round {}/{rounds}, max rate, {}", round + 1, ["no policy", "policy"][mode]);
            with_policy(&mut net, mode, &mut |net| {
                let s = measure(net, None, secs, cpu)?;
                eprintln!(
                    "  offered {} answered {} q/s, conntrack {}, softirq {:.1} %",
                    fmt_rate(s.offered),
                    fmt_rate(s.answered),
                    s.conntrack,
                    s.softirq_pct
                );
                max[mode].push(s);
                Ok(())
            })?;
        }
    }
    let med = |v: &[Sample]| min_median(&v.iter().map(|s| s.answered).collect::<Vec<_>>()).1;
    let rate =
        env_num("CTGUARD_DP_RATE").unwrap_or_else(|| (0.5 * med(&max[0]).min(med(&max[1]))) as u64 / 1000 * 1000);
    let mut fixed: Samples = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        for k in 0..2 {
            let mode = (round + k) % 2;
            eprintln!("dataplane: round {}/{rounds}, {rate} q/s, {}", round + 1, ["no policy", "policy"][mode]);
            with_policy(&mut net, mode, &mut |net| {
                let s = measure(net, Some(rate), secs, cpu)?;
                eprintln!(
                    "  offered {} answered {} q/s, conntrack {}, softirq {:.1} %",
                    fmt_rate(s.offered),
                    fmt_rate(s.answered),
                    s.conntrack,
                    s.softirq_pct
                );
                fixed[mode].push(s);
                Ok(())
            })?;
        }
    }
    let mut out = String::new();
    out.push_str("| rate | server firewall | offered q/s (median) | answered q/s min / median | responder sent q/s (median) | conntrack entries (median, end) | softirq share, min / median | softirq CPU ms per 1k answers (median) | answers per CPU-second (median) | NET_RX/s (median) |\n");
    out.push_str("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for (label, set) in [("max".to_string(), &max), (format!("fixed {}k q/s", rate / 1000), &fixed)] {
        for mode in 0..2 {
            let v = &set[mode];
            let col = |f: &dyn Fn(&Sample) -> f64| min_median(&v.iter().map(f).collect::<Vec<_>>());
            let (amin, amed) = col(&|s| s.answered);
            let (smin, smed) = col(&|s| s.softirq_pct);
            out.push_str(&format!(
                "| {label} | {} | {} | {} / {} | {} | {:.0} | {smin:.1} % / {smed:.1} % | {:.3} | {} | {} |\n",
                ["stateful, every query tracked (no policy)", "ctguard built-in policy (NOTRACK)"][mode],
                fmt_rate(col(&|s| s.offered).1),
                fmt_rate(amin),
                fmt_rate(amed),
                fmt_rate(col(&|s| s.responded).1),
                col(&|s| s.conntrack as f64).1,
                col(&|s| s.softirq_ms_per_k).1,
                fmt_rate(col(&|s| s.per_cpu_s).1),
                fmt_rate(col(&|s| s.net_rx_per_s).1),
            ));
        }
    }
    // An equal fixed rate only if the sender kept up in both modes (another load on the CPU can
    // hold it back): say so.
    for mode in 0..2 {
        let off = min_median(&fixed[mode].iter().map(|s| s.offered).collect::<Vec<_>>()).1;
        if off < 0.97 * rate as f64 {
            out.push_str(&format!(
                "\n**The fixed rate was not reached** with {}: {} q/s offered of {} (the CPU was busy): that row is not at an equal rate.\n",
                ["no policy", "the policy"][mode],
                fmt_rate(off),
                fmt_rate(rate as f64)
            ));
        }
    }
    let ratio = med(&max[1]) / med(&max[0]);
    let per_cpu = |v: &[Sample]| min_median(&v.iter().map(|s| s.per_cpu_s).collect::<Vec<_>>()).1;
    out.push_str(&format!(
        "\nAnswers per CPU-second at max rate, policy / no policy: {:.2}× (medians).",
        per_cpu(&max[1]) / per_cpu(&max[0])
    ));
    let soft = |v: &[Sample]| min_median(&v.iter().map(|s| s.softirq_pct).collect::<Vec<_>>()).1;
    out.push_str(&format!(
        " Answered q/s at max rate, policy / no policy: {ratio:.2}× (medians). Softirq share at {}k q/s: {:.1} % → {:.1} %.\n",
        rate / 1000,
        soft(&fixed[0]),
        soft(&fixed[1])
    ));
    drop(net);
    Ok(out)
}
