//! A small deterministic mutational fuzzer that runs on stable Rust inside `cargo test` (issue 14).
//!
//! For one target: every file under `tests/fuzz/<target>/regressions/` and `crashes/` is replayed
//! first (a crash once found stays a test), then every seed under `seeds/`, then
//! `CTGUARD_FUZZ_EXECS` mutated inputs (the target's default budget when unset) drawn from a
//! seeded splitmix64 generator (`CTGUARD_FUZZ_SEED`, decimal or `0x…`; from the clock when
//! unset, and printed). Mutations: bit flips, byte sets, inserts and deletes, range duplication,
//! truncation, splices of two inputs, line swaps, interesting tokens (huge numbers, `-1`, NUL,
//! ESC, non-UTF-8, bidi controls), deep nesting and long strings. An input whose outcome (the
//! class the target reports: ok or an error kind) was not seen before joins the in-memory corpus.
//!
//! A panic, an invariant the target reports broken, or an input taking longer than
//! [`HANG_LIMIT`] writes the input to `tests/fuzz/<target>/crashes/<fnv64 hex>` and fails the
//! test, naming the seed and the file.

use std::cell::RefCell;
use std::collections::HashSet;
use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// An input slower than this is a hang.
pub const HANG_LIMIT: Duration = Duration::from_secs(2);

/// Most inputs kept in the in-memory corpus (seeds included).
const MAX_CORPUS: usize = 512;

/// What a target says about one input: `Ok(class)` (any u64 naming the outcome's kind, used to
/// grow the corpus) or `Err(broken invariant)`.
pub type Verdict = Result<u64, String>;

/// One fuzz target.
pub struct Target {
    /// Directory name under `tests/fuzz/`.
    pub name: &'static str,
    /// Mutated executions when `CTGUARD_FUZZ_EXECS` is unset (the default-suite budget).
    pub default_execs: u64,
    /// Inputs are cut to this many bytes.
    pub max_len: usize,
    /// Target-specific tokens for the "insert token" mutation.
    pub dict: &'static [&'static str],
    /// Runs the code under test on one input.
    pub run: fn(&[u8]) -> Verdict,
    /// Other targets whose `seeds/` this one starts from too.
    pub borrow_seeds: &'static [&'static str],
}

/// What a run did (printed; BENCHMARKS.md quotes these lines).
#[derive(Debug)]
pub struct Report {
    pub target: &'static str,
    pub seed: u64,
    pub replayed: usize,
    pub execs: u64,
    pub secs: f64,
    pub corpus: usize,
    pub classes: usize,
    pub slowest_ms: f64,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fuzz {}: {} execs in {:.1} s ({:.0} exec/s), seed {:#x}, {} files replayed, corpus {}, \
             {} outcome classes, slowest input {:.1} ms, 0 panics, 0 hangs",
            self.target,
            self.execs,
            self.secs,
            self.execs as f64 / self.secs.max(1e-9),
            self.seed,
            self.replayed,
            self.corpus,
            self.classes,
            self.slowest_ms
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Randomness

/// splitmix64: tiny, fast, good enough to drive mutations, and reproducible from one u64.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
    /// Small sizes far more often than large ones: `1..=max`.
    pub fn size(&mut self, max: usize) -> usize {
        let cap = 1usize << self.below(usize::BITS as usize - (max.max(1)).leading_zeros() as usize + 1);
        1 + self.below(cap.min(max).max(1))
    }
}

/// FNV-1a, 64 bits: names crash files and hashes outcome classes.
pub fn fnv64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

// ---------------------------------------------------------------------------------------------
// Mutations

const TOKENS: &[&str] = &[
    "-1",
    "0",
    "-0",
    "1",
    "65535",
    "65536",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "-9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "340282366920938463463374607431768211456",
    "1e309",
    "-1e309",
    "1.5",
    "0x10",
    "NaN",
    "\0",
    "\u{1b}[31m",
    "\u{1b}",
    "\n",
    "\r",
    "\r\n",
    "\t",
    "\u{7f}",
    "\u{85}",
    "\u{202e}",
    "\u{feff}",
    "\u{10ffff}",
    "é",
    "\"",
    "'",
    "\\",
    "\\u0000",
    "\\ud800",
    "\\n",
    "null",
    "true",
    "[]",
    "{}",
    ":",
    "::",
    ",",
    "/",
    "%",
    "=",
    "#",
    " ",
];

/// Byte strings that are not UTF-8 (each alone is invalid).
const NOT_UTF8: &[&[u8]] =
    &[b"\xff", b"\xfe\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80", b"\xe2\x82"];

fn pick_range(rng: &mut Rng, len: usize) -> (usize, usize) {
    let start = rng.below(len + 1);
    let n = rng.size(len - start + 1).min(len - start);
    (start, start + n)
}

/// Line boundaries of `data`: `(start, end_including_newline)`.
fn lines(data: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, &b) in data.iter().enumerate() {
        if b == b'\n' {
            out.push((start, i + 1));
            start = i + 1;
        }
    }
    if start < data.len() {
        out.push((start, data.len()));
    }
    out
}

