//! Time to desktop, side by side: the example Desktop through deskvirt (API create → its SPICE
//! port accepts a link with the Secret's password) against the same domain XML through plain
//! libvirt (overlay, define, start → the same link), interleaved so both share the noise.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use deskvirt_crds::constants::FINALIZER_AGENT;
use deskvirt_crds::constants::condition::{DOMAIN_DEFINED, RUNNING};
use deskvirt_tests::host::run;
use deskvirt_tests::spice::{LinkOutcome, link_with_timeout};
use kube::api::PostParams;
use virt::connect::Connect;

use crate::env::{Env, LIBVIRT, POOL_PORTS, example_desktop, raw_prefix};
use crate::stats::Samples;

/// Longest wait for one desktop.
const LIMIT: Duration = Duration::from_secs(180);
/// Pause between link attempts.
const POLL: Duration = Duration::from_millis(20);

/// Both series, and where deskvirt's time went.
#[derive(Debug)]
pub struct TtdResult {
    pub raw: Samples,
    pub deskvirt: Samples,
    /// For each hop of a deskvirt desktop, the time from its POST, one sample per run.
    pub hops: Vec<(Hop, Samples)>,
    /// For each step of an agent pass, the time the agent spent in it and the passes that took
    /// it, per desktop, from the POST until the console answered; the slowest first.
    pub steps: Vec<(String, f64, f64)>,
}

/// A hop on the way from the POST to a console that answers, as the bench sees it by polling the
/// Desktop every 20 ms (so each time is late by up to one poll and a GET).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hop {
    /// `status.node` set: the operator bound it.
    Bound,
    /// The agent's finalizer is on it: the host's agent saw the binding.
    AgentSaw,
    /// `DomainDefined=True`.
    Defined,
    /// `Running=True`.
    Started,
    /// The SPICE port accepts a link with the Secret's password.
    ConsoleAnswers,
}

impl Hop {
    pub const ALL: [Hop; 5] = [
        Hop::Bound,
        Hop::AgentSaw,
        Hop::Defined,
        Hop::Started,
        Hop::ConsoleAnswers,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Hop::Bound => "bound (operator)",
            Hop::AgentSaw => "agent saw it (its finalizer)",
            Hop::Defined => "domain defined",
            Hop::Started => "domain started (Running=True)",
            Hop::ConsoleAnswers => "console answers (SPICE link accepted)",
        }
    }
}

/// When each hop was first seen, from the POST.
#[derive(Clone, Debug, Default)]
struct Seen([Option<Duration>; 5]);

impl Seen {
    fn mark(&mut self, hop: Hop, at: Duration) {
        let slot = &mut self.0[hop as usize];
        if slot.is_none() {
            *slot = Some(at);
        }
    }

    /// Each hop's time; a hop the poll missed takes the next one's.
    fn filled(&self) -> [Duration; 5] {
        let mut out = [Duration::ZERO; 5];
        let mut later = self.0[4].unwrap_or_default();
        for i in (0..5).rev() {
            later = self.0[i].unwrap_or(later).min(later);
            out[i] = later;
        }
        out
    }
}

/// What a raw run reuses from the deskvirt domain it copies.
struct Template {
    xml: String,
    overlay: String,
    backing: String,
    port: u16,
    password: String,
}

