//! A line diff in linear space: Myers' O((N+M)·D) algorithm with the linear-space
//! "middle snake" refinement (Myers 1986, §4b), on lines interned to integers, after trimming
//! the common head and tail. Memory is O(N+M) whatever the inputs (the former LCS table was
//! O(N·M): 790 MB for a 10k-rule listing); time is O((N+M)·D), D the number of changed lines.
//!
//! The output is a minimal edit script: `  ` kept, `- ` removed, `+ ` added lines, in order;
//! within a run of changes the added lines come before the removed ones (as the former
//! LCS-based diff printed them).

use std::collections::HashMap;

/// A minimal line diff of `old` → `new`: `  ` kept, `- ` removed, `+ ` added.
pub fn diff_lines(old: &[String], new: &[String]) -> Vec<String> {
    // Lines interned to integers (borrowed from the inputs): comparisons are cheap.
    let mut ids: HashMap<&str, u32> = HashMap::new();
    let mut a: Vec<u32> = Vec::with_capacity(old.len());
    let mut b: Vec<u32> = Vec::with_capacity(new.len());
    for (lines, out) in [(old, &mut a), (new, &mut b)] {
        for l in lines {
            let next = ids.len() as u32;
            out.push(*ids.entry(l.as_str()).or_insert(next));
        }
    }
    let mut ops = Vec::with_capacity(a.len().max(b.len()));
    diff_rec(&a, &b, 0, 0, &mut ops);

    let mut out = Vec::with_capacity(ops.len());
    let mut adds: Vec<usize> = Vec::new();
    let mut dels: Vec<usize> = Vec::new();
    let flush = |out: &mut Vec<String>, adds: &mut Vec<usize>, dels: &mut Vec<usize>| {
        out.extend(adds.drain(..).map(|j| format!("+ {}", new[j])));
        out.extend(dels.drain(..).map(|i| format!("- {}", old[i])));
    };
    for op in ops {
        match op {
            Op::Keep(i) => {
                flush(&mut out, &mut adds, &mut dels);
                out.push(format!("  {}", old[i]));
            }
            Op::Del(i) => dels.push(i),
            Op::Add(j) => adds.push(j),
        }
    }
    flush(&mut out, &mut adds, &mut dels);
    out
}

/// One step of the edit script, by index into the whole inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Keep(usize),
    Del(usize),
    Add(usize),
}

/// Appends the edit script of `a` → `b` (which start at `a0`/`b0` in the whole inputs).
fn diff_rec(a: &[u32], b: &[u32], a0: usize, b0: usize, ops: &mut Vec<Op>) {
    let head = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    ops.extend((0..head).map(|k| Op::Keep(a0 + k)));
    let (a, b) = (&a[head..], &b[head..]);
    let (a0, b0) = (a0 + head, b0 + head);
    let tail = a.iter().rev().zip(b.iter().rev()).take_while(|(x, y)| x == y).count();
    let (ma, mb) = (&a[..a.len() - tail], &b[..b.len() - tail]);
    if ma.is_empty() {
        ops.extend((0..mb.len()).map(|k| Op::Add(b0 + k)));
    } else if mb.is_empty() {
        ops.extend((0..ma.len()).map(|k| Op::Del(a0 + k)));
    } else {
        let (x0, y0, x1, y1) = middle_snake(ma, mb);
        if (x0, y0) == (0, 0) && (x1, y1) == (0, 0) || (x0, y0) == (ma.len(), mb.len()) {
            // Cannot happen for trimmed, different inputs (the snake splits the path into two
            // shorter ones); a correct if not minimal script rather than endless recursion.
            ops.extend((0..ma.len()).map(|k| Op::Del(a0 + k)));
            ops.extend((0..mb.len()).map(|k| Op::Add(b0 + k)));
        } else {
            diff_rec(&ma[..x0], &mb[..y0], a0, b0, ops);
            ops.extend((x0..x1).map(|k| Op::Keep(a0 + k)));
            diff_rec(&ma[x1..], &mb[y1..], a0 + x1, b0 + y1, ops);
        }
    }
    ops.extend((0..tail).map(|k| Op::Keep(a0 + ma.len() + k)));
}

