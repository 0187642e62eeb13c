//! DesktopMigrations against the real API server, with a fake node-agent: the operator picks the
//! other host of a shared pool, reserves a port there and charges it the desktop's size, records
//! the target on the Desktop, and frees all of it when the migration is deleted (cancelled),
//! times out waiting for the source host, or loses its desktop. Refusals name their reason.

mod common;

use common::{RUN_LABEL, Run, agent_reports, cond, delete, node_of, wait_for, wait_gone};
use deskvirt_crds::{Desktop, DesktopMigration, DomainNode, ResourcePool};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

/// A pool of two hosts (8 threads, 16Gi, no reserve, no overcommit) whose storage every host
/// reaches (`shared`), and a running desktop of 2 vCPUs bound in it.
struct Rig {
    run: Run,
    pool: String,
    hosts: [String; 2],
    _beats: Vec<common::Heartbeat>,
}

impl Rig {
    async fn new(prefix: &str, shared: bool) -> Self {
        let run = Run::new(prefix).await;
        let pool = format!("mig-pool-{}", run.id);
        run.pool(
            &pool,
            json!({ "overcommit": { "cpu": 1 }, "reserved": { "cpu": 0, "memory": "0" },
                    "storage": { "shared": shared } }),
        )
        .await;
        let hosts = [format!("mig-a-{}", run.id), format!("mig-b-{}", run.id)];
        let mut beats = vec![];
        for h in &hosts {
            run.host(h, 8, "16Gi").await;
            beats.push(run.heartbeat(h, 10));
        }
        Self {
            run,
            pool,
            hosts,
            _beats: beats,
        }
    }

    /// Creates desktop `name` and waits until it is bound and its fake host says it runs.
    async fn running_desktop(&self, name: &str) -> Desktop {
        let desks = self.run.desktops();
        desks
            .create(
                &PostParams::default(),
                &self.run.desktop(name, &self.pool, 2, "2Gi"),
            )
            .await
            .unwrap_or_else(|e| panic!("creating {name}: {e}"));
        wait_for(&desks, name, "bound", |d: &Desktop| node_of(d).is_some()).await;
        agent_reports(&desks, name, true, true).await;
        wait_for(&desks, name, "Running", |d: &Desktop| {
            d.status
                .as_ref()
                .is_some_and(|s| cond(&s.conditions, "Running").is_some_and(|c| c.status == "True"))
        })
        .await
    }

    fn migrations(&self) -> Api<DesktopMigration> {
        Api::namespaced(self.run.client.clone(), &self.run.ns)
    }

    async fn migrate(&self, name: &str, desktop: &str, target: Option<&str>) -> DesktopMigration {
        self.migrate_as(name, desktop, target, "Live").await
    }