/// Runs `n` pairs, alternating which side goes first.
pub async fn run_pairs(env: &Env, n: usize) -> anyhow::Result<TtdResult> {
    virt::error::clear_error_callback();
    let mut raw = Vec::new();
    let mut deskvirt = Vec::new();
    let mut hops: Vec<[Duration; 5]> = Vec::new();
    let mut steps: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    let mut template = None;
    for i in 0..n {
        let raw_first = i % 2 == 1 && template.is_some();
        if raw_first && let Some(t) = &template {
            raw.push(raw_once(env, t, i).await?);
        }
        let name = format!("ttd-{i:02}");
        let before = agent_steps(env).await;
        let (took, addr, seen) = deskvirt_once(env, &name).await?;
        for (step, (secs, passes)) in agent_steps(env).await {
            let (b_secs, b_passes) = before.get(&step).copied().unwrap_or_default();
            let e: &mut (f64, f64) = steps.entry(step).or_default();
            *e = (e.0 + secs - b_secs, e.1 + passes - b_passes);
        }
        deskvirt.push(took);
        hops.push(seen.filled());
        if template.is_none() {
            template = Some(capture(env, &name, addr.port()).await?);
        }
        env.delete_desktops("deskvirt.io/bench=ttd", LIMIT).await?;
        if !raw_first && let Some(t) = &template {
            raw.push(raw_once(env, t, i).await?);
        }
        eprintln!(
            "[bench] pair {i}: deskvirt {:.3} s, raw {:.3} s",
            took.as_secs_f64(),
            raw.last().map(|d| d.as_secs_f64()).unwrap_or(f64::NAN)
        );
    }
    let hops = Hop::ALL
        .iter()
        .map(|h| {
            (
                *h,
                Samples::new(hops.iter().map(|s| s[*h as usize]).collect()),
            )
        })
        .collect();
    let per = n.max(1) as f64;
    Ok(TtdResult {
        raw: Samples::new(raw),
        deskvirt: Samples::new(deskvirt),
        hops,
        steps: {
            let mut steps: Vec<_> = steps
                .into_iter()
                .map(|(name, (secs, passes))| (name, secs / per, passes / per))
                .collect();
            // The slowest first: where the time goes.
            steps.sort_by(|a, b| b.1.total_cmp(&a.1));
            steps
        },
    })
}

/// Seconds spent so far in each step of an agent pass, and how many passes took it, by step,
/// from the agent's `/metrics` (empty when it cannot be read).
async fn agent_steps(env: &Env) -> BTreeMap<String, (f64, f64)> {
    let Some(port) = env.agent_metrics else {
        return BTreeMap::new();
    };
    step_totals(&crate::fleet::scrape(port).await)
}

/// The sum and count of each step of `deskvirt_agent_pass_step_seconds` in a `/metrics` text.
fn step_totals(text: &str) -> BTreeMap<String, (f64, f64)> {
    let mut out = BTreeMap::new();
    const METRIC: &str = "deskvirt_agent_pass_step_seconds";
    for line in text.lines() {
        for (suffix, sum) in [("_sum", true), ("_count", false)] {
            let labelled = line
                .strip_prefix(METRIC)
                .and_then(|l| l.strip_prefix(suffix))
                .and_then(|l| l.strip_prefix("{step=\""));
            let Some((step, value)) = labelled.and_then(|l| l.split_once("\"} ")) else {
                continue;
            };
            let Ok(v) = value.trim().parse::<f64>() else {
                continue;
            };
            let e: &mut (f64, f64) = out.entry(step.to_string()).or_default();
            if sum { e.0 = v } else { e.1 = v }
        }
    }
    out
}

