//! Decides the host's memory facts that libvirt does not report: swap, the hugepage pool and
//! what kernel samepage merging (KSM) saves, from `/proc/meminfo` and `/sys/kernel/mm/ksm`.
//! Parsing is pure; [`read`] does the file reads.

use deskvirt_crds::domain_node::{Hugepages, KsmStats};
use deskvirt_crds::quantity::format_bytes;

/// Page size KSM counts in (x86-64).
const PAGE_BYTES: u64 = 4096;

/// Memory facts of the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostMemory {
    /// Swap as a quantity.
    pub swap: Option<String>,
    /// The default-size hugepage pool, when the kernel has one configured.
    pub hugepages: Option<Hugepages>,
    /// KSM state and savings, when the kernel has KSM.
    pub ksm: Option<KsmStats>,
}

/// A `/proc/meminfo` value in bytes (`kB` values scaled, counts as they are).
fn meminfo_value(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.split(':').next() == Some(key))?;
    let mut fields = line.split(':').nth(1)?.split_whitespace();
    let value: u64 = fields.next()?.parse().ok()?;
    Some(match fields.next() {
        Some("kB") => value.saturating_mul(1024),
        _ => value,
    })
}

/// Swap and hugepages from the text of `/proc/meminfo`.
pub fn parse_meminfo(text: &str) -> (Option<String>, Option<Hugepages>) {
    let swap = meminfo_value(text, "SwapTotal").map(format_bytes);
    let hugepages = match (
        meminfo_value(text, "HugePages_Total"),
        meminfo_value(text, "HugePages_Free"),
        meminfo_value(text, "Hugepagesize"),
    ) {
        (Some(total), Some(free), Some(size)) if total > 0 => Some(Hugepages {
            size: format_bytes(size),
            total,
            free,
        }),
        _ => None,
    };
    (swap, hugepages)
}

/// KSM from the contents of `run` and `pages_sharing` (`None` when either is missing).
pub fn parse_ksm(run: Option<&str>, pages_sharing: Option<&str>) -> Option<KsmStats> {
    let run: u8 = run?.trim().parse().ok()?;
    let sharing: u64 = pages_sharing?.trim().parse().ok()?;
    Some(KsmStats {
        enabled: run == 1,
        saved: format_bytes(sharing.saturating_mul(PAGE_BYTES)),
    })
}

/// Reads the facts from this host.
pub fn read() -> HostMemory {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let (swap, hugepages) = parse_meminfo(&meminfo);
    let ksm_file = |f: &str| std::fs::read_to_string(format!("/sys/kernel/mm/ksm/{f}")).ok();
    HostMemory {
        swap,
        hugepages,
        ksm: parse_ksm(
            ksm_file("run").as_deref(),
            ksm_file("pages_sharing").as_deref(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:       24576000 kB\nSwapTotal:       2097152 kB\n\
HugePages_Total:     512\nHugePages_Free:      100\nHugepagesize:       2048 kB\n";

    #[test]
    fn swap_and_hugepages() {
        let (swap, huge) = parse_meminfo(MEMINFO);
        assert_eq!(swap.as_deref(), Some("2Gi"));
        assert_eq!(
            huge,
            Some(Hugepages {
                size: "2Mi".into(),
                total: 512,
                free: 100
            })
        );
    }

    #[test]
    fn no_hugepage_pool_is_none() {
        let (_, huge) = parse_meminfo(
            "SwapTotal: 0 kB\nHugePages_Total: 0\nHugePages_Free: 0\nHugepagesize: 2048 kB\n",
        );
        assert_eq!(huge, None);
    }

    #[test]
    fn ksm_savings() {
        let ksm = parse_ksm(Some("1\n"), Some("256\n"));
        assert_eq!(
            ksm,
            Some(KsmStats {
                enabled: true,
                saved: "1Mi".into()
            })
        );
        assert_eq!(parse_ksm(None, Some("1")), None);
    }
}