    async fn migrate_as(
        &self,
        name: &str,
        desktop: &str,
        target: Option<&str>,
        mode: &str,
    ) -> DesktopMigration {
        let mut spec = json!({ "desktop": desktop, "mode": mode });
        if let Some(t) = target {
            spec["targetNode"] = json!(t);
        }
        let m: DesktopMigration = serde_json::from_value(json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "DesktopMigration",
            "metadata": { "name": name, "labels": { RUN_LABEL: self.run.id } },
            "spec": spec
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        self.migrations()
            .create(&PostParams::default(), &m)
            .await
            .unwrap_or_else(|e| panic!("creating migration {name}: {e}"))
    }

    /// Waits until migration `name` is in `phase` with `Ready`'s reason `reason`.
    async fn wait_migration(&self, name: &str, phase: &str, reason: &str) -> DesktopMigration {
        wait_for(
            &self.migrations(),
            name,
            &format!("{phase} / {reason}"),
            |m: &DesktopMigration| {
                let st = m.status.clone().unwrap_or_default();
                // An ended migration writes its phase, then lets go of what it holds and
                // drops its finalizer: wait for all of it.
                let settled = !matches!(phase, "Failed" | "Succeeded") || m.finalizers().is_empty();
                st.phase.map(|p| p.as_str()) == Some(phase)
                    && cond(&st.conditions, "Ready").is_some_and(|c| c.reason == reason)
                    && settled
            },
        )
        .await
    }

    /// Waits until the pool has `cpu` vCPUs allocated and `ports` SPICE ports in use.
    async fn wait_pool(&self, cpu: u32, ports: u32) {
        wait_for(
            &self.run.pools(),
            &self.pool,
            &format!("{cpu} CPU and {ports} ports allocated"),
            |p: &ResourcePool| {
                p.status.as_ref().is_some_and(|s| {
                    s.allocated.as_ref().is_some_and(|a| a.cpu == cpu)
                        && s.ports.as_ref().is_some_and(|u| u.used == ports)
                })
            },
        )
        .await;
    }
}

fn record(d: &Desktop) -> Option<(String, String, u16)> {
    let m = d.status.as_ref()?.migration.as_ref()?;
    Some((m.uid.clone(), m.target.clone(), m.port))
}

#[tokio::test]
async fn a_migration_reserves_the_other_host_and_frees_it_when_cancelled() {
    let rig = Rig::new("op-mig", true).await;
    let _op = rig.run.operator(&format!("op-mig-{}", rig.run.id), &[]);
    let desks = rig.run.desktops();
    let d = rig.running_desktop("d").await;
    let source = node_of(&d).unwrap_or_default().to_string();
    let other = rig
        .hosts
        .iter()
        .find(|h| **h != source)
        .cloned()
        .unwrap_or_default();
    rig.wait_pool(2, 1).await;

    rig.migrate("mv", "d", None).await;
    let m = rig
        .wait_migration("mv", "Scheduling", "TargetReserved")
        .await;
    let st = m.status.clone().unwrap_or_default();
    assert_eq!(st.source.as_deref(), Some(source.as_str()));
    assert_eq!(st.target.as_deref(), Some(other.as_str()));
    assert_eq!(st.desktop_uid, d.uid());
    let port = st.target_port.unwrap_or_default();
    assert!((5900..=6899).contains(&port), "port {port}");
    assert!(m.finalizers().iter().any(|f| f == "deskvirt.io/operator"));
    // The record on the Desktop, before any host acts.
    let d = wait_for(&desks, "d", "the migration record", |d: &Desktop| {
        record(d).is_some()
    })
    .await;
    assert_eq!(
        record(&d),
        Some((m.uid().unwrap_or_default(), other.clone(), port))
    );
    // The target is charged the desktop's size and holds the port meanwhile.
    rig.wait_pool(4, 2).await;
    rig.run.event("mv", "MigrationScheduled").await;

    // Another migration of the same desktop is refused while this one holds its target.
    rig.migrate("mv-again", "d", None).await;
    rig.wait_migration("mv-again", "Failed", "AlreadyMigrating")
        .await;

    // Cancelled: the record goes, then the target, then the finalizer.
    rig.migrations()
        .delete("mv", &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    wait_gone(&rig.migrations(), "mv", "the cancelled migration").await;
    wait_for(&desks, "d", "no migration record", |d: &Desktop| {
        record(d).is_none()
    })
    .await;
    rig.wait_pool(2, 1).await;
    rig.run.event("mv", "MigrationCancelled").await;

    // Refusals that waiting cannot change end it at once, naming the reason.
    rig.migrate("to-self", "d", Some(&source)).await;
    rig.wait_migration("to-self", "Failed", "TargetIsSource")
        .await;
    rig.migrate("to-nowhere", "d", Some("not-a-host")).await;
    rig.wait_migration("to-nowhere", "Failed", "TargetNotInPool")
        .await;
    // A desktop that does not exist (yet) makes it wait.
    rig.migrate("ghost", "nobody", None).await;
    rig.wait_migration("ghost", "Pending", "DesktopNotFound")
        .await;

    // The desktop deleted while its migration holds a target: Failed, and everything freed.
    rig.migrate("mv2", "d", Some(&other)).await;
    rig.wait_migration("mv2", "Scheduling", "TargetReserved")
        .await;
    rig.wait_pool(4, 2).await;
    delete(&desks, "d").await;
    wait_gone(&desks, "d", "the deleted desktop").await;
    let m2 = rig.wait_migration("mv2", "Failed", "DesktopDeleted").await;
    assert!(m2.finalizers().is_empty(), "settled: {:?}", m2.finalizers());
    rig.wait_pool(0, 0).await;
}

#[tokio::test]
async fn a_target_nobody_starts_is_freed_after_the_start_timeout() {
    let rig = Rig::new("op-migt", true).await;
    let _op = rig.run.operator(
        &format!("op-migt-{}", rig.run.id),
        &["--migration-start-timeout", "3s"],
    );
    rig.running_desktop("d").await;
    rig.migrate("mv", "d", None).await;
    rig.wait_migration("mv", "Scheduling", "TargetReserved")
        .await;
    let m = rig.wait_migration("mv", "Failed", "StartTimeout").await;
    let st = m.status.unwrap_or_default();
    assert!(st.completion_time.is_some());
    assert!(m.metadata.finalizers.unwrap_or_default().is_empty());
    wait_for(
        &rig.run.desktops(),
        "d",
        "no migration record",
        |d: &Desktop| record(d).is_none(),
    )
    .await;
    rig.wait_pool(2, 1).await;
}

#[tokio::test]
async fn migration_needs_a_pool_with_shared_storage() {
    let rig = Rig::new("op-migs", false).await;
    let _op = rig.run.operator(&format!("op-migs-{}", rig.run.id), &[]);
    rig.running_desktop("d").await;
    rig.migrate("mv", "d", None).await;
    let m = rig.wait_migration("mv", "Failed", "StorageNotShared").await;
    let st = m.status.unwrap_or_default();
    let msg = cond(&st.conditions, "Ready")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(msg.contains("storage.shared"), "{msg}");
    assert!(st.target.is_none() && st.target_port.is_none());
    // Cold copies the disk: the target is asked for the empty disk first, and the move is
    // recorded on the Desktop only once it answered. A refusal ends it, naming why.
    let rig = &rig;
    let ask = |name: &'static str| async move {
        let made = rig.migrate_as(name, "d", None, "Cold").await;
        let uid = made.uid().unwrap_or_default();
        let m = rig
            .wait_migration(name, "Scheduling", "TargetReserved")
            .await;
        let target = m.status.and_then(|s| s.target).unwrap_or_default();
        let nodes = rig.run.nodes();
        wait_for(&nodes, &target, "asked for the disk", |n: &DomainNode| {
            n.status.as_ref().is_some_and(|s| {
                s.incoming.iter().any(|i| {
                    i.migration == uid && i.desktop.ends_with("/d") && i.file.ends_with(".qcow2")
                })
            })
        })
        .await;
        let d = rig
            .run
            .desktops()
            .get("d")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            d.status.and_then(|s| s.migration).is_none(),
            "recorded before the target answered"
        );
        (uid, target)
    };
    let answer = |target: String, body: serde_json::Value| async move {
        rig.run
            .nodes()
            .patch_status(
                &target,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(json!({ "status": { "prepared": [body] } })),
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    };
    let (uid, target) = ask("cold").await;
    let why = "a file is at /srv/disks/d.qcow2 already";
    answer(
        target.clone(),
        json!({ "migration": uid, "ready": false, "message": why }),
    )
    .await;
    let m = rig
        .wait_migration("cold", "Failed", "TargetNotPrepared")
        .await;
    let st = m.status.unwrap_or_default();
    let msg = cond(&st.conditions, "Ready")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(msg.contains(why) && msg.contains(&target), "{msg}");
    wait_for(
        &rig.run.nodes(),
        &target,
        "the request withdrawn",
        |n: &DomainNode| n.status.as_ref().is_some_and(|s| s.incoming.is_empty()),
    )
    .await;
    rig.wait_pool(2, 1).await;
    // Answered ready: recorded on the Desktop, for its host to move.
    let (uid, target) = ask("cold2").await;
    answer(target.clone(), json!({ "migration": uid, "ready": true })).await;
    wait_for(
        &rig.run.desktops(),
        "d",
        "the cold move recorded",
        |d: &Desktop| {
            d.status
                .as_ref()
                .and_then(|s| s.migration.as_ref())
                .is_some_and(|r| r.uid == uid && r.target == target)
        },
    )
    .await;
}

#[tokio::test]
async fn a_status_written_with_the_request_is_dropped_and_the_operator_decides() {
    let rig = Rig::new("op-migf", false).await;
    let _op = rig.run.operator(&format!("op-migf-{}", rig.run.id), &[]);
    rig.running_desktop("d").await;
    // A tenant creates a migration that claims a target and a port already.
    let forged: DesktopMigration = serde_json::from_value(json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "DesktopMigration",
        "metadata": { "name": "forged", "labels": { RUN_LABEL: rig.run.id } },
        "spec": { "desktop": "d" },
        "status": { "phase": "Scheduling", "desktopUid": "someone-else", "source": rig.hosts[0],
                    "target": rig.hosts[1], "targetPort": 5900 }
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    let made = rig
        .migrations()
        .create(&PostParams::default(), &forged)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        made.status.is_none(),
        "the apiserver kept a status: {:?}",
        made.status
    );
    // The operator's own decision: the pool is not shared.
    let m = rig
        .wait_migration("forged", "Failed", "StorageNotShared")
        .await;
    let st = m.status.unwrap_or_default();
    assert!(st.target.is_none() && st.target_port.is_none());
    rig.wait_pool(2, 1).await;
}

/// The source host's report of migration `uid` of desktop `name`, as the agent writes it.
async fn report(api: &Api<Desktop>, name: &str, uid: &str, source: &str, state: &str) {
    let body = json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop",
        "metadata": { "name": name },
        "status": { "migrationReport": {
            "uid": uid, "source": source, "state": state,
            "at": k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now()),
        } }
    });
    let pp =
        kube::api::PatchParams::apply(deskvirt_crds::constants::MANAGER_AGENT_MIGRATION).force();
    api.patch_status(name, &pp, &kube::api::Patch::Apply(&body))
        .await
        .unwrap_or_else(|e| panic!("migration report of {name}: {e}"));
}

