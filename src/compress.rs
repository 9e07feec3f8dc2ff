//! Compression and content addresses of the journal's snapshots (DESIGN §2 "Journal"): zstd at
//! level [`LEVEL`], SHA-256 in lower-case hex. Pure: bytes in, bytes out.

use sha2::{Digest, Sha256};

/// zstd level of every snapshot file (3: zstd's default; ~10× on rulesets at hundreds of MB/s).
pub const LEVEL: i32 = 3;

/// Largest text [`decompress`] produces: a snapshot file claiming more is refused rather than
/// allowed to exhaust memory (a 100k-rule ruleset's listing is ~20 MB).
pub const MAX_DECOMPRESSED: usize = 1 << 30;

/// Errors of compression.
#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    /// zstd refused to compress.
    #[error("cannot compress: {0}")]
    Compress(#[source] std::io::Error),
    /// The bytes are not one whole zstd frame, or decode to more than [`MAX_DECOMPRESSED`].
    #[error("not a valid zstd snapshot: {0}")]
    Decompress(#[source] std::io::Error),
}

/// `bytes` as one zstd frame at [`LEVEL`] (the content size is recorded in the frame header).
pub fn compress(bytes: &[u8]) -> Result<Vec<u8>, CompressError> {
    zstd::bulk::compress(bytes, LEVEL).map_err(CompressError::Compress)
}

/// The bytes [`compress`] was given. Refuses anything else that does not decode (truncated,
/// garbage, trailing bytes) and output beyond [`MAX_DECOMPRESSED`]; allocates the frame's
/// declared size once when the header states it.
pub fn decompress(frame: &[u8]) -> Result<Vec<u8>, CompressError> {
    use std::io::Read;
    let declared = zstd::zstd_safe::get_frame_content_size(frame).ok().flatten();
    let mut out = Vec::with_capacity(declared.map_or(0, |n| usize::try_from(n).unwrap_or(0).min(MAX_DECOMPRESSED)));
    let mut dec = zstd::stream::read::Decoder::with_buffer(frame).map_err(CompressError::Decompress)?.single_frame();
    let limit = u64::try_from(MAX_DECOMPRESSED).unwrap_or(u64::MAX) + 1;
    (&mut dec).take(limit).read_to_end(&mut out).map_err(CompressError::Decompress)?;
    if out.len() > MAX_DECOMPRESSED {
        return Err(CompressError::Decompress(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("it decodes to more than {MAX_DECOMPRESSED} bytes"),
        )));
    }
    let rest = dec.finish();
    if !rest.is_empty() {
        return Err(CompressError::Decompress(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} bytes after the frame", rest.len()),
        )));
    }
    Ok(out)
}

/// SHA-256 of `bytes`, 64 lower-case hex digits: a snapshot's name and its integrity check.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut s = String::with_capacity(64);
    for b in digest {
        s.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        s.push(char::from(b"0123456789abcdef"[usize::from(b & 0xf)]));
    }
    s
}

/// True for 64 lower-case hex digits (what [`sha256_hex`] returns): safe as a file name.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_ratio() {
        let text: String =
            (0..20_000).map(|i| format!("-A INPUT -s 10.{}.{}.0/24 -j DROP\n", i / 256, i % 256)).collect();
        let z = compress(text.as_bytes()).expect("compress");
        assert!(z.len() * 5 < text.len(), "{} -> {}", text.len(), z.len());
        assert_eq!(decompress(&z).expect("decompress"), text.as_bytes());
        assert_eq!(decompress(&compress(b"").expect("empty")).expect("empty"), b"");
    }

    #[test]
    fn damaged_frames_are_refused() {
        let z = compress(b"table inet t { chain c { accept; } }\n".repeat(100).as_slice()).expect("compress");
        assert!(decompress(&z[..z.len() / 2]).is_err(), "truncated");
        assert!(decompress(b"not zstd at all").is_err(), "garbage");
        let mut trailing = z.clone();
        trailing.extend_from_slice(b"junk");
        assert!(decompress(&trailing).is_err(), "trailing bytes");
        let mut two = z.clone();
        two.extend_from_slice(&z);
        assert!(decompress(&two).is_err(), "a second frame");
    }

    #[test]
    fn sha256_known_answers() {
        assert_eq!(sha256_hex(b""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert!(is_sha256_hex(&sha256_hex(b"x")));
        assert!(!is_sha256_hex("../etc/passwd"));
        assert!(!is_sha256_hex(&sha256_hex(b"x").to_uppercase()));
    }
}
