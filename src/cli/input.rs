//! Reading a file argument (`POLICY`, `--ruleset FILE`, `restore --policy-file`) exactly once.
//!
//! `-` is stdin. Anything else is opened non-blocking (a FIFO opens at once) and `fstat`-checked:
//! a regular file or a pipe/FIFO (what `<(…)` and `/dev/fd/N` name) is read, up to a size
//! limit; a directory, a device or a socket is refused (exit 2) without reading. The caller
//! gets the bytes it validated, and sends those same bytes (never a second read of the path,
//! which for a pipe would be empty).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::exit::Failure;
use crate::model::Format;
use crate::netns::describe_file_type;

/// Reads `arg` (`-` = stdin) once, at most `limit` bytes. `what` names the argument in
/// errors (`"policy"`, `"--ruleset"`). Every failure is exit 2, one line naming the path.
pub(crate) fn read_once(what: &str, arg: &str, limit: usize) -> Result<Vec<u8>, Failure> {
    let bad = |m: String| Failure::bad_input(format!("{what} {arg}: {m}"));
    if arg == "-" {
        return read_limited(std::io::stdin().lock(), limit).map_err(|e| bad(e.message(limit)));
    }
    let path = Path::new(arg);
    // Refuse what is not a file or a pipe before opening: opening a device can have effects.
    match std::fs::metadata(path) {
        Ok(md) if !readable_kind(md.file_type()) => {
            return Err(bad(format!("{}, not a regular file or a pipe", describe_file_type(md.file_type()))))
        }
        Ok(_) => {}
        Err(e) => return Err(bad(format!("cannot read: {e}"))),
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            // Opening a socket path gives ENXIO.
            Some(libc::ENXIO) => bad("a socket, not a regular file or a pipe".to_string()),
            _ => bad(format!("cannot read: {e}")),
        })?;
    // The file that was opened is what counts (the path may have been replaced meanwhile).
    let md = file.metadata().map_err(|e| bad(format!("cannot stat: {e}")))?;
    let ft = md.file_type();
    if !readable_kind(ft) {
        return Err(bad(format!("{}, not a regular file or a pipe", describe_file_type(ft))));
    }
    if ft.is_file() && md.len() > limit as u64 {
        return Err(bad(format!("{} bytes, larger than the {limit} byte limit", md.len())));
    }
    if ft.is_fifo() {
        return read_fifo(&file, limit).map_err(|e| bad(e.message(limit)));
    }
    read_limited(file, limit).map_err(|e| bad(e.message(limit)))
}

