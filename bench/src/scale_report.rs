//! Markdown for the test-driver sections: the scale steps, how memory grows between them
//! (slopes per host and per desktop), and the 200-desktop footprint on one host.

use std::fmt::Write;

use crate::footprint::{ProcMem, mib};
use crate::scale::{Snapshot, Step};
use crate::stats::{ratio, secs};

fn mib_f(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn kib_signed(delta_bytes: f64) -> String {
    format!("{:+.1} KiB", delta_bytes / 1024.0)
}

/// `12.3 → 45.6 MiB`.
fn arrow(a: u64, b: u64) -> String {
    format!("{:.1} → {:.1} MiB", mib_f(a), mib_f(b))
}

fn mem_row(s: &mut String, what: &str, m: &ProcMem) {
    let _ = writeln!(
        s,
        "| {what} | {} | {} | {} | {} | {} | {} |",
        mib(m.rss),
        mib(m.anon),
        mib(m.file),
        mib(m.pss),
        mib(m.uss),
        m.threads
    );
}

const MEM_HEADER: &str =
    "| | RSS | anon | file | PSS | USS | threads |\n|---|---|---|---|---|---|---|";

/// The scale section: one row per step, the growth between steps, composition and calls.
pub fn scale(s: &mut String, steps: &[Step]) {
    if steps.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\n## Scale (simulated hosts: real agents on libvirt's `test:///default`)\n\n\
         | step | hosts Ready | all bound | all Running | creation→bound p50 | creation→Running p50 / p95 | mutating calls / desktop | reconciles / desktop: operator (Desktop + DomainNode + ResourcePool) / agents | operator RSS idle → loaded | agent RSS mean idle → loaded (max) | CPU busy: operator / agents | deletion | load before → after |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for st in steps {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} / {} | {:.1} | {:.1} ({:.1} + {:.1} + {:.1}) / {:.1} | {} | {} ({:.1}) | {} / {} | {} | {} → {} |",
            st.spec.label,
            secs(st.hosts_ready),
            secs(st.all_bound),
            secs(st.all_running),
            secs(st.bound.p50()),
            secs(st.running.p50()),
            secs(st.running.p95()),
            st.calls_per_desktop(),
            st.operator_reconciles / st.spec.desktops.max(1) as f64,
            st.desktop_reconciles / st.spec.desktops.max(1) as f64,
            st.domainnode_reconciles / st.spec.desktops.max(1) as f64,
            st.resourcepool_reconciles / st.spec.desktops.max(1) as f64,
            st.agent_reconciles / st.spec.desktops.max(1) as f64,
            arrow(st.idle_before.operator.rss, st.loaded.operator.rss),
            arrow(st.idle_before.agent_mean().rss, st.loaded.agent_mean().rss),
            mib_f(st.loaded.agent_max_rss()),
            secs(st.operator_cpu_busy),
            secs(st.agents_cpu_busy),
            st.deleted.map(secs).unwrap_or_else(|| "incomplete".into()),
            st.load_before,
            st.load_after,
        );
    }
    let _ = writeln!(
        s,
        "\n\"idle\" is after every host is Ready and before any desktop; \"loaded\" is {} s after the last Running. \
         Calls leave out Leases (heartbeats) and subtract the other background measured over 10 s before the step. \
         CPU busy is user+system from the first POST to the last Running (agents summed).\n",
        10
    );
    growth(s, steps);
    if let Some(last) = steps.last() {
        let _ = writeln!(
            s,
            "\nMemory composition at {} (anon: heap and stacks; file: mapped binary and libraries; \
             PSS divides shared pages among the processes mapping them, here {} agents share one binary; \
             USS: pages only this process maps):\n\n{MEM_HEADER}",
            last.spec.label, last.spec.hosts
        );
        mem_row(s, "operator", &last.loaded.operator);
        mem_row(s, "agent (mean)", &last.loaded.agent_mean());
        calls(s, last);
    }
}

