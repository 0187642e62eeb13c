//! Host drain, side by side: `n` running desktops on host A emptied by `spec.drain` (patch →
//! `Drained=True` with all `n` moved live) against an admin's loop of `virsh migrate --live`
//! over `n` plain domains made from the same definitions, one after the other, between the
//! same two libvirt hosts. The operator runs with one migration per host at once, so both
//! sides move one domain at a time. Rounds alternate the two so both share the noise.

use std::time::{Duration, Instant};

use deskvirt_crds::DomainNode;
use deskvirt_crds::desktop::Phase;
use deskvirt_tests::cluster::unique_suffix;
use deskvirt_tests::host::eventually;
use deskvirt_tests::second_host::SecondHost;
use deskvirt_tests::world::{
    create_pool, domain_of, guest_desktop, patch_pool, setup, virsh_system, wait_ready_hosts,
};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::migrate::{booted, start_plain, virsh_migrate};
use crate::stats::{Samples, secs};

/// Both series (one sample per round: the time to empty the host of `n` desktops).
pub struct DrainResult {
    pub n: usize,
    pub deskvirt: Samples,
    pub virsh: Samples,
}

/// Runs `rounds` rounds of draining `n` desktops.
pub async fn run_bench(n: usize, rounds: usize) -> anyhow::Result<DrainResult> {
    let host_b = SecondHost::start(&format!("dvr{}", unique_suffix()))?;
    let mut w = setup(&format!("drainb-{}", unique_suffix())).await?;
    create_pool(&w).await?;
    patch_pool(&w, json!({ "storage": { "shared": true } })).await?;
    w.agent = Some(w.spawn_agent(&w.node, &[])?);
    w.start_operator_with(&["--migrations-per-host", "1"])?;
    w.add_migration_target(&host_b)?;
    wait_ready_hosts(&w, 2).await?;
    let node_b = format!("{}-b", w.node);
    let desktops = w.desktops();
    let nodes: Api<DomainNode> = Api::all(w.client.clone());
    let set = |spec: serde_json::Value| Patch::Merge(json!({ "spec": spec }));
    let (mut ours, mut plain) = (vec![], vec![]);
    for r in 0..rounds {
        // B is cordoned while the desktops are placed, so that all land on A.
        nodes
            .patch(
                &node_b,
                &PatchParams::default(),
                &set(json!({ "unschedulable": true })),
            )
            .await?;
        let names: Vec<String> = (0..n).map(|i| format!("drain-{r}-{i}")).collect();
        for name in &names {
            let extra = json!({ "disk": { "image": "base.qcow2", "persistent": true } });
            desktops
                .create(
                    &PostParams::default(),
                    &guest_desktop(&w, name, "128Mi", extra)?,
                )
                .await?;
        }
        let mut xmls = vec![];
        for name in &names {
            eventually(Duration::from_secs(300), "desktop Running", || async {
                Ok((w.phase(name).await? == Some(Phase::Running)).then_some(()))
            })
            .await?;
            let domain = domain_of(&desktops, &w.user_ns.name, name).await?;
            booted(&format!("/var/log/libvirt/qemu/{domain}-serial.log")).await?;
            xmls.push((
                domain.clone(),
                virsh_system(&["dumpxml", "--migratable", &domain])?,
            ));
        }
        nodes
            .patch(
                &node_b,
                &PatchParams::default(),
                &set(json!({ "unschedulable": false })),
            )
            .await?;

        // deskvirt: spec.drain → Drained with all n moved.
        let t0 = Instant::now();
        nodes
            .patch(
                &w.node,
                &PatchParams::default(),
                &set(json!({ "drain": true })),
            )
            .await?;
        eventually(Duration::from_secs(600), "host A drained", || async {
            let node = nodes.get(&w.node).await?;
            let st = node.status.unwrap_or_default();
            let drained = st
                .conditions
                .iter()
                .any(|c| c.type_ == "Drained" && c.status == "True");
            let moved = st.drain.is_some_and(|d| d.migrated as usize == n);
            Ok((drained && moved).then_some(()))
        })
        .await?;
        let took = t0.elapsed();
        ours.push(took);
        nodes
            .patch(
                &w.node,
                &PatchParams::default(),
                &set(json!({ "drain": false })),
            )
            .await?;

        // virsh: the same definitions as plain domains on A, then moved one after the other.
        let mut plains = vec![];
        for (i, (domain, xml)) in xmls.iter().enumerate() {
            let name = format!("plain-{}-{r}-{i}", w.run);
            let (disk, file) = start_plain(&w, xml, domain, &name)?;
            plains.push((name, disk, file));
        }
        for (name, _, _) in &plains {
            booted(&format!("/var/log/libvirt/qemu/{name}-serial.log")).await?;
        }
        let t0 = Instant::now();
        for (name, _, _) in &plains {
            virsh_migrate(&host_b, name, &["--auto-converge"])?;
        }
        plain.push(t0.elapsed());
        eprintln!(
            "[bench] drain round {r} ({n} desktops): deskvirt {}, virsh loop {}",
            secs(took),
            secs(t0.elapsed())
        );
        for (name, disk, file) in &plains {
            let _ = host_b.virsh(&["destroy", name]);
            let _ = host_b.virsh(&["undefine", name]);
            let _ = std::fs::remove_file(disk);
            let _ = std::fs::remove_file(file);
        }
        for name in &names {
            desktops.delete(name, &DeleteParams::default()).await?;
        }
        for name in &names {
            eventually(Duration::from_secs(120), "desktop deleted", || async {
                Ok(desktops.get_opt(name).await?.is_none().then_some(()))
            })
            .await?;
        }
    }
    Ok(DrainResult {
        n,
        deskvirt: Samples::new(ours),
        virsh: Samples::new(plain),
    })
}

/// The markdown section.
pub fn markdown(r: &DrainResult) -> String {
    let ratio = r.deskvirt.p50().as_secs_f64() / r.virsh.p50().as_secs_f64().max(1e-9);
    format!(
        "### Drain of a host with {n} running desktops (128 MiB guests, host A → host B, {} rounds, alternating)\n\n\
         | | p50 | max |\n|---|---|---|\n\
         | a loop of `virsh migrate --live --p2p --persistent --undefinesource --auto-converge`, one domain at a time | {} | {} |\n\
         | deskvirt `spec.drain: true` → `Drained=True`, one migration per host at a time | {} | {} |\n\n\
         Ratio of the medians (deskvirt / virsh loop): **{ratio:.2}×**.\n",
        r.deskvirt.len(),
        secs(r.virsh.p50()),
        secs(r.virsh.max()),
        secs(r.deskvirt.p50()),
        secs(r.deskvirt.max()),
        n = r.n,
    )
}
