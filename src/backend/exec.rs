//! Running the netfilter tools: absolute paths found once, arguments as vectors (never a shell
//! command line), stdin from memory, stdout and stderr captured. The child inherits the calling
//! thread's network namespace, so call these inside `crate::netns::Target::run`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Directories searched for tools, in order (root's usual PATH; independent of the caller's).
pub const TOOL_DIRS: &[&str] = &["/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/sbin"];

/// Errors running a tool.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The tool is not installed.
    #[error("{0} not found in {dirs}", dirs = TOOL_DIRS.join(":"))]
    NotFound(String),
    /// It could not be started.
    #[error("cannot run {path}: {source}")]
    Spawn {
        /// Absolute path of the tool.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It ran and failed.
    #[error("{cmd} failed ({status}): {stderr}")]
    Failed {
        /// The command, for the message.
        cmd: String,
        /// Exit status text.
        status: String,
        /// Its stderr, trimmed to one line.
        stderr: String,
    },
}

/// A tool with its absolute path (recorded in the journal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tool {
    /// Short name, e.g. `nft`.
    pub name: String,
    /// Absolute path.
    pub path: PathBuf,
}

impl Tool {
    /// Finds `name` in [`TOOL_DIRS`].
    pub fn find(name: &str) -> Result<Tool, ExecError> {
        TOOL_DIRS
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.is_file())
            .map(|path| Tool { name: name.to_string(), path })
            .ok_or_else(|| ExecError::NotFound(name.to_string()))
    }

    /// Runs the tool with `args` and optional `stdin`; returns stdout on exit 0.
    pub fn run(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<String, ExecError> {
        let out = self.output(args, stdin)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(ExecError::Failed {
                cmd: format!("{} {}", self.name, args.join(" ")),
                status: out.status.to_string(),
                stderr: one_line(&String::from_utf8_lossy(&out.stderr)),
            })
        }
    }

    /// Runs the tool and returns its raw output whatever the exit status.
    pub fn output(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<std::process::Output, ExecError> {
        let spawn_err = |source| ExecError::Spawn { path: self.path.clone(), source };
        let mut child = Command::new(&self.path)
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("LC_ALL", "C")
            .spawn()
            .map_err(spawn_err)?;
        if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A tool that exits early closes its stdin; its exit status tells the real story.
            let _ = pipe.write_all(data);
        }
        child.wait_with_output().map_err(spawn_err)
    }
}

/// Joins a tool's stderr into one line for an error message.
pub fn one_line(s: &str) -> String {
    s.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" | ")
}
