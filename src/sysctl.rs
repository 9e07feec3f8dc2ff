//! Reading and writing sysctls through `/proc/sys` directly (DESIGN §10: `sysctl -w` exits 0
//! on a failed write). `/proc/sys/net` shows the network namespace of the calling thread, so
//! call these inside `crate::netns::Target::run`.

use std::path::{Path, PathBuf};

use crate::model::names::SysctlKey;

/// Root of the sysctl tree.
pub const PROC_SYS: &str = "/proc/sys";

/// Errors reading or writing a sysctl.
#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    /// The file could not be read.
    #[error("cannot read {key}: {source}")]
    Read {
        /// Key.
        key: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The value is not an integer.
    #[error("{key} holds {value:?}, not an integer")]
    NotInteger {
        /// Key.
        key: String,
        /// What it held.
        value: String,
    },
    /// The write failed.
    #[error("cannot write {key} = {value}: {source}")]
    Write {
        /// Key.
        key: String,
        /// Value.
        value: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The file behind `key`.
pub fn path_of(key: &SysctlKey) -> PathBuf {
    Path::new(PROC_SYS).join(key.proc_path())
}

/// Reads an integer sysctl; `Ok(None)` when the key does not exist here (module not loaded,
/// or a key the namespace does not have).
pub fn read(key: &SysctlKey) -> Result<Option<u64>, SysctlError> {
    let text = match std::fs::read_to_string(path_of(key)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(SysctlError::Read { key: key.to_string(), source }),
    };
    let t = text.trim();
    t.parse::<u64>().map(Some).map_err(|_| SysctlError::NotInteger { key: key.to_string(), value: t.to_string() })
}

/// True when the current thread may write `key` (in a non-initial namespace the host-wide
/// conntrack sizes are mode 0444, which binds root too).
pub fn writable(key: &SysctlKey) -> bool {
    nix::unistd::access(&path_of(key), nix::unistd::AccessFlags::W_OK).is_ok()
}

/// Writes `value` to `key` and reads it back. Not atomic across keys: the transaction layer
/// undoes earlier writes when a later one fails.
pub fn write(key: &SysctlKey, value: u64) -> Result<(), SysctlError> {
    std::fs::write(path_of(key), format!("{value}\n")).map_err(|source| SysctlError::Write {
        key: key.to_string(),
        value,
        source,
    })
}

/// `MemTotal` from `/proc/meminfo`, in bytes.
pub fn mem_total_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_total(&text)
}

/// Parses the `MemTotal:  N kB` line.
pub fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn meminfo() {
        assert_eq!(super::parse_mem_total("MemTotal:       24567892 kB\nMemFree: 1 kB\n"), Some(24567892 * 1024));
        assert_eq!(super::parse_mem_total("nothing"), None);
    }
}