/// Applies one random mutation to `data` (`others` for splices, `dict` for tokens).
pub fn mutate_once(rng: &mut Rng, data: &mut Vec<u8>, others: &[Vec<u8>], dict: &[&str]) {
    let len = data.len();
    match rng.below(18) {
        0 if len > 0 => {
            let i = rng.below(len);
            data[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            data[i] = rng.next() as u8;
        }
        2 => {
            let i = rng.below(len + 1);
            let n = rng.size(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            data.splice(i..i, bytes);
        }
        3 if len > 0 => {
            let (a, b) = pick_range(rng, len);
            data.drain(a..b);
        }
        4 if len > 0 => {
            // Duplicate a range somewhere (repeat a field, a line, a table…).
            let (a, b) = pick_range(rng, len);
            let chunk = data[a..b].to_vec();
            let at = rng.below(len + 1);
            let times = if rng.chance(8) { rng.size(64) } else { 1 };
            for _ in 0..times {
                data.splice(at..at, chunk.iter().copied());
            }
        }
        5 if len > 0 => data.truncate(rng.below(len)),
        6 if !others.is_empty() => {
            // Splice: a prefix of this input and a suffix of another.
            let o = &others[rng.below(others.len())];
            let cut = rng.below(len + 1);
            let from = rng.below(o.len() + 1);
            data.truncate(cut);
            data.extend_from_slice(&o[from..]);
        }
        7 | 8 => {
            let t = if !dict.is_empty() && rng.chance(2) {
                dict[rng.below(dict.len())]
            } else {
                TOKENS[rng.below(TOKENS.len())]
            };
            let i = rng.below(len + 1);
            if rng.chance(3) && len > 0 {
                // Replace a range with the token.
                let (a, b) = pick_range(rng, len);
                data.splice(a..b, t.bytes());
            } else {
                data.splice(i..i, t.bytes());
            }
        }
        9 => {
            // Replace a run of digits with an interesting number.
            let digits: Vec<usize> =
                (0..len).filter(|&i| data[i].is_ascii_digit() && (i == 0 || !data[i - 1].is_ascii_digit())).collect();
            if let Some(&start) = digits.get(rng.below(digits.len().max(1))) {
                let end = (start..len).find(|&i| !data[i].is_ascii_digit()).unwrap_or(len);
                let nums = [
                    "0",
                    "-1",
                    "65536",
                    "4294967296",
                    "18446744073709551616",
                    "99999999999999999999999",
                    "1e999",
                    "-0",
                    "00053",
                ];
                data.splice(start..end, nums[rng.below(nums.len())].bytes());
            }
        }
        10 => {
            let i = rng.below(len + 1);
            let bytes = NOT_UTF8[rng.below(NOT_UTF8.len())];
            data.splice(i..i, bytes.iter().copied());
        }
        11 => {
            // Deep nesting.
            let i = rng.below(len + 1);
            let depth = if rng.chance(4) { 1000 + rng.below(100_000) } else { rng.size(200) };
            let unit: &[u8] = match rng.below(5) {
                0 => b"[",
                1 => b"{\"a\":",
                2 => b"[[",
                3 => b"{",
                _ => b"a=[",
            };
            let mut ins = Vec::with_capacity(unit.len() * depth);
            for _ in 0..depth {
                ins.extend_from_slice(unit);
            }
            data.splice(i..i, ins);
        }
        12 => {
            // A long string or number.
            let i = rng.below(len + 1);
            let n = if rng.chance(4) { rng.size(200_000) } else { rng.size(300) };
            let c = [b'A', b'9', b' ', b'\\', b'"', b'-', b'0', b'.'][rng.below(8)];
            data.splice(i..i, std::iter::repeat_n(c, n));
        }
        13 | 14 => {
            // Line-level: swap, duplicate or delete a line.
            let ls = lines(data);
            if ls.len() >= 2 {
                let (a0, a1) = ls[rng.below(ls.len())];
                let (b0, b1) = ls[rng.below(ls.len())];
                let la = data[a0..a1].to_vec();
                match rng.below(3) {
                    0 => {
                        data.splice(b0..b0, la);
                    }
                    1 => {
                        data.drain(a0..a1);
                    }
                    _ => {
                        let lb = data[b0..b1].to_vec();
                        if a0 < b0 && a1 <= b0 {
                            data.splice(b0..b1, la);
                            data.splice(a0..a1, lb);
                        } else if b0 < a0 && b1 <= a0 {
                            data.splice(a0..a1, lb);
                            data.splice(b0..b1, la);
                        }
                    }
                }
            } else if len > 0 {
                let i = rng.below(len);
                data.insert(i, b'\n');
            }
        }
        15 if len > 0 => {
            // Swap two bytes (quotes and brackets move).
            let (i, j) = (rng.below(len), rng.below(len));
            data.swap(i, j);
        }
        16 if len > 0 => {
            // Arithmetic on a byte.
            let i = rng.below(len);
            let d = rng.below(35) as u8;
            data[i] = if rng.chance(2) { data[i].wrapping_add(d) } else { data[i].wrapping_sub(d) };
        }
        _ => {
            // Insert a line from another input (or this one).
            let src = if !others.is_empty() && rng.chance(2) { &others[rng.below(others.len())] } else { &*data };
            let ls = lines(src);
            if !ls.is_empty() {
                let (a, b) = ls[rng.below(ls.len())];
                let line = src[a..b].to_vec();
                let at = lines(data).get(rng.below(lines(data).len().max(1))).map_or(0, |l| l.0);
                data.splice(at..at, line);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Panic capture

thread_local! {
    /// While set, panics are recorded here instead of printed.
    static CAPTURE: RefCell<Option<Option<String>>> = const { RefCell::new(None) };
}

fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let captured = CAPTURE.with(|c| {
                let mut c = c.borrow_mut();
                match c.as_mut() {
                    Some(slot) => {
                        let msg = info
                            .payload()
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| info.payload().downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "(non-string payload)".into());
                        let loc = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
                        *slot = Some(format!("{msg}{loc}"));
                        true
                    }
                    None => false,
                }
            });
            if !captured {
                previous(info);
            }
        }));
    });
}

