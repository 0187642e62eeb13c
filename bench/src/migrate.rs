//! Live migration, side by side: a running desktop moved by a `DesktopMigration` (API create →
//! `Succeeded`, the Desktop bound to the target) against `virsh migrate` of a plain domain made
//! from the same definition (the same flags deskvirt's agent passes: live, peer to peer,
//! persistent on the target, undefined on the source), between the same two libvirt hosts
//! (this machine's qemu:///system and a second libvirtd, `scripts/second-host.sh`), interleaved
//! so both share the noise. No SPICE client is connected on either side (a client that does not
//! do SPICE's seamless migration makes QEMU wait spice-server's 10 s timeout).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use deskvirt_crds::DesktopMigration;
use deskvirt_crds::desktop::Phase;
use deskvirt_tests::cluster::unique_suffix;
use deskvirt_tests::host::{eventually, run};
use deskvirt_tests::second_host::SecondHost;
use deskvirt_tests::world::{
    RUN_LABEL, World, create_pool, domain_of, guest_desktop, guest_uptimes, patch_pool, setup,
    virsh_system, wait_ready_hosts,
};
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::json;
use tokio::sync::oneshot;

use crate::migrate_hops::{Hop, Steps};
use crate::stats::{Samples, secs};

/// Both series, and the hosts' own figures of deskvirt's moves.
pub struct MigrateResult {
    pub deskvirt: Samples,
    pub virsh: Samples,
    /// libvirt's job time and downtime of each deskvirt move, in ms.
    pub job_ms: Vec<(u64, u64)>,
    /// The same of each `virsh migrate` (libvirt's completed job on host B).
    pub plain_job_ms: Vec<(u64, u64)>,
    /// When each step of each deskvirt move was seen, from its POST.
    pub hops: Vec<Steps>,
}

/// Runs `n` interleaved rounds.
pub async fn run_bench(n: usize) -> anyhow::Result<MigrateResult> {
    let host_b = SecondHost::start(&format!("dvb{}", unique_suffix()))?;
    let mut w = setup(&format!("migb-{}", unique_suffix())).await?;
    create_pool(&w).await?;
    patch_pool(&w, json!({ "storage": { "shared": true } })).await?;
    w.agent = Some(w.spawn_agent(&w.node, &[])?);
    w.start_operator()?;
    w.add_migration_target(&host_b)?;
    wait_ready_hosts(&w, 2).await?;
    let migrations: Api<DesktopMigration> = Api::namespaced(w.client.clone(), &w.user_ns.name);
    let (mut ours, mut plain, mut job_ms, mut hops) = (vec![], vec![], vec![], vec![]);
    let mut plain_job_ms = vec![];
    for i in 0..n {
        // A desktop running on host A, booted (its guest prints its uptime).
        let name = format!("bench-{i}");
        let extra = json!({ "disk": { "image": "base.qcow2", "persistent": true } });
        let domain = running_guest(&w, &name, extra).await?;
        booted(&format!("/var/log/libvirt/qemu/{domain}-serial.log")).await?;
        let xml = virsh_system(&["dumpxml", "--migratable", &domain])?;

        // deskvirt: API create → Succeeded.
        let m: DesktopMigration = serde_json::from_value(json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "DesktopMigration",
            "metadata": { "name": name, "labels": { RUN_LABEL: w.run } },
            "spec": { "desktop": name },
        }))?;
        // The watches list before the POST, so every step is seen as it happens.
        let (listed_tx, listed_rx) = oneshot::channel();
        let (posted_tx, posted_rx) = oneshot::channel();
        let watching = tokio::spawn(crate::migrate_hops::watch(
            migrations.clone(),
            w.desktops(),
            name.clone(),
            listed_tx,
            posted_rx,
            Duration::from_secs(120),
        ));
        if listed_rx.await.is_err() {
            // The task ended before both watches listed: its own error says why.
            watching.await??;
            anyhow::bail!("the migration's watches ended before listing");
        }
        let t0 = Instant::now();
        let created = match migrations.create(&PostParams::default(), &m).await {
            Ok(c) => c,
            Err(e) => {
                watching.abort();
                return Err(e.into());
            }
        };
        let _ = posted_tx.send((t0, created.metadata.uid.unwrap_or_default()));
        let (seen, done) = watching.await??;
        let took = seen[Hop::ALL.len() - 1].unwrap_or_else(|| t0.elapsed());
        let st = done.status.clone().unwrap_or_default();
        hops.push(seen);
        ours.push(took);
        job_ms.push((
            st.total_millis.unwrap_or(0),
            st.downtime_millis.unwrap_or(0),
        ));

        // virsh: the same definition as a plain domain on host A, booted, then moved.
        let plain_name = format!("plain-{}-{i}", w.run);
        let (disk, file) = start_plain(&w, &xml, &domain, &plain_name)?;
        booted(&format!("/var/log/libvirt/qemu/{plain_name}-serial.log")).await?;
        let t0 = Instant::now();
        virsh_migrate(&host_b, &plain_name, &["--auto-converge"])?;
        plain.push(t0.elapsed());
        plain_job_ms.extend(completed_job(&host_b, &plain_name));
        eprintln!(
            "[bench] migration {i}: deskvirt {}, virsh {}",
            secs(took),
            secs(t0.elapsed())
        );
        end_round(&w, &host_b, &plain_name, &[&disk, &file], &name).await?;
    }
    Ok(MigrateResult {
        deskvirt: Samples::new(ours),
        virsh: Samples::new(plain),
        job_ms,
        plain_job_ms,
        hops,
    })
}