/// The breakdown of a step's mutating calls.
fn calls(s: &mut String, st: &Step) {
    let _ = writeln!(
        s,
        "\nMutating calls during {} ({:.0} background subtracted in the per-desktop figure; \
         Leases are the hosts' heartbeats):\n\n| verb | resource | calls | per desktop |\n|---|---|---|---|",
        st.spec.label, st.background
    );
    let per = |n: f64| n / st.spec.desktops.max(1) as f64;
    for ((verb, resource), n) in &st.calls {
        let _ = writeln!(s, "| {verb} | {resource} | {n:.0} | {:.2} |", per(*n));
    }
    let _ = writeln!(
        s,
        "\nOf the `desktops/status` writes, the agents' own: {:.0} ({:.2} per desktop; the rest are \
         the operator's). Events about the desktops once all were Running:\n\n\
         | component | reason | events | per desktop |\n|---|---|---|---|",
        st.agent_status_writes,
        per(st.agent_status_writes)
    );
    for ((who, reason), n) in &st.events {
        let _ = writeln!(s, "| {who} | {reason} | {n:.0} | {:.2} |", per(*n));
    }
}

/// One growth row: `(what, between, slope text)`.
pub fn slopes(steps: &[Step]) -> Vec<(String, String, String)> {
    let mut rows = Vec::new();
    for w in steps.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        let between = format!("{} → {}", a.spec.label, b.spec.label);
        if a.spec.hosts != b.spec.hosts {
            let dh = b.spec.hosts as f64 - a.spec.hosts as f64;
            let per = |x: &Snapshot, y: &Snapshot, f: fn(&Snapshot) -> u64| {
                kib_signed((f(y) as f64 - f(x) as f64) / dh)
            };
            rows.push((
                "operator RSS per host, no desktops".into(),
                between.clone(),
                per(&a.idle_before, &b.idle_before, |s| s.operator.rss),
            ));
            if a.spec.desktops == b.spec.desktops {
                rows.push((
                    format!("operator RSS per host, {} desktops", a.spec.desktops),
                    between.clone(),
                    per(&a.loaded, &b.loaded, |s| s.operator.rss),
                ));
            }
            rows.push((
                "agent RSS (mean) per host in the fleet, no desktops".into(),
                between.clone(),
                per(&a.idle_before, &b.idle_before, |s| s.agent_mean().rss),
            ));
        }
        if a.spec.hosts == b.spec.hosts && a.spec.desktops != b.spec.desktops {
            let dd = b.spec.desktops as f64 - a.spec.desktops as f64;
            rows.push((
                "operator RSS per desktop".into(),
                between.clone(),
                kib_signed((b.loaded.operator.rss as f64 - a.loaded.operator.rss as f64) / dd),
            ));
            let per_host = |st: &Step| st.spec.desktops as f64 / st.spec.hosts.max(1) as f64;
            let dph = per_host(b) - per_host(a);
            if dph.abs() > f64::EPSILON {
                rows.push((
                    "agent RSS (mean) per desktop on its host".into(),
                    between.clone(),
                    kib_signed(
                        (b.loaded.agent_mean().rss as f64 - a.loaded.agent_mean().rss as f64) / dph,
                    ),
                ));
            }
        }
    }
    for st in steps {
        let d = st.spec.desktops.max(1) as f64;
        let per_host = d / st.spec.hosts.max(1) as f64;
        rows.push((
            "operator RSS per desktop, within the step".into(),
            st.spec.label.clone(),
            kib_signed((st.loaded.operator.rss as f64 - st.idle_before.operator.rss as f64) / d),
        ));
        rows.push((
            "agent RSS (mean) per desktop on its host, within the step".into(),
            st.spec.label.clone(),
            kib_signed(
                (st.loaded.agent_mean().rss as f64 - st.idle_before.agent_mean().rss as f64)
                    / per_host,
            ),
        ));
    }
    rows
}

fn growth(s: &mut String, steps: &[Step]) {
    let rows = slopes(steps);
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "Growth:\n\n| slope | between | per unit |\n|---|---|---|"
    );
    for (what, between, v) in rows {
        let _ = writeln!(s, "| {what} | {between} | {v} |");
    }
}

