//! The markdown report: one table per section and a comparison with the issues' goals.

use std::fmt::Write;
use std::time::Duration;

use crate::burst::{BurstResult, Footprint};
use crate::footprint::mib;
use crate::scale::Step;
use crate::sched::SchedResult;
use crate::stats::{micros, ratio, secs};
use crate::ttd::TtdResult;
use deskvirt_tests::apimetrics;

/// Everything one run measured (each part optional: sections can be skipped).
#[derive(Debug, Default)]
pub struct Report {
    pub machine: String,
    pub command: String,
    pub ttd: Option<TtdResult>,
    pub background_per_s: Option<f64>,
    pub bursts: Vec<BurstResult>,
    pub footprint: Option<Footprint>,
    pub sched: Option<SchedResult>,
    /// Scale steps on simulated hosts (test driver).
    pub scale: Vec<Step>,
    /// Many desktops on one simulated host.
    pub fleet_footprint: Option<Step>,
    pub notes: Vec<String>,
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "missed" }
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# deskvirt benchmark\n\n{}\n\n`{}`\n",
            self.machine, self.command
        );
        let mut goals: Vec<String> = Vec::new();
        if let Some(t) = &self.ttd {
            let _ = writeln!(
                s,
                "## Time to desktop (N={} each, interleaved)\n",
                t.raw.len()
            );
            let _ = writeln!(s, "| | p50 | p95 | max |\n|---|---|---|---|");
            for (name, x) in [("raw libvirt", &t.raw), ("deskvirt", &t.deskvirt)] {
                let _ = writeln!(
                    s,
                    "| {name} | {} | {} | {} |",
                    secs(x.p50()),
                    secs(x.p95()),
                    secs(x.max())
                );
            }
            let (r50, r95) = (
                ratio(t.deskvirt.p50(), t.raw.p50()),
                ratio(t.deskvirt.p95(), t.raw.p95()),
            );
            let _ = writeln!(s, "| deskvirt / raw | {r50:.2}× | {r95:.2}× | |\n");
            if !t.hops.is_empty() {
                let _ = writeln!(
                    s,
                    "Where deskvirt's time goes (from the POST; polled every 20 ms):\n\n| hop | p50 | p50 step | max |\n|---|---|---|---|"
                );
                let mut before = Duration::ZERO;
                for (hop, x) in &t.hops {
                    let _ = writeln!(
                        s,
                        "| {} | {} | +{} | {} |",
                        hop.label(),
                        secs(x.p50()),
                        secs(x.p50().saturating_sub(before)),
                        secs(x.max())
                    );
                    before = x.p50();
                }
                let _ = writeln!(
                    s,
                    "| raw libvirt, whole job | {} | | |\n",
                    secs(t.raw.p50())
                );
            }
            if t.steps.iter().any(|(_, _, passes)| *passes > 0.0) {
                let _ = writeln!(
                    s,
                    "Inside the agent (`deskvirt_agent_pass_step_seconds`), per desktop from the POST until its console answered, means over the runs:\n\n| step | time | passes that took it |\n|---|---|---|"
                );
                for (step, secs_per, passes) in &t.steps {
                    let _ = writeln!(
                        s,
                        "| {step} | {} | {passes:.1} |",
                        secs(Duration::from_secs_f64(secs_per.max(0.0)))
                    );
                }
                let _ = writeln!(s);
            }
            goals.push(format!(
                "| time to desktop ≤ 1.3× raw | p50 {r50:.2}×, p95 {r95:.2}× | {} |",
                verdict(r50 <= 1.3)
            ));
        }
        if !self.bursts.is_empty() {
            let _ = writeln!(s, "## Bursts (1 vCPU, 128 MiB, direct kernel boot)\n");
            let _ = writeln!(
                s,
                "| burst | creation→Ready p50 | p95 | all Ready | mutating calls / desktop |\n|---|---|---|---|---|"
            );
            for b in &self.bursts {
                let per = b.calls_total / b.count.max(1) as f64;
                let _ = writeln!(
                    s,
                    "| {} ({} desktops) | {} | {} | {} | {per:.1} |",
                    b.label,
                    b.count,
                    secs(b.ready.p50()),
                    secs(b.ready.p95()),
                    secs(b.all_ready)
                );
            }
            if let Some(bg) = self.background_per_s {
                let _ = writeln!(
                    s,
                    "\nBackground on the shared apiserver before the bursts: {bg:.2} mutating calls/s \
                     (other clients, plus this run's idle heartbeats), subtracted from the totals.\n"
                );
            }
            for b in &self.bursts {
                let _ = writeln!(
                    s,
                    "\nCalls during burst {} ({:.0} raw, {:.0} background):\n\n| verb | resource | calls | per desktop |\n|---|---|---|---|",
                    b.label,
                    apimetrics::total(&b.calls),
                    b.background
                );
                for ((verb, resource), n) in &b.calls {
                    let _ = writeln!(
                        s,
                        "| {verb} | {resource} | {n:.0} | {:.2} |",
                        n / b.count.max(1) as f64
                    );
                }
            }
            let best_p50 = self
                .bursts
                .iter()
                .map(|b| b.ready.p50())
                .min()
                .unwrap_or_default();
            goals.push(format!(
                "| creation→Ready p50 ≤ 1.5 s | best burst p50 {} | {} |",
                secs(best_p50),
                verdict(best_p50 <= Duration::from_millis(1500))
            ));
            let worst = self
                .bursts
                .iter()
                .map(|b| b.calls_total / b.count.max(1) as f64)
                .fold(0.0_f64, f64::max);
            goals.push(format!(
                "| ≤ 4 mutating API calls / desktop | up to {worst:.1} | {} |",
                verdict(worst <= 4.0)
            ));
        }
        if let Some(f) = &self.footprint {
            let _ = writeln!(
                s,
                "\n## Footprint ({} desktops Running)\n\n| | RSS | CPU over {} s idle |\n|---|---|---|\n| operator | {} | {} ({:.2} %) |\n| node-agent | {} | {} ({:.2} %) |\n",
                f.desktops,
                f.window.as_secs(),
                mib(f.operator_rss),
                secs(f.operator_cpu),
                100.0 * ratio(f.operator_cpu, f.window),
                mib(f.agent_rss),
                secs(f.agent_cpu),
                100.0 * ratio(f.agent_cpu, f.window),
            );
            let mib_of = |b: u64| b as f64 / (1024.0 * 1024.0);
            goals.push(format!(
                "| operator ≤ 25 MiB RSS ({} desktops) | {} | {} |",
                f.desktops,
                mib(f.operator_rss),
                verdict(mib_of(f.operator_rss) <= 25.0)
            ));
            goals.push(format!(
                "| agent ≤ 15 MiB RSS ({} desktops) | {} | {} |",
                f.desktops,
                mib(f.agent_rss),
                verdict(mib_of(f.agent_rss) <= 15.0)
            ));
        }
        crate::scale_report::scale(&mut s, &self.scale);
        if let Some(f) = &self.fleet_footprint {
            crate::scale_report::footprint(&mut s, f, &mut goals);
        }
        if let Some(r) = &self.sched {
            let _ = writeln!(
                s,
                "\n## Placement ({} hosts, {} bound desktops)\n\n| path | p50 | p99 | samples |\n|---|---|---|---|\n| bind path: charges counted one desktop at a time, `world::host_views_counted` + `schedule` | {} | {} | {} |\n| every desktop counted again, `world::host_views` + `schedule` | {} | {} | {} |\n| `place_in_pool` alone | {} | {} | {} |\n",
                r.hosts,
                r.desktops,
                micros(r.bind_path.p50()),
                micros(r.bind_path.p99()),
                r.bind_path.len(),
                micros(r.full_count.p50()),
                micros(r.full_count.p99()),
                r.full_count.len(),
                micros(r.place_only.p50()),
                micros(r.place_only.p99()),
                r.place_only.len(),
            );
            goals.push(format!(
                "| placement ≤ 1 ms p99 at {} hosts | bind path {}, place only {} | {} |",
                r.hosts,
                micros(r.bind_path.p99()),
                micros(r.place_only.p99()),
                verdict(r.bind_path.p99() <= Duration::from_millis(1))
            ));
            goals.push(format!(
                "| bind path ≤ 50 µs p99 at {} hosts / {} desktops | {} ({} counting every desktop) | {} |",
                r.hosts,
                r.desktops,
                micros(r.bind_path.p99()),
                micros(r.full_count.p99()),
                verdict(r.bind_path.p99() <= Duration::from_micros(50))
            ));
        }
        if !goals.is_empty() {
            let _ = writeln!(
                s,
                "\n## Against the issues' goals\n\n| goal | measured | |\n|---|---|---|"
            );
            for g in goals {
                let _ = writeln!(s, "{g}");
            }
        }
        if !self.notes.is_empty() {
            let _ = writeln!(s, "\n## Notes\n");
            for n in &self.notes {
                let _ = writeln!(s, "- {n}");
            }
        }
        s
    }
}
