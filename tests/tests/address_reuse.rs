//! A desktop's address on the pool network is the one its guest gets, also right after another
//! desktop was deleted: the operator, the real node-agent, real QEMU (TCG) on this machine's
//! libvirt, the pool's `nat` network and its dnsmasq. The test guest takes its address by DHCP
//! (`deskvirt.dhcp`) and prints it on its serial console.
//! - `first` runs and takes the address its status shows;
//! - `first` is deleted: its domain is destroyed, and its guest never released its lease, so
//!   dnsmasq keeps that address for `first`'s MAC until the lease expires (it would give the
//!   next MAC pinned to it another address meanwhile: that was the bug);
//! - `second` is created: the host pins it an address dnsmasq does not count as leased to
//!   another MAC (not `first`'s), and the guest gets exactly that address.
//!
//! Run: `cargo test -p deskvirt-tests --test address_reuse -- --nocapture`.

use std::time::{Duration, Instant};

use anyhow::Context;
use deskvirt_crds::desktop::Phase;
use deskvirt_tests::host::eventually;
use deskvirt_tests::world::{
    World, create_pool, domain_of, guest_addresses, guest_in_phase, serial_log, setup,
};
use kube::api::DeleteParams;
use serde_json::json;

/// The address the guest of desktop `name` took by DHCP, once it printed one, and the one its
/// status shows.
async fn addresses(w: &World, name: &str) -> anyhow::Result<(String, String)> {
    let desktops = w.desktops();
    let domain = domain_of(&desktops, &w.user_ns.name, name).await?;
    let log = serial_log(&domain);
    let took = eventually(
        Duration::from_secs(120),
        &format!("{name}'s guest took an address"),
        || async { Ok(guest_addresses(&log)?.last().cloned()) },
    )
    .await?;
    let shown = desktops
        .get(name)
        .await?
        .status
        .and_then(|s| s.ip)
        .context("no status.ip")?;
    Ok((took, shown))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freed_address_given_again_is_the_one_the_guest_gets() -> anyhow::Result<()> {
    let started = Instant::now();
    let mut w = setup("reuse").await?;
    create_pool(&w).await?;
    w.start_agent()?;
    w.start_operator()?;
    let desktops = w.desktops();
    let dhcp = json!({ "boot": { "kernel": "vmlinuz", "initrd": "initrd.img",
                                 "cmdline": "console=ttyS0 deskvirt.dhcp" } });

    guest_in_phase(&w, "first", dhcp.clone(), Phase::Running).await?;
    let (took, shown) = addresses(&w, "first").await?;
    anyhow::ensure!(
        took == shown,
        "first's guest took {took}, its status shows {shown}"
    );
    eprintln!(
        "[reuse] first runs at {shown}: {:.1}s",
        started.elapsed().as_secs_f64()
    );

    desktops.delete("first", &DeleteParams::default()).await?;
    eventually(Duration::from_secs(120), "first deleted", || async {
        Ok(desktops.get_opt("first").await?.is_none().then_some(()))
    })
    .await?;

    guest_in_phase(&w, "second", dhcp, Phase::Running).await?;
    let (took2, shown2) = addresses(&w, "second").await?;
    anyhow::ensure!(
        took2 == shown2,
        "second's guest took {took2}, its status shows {shown2}"
    );
    anyhow::ensure!(
        shown2 != shown,
        "second was pinned {shown2}, the address first's guest still holds a lease of"
    );
    eprintln!(
        "[reuse] second runs at {shown2} ({shown} stays first's until its lease ends): {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
