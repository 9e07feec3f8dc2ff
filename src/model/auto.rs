//! The `"auto"` formulas for the host-wide conntrack sizes. Pure functions of the machine's RAM
//! and the live values, so they are unit-tested without a kernel.
//!
//! Kernel rules followed (net/netfilter/nf_conntrack_core.c, 5.15 and later):
//! - since 5.15 the kernel's own default is `nf_conntrack_max == nf_conntrack_buckets` (one
//!   entry per bucket on average), so ctguard derives buckets = max;
//! - a write to `nf_conntrack_buckets` is rounded **up** by `nf_ct_alloc_hashtable` to a
//!   multiple of `PAGE_SIZE / sizeof(struct hlist_nulls_head)` (4096 / 8 = 512 on x86_64), so
//!   300001 reads back as 300032; values are compared after that rounding.

/// The RAM-based maximum: `RAM bytes / 16384 / (pointer bits / 32)`, rounded down to a power of
/// two (the operators' rule of thumb). Never below 1.
pub fn conntrack_max_for_ram(ram_bytes: u64, pointer_bits: u32) -> u64 {
    let divisor = (pointer_bits / 32).max(1) as u64;
    let raw = (ram_bytes / 16384 / divisor).max(1);
    1u64 << (63 - raw.leading_zeros())
}

/// How the kernel stores a bucket count written to `nf_conntrack_buckets`: rounded up to a
/// multiple of `page_size / 8`.
pub fn kernel_rounded_buckets(requested: u64, page_size: u64) -> u64 {
    let per_page = (page_size / 8).max(1);
    requested.div_ceil(per_page) * per_page
}

/// Facts about the machine the formulas need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineFacts {
    /// `MemTotal` from `/proc/meminfo`, in bytes.
    pub ram_bytes: u64,
    /// Width of a pointer (64 on x86_64).
    pub pointer_bits: u32,
    /// `sysconf(_SC_PAGESIZE)`.
    pub page_size: u64,
}

impl MachineFacts {
    /// This build's pointer width and a 4 KiB page; `ram_bytes` from the caller.
    pub fn with_ram(ram_bytes: u64) -> Self {
        MachineFacts { ram_bytes, pointer_bits: usize::BITS, page_size: 4096 }
    }
}

/// The value ctguard writes for `nf_conntrack_max = "auto"`: the RAM formula, but never lower
/// than `live` (a busy host may have been raised by hand already).
pub fn auto_conntrack_max(facts: MachineFacts, live: Option<u64>) -> u64 {
    conntrack_max_for_ram(facts.ram_bytes, facts.pointer_bits).max(live.unwrap_or(0))
}

/// The value ctguard writes for `nf_conntrack_buckets = "auto"`: equal to the max it targets
/// (kernel ≥ 5.15 default ratio), rounded as the kernel rounds it, never lower than `live`.
pub fn auto_conntrack_buckets(facts: MachineFacts, target_max: u64, live: Option<u64>) -> u64 {
    kernel_rounded_buckets(target_max, facts.page_size).max(live.unwrap_or(0))
}

/// True when writing `wanted` would leave the kernel at `live` (buckets round up on write).
pub fn buckets_equal(wanted: u64, live: u64, page_size: u64) -> bool {
    kernel_rounded_buckets(wanted, page_size) == live
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_formula() {
        // 24 GiB on 64-bit: 25769803776 / 16384 / 2 = 786432 -> 524288.
        assert_eq!(conntrack_max_for_ram(24 << 30, 64), 524_288);
        // 1 GiB on 32-bit: 65536 exactly.
        assert_eq!(conntrack_max_for_ram(1 << 30, 32), 65_536);
        assert_eq!(conntrack_max_for_ram(0, 64), 1);
    }

    #[test]
    fn never_lowers() {
        let f = MachineFacts::with_ram(1 << 30);
        assert_eq!(auto_conntrack_max(f, Some(2_000_000)), 2_000_000);
        assert_eq!(auto_conntrack_max(f, Some(10)), 32_768);
        assert_eq!(auto_conntrack_buckets(f, 32_768, Some(262_144)), 262_144);
    }

    #[test]
    fn kernel_rounding_matches_measurement() {
        // DESIGN §10: 300001 reads back as 300032.
        assert_eq!(kernel_rounded_buckets(300_001, 4096), 300_032);
        assert_eq!(kernel_rounded_buckets(262_144, 4096), 262_144);
        assert!(buckets_equal(300_001, 300_032, 4096));
    }
}