/// Creates the example Desktop and times until its SPICE port accepts the Secret's password.
async fn deskvirt_once(env: &Env, name: &str) -> anyhow::Result<(Duration, SocketAddr, Seen)> {
    let api = env.desktops();
    let desktop = example_desktop(env, name)?;
    let started = Instant::now();
    api.create(&PostParams::default(), &desktop).await?;
    let mut password = None;
    let mut seen = Seen::default();
    // The conditions last read, to say why a desktop never answered (a full host, say).
    let mut why = String::new();
    loop {
        anyhow::ensure!(
            started.elapsed() < LIMIT,
            "{name} not reachable in {LIMIT:?}; its conditions: {why}"
        );
        let d = api.get(name).await?;
        why = d
            .status
            .iter()
            .flat_map(|s| s.conditions.iter())
            .map(|c| format!("{}={} {}: {}", c.type_, c.status, c.reason, c.message))
            .collect::<Vec<_>>()
            .join("; ");
        let at = started.elapsed();
        let st = d.status.clone().unwrap_or_default();
        let is_true = |t| deskvirt_crds::conditions::is_true(&st.conditions, t);
        if st.node.is_some() {
            seen.mark(Hop::Bound, at);
        }
        if d.metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == FINALIZER_AGENT)
        {
            seen.mark(Hop::AgentSaw, at);
        }
        if is_true(DOMAIN_DEFINED) {
            seen.mark(Hop::Defined, at);
        }
        if is_true(RUNNING) {
            seen.mark(Hop::Started, at);
        }
        let spice = st.spice.and_then(|s| Some((s.host?, s.port?)));
        if password.is_none() {
            password = env.password(name).await?;
        }
        if let (Some((host, port)), Some(pw)) = (spice, password.as_deref()) {
            let ip: IpAddr = host.parse().context("status.spice.host")?;
            let addr = SocketAddr::new(ip, port);
            if accepted(addr, pw).await {
                let took = started.elapsed();
                seen.mark(Hop::ConsoleAnswers, took);
                return Ok((took, addr, seen));
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn accepted(addr: SocketAddr, password: &str) -> bool {
    matches!(
        link_with_timeout(addr, password, Duration::from_secs(2)).await,
        Ok(LinkOutcome::Accepted { .. })
    )
}

/// The inactive XML (with the SPICE password) of a running deskvirt desktop.
async fn capture(env: &Env, desktop: &str, port: u16) -> anyhow::Result<Template> {
    let domain = env.domain_of(desktop).await?;
    let xml = run(
        "virsh dumpxml",
        Command::new("virsh").args([
            "-c",
            LIBVIRT,
            "dumpxml",
            "--inactive",
            "--security-info",
            &domain,
        ]),
    )?;
    let overlay = env.disk_dir.join(format!("{domain}.qcow2"));
    let overlay = overlay.display().to_string();
    anyhow::ensure!(
        xml.contains(&overlay),
        "the domain XML does not use {overlay}"
    );
    let password = env
        .password(desktop)
        .await?
        .context("no console password")?;
    Ok(Template {
        xml,
        overlay,
        backing: env
            .image_dir
            .join("demo-desktop.qcow2")
            .display()
            .to_string(),
        port,
        password,
    })
}

/// One raw run: overlay, define, start, then the link; torn down afterwards (untimed).
async fn raw_once(env: &Env, t: &Template, i: usize) -> anyhow::Result<Duration> {
    let name = format!("{}{i:02}", raw_prefix(&env.run));
    let overlay = env.work.join("raw").join(format!("{name}.qcow2"));
    let port = env.first_port + POOL_PORTS + u16::try_from(i % 20).unwrap_or(0);
    let xml = to_raw(
        &t.xml,
        &name,
        &t.overlay,
        &overlay.display().to_string(),
        t.port,
        port,
    )?;
    let backing = t.backing.clone();
    let overlay_path = overlay.clone();
    let started = Instant::now();
    let defined =
        tokio::task::spawn_blocking(move || define_and_start(&xml, &backing, &overlay_path))
            .await?;
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    let result = match defined {
        Ok(()) => loop {
            if accepted(addr, &t.password).await {
                break Ok(started.elapsed());
            }
            if started.elapsed() > LIMIT {
                break Err(anyhow::anyhow!("raw {name} not reachable in {LIMIT:?}"));
            }
            tokio::time::sleep(POLL).await;
        },
        Err(e) => Err(e),
    };
    let cleanup_name = name.clone();
    tokio::task::spawn_blocking(move || teardown(&cleanup_name)).await?;
    let _ = std::fs::remove_file(&overlay);
    result
}

/// `qemu-img create` of the overlay (the agent does it too), then define and start through one
/// libvirt connection, as an agent would hold it.
fn define_and_start(xml: &str, backing: &str, overlay: &Path) -> anyhow::Result<()> {
    run(
        "qemu-img create",
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", backing])
            .arg(overlay),
    )?;
    // virt closes the connection on drop (a failed close panics, caught by spawn_blocking).
    let conn = Connect::open(Some(LIBVIRT))?;
    let dom = conn.define_domain_xml(xml)?;
    dom.create()?;
    Ok(())
}

fn teardown(name: &str) {
    if let Ok(conn) = Connect::open(Some(LIBVIRT))
        && let Ok(dom) = conn.lookup_domain_by_name(name)
    {
        let _ = dom.destroy();
        let _ = dom.undefine();
    }
}

/// The deskvirt domain's XML as a plain libvirt domain: new name, no UUID, no deskvirt
/// metadata (so no agent ever adopts it), libvirt-chosen MACs, its own overlay and SPICE port.
pub fn to_raw(
    xml: &str,
    name: &str,
    overlay_from: &str,
    overlay_to: &str,
    port_from: u16,
    port_to: u16,
) -> anyhow::Result<String> {
    let mut out = replace_element(xml, "name", &format!("<name>{name}</name>"))?;
    out = replace_element(&out, "uuid", "")?;
    if out.contains("<metadata>") {
        out = replace_element(&out, "metadata", "")?;
    }
    out = out
        .lines()
        .filter(|l| !l.trim_start().starts_with("<mac address="))
        .collect::<Vec<_>>()
        .join("\n");
    anyhow::ensure!(
        out.contains(overlay_from),
        "no disk {overlay_from} in the XML"
    );
    out = out.replace(overlay_from, overlay_to);
    let start = out
        .find("<graphics type='spice'")
        .context("no SPICE graphics in the XML")?;
    let end = start + out[start..].find('>').context("unterminated <graphics>")?;
    let tag = out[start..end].replace(&format!("port='{port_from}'"), &format!("port='{port_to}'"));
    anyhow::ensure!(
        tag.contains(&format!("port='{port_to}'")),
        "no SPICE port {port_from} in {tag}"
    );
    out.replace_range(start..end, &tag);
    Ok(out)
}

/// Replaces the first `<tag>…</tag>` with `with`.
fn replace_element(xml: &str, tag: &str, with: &str) -> anyhow::Result<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = xml.find(&open).with_context(|| format!("no <{tag}>"))?;
    let end = start
        + xml[start..]
            .find(&close)
            .with_context(|| format!("no </{tag}>"))?
        + close.len();
    let mut out = xml.to_string();
    out.replace_range(start..end, with);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_an_independent_domain() -> anyhow::Result<()> {
        let xml = "<domain type='qemu'>\n  <name>ns--d</name>\n  <uuid>1234</uuid>\n  <metadata>\n    <x:desktop/>\n  </metadata>\n  <devices>\n    <source file='/d/ns--d.qcow2'/>\n    <mac address='52:54:00:00:00:01'/>\n    <graphics type='spice' port='5901' autoport='no' passwd='pw'>\n  </devices>\n</domain>";
        let out = to_raw(xml, "raw-0", "/d/ns--d.qcow2", "/r/raw-0.qcow2", 5901, 6001)?;
        assert!(out.contains("<name>raw-0</name>"));
        assert!(!out.contains("uuid") && !out.contains("metadata") && !out.contains("mac "));
        assert!(out.contains("/r/raw-0.qcow2") && out.contains("port='6001'"));
        assert!(to_raw(xml, "r", "/nope", "/r", 5901, 6001).is_err());
        Ok(())
    }
}

#[cfg(test)]
mod step_tests {
    use super::*;

    #[test]
    fn step_totals_are_read_from_the_exposition() {
        let text = "# HELP deskvirt_agent_pass_step_seconds Time each step took.\n\
            deskvirt_agent_pass_step_seconds_bucket{step=\"execute\",le=\"0.001\"} 0\n\
            deskvirt_agent_pass_step_seconds_sum{step=\"execute\"} 1.5\n\
            deskvirt_agent_pass_step_seconds_count{step=\"execute\"} 3\n\
            deskvirt_agent_pass_step_seconds_sum{step=\"status\"} 0.25\n\
            deskvirt_agent_pass_step_seconds_count{step=\"status\"} 5\n\
            deskvirt_agent_desktop_reconciles_total 9\n";
        let t = step_totals(text);
        assert_eq!(t.get("execute"), Some(&(1.5, 3.0)));
        assert_eq!(t.get("status"), Some(&(0.25, 5.0)));
        assert_eq!(t.len(), 2);
    }
}
