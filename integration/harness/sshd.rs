//! A real OpenSSH server inside a test namespace, and the ssh client to reach it from another.
//!
//! [`Sshd::start`] writes a throw-away directory (fresh ed25519 host key, a client key pair,
//! `authorized_keys`, `sshd_config`) and runs `/usr/sbin/sshd -D -e -f CONFIG` from a thread
//! that entered the namespace, listening only on the address given (an address of that
//! namespace): nothing listens in the initial namespace. Dropping it kills the listener and
//! every process below it (the session processes and what they run), by pid, after checking
//! each one still lives in the namespace; then it removes the directory.
//!
//! The client side ([`ssh`], [`ssh_spawn`]) runs `/usr/bin/ssh` in another namespace with
//! [`Sshd::ssh_args`]. The remote command goes through the remote login shell, as with any ssh.
//! Needs `openssh-server` and `openssh-client` (listed in `integration/packages.txt`).

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{spawn_tool, Ns, ToolOutput, TOOL_TIMEOUT};

const SSHD: &str = "/usr/sbin/sshd";
const SSH: &str = "/usr/bin/ssh";
const SSH_KEYGEN: &str = "/usr/bin/ssh-keygen";
/// sshd's privilege separation directory (Debian's build); sshd refuses to start without it.
const PRIVSEP_DIR: &str = "/run/sshd";
/// How long sshd may take to report that it listens.
const START_TIMEOUT: Duration = Duration::from_secs(10);

static SSHD_COUNTER: AtomicU64 = AtomicU64::new(0);

/// How [`Sshd::start_with`] configures the server beyond the defaults of [`Sshd::start`].
#[derive(Debug, Clone, Default)]
pub struct SshdOptions {
    /// `UsePAM yes`: Debian's `/etc/pam.d/sshd`, whose `pam_loginuid` gives every connection a
    /// fresh audit session id (`/proc/PID/sessionid`). Off by default (`UsePAM no`).
    pub use_pam: bool,
    /// More addresses of the namespace to listen on, same port (e.g. `127.0.0.1`).
    pub also_listen: Vec<IpAddr>,
}

fn need(path: &str, package: &str) {
    if !Path::new(path).is_file() {
        panic!("harness: {path} is missing: install {package} (integration/packages.txt)");
    }
}

/// A running OpenSSH server in a test namespace (see the module doc).
#[derive(Debug)]
pub struct Sshd {
    dir: PathBuf,
    addr: SocketAddr,
    child: Option<Child>,
    pid: i32,
    ns_name: String,
    ns_id: (u64, u64),
    opts: SshdOptions,
}

impl Sshd {
    /// Starts sshd in `ns` on `addr`:`port` (root logins with the generated key only) and waits
    /// until it listens. Fails the test if it cannot start.
    pub fn start(ns: &Ns, addr: IpAddr, port: u16) -> Sshd {
        Sshd::start_with(ns, addr, port, &SshdOptions::default())
    }