/// Reads a pipe or FIFO opened non-blocking, to its end. A named FIFO waits for its writer as
/// `cat` would: a read end with no writer yet reads as end of file, so nothing is read before
/// `poll` reports data or a writer that came and went. A blocking re-open would not do: a
/// writer that opened, wrote and closed in between would leave it waiting forever.
fn read_fifo(file: &File, limit: usize) -> Result<Vec<u8>, ReadError> {
    use std::os::fd::AsRawFd;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut reader = file;
    loop {
        let mut pfd = libc::pollfd { fd: file.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, borrowed for the call.
        let n = unsafe { libc::poll(&mut pfd, 1, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(ReadError::Io(e));
        }
        loop {
            match reader.read(&mut chunk) {
                Ok(0) => return Ok(buf),
                Ok(k) => {
                    buf.extend_from_slice(&chunk[..k]);
                    if buf.len() > limit {
                        return Err(ReadError::TooLarge);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }
}

fn readable_kind(ft: std::fs::FileType) -> bool {
    ft.is_file() || ft.is_fifo()
}

enum ReadError {
    Io(std::io::Error),
    TooLarge,
}

impl ReadError {
    fn message(&self, limit: usize) -> String {
        match self {
            ReadError::Io(e) => format!("cannot read: {e}"),
            ReadError::TooLarge => format!("larger than the {limit} byte limit"),
        }
    }
}

fn read_limited(r: impl Read, limit: usize) -> Result<Vec<u8>, ReadError> {
    let mut buf = Vec::new();
    r.take(limit as u64 + 1).read_to_end(&mut buf).map_err(ReadError::Io)?;
    if buf.len() > limit {
        return Err(ReadError::TooLarge);
    }
    Ok(buf)
}

/// A policy document as read from the command line: its text (read once) and format.
#[derive(Debug, Clone)]
pub(crate) struct PolicySource {
    /// The document, exactly as validated.
    pub text: String,
    /// TOML or JSON (`.json` or a leading `{`).
    pub format: Format,
}

impl PolicySource {
    /// The format as the agent protocol spells it.
    pub fn format_name(&self) -> &'static str {
        match self.format {
            Format::Json => "json",
            Format::Toml => "toml",
        }
    }
}

/// Reads a policy argument once (see [`read_once`]) and detects its format.
pub(crate) fn read_policy(arg: &str) -> Result<PolicySource, Failure> {
    let bytes = read_once("policy", arg, crate::model::MAX_POLICY_BYTES)?;
    let text = String::from_utf8(bytes).map_err(|e| {
        Failure::bad_input(format!(
            "policy {arg}: not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })?;
    let format = Format::detect(Some(arg), &text);
    Ok(PolicySource { text, format })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(label: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("ctguard-input-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch dir");
        d
    }

    #[test]
    fn regular_file_is_read_and_size_limited() {
        let d = scratch("reg");
        let p = d.join("p.toml");
        std::fs::write(&p, b"0123456789").expect("write");
        let s = p.to_str().expect("utf8");
        assert_eq!(read_once("policy", s, 10).expect("read"), b"0123456789");
        let e = read_once("policy", s, 9).expect_err("too large");
        assert!(e.message.contains("larger than the 9 byte limit"), "{}", e.message);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn directory_device_missing_and_fifo() {
        let d = scratch("kinds");
        let e = read_once("policy", d.to_str().expect("utf8"), 100).expect_err("dir");
        assert!(e.message.contains("a directory"), "{}", e.message);
        assert_eq!(e.exit, crate::exit::Exit::BadInput);
        let e = read_once("--ruleset", "/dev/null", 100).expect_err("chardev");
        assert_eq!(e.message, "--ruleset /dev/null: a character device, not a regular file or a pipe");
        let e = read_once("policy", "/nonexistent/x", 100).expect_err("missing");
        assert!(e.message.starts_with("policy /nonexistent/x: cannot read"), "{}", e.message);
        // A FIFO with a writer: read to the writer's end.
        let fifo = d.join("f");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
        let f2 = fifo.clone();
        let writer = std::thread::spawn(move || std::fs::write(f2, b"abc"));
        assert_eq!(read_once("policy", fifo.to_str().expect("utf8"), 100).expect("fifo"), b"abc");
        writer.join().expect("join").expect("write fifo");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn fifo_whose_writer_came_and_went_before_the_read_is_read_whole() {
        let d = scratch("fifo-race");
        let fifo = d.join("f");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
        let reader =
            std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&fifo).expect("open read end");
        // The writer opens (a reader exists), writes and closes before anything is read.
        std::fs::write(&fifo, b"written before").expect("write");
        let got = read_fifo(&reader, 100).map_err(|e| e.message(100)).expect("read");
        assert_eq!(got, b"written before");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn fifo_without_a_writer_yet_waits_for_it() {
        let d = scratch("fifo-wait");
        let fifo = d.join("f");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
        let (tx, rx) = std::sync::mpsc::channel();
        let f2 = fifo.clone();
        let reading = std::thread::spawn(move || {
            let r = read_once("policy", f2.to_str().expect("utf8"), 100).map_err(|e| e.message);
            let _ = tx.send(());
            r
        });
        // No writer: an empty document must not come back (it would be applied as such).
        assert!(rx.recv_timeout(std::time::Duration::from_millis(300)).is_err(), "read ended without a writer");
        std::fs::write(&fifo, b"late writer").expect("write");
        assert_eq!(reading.join().expect("join").expect("read"), b"late writer");
        let _ = std::fs::remove_dir_all(&d);
    }
}