/// Runs the target on one input: `Err(description)` for a panic or a broken invariant.
fn exec(target: &Target, input: &[u8]) -> Result<u64, String> {
    CAPTURE.with(|c| *c.borrow_mut() = Some(None));
    let r = panic::catch_unwind(AssertUnwindSafe(|| (target.run)(input)));
    let msg = CAPTURE.with(|c| c.borrow_mut().take()).flatten();
    match r {
        Ok(Ok(class)) => Ok(class),
        Ok(Err(broken)) => Err(format!("invariant broken: {broken}")),
        Err(_) => Err(format!("panic: {}", msg.unwrap_or_else(|| "(no message)".into()))),
    }
}

// ---------------------------------------------------------------------------------------------
// Files

pub fn target_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz").join(name)
}

fn read_dir_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<(PathBuf, Vec<u8>)> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .filter_map(|p| fs::read(&p).ok().map(|d| (p, d)))
        .collect();
    out.sort();
    out
}

/// Writes a failing input to `crashes/` and returns its path relative to the crate.
fn save_crash(target: &str, input: &[u8]) -> String {
    let dir = target_dir(target).join("crashes");
    let _ = fs::create_dir_all(&dir);
    let path = dir.join(format!("{:016x}", fnv64(input)));
    if let Err(e) = fs::write(&path, input) {
        return format!("(could not write {}: {e})", path.display());
    }
    path.strip_prefix(env!("CARGO_MANIFEST_DIR"))
        .map_or_else(|_| path.display().to_string(), |p| p.display().to_string())
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.replace('_', "").parse(),
    };
    match parsed {
        Ok(n) => Some(n),
        Err(_) => panic!("{name}={v:?} is not a number"),
    }
}