/// Creates desktop `name` of the test guest (128 MiB, plus `extra`'s fields) and waits until
/// it runs; returns its domain's name.
pub(crate) async fn running_guest(
    w: &World,
    name: &str,
    extra: serde_json::Value,
) -> anyhow::Result<String> {
    let desktops = w.desktops();
    desktops
        .create(
            &PostParams::default(),
            &guest_desktop(w, name, "128Mi", extra)?,
        )
        .await?;
    eventually(Duration::from_secs(240), "desktop Running", || async {
        Ok((w.phase(name).await? == Some(Phase::Running)).then_some(()))
    })
    .await?;
    domain_of(&desktops, &w.user_ns.name, name).await
}

/// Ends a round: plain domain `plain` gone from host B and `files` from here, then the
/// DesktopMigration and the desktop `name` deleted (waiting until the desktop is gone).
pub(crate) async fn end_round(
    w: &World,
    host_b: &SecondHost,
    plain: &str,
    files: &[&std::path::Path],
    name: &str,
) -> anyhow::Result<()> {
    let _ = host_b.virsh(&["destroy", plain]);
    let _ = host_b.virsh(&["undefine", plain]);
    for f in files {
        let _ = std::fs::remove_file(f);
    }
    let migrations: Api<DesktopMigration> = Api::namespaced(w.client.clone(), &w.user_ns.name);
    migrations.delete(name, &DeleteParams::default()).await?;
    let desktops = w.desktops();
    desktops.delete(name, &DeleteParams::default()).await?;
    eventually(Duration::from_secs(120), "desktop deleted", || async {
        Ok(desktops.get_opt(name).await?.is_none().then_some(()))
    })
    .await
}

/// Defines and starts plain domain `name` on host A from deskvirt's definition `xml` of
/// `domain`, on an overlay of its own over the same base image. Returns its disk and XML file.
pub(crate) fn start_plain(
    w: &World,
    xml: &str,
    domain: &str,
    name: &str,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let disk = w.disk_dir.join(format!("{name}.qcow2"));
    run(
        "plain overlay",
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(w.image_dir.join("base.qcow2"))
            .arg(&disk),
    )?;
    let file = std::env::temp_dir().join(format!("{name}.xml"));
    std::fs::write(&file, plain_definition(xml, domain, name))?;
    virsh_system(&["define", &file.display().to_string()])?;
    virsh_system(&["start", name])?;
    Ok((disk, file))
}

/// `virsh migrate` of plain domain `name` to host B with the flags deskvirt's agent passes
/// (live, peer to peer, persistent there, undefined here, aborted on error, shared storage
/// declared), then `extra`.
pub(crate) fn virsh_migrate(host_b: &SecondHost, name: &str, extra: &[&str]) -> anyhow::Result<()> {
    let migrate_uri = format!("tcp://{}", host_b.address);
    let mut args = vec![
        "migrate",
        "--live",
        "--p2p",
        "--persistent",
        "--undefinesource",
        "--abort-on-error",
        "--unsafe",
    ];
    args.extend_from_slice(extra);
    args.extend([name, host_b.uri.as_str(), migrate_uri.as_str()]);
    virsh_system(&args)?;
    Ok(())
}

/// libvirt's job time and downtime, in ms, of the completed migration of `name` into host B
/// (`virsh domjobinfo --completed`); `None` when unreadable (left out of the figures).
fn completed_job(host_b: &SecondHost, name: &str) -> Option<(u64, u64)> {
    let text = host_b.virsh(&["domjobinfo", "--completed", name]).ok()?;
    let ms = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    Some((ms("Time elapsed:")?, ms("Total downtime:")?))
}

/// Waits until the guest whose serial log is `log` printed its uptime (it booted).
pub(crate) async fn booted(log: &str) -> anyhow::Result<()> {
    let log = std::path::PathBuf::from(log);
    eventually(Duration::from_secs(120), "the guest booted", || async {
        Ok(guest_uptimes(&log)?.first().map(|_| ()))
    })
    .await
    .with_context(|| format!("{}", log.display()))
}