/// The one-host footprint section; pushes its goal rows into `goals`.
pub fn footprint(s: &mut String, f: &Step, goals: &mut Vec<String>) {
    let window = f.spec.idle;
    let _ = writeln!(
        s,
        "\n## Footprint: {} desktops on one simulated host (libvirt test driver, URI in the notes; {} each)\n\n\
         | | RSS before desktops | RSS with {} Running | anon | file | PSS | USS | threads | CPU over {} s idle |\n|---|---|---|---|---|---|---|---|---|",
        f.spec.desktops,
        f.spec.memory,
        f.spec.desktops,
        window.as_secs()
    );
    for (what, idle, m, cpu) in [
        (
            "operator",
            &f.idle_before.operator,
            &f.loaded.operator,
            f.operator_cpu_idle,
        ),
        (
            "node-agent",
            &f.idle_before.agent_mean(),
            &f.loaded.agent_mean(),
            f.agents_cpu_idle,
        ),
    ] {
        let _ = writeln!(
            s,
            "| {what} | {} | {} | {} | {} | {} | {} | {} | {} ({:.2} %) |",
            mib(idle.rss),
            mib(m.rss),
            mib(m.anon),
            mib(m.file),
            mib(m.pss),
            mib(m.uss),
            m.threads,
            secs(cpu),
            100.0 * ratio(cpu, window)
        );
    }
    let d = f.spec.desktops.max(1) as f64;
    let _ = writeln!(
        s,
        "\nPer desktop: operator {} RSS ({} anon), agent {} RSS ({} anon). All {} bound {} and Running {} after the first POST \
         (p50 from its own POST: bound {}, Running {}); {:.1} mutating calls and {:.1} operator ({:.1} Desktop, {:.1} DomainNode, {:.1} ResourcePool) / {:.1} agent reconciles per desktop; deletion {}. Load {} → {}.",
        kib_signed((f.loaded.operator.rss as f64 - f.idle_before.operator.rss as f64) / d),
        kib_signed((f.loaded.operator.anon as f64 - f.idle_before.operator.anon as f64) / d),
        kib_signed((f.loaded.agent_mean().rss as f64 - f.idle_before.agent_mean().rss as f64) / d),
        kib_signed(
            (f.loaded.agent_mean().anon as f64 - f.idle_before.agent_mean().anon as f64) / d
        ),
        f.spec.desktops,
        secs(f.all_bound),
        secs(f.all_running),
        secs(f.bound.p50()),
        secs(f.running.p50()),
        f.calls_per_desktop(),
        f.operator_reconciles / d,
        f.desktop_reconciles / d,
        f.domainnode_reconciles / d,
        f.resourcepool_reconciles / d,
        f.agent_reconciles / d,
        f.deleted.map(secs).unwrap_or_else(|| "incomplete".into()),
        f.load_before,
        f.load_after,
    );
    if let Some(c) = &f.caches {
        let _ = writeln!(
            s,
            "\nWhat the agent's watches hold (JSON as the API sends it): {} Desktops, {:.1} KiB \
             ({:.1} KiB of it `managedFields`, {:.0} %); {} console mirror Secrets, {:.1} KiB \
             ({:.1} KiB `managedFields`).",
            c.desktops,
            c.desktop_bytes as f64 / 1024.0,
            c.managed_fields_bytes as f64 / 1024.0,
            100.0 * c.managed_fields_bytes as f64 / c.desktop_bytes.max(1) as f64,
            c.mirrors,
            c.mirror_bytes as f64 / 1024.0,
            c.mirror_managed_fields_bytes as f64 / 1024.0,
        );
    }
    calls(s, f);
    goals.push(format!(
        "| operator ≤ 25 MiB RSS ({} desktops, test driver) | {} | {} |",
        f.spec.desktops,
        mib(f.loaded.operator.rss),
        if mib_f(f.loaded.operator.rss) <= 25.0 {
            "met"
        } else {
            "missed"
        }
    ));
    goals.push(format!(
        "| agent ≤ 15 MiB RSS ({} desktops on one host, test driver) | {} | {} |",
        f.spec.desktops,
        mib(f.loaded.agent_mean().rss),
        if mib_f(f.loaded.agent_mean().rss) <= 15.0 {
            "met"
        } else {
            "missed"
        }
    ));
    goals.push(format!(
        "| agent ≤ 15 MiB USS, issue 14 ({} desktops on one host; libvirtd's own pages not counted) | {} | {} |",
        f.spec.desktops,
        mib(f.loaded.agent_mean().uss),
        if mib_f(f.loaded.agent_mean().uss) <= 15.0 {
            "met"
        } else {
            "missed"
        }
    ));
}