#[tokio::test]
async fn a_desktop_deleted_while_it_moves_is_bound_to_the_target_before_it_goes() {
    let rig = Rig::new("op-mig-del", true).await;
    let _op = rig.run.operator(&format!("op-mig-del-{}", rig.run.id), &[]);
    let desks = rig.run.desktops();
    let d = rig.running_desktop("d").await;
    common::agent_adds_finalizer(&desks, "d").await;
    let source = node_of(&d).unwrap_or_default().to_string();
    rig.migrate("mv", "d", None).await;
    let d = wait_for(&desks, "d", "the migration record", |d: &Desktop| {
        record(d).is_some()
    })
    .await;
    let (uid, target, port) = record(&d).unwrap_or_default();
    report(&desks, "d", &uid, &source, "Started").await;
    rig.wait_migration("mv", "Running", "Moving").await;

    // Deleted while the domain moves: the target stays held until the source reports.
    delete(&desks, "d").await;
    report(&desks, "d", &uid, &source, "Completed").await;
    // The binding follows the domain to the target, whose host then tears it down.
    let moved = wait_for(&desks, "d", "bound to the target", |d: &Desktop| {
        node_of(d) == Some(target.as_str())
    })
    .await;
    let st = moved.status.clone().unwrap_or_default();
    assert_eq!(st.spice.and_then(|s| s.port), Some(port));
    assert!(moved.metadata.deletion_timestamp.is_some());
    assert_eq!(
        moved.labels().get("deskvirt.io/node"),
        Some(&target),
        "relabelled for the target's agent"
    );
    rig.wait_migration("mv", "Succeeded", "Succeeded").await;
    common::agent_removes_finalizer(&desks, "d").await;
    wait_gone(&desks, "d", "the deleted desktop").await;
    rig.wait_pool(0, 0).await;
}