/// deskvirt's definition of `domain` as a plain domain `name`: its own disk overlay and serial
/// log (every occurrence of the name), no UUID or MAC (libvirt makes new ones), no deskvirt
/// metadata, any free SPICE port.
pub(crate) fn plain_definition(xml: &str, domain: &str, name: &str) -> String {
    let mut out = String::new();
    let mut skipping = false;
    for line in xml.lines() {
        let t = line.trim();
        if t.starts_with("<uuid>") || t.starts_with("<mac address=") {
            continue;
        }
        if t.starts_with("<metadata") {
            skipping = !t.ends_with("</metadata>") && !t.ends_with("/>");
            continue;
        }
        if skipping {
            skipping = !t.starts_with("</metadata>");
            continue;
        }
        let mut l = line.replace(domain, name);
        if l.contains("<graphics") {
            l = strip_attr(&strip_attr(&l, "port"), "autoport")
                .replace("<graphics", "<graphics autoport='yes'");
        }
        out.push_str(&l);
        out.push('\n');
    }
    out
}

/// `line` without its attribute `attr='…'`.
fn strip_attr(line: &str, attr: &str) -> String {
    let key = format!(" {attr}='");
    match line.find(&key) {
        Some(i) => {
            let rest = &line[i + key.len()..];
            let end = rest
                .find('\'')
                .map_or(line.len(), |j| i + key.len() + j + 1);
            format!("{}{}", &line[..i], &line[end..])
        }
        None => line.to_string(),
    }
}

/// The markdown section.
pub fn markdown(r: &MigrateResult) -> String {
    let ratio = r.deskvirt.p50().as_secs_f64() / r.virsh.p50().as_secs_f64().max(1e-9);
    let jobs = |v: &[(u64, u64)]| -> String {
        v.iter()
            .map(|(t, d)| format!("{t} ms / {d} ms"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let downtime = |v: &[(u64, u64)]| {
        Samples::new(v.iter().map(|(_, d)| Duration::from_millis(*d)).collect()).p50()
    };
    format!(
        "### Live migration, 128 MiB guest, host A → host B (N={} each, interleaved)\n\n\
         | | p50 | max |\n|---|---|---|\n\
         | `virsh migrate --live --p2p --persistent --undefinesource --auto-converge` | {} | {} |\n\
         | deskvirt `DesktopMigration` create → `Succeeded` | {} | {} |\n\n\
         Ratio of the medians (deskvirt / virsh): **{ratio:.2}×**. Downtime p50: deskvirt {}, \
         virsh {}. libvirt's own job time / downtime of deskvirt's moves: {}; of virsh's: {}.\n\n{}",
        r.deskvirt.len(),
        secs(r.virsh.p50()),
        secs(r.virsh.max()),
        secs(r.deskvirt.p50()),
        secs(r.deskvirt.max()),
        secs(downtime(&r.job_ms)),
        secs(downtime(&r.plain_job_ms)),
        jobs(&r.job_ms),
        jobs(&r.plain_job_ms),
        hop_table(&r.hops)
    )
}

/// Each step's p50 from the POST, and the p50 of its own time (from the step before).
fn hop_table(hops: &[Steps]) -> String {
    let mut out = String::from(
        "| step of a deskvirt move (seen by a watch) | p50 from the POST | p50 of the step |\n|---|---|---|\n",
    );
    for (i, hop) in Hop::ALL.iter().enumerate() {
        let at = |s: &Steps, i: usize| s[i].unwrap_or_default();
        let from = Samples::new(hops.iter().map(|s| at(s, i)).collect());
        let step = Samples::new(
            hops.iter()
                .map(|s| {
                    at(s, i).saturating_sub(if i == 0 { Duration::ZERO } else { at(s, i - 1) })
                })
                .collect(),
        );
        out.push_str(&format!(
            "| {} | {} | +{} |\n",
            hop.describe(),
            secs(from.p50()),
            secs(step.p50())
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_definition_has_its_own_name_disk_and_a_free_port() {
        let xml = "<domain>\n  <name>d1</name>\n  <uuid>u</uuid>\n  <metadata>\n    <x/>\n  </metadata>\n  \
                   <mac address='52:54:00:00:00:01'/>\n  <source file='/disks/d1.qcow2'/>\n  <graphics type='spice' port='5901' autoport='no' listen='127.0.0.1'>\n</domain>\n";
        let p = plain_definition(xml, "d1", "p1");
        assert!(
            p.contains("<name>p1</name>") && p.contains("/disks/p1.qcow2"),
            "{p}"
        );
        assert!(
            !p.contains("<uuid>")
                && !p.contains("<mac")
                && !p.contains("<metadata")
                && !p.contains("<x/>"),
            "{p}"
        );
        assert!(
            p.contains("<graphics autoport='yes' type='spice' listen='127.0.0.1'>"),
            "{p}"
        );
    }
}