// ---------------------------------------------------------------------------------------------
// The loop

struct Watch {
    /// Nanoseconds since `epoch` when the current input started; 0 when idle.
    started: AtomicU64,
    /// The input being run.
    current: Mutex<Vec<u8>>,
    epoch: Instant,
}

enum Done {
    Ok(Report),
    Failed(String),
}

/// Replays the stored inputs, then fuzzes. Panics (fails the test) on the first problem.
pub fn run(target: &'static Target) {
    install_hook();
    let seed = env_u64("CTGUARD_FUZZ_SEED").unwrap_or_else(|| {
        let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        fnv64(&t.to_le_bytes()) ^ fnv64(target.name.as_bytes())
    });
    let execs = env_u64("CTGUARD_FUZZ_EXECS").unwrap_or(target.default_execs);
    let watch = Arc::new(Watch { started: AtomicU64::new(0), current: Mutex::new(Vec::new()), epoch: Instant::now() });
    let (tx, rx) = mpsc::channel();
    let w = Arc::clone(&watch);
    let repro =
        format!("CTGUARD_FUZZ_SEED={seed:#x} CTGUARD_FUZZ_EXECS={execs} cargo test --test fuzz {}", target.name);
    let worker_repro = repro.clone();
    std::thread::Builder::new()
        .name(format!("fuzz-{}", target.name))
        .stack_size(64 << 20)
        .spawn(move || {
            install_hook();
            let done = fuzz_loop(target, seed, execs, &w, &worker_repro);
            let _ = tx.send(done);
        })
        .expect("spawn the fuzz worker");
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Done::Ok(report)) => {
                println!("{report}");
                return;
            }
            Ok(Done::Failed(msg)) => panic!("{msg}"),
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("fuzz {}: the worker died ({repro})", target.name),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let started = watch.started.load(Ordering::SeqCst);
                if started == 0 {
                    continue;
                }
                let now = watch.epoch.elapsed().as_nanos() as u64;
                if now.saturating_sub(started) > HANG_LIMIT.as_nanos() as u64 {
                    let input = watch.current.lock().map(|g| g.clone()).unwrap_or_default();
                    let file = save_crash(target.name, &input);
                    // The worker is left running; the test binary exits when the tests end.
                    panic!(
                        "fuzz {}: hang: an input ran longer than {:?}; saved as {file} ({} bytes); seed {seed:#x}; \
                         reproduce: {repro}",
                        target.name,
                        HANG_LIMIT,
                        input.len()
                    );
                }
            }
        }
    }
}

fn timed(target: &Target, w: &Watch, input: &[u8]) -> (Result<u64, String>, Duration) {
    if let Ok(mut g) = w.current.lock() {
        g.clear();
        g.extend_from_slice(input);
    }
    let t0 = Instant::now();
    w.started.store((w.epoch.elapsed().as_nanos() as u64).max(1), Ordering::SeqCst);
    let r = exec(target, input);
    w.started.store(0, Ordering::SeqCst);
    (r, t0.elapsed())
}

