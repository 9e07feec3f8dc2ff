//! Where a request comes from (DESIGN §4): the SSH connection and login session a transaction
//! was applied or confirmed from, as recorded in the journal. Plain data shared by the journal's
//! record type ([`crate::txn`]) and the agent's proof of a new connection
//! ([`crate::agent::proof`], which finds these values and decides on them). Pure.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// An SSH connection: the TCP connection between the client and sshd, as seen by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SshConn4 {
    /// The client's address and port.
    pub client: SocketAddr,
    /// The server's address and port (sshd's side).
    pub server: SocketAddr,
}

impl SshConn4 {
    /// `SSH_CONNECTION` form: `client_ip client_port server_ip server_port`.
    pub fn to_env_value(&self) -> String {
        format!("{} {} {} {}", self.client.ip(), self.client.port(), self.server.ip(), self.server.port())
    }

    /// The lint's view of the connection (client address, server port).
    pub fn lint_conn(&self) -> crate::lint::SshConn {
        crate::lint::SshConn { client: self.client.ip(), server_port: self.server.port() }
    }

    /// The command that confirms from a new connection to this one's server: `ssh [-p PORT]
    /// -o ControlPath=none SERVER ctguard confirm [TXID]` (the server address is the one the
    /// client reached).
    pub fn new_connection_command(&self, txid: Option<&str>) -> String {
        let mut cmd = String::from("ssh -o ControlPath=none");
        if self.server.port() != 22 {
            cmd.push_str(&format!(" -p {}", self.server.port()));
        }
        cmd.push_str(&format!(" {} ctguard confirm", self.server.ip()));
        if let Some(t) = txid {
            cmd.push(' ');
            cmd.push_str(t);
        }
        cmd
    }
}

impl fmt::Display for SshConn4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.client, self.server)
    }
}

/// How an SSH origin was established.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// From the socket held by the nearest per-connection sshd ancestor: verified.
    Ancestry,
    /// UNVERIFIED: the requester's `SSH_CONNECTION`, with no sshd ancestor. A claim only: never
    /// evidence for a confirm (see the module doc).
    Env,
}

/// The login session of a requester, as the kernel (audit) and systemd recorded it. Every field
/// is optional: absent when unset, unreadable on this kernel, or inherited from the sshd listener.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginSession {
    /// Audit session id (`/proc/PID/sessionid`): a fresh value for every login `pam_loginuid`
    /// handled (sshd with `UsePAM yes`, console, cron), inherited by every descendant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_session: Option<u32>,
    /// Login uid (`/proc/PID/loginuid`): who logged in. Shown, not compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login_uid: Option<u32>,
    /// The systemd login session scope the process runs in (the cgroup path up to
    /// `session-N.scope`), where systemd-logind runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

impl LoginSession {
    /// True when nothing is known.
    pub fn is_empty(&self) -> bool {
        self.audit_session.is_none() && self.login_uid.is_none() && self.scope.is_none()
    }

    /// True when it holds an identifier that can tell sessions apart (audit session or scope).
    pub fn identifies(&self) -> bool {
        self.audit_session.is_some() || self.scope.is_some()
    }

    /// `audit session 5, login uid 0, scope /user.slice/…/session-5.scope` (empty when nothing
    /// is known).
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(s) = self.audit_session {
            parts.push(format!("audit session {s}"));
        }
        if let Some(u) = self.login_uid {
            parts.push(format!("login uid {u}"));
        }
        if let Some(s) = &self.scope {
            parts.push(format!("scope {}", escape(s)));
        }
        parts.join(", ")
    }
}

/// Where a request comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Origin {
    /// Over an SSH connection (verified through the ancestry, or — at apply only — claimed by
    /// `SSH_CONNECTION`, [`Via::Env`]).
    Ssh {
        /// The TCP connection.
        conn: SshConn4,
        /// The per-connection sshd process holding it (`sshd: user@…` nearest the requester);
        /// `None` when only claimed through `SSH_CONNECTION`.
        sshd_pid: Option<i32>,
        /// How it was identified.
        via: Via,
        /// The requester's login session.
        #[serde(default, skip_serializing_if = "LoginSession::is_empty")]
        session: LoginSession,
    },
    /// No sshd ancestor (and no `SSH_CONNECTION` claim): a local console or root shell, a timer,
    /// a detached process, …
    Local {
        /// The requester's login session.
        #[serde(default, skip_serializing_if = "LoginSession::is_empty")]
        session: LoginSession,
    },
}

impl Origin {
    /// A local origin with nothing known about its login session.
    pub fn local() -> Origin {
        Origin::Local { session: LoginSession::default() }
    }

    /// The SSH connection, verified or claimed (for display, the lint and the new-connection
    /// command; never evidence for a confirm: see [`Origin::verified_conn`]).
    pub fn conn(&self) -> Option<&SshConn4> {
        match self {
            Origin::Ssh { conn, .. } => Some(conn),
            Origin::Local { .. } => None,
        }
    }

    /// The SSH connection found through the sshd ancestry.
    pub fn verified_conn(&self) -> Option<&SshConn4> {
        match self {
            Origin::Ssh { conn, via: Via::Ancestry, .. } => Some(conn),
            _ => None,
        }
    }

    /// The requester's login session.
    pub fn session(&self) -> &LoginSession {
        match self {
            Origin::Ssh { session, .. } | Origin::Local { session } => session,
        }
    }

    /// True when the request came (or claims to have come) over SSH: a transaction so applied
    /// needs a confirm from a new SSH connection.
    pub fn over_ssh(&self) -> bool {
        matches!(self, Origin::Ssh { .. })
    }

    /// The identifiers it was recognised by, for the journal ("confirmed from …"): the same
    /// text as its `Display`.
    pub fn describe(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let session = self.session().describe();
        let sep = if session.is_empty() { "" } else { "; " };
        match self {
            Origin::Ssh { conn, sshd_pid, via: Via::Ancestry, .. } => {
                let pid = sshd_pid.map(|p| format!("sshd pid {p}, ")).unwrap_or_default();
                write!(f, "ssh {conn} ({pid}via Ancestry{sep}{session})")
            }
            Origin::Ssh { conn, via: Via::Env, .. } => {
                write!(f, "local, no sshd ancestor (UNVERIFIED SSH_CONNECTION claim: {conn}, via Env{sep}{session})")
            }
            Origin::Local { .. } if session.is_empty() => f.write_str("local (no sshd ancestor, no login session)"),
            Origin::Local { .. } => write!(f, "local (no sshd ancestor; {session})"),
        }
    }
}

/// `s` with control characters and non-ASCII escaped (values read from `/proc` end up in
/// messages and the journal).
fn escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| if c.is_ascii_graphic() || c == ' ' { vec![c] } else { c.escape_default().collect() })
        .collect()
}
