//! Hostile tenants against each other on the real apiserver, the chart's operator and agent
//! (chart ServiceAccount tokens) and QEMU (TCG). Tenant A owns namespace `<ns>`, tenant B owns
//! `<ns>--a`, and a third tenant a namespace of 63 characters:
//! - a Secret tenant A made, named like the console Secret of a desktop A then creates, is
//!   never written over (`ConsoleSecret=False SecretNotOurs`);
//! - colliding names: `a--x` in A and `x` in B (both `<ns>--a--x` under the old naming) both
//!   run, each on its own domain and disk, with its own port; deleting one leaves the other;
//! - a 253-character Desktop name in a 63-character namespace runs;
//! - a Desktop with a forged `deskvirt.io/node` label and agent finalizer gets no domain and no
//!   disk, and deletes (the operator drops the finalizer no agent set);
//! - a forged status (another desktop's host, port and MAC) gets nothing either;
//! - a Desktop whose finalizers the tenant stripped before deleting it: its domain keeps
//!   running (nothing stops a desktop) and is reported as an orphan.
//!
//! "Nothing happened" is asserted after the agent counted the reconcile that refused it
//! (`deskvirt_agent_unbound_desktops_total`).
//!
//! Run: `cargo test -p deskvirt-tests --test tenants -- --nocapture`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use deskvirt_crds::conditions::find;
use deskvirt_crds::constants::{
    FINALIZER_AGENT, LABEL_NODE, LABEL_POOL, condition, console_reason,
};
use deskvirt_crds::desktop::Phase;
use deskvirt_crds::names::{domain_name, is_label_value};
use deskvirt_crds::{Desktop, DomainNode, ResourcePool};
use deskvirt_tests::cluster::unique_suffix;
use deskvirt_tests::helm::ScratchNamespace;
use deskvirt_tests::host::eventually;
use deskvirt_tests::world::{
    World, create_pool, delete_desktops, guest_desktop, remove_domains, setup, virsh_system,
};
use k8s_openapi::api::core::v1::{Event, Secret};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, ResourceExt};
use serde_json::json;

/// Deletes the desktops of the extra tenant namespaces (while the agent still runs) and any
/// domain left there, before the World goes.
struct Tenants(Vec<String>);

impl Drop for Tenants {
    fn drop(&mut self) {
        for ns in &self.0 {
            delete_desktops(ns);
            remove_domains(&format!("{ns}--"));
        }
    }
}

/// The disk file of a domain, from `virsh domblklist`.
fn disk_of(domain: &str) -> anyhow::Result<PathBuf> {
    let list = virsh_system(&["domblklist", domain])?;
    list.lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .find(|p| p.ends_with(".qcow2"))
        .map(PathBuf::from)
        .with_context(|| format!("no disk in {list}"))
}

