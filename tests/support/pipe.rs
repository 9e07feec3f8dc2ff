//! Running a command with a pipe on a fixed descriptor, as bash's `<(…)` gives one
//! (`/dev/fd/63`): shared by the CLI tests and the kernel tests (`#[path]`-included).

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Output};

/// The fd number the child sees its pipe on (`/dev/fd/9`).
pub const PIPE_FD: i32 = 9;

/// Runs `cmd` with a pipe holding `input` on [`PIPE_FD`] (no shell). The write end is closed
/// before the child runs, so the child reads `input` and then end of file.
pub fn run_with_pipe(mut cmd: Command, input: &[u8]) -> Output {
    use std::io::Write;
    assert!(input.len() < 60_000, "the pipe is filled before the child starts");
    let (r, w): (OwnedFd, OwnedFd) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe2");
    let mut wf = std::fs::File::from(w);
    wf.write_all(input).expect("fill pipe");
    drop(wf);
    let raw = r.as_raw_fd();
    // SAFETY: dup2 and fcntl are async-signal-safe; only the child's descriptors change.
    unsafe {
        cmd.pre_exec(move || {
            // The pipe may already be fd 9: dup2 onto itself keeps close-on-exec, so clear it
            // (found as a one-in-many flake: "cannot read /dev/fd/9: No such file").
            if raw == PIPE_FD {
                if libc::fcntl(raw, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(raw, PIPE_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("run");
    drop(r);
    out
}