/// The middle snake of a shortest edit path from `a` to `b` (both non-empty): `(x0, y0, x1,
/// y1)`, the diagonal run from `(x0, y0)` to `(x1, y1)` the forward and backward searches meet
/// on. Linear space: two vectors of furthest-reaching x per diagonal.
fn middle_snake(a: &[u32], b: &[u32]) -> (usize, usize, usize, usize) {
    let (n, m) = (a.len() as isize, b.len() as isize);
    let delta = n - m;
    let odd = delta & 1 != 0;
    let max = (n + m + 1) / 2 + 1;
    let off = max + 1;
    let size = (2 * off + 1) as usize;
    // Furthest x on diagonal k (forward: x − y = k; backward, on the reversed inputs).
    let mut vf = vec![0isize; size];
    let mut vb = vec![0isize; size];
    let at = |k: isize| (k + off) as usize;
    for d in 0..=max {
        let mut k = -d;
        while k <= d {
            let mut x =
                if k == -d || (k != d && vf[at(k - 1)] < vf[at(k + 1)]) { vf[at(k + 1)] } else { vf[at(k - 1)] + 1 };
            let mut y = x - k;
            let (sx, sy) = (x, y);
            while x < n && y < m && a[x as usize] == b[y as usize] {
                x += 1;
                y += 1;
            }
            vf[at(k)] = x;
            let kr = delta - k;
            if odd && kr > -d && kr < d && x + vb[at(kr)] >= n {
                return (sx as usize, sy as usize, x as usize, y as usize);
            }
            k += 2;
        }
        let mut kr = -d;
        while kr <= d {
            let mut xr = if kr == -d || (kr != d && vb[at(kr - 1)] < vb[at(kr + 1)]) {
                vb[at(kr + 1)]
            } else {
                vb[at(kr - 1)] + 1
            };
            let mut yr = xr - kr;
            let (sxr, syr) = (xr, yr);
            while xr < n && yr < m && a[(n - 1 - xr) as usize] == b[(m - 1 - yr) as usize] {
                xr += 1;
                yr += 1;
            }
            vb[at(kr)] = xr;
            let k = delta - kr;
            if !odd && k >= -d && k <= d && vf[at(k)] + xr >= n {
                return ((n - xr) as usize, (m - yr) as usize, (n - sxr) as usize, (m - syr) as usize);
            }
            kr += 2;
        }
    }
    // Unreachable: the searches meet by d = ⌈(n+m)/2⌉.
    (0, 0, 0, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    /// The former quadratic LCS diff, kept as the reference.
    fn lcs_reference(old: &[String], new: &[String]) -> Vec<String> {
        let (n, m) = (old.len(), new.len());
        let mut lcs = vec![vec![0usize; m + 1]; n + 1];
        for i in (0..n).rev() {
            for j in (0..m).rev() {
                lcs[i][j] = if old[i] == new[j] { lcs[i + 1][j + 1] + 1 } else { lcs[i + 1][j].max(lcs[i][j + 1]) };
            }
        }
        let (mut i, mut j) = (0, 0);
        let mut out = Vec::new();
        while i < n || j < m {
            if i < n && j < m && old[i] == new[j] {
                out.push(format!("  {}", old[i]));
                i += 1;
                j += 1;
            } else if j < m && (i == n || lcs[i][j + 1] >= lcs[i + 1][j]) {
                out.push(format!("+ {}", new[j]));
                j += 1;
            } else {
                out.push(format!("- {}", old[i]));
                i += 1;
            }
        }
        out
    }

    /// Checks that `script` turns `old` into `new` and returns how many lines it keeps.
    fn check_script(old: &[String], new: &[String], script: &[String]) -> usize {
        let from: Vec<&str> = script.iter().filter(|l| !l.starts_with("+ ")).map(|l| &l[2..]).collect();
        let to: Vec<&str> = script.iter().filter(|l| !l.starts_with("- ")).map(|l| &l[2..]).collect();
        assert_eq!(from, old.iter().map(String::as_str).collect::<Vec<_>>(), "script: {script:?}");
        assert_eq!(to, new.iter().map(String::as_str).collect::<Vec<_>>(), "script: {script:?}");
        assert!(script.iter().all(|l| l.starts_with("  ") || l.starts_with("- ") || l.starts_with("+ ")));
        script.iter().filter(|l| l.starts_with("  ")).count()
    }

    #[test]
    fn small_cases_match_the_former_output() {
        for (a, b) in [
            ("", ""),
            ("a", ""),
            ("", "a"),
            ("a b c", "a b c"),
            ("a b c", "a x c"),
            ("a b c d", "a c d e"),
            ("x a b", "a b y"),
            ("a b c", "c b a"),
        ] {
            let (a, b) = (lines(a), lines(b));
            let got = diff_lines(&a, &b);
            let want = lcs_reference(&a, &b);
            assert_eq!(check_script(&a, &b, &got), check_script(&a, &b, &want), "{a:?} -> {b:?}: {got:?}");
        }
        assert_eq!(diff_lines(&lines("a b c"), &lines("a x c")), ["  a", "+ x", "- b", "  c"]);
        assert_eq!(diff_lines(&lines("a b"), &lines("a b")), ["  a", "  b"]);
    }

    /// A small deterministic generator (xorshift), so failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> usize {
            (self.next() % n) as usize
        }
    }

    #[test]
    fn random_small_inputs_are_as_minimal_as_the_lcs_reference() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for case in 0..4000 {
            let alphabet = 1 + rng.below(5) as u64;
            let make = |rng: &mut Rng| -> Vec<String> {
                let len = rng.below(14);
                (0..len).map(|_| format!("l{}", rng.below(alphabet))).collect()
            };
            let a = make(&mut rng);
            let b = if rng.below(3) == 0 {
                make(&mut rng)
            } else {
                // b as an edit of a.
                let mut b = a.clone();
                for _ in 0..rng.below(4) {
                    match rng.below(3) {
                        0 if !b.is_empty() => {
                            let i = rng.below(b.len() as u64);
                            b.remove(i);
                        }
                        1 => {
                            let i = rng.below(b.len() as u64 + 1);
                            b.insert(i, format!("l{}", rng.below(alphabet + 1)));
                        }
                        _ if !b.is_empty() => {
                            let i = rng.below(b.len() as u64);
                            b[i] = format!("l{}", rng.below(alphabet + 1));
                        }
                        _ => {}
                    }
                }
                b
            };
            let got = diff_lines(&a, &b);
            let want = lcs_reference(&a, &b);
            let (kg, kw) = (check_script(&a, &b, &got), check_script(&a, &b, &want));
            assert_eq!(kg, kw, "case {case}: {a:?} -> {b:?}\n got {got:?}\nwant {want:?}");
        }
    }

    #[test]
    fn twenty_thousand_lines_with_a_few_changes_give_the_minimal_script() {
        let old: Vec<String> =
            (0..20_000).map(|i| format!("\t\tip saddr 10.{}.{}.0/24 drop", i / 256, i % 256)).collect();
        let mut new = old.clone();
        new[3] = "changed 3".into(); // replaced: 1 removed, 1 added
        new.remove(5000); // removed
        new.insert(12_000, "inserted".into()); // added
        new.insert(12_001, "inserted too".into()); // added
        new[19_000] = "changed 19000".into(); // replaced
        new.push("appended".into()); // added
        let t = std::time::Instant::now();
        let d = diff_lines(&old, &new);
        let took = t.elapsed();
        let kept = check_script(&old, &new, &d);
        let removed = d.iter().filter(|l| l.starts_with("- ")).count();
        let added = d.iter().filter(|l| l.starts_with("+ ")).count();
        assert_eq!((removed, added), (3, 5), "{:?}", d.iter().filter(|l| !l.starts_with("  ")).collect::<Vec<_>>());
        assert_eq!(kept, 20_000 - 3);
        assert!(d.contains(&"- \t\tip saddr 10.19.136.0/24 drop".to_string()), "line 5000 removed");
        // Linear: milliseconds even unoptimised (the LCS table took seconds and 3.2 GB here).
        assert!(took < std::time::Duration::from_secs(5), "took {took:?}");
    }

    #[test]
    fn completely_different_inputs_stay_bounded() {
        let old: Vec<String> = (0..3000).map(|i| format!("a{i}")).collect();
        let new: Vec<String> = (0..3000).map(|i| format!("b{i}")).collect();
        let d = diff_lines(&old, &new);
        assert_eq!(check_script(&old, &new, &d), 0);
        assert_eq!(d.len(), 6000);
        // Interleaved common lines: every other line kept.
        let new: Vec<String> = (0..3000).map(|i| if i % 2 == 0 { format!("a{i}") } else { format!("b{i}") }).collect();
        let d = diff_lines(&old, &new);
        assert_eq!(check_script(&old, &new, &d), 1500);
    }
}