fn fuzz_loop(target: &Target, seed: u64, execs: u64, w: &Watch, repro: &str) -> Done {
    let dir = target_dir(target.name);
    let fail = |what: String, input: &[u8], file: Option<String>| {
        let file = file.unwrap_or_else(|| save_crash(target.name, input));
        let what = shorten(&what);
        Done::Failed(format!(
            "fuzz {}: {what}; input saved as {file} ({} bytes); seed {seed:#x}; reproduce: {repro}",
            target.name,
            input.len()
        ))
    };
    let mut slowest = Duration::ZERO;
    let mut classes = HashSet::new();
    // 1. Stored crashes and regressions: each must now pass.
    let mut replayed = 0;
    for sub in ["regressions", "crashes"] {
        for (path, data) in read_dir_files(&dir.join(sub)) {
            let rel = path.strip_prefix(env!("CARGO_MANIFEST_DIR")).unwrap_or(&path).display().to_string();
            let (r, t) = timed(target, w, &data);
            if t > HANG_LIMIT {
                return Done::Failed(format!(
                    "fuzz {}: stored input {rel} takes {t:?} (> {HANG_LIMIT:?})",
                    target.name
                ));
            }
            if let Err(e) = r {
                return Done::Failed(format!("fuzz {}: stored input {rel} still fails: {}", target.name, shorten(&e)));
            }
            replayed += 1;
        }
    }
    // 2. Seeds.
    let mut corpus: Vec<Vec<u8>> = Vec::new();
    let mut seed_files = read_dir_files(&dir.join("seeds"));
    for other in target.borrow_seeds {
        seed_files.extend(read_dir_files(&target_dir(other).join("seeds")));
    }
    for (path, mut data) in seed_files {
        data.truncate(target.max_len);
        let (r, t) = timed(target, w, &data);
        slowest = slowest.max(t);
        match r {
            Ok(class) => {
                classes.insert(class);
            }
            Err(e) => return fail(format!("seed {} fails: {e}", path.display()), &data, None),
        }
        if t > HANG_LIMIT {
            return fail(format!("hang: seed {} took {t:?}", path.display()), &data, None);
        }
        corpus.push(data);
        replayed += 1;
    }
    if corpus.is_empty() {
        corpus.push(Vec::new());
    }
    let seeds = corpus.len();
    // 3. Mutations.
    let mut rng = Rng::new(seed);
    let start = Instant::now();
    let mut input = Vec::new();
    for _ in 0..execs {
        let base = rng.below(corpus.len());
        input.clear();
        input.extend_from_slice(&corpus[base]);
        let stack = 1 << rng.below(4);
        for _ in 0..rng.size(stack) {
            mutate_once(&mut rng, &mut input, &corpus, target.dict);
        }
        input.truncate(target.max_len);
        let (r, t) = timed(target, w, &input);
        slowest = slowest.max(t);
        if t > HANG_LIMIT {
            return fail(format!("hang: an input took {t:?} (> {HANG_LIMIT:?})"), &input, None);
        }
        match r {
            Ok(class) => {
                if classes.insert(class) {
                    if corpus.len() < MAX_CORPUS {
                        corpus.push(input.clone());
                    } else {
                        // Keep the seeds; replace a discovered input.
                        let i = seeds + rng.below(MAX_CORPUS - seeds);
                        corpus[i] = input.clone();
                    }
                }
            }
            Err(e) => return fail(e, &input, None),
        }
    }
    Done::Ok(Report {
        target: target.name,
        seed,
        replayed,
        execs,
        secs: start.elapsed().as_secs_f64(),
        corpus: corpus.len(),
        classes: classes.len(),
        slowest_ms: slowest.as_secs_f64() * 1000.0,
    })
}

/// At most 600 characters of a failure description (inputs can be long).
fn shorten(s: &str) -> String {
    if s.chars().count() <= 600 {
        return s.to_string();
    }
    let head: String = s.chars().take(600).collect();
    format!("{head}… ({} bytes)", s.len())
}

// ---------------------------------------------------------------------------------------------
// Helpers for targets

/// Checks an error message: not empty, one line (no `\n`/`\r` of its own), and not absurdly
/// longer than the input it is about.
pub fn check_message(what: &str, msg: &str, input_len: usize) -> Result<(), String> {
    if msg.trim().is_empty() {
        return Err(format!("{what}: empty error message"));
    }
    if msg.contains('\n') || msg.contains('\r') {
        return Err(format!("{what}: error message is not one line: {msg:?}"));
    }
    if msg.len() > 4 * input_len + 4096 {
        return Err(format!("{what}: error message of {} bytes for a {input_len}-byte input", msg.len()));
    }
    Ok(())
}

/// An outcome class from an error message: its letters only (numbers, quoted input and
/// positions vary), first 48 of them.
pub fn class_of_message(tag: &str, msg: &str) -> u64 {
    let mut s = String::from(tag);
    let mut in_quote = false;
    for c in msg.chars() {
        if c == '"' || c == '`' {
            in_quote = !in_quote;
            continue;
        }
        if !in_quote && (c.is_ascii_alphabetic() || c == ' ') {
            s.push(c);
        }
        if s.len() >= 48 + tag.len() {
            break;
        }
    }
    fnv64(s.as_bytes())
}