    /// [`Sshd::start`] with `opts` (PAM, more listen addresses).
    pub fn start_with(ns: &Ns, addr: IpAddr, port: u16, opts: &SshdOptions) -> Sshd {
        need(SSHD, "openssh-server");
        need(SSH_KEYGEN, "openssh-client");
        assert!(!ns.target().is_initial(), "harness: sshd must run in a test namespace, not the host's");
        let n = SSHD_COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ctg-sshd-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            panic!("harness: creating {}: {e}", dir.display());
        }
        // From here on Drop cleans up, whatever fails next.
        let mut sshd = Sshd {
            dir,
            addr: SocketAddr::new(addr, port),
            child: None,
            pid: 0,
            ns_name: ns.name().to_string(),
            ns_id: ns.target().id,
            opts: opts.clone(),
        };
        for key in ["host_ed25519", "client_ed25519"] {
            let path = sshd.dir.join(key);
            let path = path.to_string_lossy();
            let o = spawn_tool(
                SSH_KEYGEN,
                &["-q", "-t", "ed25519", "-N", "", "-C", "ctguard-test", "-f", &path],
                None,
                TOOL_TIMEOUT,
            );
            match o {
                Ok(o) if o.success() => {}
                Ok(o) => panic!("harness: ssh-keygen {path} failed: {}", o.stderr.trim()),
                Err(e) => panic!("harness: {e}"),
            }
        }
        if let Err(e) = std::fs::copy(sshd.dir.join("client_ed25519.pub"), sshd.dir.join("authorized_keys")) {
            panic!("harness: writing authorized_keys: {e}");
        }
        let config = sshd.config_text();
        if let Err(e) = std::fs::write(sshd.config(), config) {
            panic!("harness: writing sshd_config: {e}");
        }
        if let Err(e) = std::fs::create_dir_all(PRIVSEP_DIR) {
            panic!("harness: creating {PRIVSEP_DIR}: {e}");
        }
        let log = match std::fs::File::create(sshd.log_path()) {
            Ok(f) => f,
            Err(e) => panic!("harness: creating the sshd log: {e}"),
        };
        let config = sshd.config();
        let spawned = ns.run(move || {
            Command::new(SSHD)
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(&config)
                .env_clear()
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                .env("LC_ALL", "C")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
        });
        match spawned {
            Ok(c) => {
                sshd.pid = c.id() as i32;
                sshd.child = Some(c);
            }
            Err(e) => panic!("harness: cannot start {SSHD} in {}: {e}", ns.name()),
        }
        sshd.wait_listening();
        assert_eq!(
            netns_id(sshd.pid),
            Some(sshd.ns_id),
            "harness: sshd {} is not in namespace {}",
            sshd.pid,
            sshd.ns_name
        );
        sshd
    }

    fn wait_listening(&mut self) {
        let want = format!("Server listening on {} port {}.", self.addr.ip(), self.addr.port());
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.log().contains(&want) {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("harness: sshd exited ({st}) before listening:\n{}", self.log());
                }
            }
            assert!(
                Instant::now() < deadline,
                "harness: sshd did not listen within {START_TIMEOUT:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn config_text(&self) -> String {
        let d = self.dir.display();
        let more: String = self.opts.also_listen.iter().map(|a| format!("ListenAddress {a}\n")).collect();
        format!(
            "# ctguard test sshd: reachable only inside its namespace\n\
             ListenAddress {ip}\n\
             {more}\
             Port {port}\n\
             HostKey {d}/host_ed25519\n\
             AuthorizedKeysFile {d}/authorized_keys\n\
             PermitRootLogin prohibit-password\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             UsePAM {pam}\n\
             StrictModes no\n\
             PidFile {d}/sshd.pid\n\
             PrintMotd no\n\
             PrintLastLog no\n\
             AllowTcpForwarding yes\n\
             X11Forwarding no\n\
             ClientAliveInterval 2\n\
             ClientAliveCountMax 3\n\
             LogLevel INFO\n\
             Subsystem sftp internal-sftp\n",
            ip = self.addr.ip(),
            port = self.addr.port(),
            pam = if self.opts.use_pam { "yes" } else { "no" },
        )
    }

    /// The listener's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its temp directory (keys, config, log); also a good place for a ControlPath.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The `sshd_config` it runs with.
    pub fn config(&self) -> PathBuf {
        self.dir.join("sshd_config")
    }

    /// The client's private key.
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client_ed25519")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("sshd.log")
    }

    /// What sshd logged so far (`-e`: stderr, also its session processes').
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The ssh client's options and destination: `-F /dev/null -i KEY -o … -p PORT root@ADDR`.
    /// Put `-tt`/`-T` and extra options before these, the remote command after.
    pub fn ssh_args(&self) -> Vec<String> {
        let mut a: Vec<String> =
            vec!["-F".into(), "/dev/null".into(), "-i".into(), self.client_key().display().to_string()];
        for o in [
            "IdentitiesOnly=yes",
            "StrictHostKeyChecking=no",
            "UserKnownHostsFile=/dev/null",
            "GlobalKnownHostsFile=/dev/null",
            "LogLevel=ERROR",
            "BatchMode=yes",
            "ConnectTimeout=5",
            "ServerAliveInterval=2",
            "ServerAliveCountMax=2",
        ] {
            a.push("-o".into());
            a.push(o.into());
        }
        a.push("-p".into());
        a.push(self.addr.port().to_string());
        a.push(format!("root@{}", self.addr.ip()));
        a
    }

    /// Pids of every process below the listener (connection processes and what they run),
    /// parents before children.
    pub fn session_pids(&self) -> Vec<i32> {
        descendants(self.pid)
    }

    fn in_ns(&self, pid: i32) -> bool {
        netns_id(pid) == Some(self.ns_id)
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        if self.pid > 0 {
            // Sessions first (collected before the listener dies and they are reparented),
            // each checked to still be a process of the namespace (no pid reuse victims).
            for _ in 0..3 {
                let below: Vec<i32> = self.session_pids().into_iter().filter(|&p| self.in_ns(p)).collect();
                if below.is_empty() {
                    break;
                }
                for p in below {
                    let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Network namespace (device, inode) of a process, if it still exists.
pub fn netns_id(pid: i32) -> Option<(u64, u64)> {
    std::fs::metadata(format!("/proc/{pid}/ns/net")).ok().map(|m| (m.dev(), m.ino()))
}

/// Parent pid from `/proc/PID/stat` (comm may hold spaces and parentheses).
fn ppid_of(pid: i32) -> Option<i32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Every descendant of `root` (one scan of `/proc`), parents before children.
pub fn descendants(root: i32) -> Vec<i32> {
    let mut pairs: Vec<(i32, i32)> = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
                if let Some(pp) = ppid_of(pid) {
                    pairs.push((pid, pp));
                }
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(c, pp) in &pairs {
            if pp == p && !out.contains(&c) && c != root {
                out.push(c);
                frontier.push(c);
            }
        }
    }
    out
}

/// `/proc/PID/cmdline` split into its arguments (empty when gone).
pub fn argv_of(pid: i32) -> Vec<String> {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(raw) => {
            raw.split(|&b| b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
        }
        Err(_) => Vec::new(),
    }
}

/// Waits (at most `timeout`) for a process of `ns` whose argv is exactly `argv`; returns its
/// pid or fails the test. Give every process a test looks for a unique argv (`sleep 3601`).
pub fn wait_process(ns: &Ns, argv: &[&str], timeout: Duration) -> i32 {
    let deadline = Instant::now() + timeout;
    loop {
        for p in ns.pids() {
            if argv_of(p) == argv {
                return p;
            }
        }
        assert!(Instant::now() < deadline, "harness: no process {argv:?} in {} after {timeout:?}", ns.name());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn client_args(sshd: &Sshd, extra: &[&str], remote_cmd: &[&str], tty: bool) -> Vec<String> {
    let mut a: Vec<String> = vec![if tty { "-tt" } else { "-T" }.to_string()];
    a.extend(extra.iter().map(|s| s.to_string()));
    a.extend(sshd.ssh_args());
    a.extend(remote_cmd.iter().map(|s| s.to_string()));
    a
}

/// Runs `remote_cmd` over a new ssh connection from `cli` to `sshd` (`-tt` with `tty`: a pty
/// even without a local terminal) and returns what the client printed; killed after
/// [`TOOL_TIMEOUT`].
pub fn ssh(cli: &Ns, sshd: &Sshd, remote_cmd: &[&str], tty: bool) -> ToolOutput {
    ssh_opts(cli, sshd, &[], remote_cmd, tty)
}

/// [`ssh`] with extra client options (placed before [`Sshd::ssh_args`]).
pub fn ssh_opts(cli: &Ns, sshd: &Sshd, extra: &[&str], remote_cmd: &[&str], tty: bool) -> ToolOutput {
    need(SSH, "openssh-client");
    let args = client_args(sshd, extra, remote_cmd, tty);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match cli.run(|| spawn_tool(SSH, &args, None, TOOL_TIMEOUT)) {
        Ok(o) => o,
        Err(e) => panic!("{e} (in {})", cli.name()),
    }
}

/// An ssh client running in the background (see [`ssh_spawn`]); killed on `Drop`.
#[derive(Debug)]
pub struct SshClient {
    child: Child,
    stderr: super::Captured,
    reader: Option<JoinHandle<()>>,
}

impl SshClient {
    /// The client's pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Its exit status if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits at most `timeout` for it to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        super::captured_text(&self.stderr)
    }
}

impl Drop for SshClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Another process may still hold the pipe (a ControlMaster received this client's
        // stdio over its control socket): never wait long for EOF, let the reader finish later.
        if let Some(r) = self.reader.take() {
            let deadline = Instant::now() + Duration::from_millis(500);
            while !r.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if r.is_finished() {
                let _ = r.join();
            }
        }
    }
}

/// Starts `ssh [-tt|-T] EXTRA… ARGS… REMOTE_CMD…` in `cli` without waiting for it (stdin and
/// stdout `/dev/null`): the connection stays up while the remote command runs.
pub fn ssh_spawn(cli: &Ns, sshd: &Sshd, extra: &[&str], remote_cmd: &[&str], tty: bool) -> SshClient {
    need(SSH, "openssh-client");
    let args = client_args(sshd, extra, remote_cmd, tty);
    let spawned = cli.run(move || {
        Command::new(SSH)
            .args(&args)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
    });
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => panic!("harness: cannot start {SSH} in {}: {e}", cli.name()),
    };
    let (stderr, reader) = match child.stderr.take() {
        Some(pipe) => {
            let (out, reader) = super::drain(pipe);
            (out, Some(reader))
        }
        None => (super::Captured::default(), None),
    };
    SshClient { child, stderr, reader }
}
