//! Upgrade from the previous release's node-agent binary (built from this repository's history,
//! see `deskvirt_tests::previous`): a domain it defined under the old naming
//! (`<namespace>--<name>`, no disk owner record) is adopted by the current agent, never
//! recreated: the same QEMU process keeps running, the Desktop reports it defined under the
//! name it has, its disk gets an owner record, and deleting the Desktop removes both.
//!
//! Run: `cargo test -p deskvirt-node-agent --test agent_upgrade -- --nocapture`.

mod common;

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use common::world::{World, cleanup, cond_is};
use common::{eventually, finish, unique};
use deskvirt_crds::conditions::find;
use deskvirt_crds::constants::condition::{DOMAIN_DEFINED, RUNNING};
use deskvirt_node_agent::domain::{domain_name, legacy_domain_name};
use deskvirt_node_agent::hypervisor::Hypervisor;
use deskvirt_tests::cluster::{TestNamespace, client, ensure_crds};
use deskvirt_tests::host::qemu_pid;
use deskvirt_tests::previous::{PREVIOUS_RELEASE, previous_node_agent};
use futures::FutureExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domains_of_the_previous_release_are_adopted_not_recreated() -> anyhow::Result<()> {
    let previous = previous_node_agent()?;
    let client = client().await?;
    ensure_crds(&client).await?;
    let ns = TestNamespace::new(&client, "agent-upgrade").await?;
    let w = World::new(client.clone(), &ns.name, "agent-upgrade").await?;
    let result = AssertUnwindSafe(scenario(&w, unique(), &previous))
        .catch_unwind()
        .await;
    cleanup(&w).await;
    drop(ns);
    finish(result)
}

async fn scenario(w: &World, id: u64, previous: &std::path::Path) -> anyhow::Result<()> {
    let octet = 100 + (id % 100) as u8;
    w.create_pool(octet).await?;
    let old = w.start_agent_binary(previous)?;
    w.assign_subnet(&format!("10.{octet}.11.0/24")).await?;

    let name = "veteran";
    let mac = format!("52:54:00:{:02x}:{:02x}:31", (id >> 8) & 0xff, id & 0xff);
    let uid = w
        .create_bound(name, "base.qcow2", w.first_port, &mac, "pw-upgrade")
        .await?;
    w.wait_desktop(
        name,
        "Running under the previous release",
        Duration::from_secs(120),
        |d| cond_is(d, RUNNING, "True", None),
    )
    .await?;
    let legacy = legacy_domain_name(&w.ns, name);
    let pid = qemu_pid(&legacy).ok_or_else(|| {
        anyhow::anyhow!("the previous release did not run a domain named {legacy}")
    })?;
    let disk = w.disk_dir.join(format!("{legacy}.qcow2"));
    anyhow::ensure!(disk.is_file(), "no disk {}", disk.display());
    eprintln!(
        "[upgrade] release {} runs {legacy} (QEMU pid {pid})",
        &PREVIOUS_RELEASE[..12]
    );

    // The upgrade: the old agent stops, the new one starts.
    drop(old);
    let new = w.start_agent()?;
    let adopted = w
        .wait_desktop(
            name,
            "adopted by the current agent",
            Duration::from_secs(60),
            |d| {
                cond_is(d, DOMAIN_DEFINED, "True", None)
                    && d.status.as_ref().is_some_and(|s| {
                        find(&s.conditions, DOMAIN_DEFINED).is_some_and(|c| {
                            c.message.contains(&legacy) && c.observed_generation.is_some()
                        })
                    })
                    && std::fs::read_to_string(w.disk_dir.join(format!("{legacy}.qcow2.owner")))
                        .is_ok_and(|o| o.trim() == uid)
            },
        )
        .await?;
    anyhow::ensure!(
        cond_is(&adopted, RUNNING, "True", None),
        "not Running after the upgrade"
    );
    anyhow::ensure!(
        qemu_pid(&legacy) == Some(pid),
        "the domain was restarted or recreated by the upgrade"
    );
    let new_name = domain_name(&w.ns, name, &uid);
    anyhow::ensure!(
        w.hv.list_domains()
            .await?
            .iter()
            .all(|d| d.name != new_name),
        "a second domain {new_name} was defined"
    );
    eprintln!("[upgrade] the current agent adopted {legacy}: same QEMU pid, owner record written");

    // Deleting the Desktop removes the adopted domain and its disk.
    w.delete_desktop(name, &legacy).await?;
    eventually(
        Duration::from_secs(30),
        "the adopted disk deleted",
        || async { Ok((!disk.exists()).then_some(())) },
    )
    .await?;
    drop(new);
    Ok(())
}