/// The UID in the owner record beside a disk.
fn recorded_owner(disk: &Path) -> String {
    let mut record = disk.as_os_str().to_os_string();
    record.push(".owner");
    std::fs::read_to_string(record)
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn uid(d: &Desktop) -> String {
    d.uid().unwrap_or_default()
}

/// Whether libvirt holds a domain with this UUID.
fn has_domain(uuid: &str) -> bool {
    virsh_system(&["domname", uuid]).is_ok()
}

async fn running(api: &Api<Desktop>, name: &str) -> anyhow::Result<Desktop> {
    eventually(
        Duration::from_secs(240),
        &format!("{name} Running"),
        || async {
            let d = api.get(name).await?;
            let phase = d.status.as_ref().and_then(|s| s.phase);
            Ok((phase == Some(Phase::Running)).then_some(d))
        },
    )
    .await
}

/// Waits until the agent has refused `n` more reconciles than `before`.
async fn refused(w: &World, before: f64, n: f64, what: &str) -> anyhow::Result<()> {
    eventually(Duration::from_secs(60), what, || async {
        let now = w
            .agent_metric("deskvirt_agent_unbound_desktops_total")
            .await?;
        Ok((now >= before + n).then_some(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tenants_reach_no_domain_disk_or_binding_of_another() -> anyhow::Result<()> {
    let mut w = setup(&format!("tenants-{}", unique_suffix())).await?;
    create_pool(&w).await?;
    // The orphan sweep every 2 s, so a stripped desktop is reported soon.
    let metrics = format!("127.0.0.1:{}", deskvirt_tests::host::free_port()?);
    w.agent = Some(w.spawn_agent_at(&w.node, &metrics, &["--refresh-interval", "2s"])?);
    w.agent_metrics = Some(metrics);
    w.start_operator()?;

    let a_ns = w.user_ns.name.clone();
    let b = ScratchNamespace::named(&format!("{a_ns}--a"))?;
    let long_ns_name = format!("{}-{}", "t".repeat(62 - w.run.len()), w.run);
    anyhow::ensure!(long_ns_name.len() == 63, "{}", long_ns_name.len());
    let long_ns = ScratchNamespace::named(&long_ns_name)?;
    let _tenants = Tenants(vec![b.name.clone(), long_ns.name.clone()]);
    let in_a = w.desktops();
    let in_b: Api<Desktop> = Api::namespaced(w.client.clone(), &b.name);
    let in_long: Api<Desktop> = Api::namespaced(w.client.clone(), &long_ns.name);

    // Tenant A (a namespace whose console Secrets the chart allows) keeps a Secret of its own
    // named like the console Secret of a desktop it then creates: it is never written over.
    let secrets: Api<Secret> = Api::namespaced(w.client.clone(), &a_ns);
    let mine: Secret = serde_json::from_value(json!({
        "metadata": { "name": "victim-console" },
        "stringData": { "password": "tenant's own", "note": "not deskvirt's" }
    }))?;
    let mine = secrets.create(&PostParams::default(), &mine).await?;
    in_a.create(
        &PostParams::default(),
        &guest_desktop(&w, "victim", "128Mi", json!({}))?,
    )
    .await?;

    // Colliding names and a 253-character name.
    let long_name = format!("d{}", "x".repeat(252));
    in_a.create(
        &PostParams::default(),
        &guest_desktop(&w, "a--x", "128Mi", json!({}))?,
    )
    .await?;
    in_b.create(
        &PostParams::default(),
        &guest_desktop(&w, "x", "128Mi", json!({}))?,
    )
    .await?;
    in_long
        .create(
            &PostParams::default(),
            &guest_desktop(
                &w,
                &long_name,
                "128Mi",
                json!({ "user": "long@example.org" }),
            )?,
        )
        .await?;
    let ax = running(&in_a, "a--x").await?;
    let victim = eventually(
        Duration::from_secs(60),
        "victim's ConsoleSecret",
        || async {
            let d = in_a.get("victim").await?;
            Ok(d.status
                .as_ref()
                .and_then(|s| find(&s.conditions, condition::CONSOLE_SECRET).cloned())
                .filter(|c| c.reason == console_reason::SECRET_NOT_OURS))
        },
    )
    .await?;
    let after = secrets.get("victim-console").await?;
    anyhow::ensure!(
        after.data == mine.data
            && after.metadata.resource_version == mine.metadata.resource_version,
        "the tenant's own victim-console Secret was written"
    );
    eprintln!(
        "[tenants] a pre-existing victim-console Secret is untouched: {}",
        victim.message
    );
    let x = running(&in_b, "x").await?;
    let long = running(&in_long, &long_name).await?;

    let ax_domain = domain_name(&a_ns, "a--x", &uid(&ax));
    let x_domain = domain_name(&b.name, "x", &uid(&x));
    anyhow::ensure!(
        ax_domain != x_domain,
        "one domain name for two desktops: {ax_domain}"
    );
    let ax_disk = disk_of(&ax_domain)?;
    let x_disk = disk_of(&x_domain)?;
    anyhow::ensure!(
        ax_disk != x_disk,
        "one disk for two desktops: {}",
        ax_disk.display()
    );
    anyhow::ensure!(
        recorded_owner(&ax_disk) == uid(&ax),
        "a--x's disk owner record"
    );
    anyhow::ensure!(recorded_owner(&x_disk) == uid(&x), "x's disk owner record");
    let port = |d: &Desktop| {
        d.status
            .as_ref()
            .and_then(|s| s.spice.as_ref())
            .and_then(|s| s.port)
    };
    anyhow::ensure!(
        port(&ax).is_some() && port(&ax) != port(&x),
        "ports {:?} {:?}",
        port(&ax),
        port(&x)
    );
    eprintln!("[tenants] a--x → {ax_domain}, x → {x_domain}: distinct domains, disks and ports");

    let long_domain = domain_name(&long_ns.name, &long_name, &uid(&long));
    anyhow::ensure!(
        has_domain(&uid(&long)),
        "the long-named desktop has no domain"
    );
    for (key, value) in long.labels() {
        anyhow::ensure!(
            is_label_value(value),
            "label {key}={value} is not a valid label value"
        );
    }
    anyhow::ensure!(
        long.labels().contains_key(LABEL_NODE) && long.labels().contains_key(LABEL_POOL)
    );
    eprintln!(
        "[tenants] a {}-character Desktop in a {}-character namespace runs as {long_domain}",
        long_name.len(),
        long_ns.name.len()
    );

    // A forged node label and agent finalizer on a desktop the operator cannot bind (its pool
    // does not exist): no domain, no disk; deleting it finishes.
    let before = w
        .agent_metric("deskvirt_agent_unbound_desktops_total")
        .await?;
    let mut forged = guest_desktop(
        &w,
        "forged",
        "128Mi",
        json!({ "pool": format!("none-{}", w.run) }),
    )?;
    forged
        .labels_mut()
        .insert(LABEL_NODE.into(), w.node.clone());
    forged.finalizers_mut().push(FINALIZER_AGENT.into());
    let forged = in_b.create(&PostParams::default(), &forged).await?;
    refused(&w, before, 1.0, "the agent refused the forged label").await?;
    anyhow::ensure!(
        !has_domain(&uid(&forged)),
        "a domain was defined for a forged label"
    );
    let forged_disk = w.disk_dir.join(format!(
        "{}.qcow2",
        domain_name(&b.name, "forged", &uid(&forged))
    ));
    anyhow::ensure!(!forged_disk.exists(), "a disk was made for a forged label");
    let scheduled = in_b.get("forged").await?;
    let cond = scheduled
        .status
        .as_ref()
        .and_then(|s| find(&s.conditions, condition::SCHEDULED).cloned());
    eprintln!("[tenants] forged label: no domain, no disk; Scheduled: {cond:?}");
    in_b.delete("forged", &DeleteParams::default()).await?;
    eventually(
        Duration::from_secs(60),
        "the forged desktop deleted",
        || async { Ok(in_b.get_opt("forged").await?.is_none().then_some(())) },
    )
    .await?;
    let events: Api<Event> = Api::namespaced(w.client.clone(), &b.name);
    let explained = events
        .list(&ListParams::default().fields("involvedObject.name=forged"))
        .await?
        .items
        .iter()
        .any(|e| e.reason.as_deref() == Some("FinalizerNotBound"));
    anyhow::ensure!(
        explained,
        "no FinalizerNotBound Event on the forged desktop"
    );

    // A forged status naming this host and a--x's port and MAC (as a tenant granted
    // desktops/status by a careless admin could write): nothing.
    let before = w
        .agent_metric("deskvirt_agent_unbound_desktops_total")
        .await?;
    let mut fake = guest_desktop(
        &w,
        "forged-status",
        "128Mi",
        json!({ "pool": format!("none-{}", w.run) }),
    )?;
    fake.labels_mut().insert(LABEL_NODE.into(), w.node.clone());
    let fake = in_b.create(&PostParams::default(), &fake).await?;
    let ax_status = ax.status.clone().unwrap_or_default();
    let status = json!({ "status": {
        "node": w.node, "mac": ax_status.mac, "phase": "Scheduled",
        "spice": { "port": port(&ax) }
    }});
    in_b.patch_status(
        "forged-status",
        &PatchParams::default(),
        &Patch::Merge(&status),
    )
    .await?;
    refused(&w, before, 1.0, "the agent refused the forged status").await?;
    anyhow::ensure!(
        !has_domain(&uid(&fake)),
        "a domain was defined for a forged status"
    );
    let refused_binding = eventually(Duration::from_secs(30), "BindingNotOurs", || async {
        let d = in_b.get("forged-status").await?;
        Ok(d.status
            .as_ref()
            .and_then(|s| find(&s.conditions, condition::SCHEDULED).cloned())
            .filter(|c| c.reason == "BindingNotOurs"))
    })
    .await?;
    eprintln!("[tenants] forged status: {}", refused_binding.message);
    anyhow::ensure!(
        virsh_system(&["domstate", &ax_domain])?.trim() == "running",
        "a--x stopped"
    );
    eprintln!("[tenants] forged status with a--x's port and MAC: no domain; a--x runs");

    // Deleting a--x takes its domain and disk, and nothing of x.
    let x_inode = std::fs::metadata(&x_disk)?.ino();
    in_a.delete("a--x", &DeleteParams::default()).await?;
    eventually(Duration::from_secs(120), "a--x deleted", || async {
        Ok(in_a.get_opt("a--x").await?.is_none().then_some(()))
    })
    .await?;
    anyhow::ensure!(
        !has_domain(&uid(&ax)) && !ax_disk.exists(),
        "a--x left its domain or disk"
    );
    anyhow::ensure!(
        virsh_system(&["domstate", &x_domain])?.trim() == "running"
            && std::fs::metadata(&x_disk)?.ino() == x_inode
            && recorded_owner(&x_disk) == uid(&x),
        "x was touched by a--x's deletion"
    );
    eprintln!("[tenants] a--x deleted: its domain and disk gone; x runs on the same disk");

    // Tenant B strips the finalizers of x and deletes it: its domain is not stopped, and the
    // agent reports it as an orphan. The agent and the operator put their finalizers back as
    // soon as they see them gone (then the deletion is an ordinary one, and nothing is left
    // running), so the tenant deletes on the condition that nobody wrote x since its strip,
    // and strips again until that holds, as a determined tenant would.
    let mut attempts = 0;
    loop {
        attempts += 1;
        let stripped = in_b
            .patch(
                "x",
                &PatchParams::default(),
                &Patch::Merge(&json!({ "metadata": { "finalizers": null } })),
            )
            .await?;
        let unchanged = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: stripped.resource_version(),
                uid: None,
            }),
            ..DeleteParams::default()
        };
        match in_b.delete("x", &unchanged).await {
            Ok(_) => break,
            Err(kube::Error::Api(e)) if e.code == 409 && attempts < 50 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    eprintln!("[tenants] x deleted without its finalizers after {attempts} strip(s)");
    eventually(Duration::from_secs(30), "x gone", || async {
        Ok(in_b.get_opt("x").await?.is_none().then_some(()))
    })
    .await?;
    let nodes: Api<DomainNode> = Api::all(w.client.clone());
    let reported = eventually(
        Duration::from_secs(60),
        "x reported as an orphan",
        || async {
            let node = nodes.get(&w.node).await?;
            let orphans = node.status.map(|s| s.orphans).unwrap_or_default();
            Ok(orphans.into_iter().find(|o| o.uid == uid(&x)))
        },
    )
    .await?;
    anyhow::ensure!(
        reported.running && reported.spice_port == port(&x) && reported.cpu == 1,
        "x's orphan entry: {reported:?}"
    );
    anyhow::ensure!(
        virsh_system(&["domstate", &x_domain])?.trim() == "running" && x_disk.exists(),
        "x's domain was stopped or its disk removed"
    );
    eprintln!(
        "[tenants] x deleted without its finalizers: its domain runs on, reported as an orphan: {reported:?}"
    );

    // Until it is gone the orphan is charged to the host: the pool still counts its CPU and
    // memory beside those of the two desktops left in the pool (victim and the long-named
    // one), read from a pool status written after a spec change, so not a stale one.
    let pools: Api<ResourcePool> = Api::all(w.client.clone());
    let bump = |spec: serde_json::Value| {
        let pools = pools.clone();
        let pool = w.pool.clone();
        async move {
            let p = pools
                .patch(
                    &pool,
                    &PatchParams::default(),
                    &Patch::Merge(&json!({ "spec": spec })),
                )
                .await?;
            anyhow::Ok(p.metadata.generation.unwrap_or_default())
        }
    };
    let generation = bump(json!({ "orphans": { "action": "Report", "after": "1h" } })).await?;
    let charged = eventually(
        Duration::from_secs(30),
        "pool status of the new generation",
        || async {
            let st = pools.get(&w.pool).await?.status.unwrap_or_default();
            Ok((st.observed_generation >= Some(generation))
                .then_some(())
                .and(st.allocated))
        },
    )
    .await?;
    if charged.cpu != 3 {
        let all: Api<Desktop> = Api::all(w.client.clone());
        let seen: Vec<String> = all
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .map(|d| {
                format!(
                    "{}/{} pool={} node={:?}",
                    d.namespace().unwrap_or_default(),
                    d.name_any().chars().take(20).collect::<String>(),
                    d.spec.pool,
                    d.status.as_ref().and_then(|s| s.node.clone())
                )
            })
            .collect();
        anyhow::bail!(
            "the orphan is not charged as one desktop: allocated {charged:?}; desktops: {seen:#?}"
        );
    }
    // The pool's policy: undefine orphans after 1 s. The domain goes (its disk stays), and with
    // it the charge.
    bump(json!({ "orphans": { "action": "Undefine", "after": "1s" } })).await?;
    eventually(Duration::from_secs(90), "the orphan undefined", || async {
        Ok((!has_domain(&uid(&x))).then_some(()))
    })
    .await?;
    anyhow::ensure!(x_disk.exists(), "the orphan's disk was deleted");
    eventually(
        Duration::from_secs(60),
        "the orphan's charge released",
        || async {
            let st = pools.get(&w.pool).await?.status.unwrap_or_default();
            Ok(st.allocated.filter(|a| a.cpu == 2).map(|_| ()))
        },
    )
    .await?;
    eprintln!(
        "[tenants] the pool's orphan policy undefined x's domain (disk kept); its charge went with it"
    );
    Ok(())
}