#[tokio::test]
async fn a_migration_deleted_while_the_domain_moves_asks_the_source_to_abort() {
    let rig = Rig::new("op-mig-abort", true).await;
    let _op = rig
        .run
        .operator(&format!("op-mig-abort-{}", rig.run.id), &[]);
    let desks = rig.run.desktops();
    let d = rig.running_desktop("d").await;
    let source = node_of(&d).unwrap_or_default().to_string();
    rig.migrate("mv", "d", None).await;
    let d = wait_for(&desks, "d", "the migration record", |d: &Desktop| {
        record(d).is_some()
    })
    .await;
    let (uid, _, _) = record(&d).unwrap_or_default();
    report(&desks, "d", &uid, &source, "Started").await;
    rig.wait_migration("mv", "Running", "Moving").await;
    rig.wait_pool(4, 2).await;

    rig.migrations()
        .delete("mv", &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // The record tells the source host to abort; the target stays held meanwhile.
    wait_for(&desks, "d", "the record marked cancelled", |d: &Desktop| {
        d.status
            .as_ref()
            .and_then(|s| s.migration.as_ref())
            .is_some_and(|m| m.uid == uid && m.cancelled)
    })
    .await;
    let m = rig
        .migrations()
        .get("mv")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(m.metadata.deletion_timestamp.is_some());
    // The source host aborted: the migration goes, and with it the record and the target.
    report(&desks, "d", &uid, &source, "Failed").await;
    wait_gone(&rig.migrations(), "mv", "the cancelled migration").await;
    let d = wait_for(&desks, "d", "no migration record", |d: &Desktop| {
        record(d).is_none()
    })
    .await;
    assert_eq!(node_of(&d), Some(source.as_str()), "the desktop stays");
    rig.wait_pool(2, 1).await;
}
