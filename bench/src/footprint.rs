//! A process's footprint from /proc: resident memory (`VmRSS`) and CPU time (utime + stime).

use std::time::Duration;

/// Resident set size in bytes, from `/proc/<pid>/status`.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for pid {pid}"))?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("malformed VmRSS line {line:?}"))?
        .parse()?;
    Ok(kib * 1024)
}

/// CPU time (user + system) consumed so far, from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces: fields start after the last ')'.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow::anyhow!("malformed /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3 of stat(5), so utime (14) and stime (15) are at 11 and 12.
    let tick = |i: usize| -> anyhow::Result<u64> {
        Ok(fields
            .get(i)
            .ok_or_else(|| anyhow::anyhow!("short /proc/{pid}/stat"))?
            .parse()?)
    };
    let ticks = tick(11)? + tick(12)?;
    // USER_HZ is 100 on every Linux this runs on.
    Ok(Duration::from_millis(ticks * 10))
}

/// A process's memory from `/proc/<pid>/status`: resident total, its anonymous (heap, stacks)
/// and file-backed (the mapped binary and libraries) parts, and the thread count; from
/// `/proc/<pid>/smaps_rollup`, PSS (shared pages divided among their users) and USS (pages
/// only this process maps: what stopping it frees).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcMem {
    pub rss: u64,
    pub anon: u64,
    pub file: u64,
    pub threads: u64,
    pub pss: u64,
    pub uss: u64,
}

impl ProcMem {
    pub fn read(pid: u32) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let mut m = Self::parse(&text);
        // smaps_rollup may be unreadable (older kernels, hardening): PSS and USS stay zero.
        if let Ok(rollup) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
            let kib = |key: &str| kib_field(&rollup, key) * 1024;
            m.pss = kib("Pss:");
            m.uss = kib("Private_Clean:") + kib("Private_Dirty:");
        }
        Ok(m)
    }

    /// Parses the text of `/proc/<pid>/status` (missing fields are zero).
    pub fn parse(text: &str) -> Self {
        let field = |key: &str| kib_field(text, key);
        Self {
            rss: field("VmRSS:") * 1024,
            anon: field("RssAnon:") * 1024,
            file: field("RssFile:") * 1024,
            threads: field("Threads:"),
            pss: 0,
            uss: 0,
        }
    }

    /// The field-wise mean (zero for none).
    pub fn mean(all: &[ProcMem]) -> ProcMem {
        let n = all.len().max(1) as u64;
        let sum = |f: fn(&ProcMem) -> u64| all.iter().map(f).sum::<u64>() / n;
        ProcMem {
            rss: sum(|p| p.rss),
            anon: sum(|p| p.anon),
            file: sum(|p| p.file),
            threads: sum(|p| p.threads),
            pss: sum(|p| p.pss),
            uss: sum(|p| p.uss),
        }
    }
}

/// The first number after `key` at the start of a line (zero when absent).
fn kib_field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// MiB with one decimal.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_itself() -> anyhow::Result<()> {
        let me = std::process::id();
        assert!(rss_bytes(me)? > 0);
        cpu_time(me)?;
        let m = ProcMem::read(me)?;
        assert!(m.rss > 0 && m.threads > 0);
        Ok(())
    }

    #[test]
    fn parses_status() {
        let m = ProcMem::parse(
            "VmRSS:\t  3000 kB\nRssAnon:\t  1000 kB\nRssFile:\t  2000 kB\nThreads:\t4\n",
        );
        assert_eq!(
            (m.rss, m.anon, m.file, m.threads),
            (3000 * 1024, 1024 * 1000, 2000 * 1024, 4)
        );
        let avg = ProcMem::mean(&[m, ProcMem::default()]);
        assert_eq!(avg.threads, 2);
        assert_eq!(ProcMem::mean(&[]), ProcMem::default());
    }
}
