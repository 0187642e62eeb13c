//! Golden images end to end: the chart's RBAC (the operator and the agent act with their chart
//! ServiceAccount tokens), the real operator and node-agent, real libvirt and QEMU (TCG), and
//! an HTTP origin started by the test serving the tiny guest's disk, and two libvirt hosts that
//! do not share their image directory (host B from `scripts/second-host.sh`, its agent confined
//! to the chart's mounts).
//! - a DesktopImage of the images namespace with the right SHA-256 is fetched by each host,
//!   verified and linked into its own `imageDir/managed/<uid>/v1.qcow2`, read-only, with the
//!   same sum; the image shows `2/2` and `Ready=True`;
//! - one with a wrong sum fails on the host with `ChecksumMismatch` naming both sums, leaves no
//!   file, and the image says `CopyFailed`;
//! - a tenant's URL import is refused (`SourceNotAllowed`), and the host never asks the origin;
//! - a tenant's Desktop with `imageRef` to the good image is pinned to v1, boots on a linked
//!   clone of the verified copy, and one naming the failed image waits with `ImageNotReady`;
//! - deleting the image waits (`Deleting=True InUse`, naming the desktop) until the desktop
//!   pinned to it is gone.
//!
//! Run: `cargo test -p deskvirt-tests --test images -- --nocapture`.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use deskvirt_crds::conditions::find;
use deskvirt_crds::desktop::Phase;
use deskvirt_crds::image::DesktopImage;
use deskvirt_tests::cluster::unique_suffix;
use deskvirt_tests::host::eventually;
use deskvirt_tests::images::{
    KEY_MARKER, create_image, disk_bytes, file_in_image, ready, sealable_image, sha256, wait_image,
};
use deskvirt_tests::origin::Origin;
use deskvirt_tests::second_host::SecondHost;
use deskvirt_tests::world::{
    RUN_LABEL, create_pool, domain_of, guest_in_phase, guest_writes, serial_log, setup,
    wait_ready_hosts,
};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_fetched_verified_and_cloned_and_bad_ones_refused() -> anyhow::Result<()> {
    let started = Instant::now();
    // Declared first, dropped last: the World's desktops are deleted while host B runs.
    let host_b: Arc<SecondHost>;
    let mut w = setup("images").await?;
    host_b = Arc::new(SecondHost::start_with_private(
        &format!("dvi{}", unique_suffix()),
        std::slice::from_ref(&w.image_dir),
    )?);
    // Host B's own image directory holds the guest's kernel, as a real host's would.
    let b_images = host_b.private_dir(0);
    for f in ["vmlinuz", "initrd.img"] {
        std::fs::copy(w.guest_dir.join(f), b_images.join(f))?;
    }
    create_pool(&w).await?;
    w.start_agent()?;
    w.start_operator()?;
    let origin = Origin::start(w.guest_dir.clone()).await?;
    let sum = sha256(&w.guest_dir.join("base.qcow2"))?;
    let images_ns = w.images_ns.clone();

    // The right sum: fetched, verified, in place and read-only.
    create_image(&w, &images_ns, "lab", &origin.url("base.qcow2"), &sum).await?;
    let distributed = |hosts: &'static str| {
        move |i: &DesktopImage| {
            ready(i) == Some(("True".into(), "Distributed".into()))
                && i.status.as_ref().and_then(|s| s.hosts.as_deref()) == Some(hosts)
        }
    };
    wait_image(
        &w,
        &images_ns,
        "lab",
        "lab Ready on 1/1",
        distributed("1/1"),
    )
    .await?;
    eprintln!(
        "[images] lab v1 Ready on host A: {:.1}s",
        started.elapsed().as_secs_f64()
    );
    // Host B joins the pool later and gets the pool's images.
    let node_b = w.add_migration_target(&host_b)?;
    wait_ready_hosts(&w, 2).await?;
    let good = wait_image(
        &w,
        &images_ns,
        "lab",
        "lab Ready on 2/2",
        distributed("2/2"),
    )
    .await?;
    let st = good.status.clone().unwrap_or_default();
    anyhow::ensure!(st.hosts.as_deref() == Some("2/2"), "hosts {:?}", st.hosts);
    let uid = good.uid().context("uid")?;
    for dir in [&w.image_dir, &b_images] {
        let file = dir.join(format!("managed/{uid}/v1.qcow2"));
        anyhow::ensure!(sha256(&file)? == sum, "{} has another sum", file.display());
        let mode = std::fs::metadata(&file)?.permissions().mode() & 0o777;
        anyhow::ensure!(mode == 0o444, "{} has mode {mode:o}", file.display());
    }
    anyhow::ensure!(
        origin.requests("base.qcow2") == 2,
        "each host fetches once: {} requests",
        origin.requests("base.qcow2")
    );
    eprintln!(
        "[images] lab v1 Ready on 2/2, a copy of its own on each host ({} bytes): {:.1}s",
        st.actual_bytes.unwrap_or_default(),
        started.elapsed().as_secs_f64()
    );

    // A write into host B's copy: found at its next look (the file's time changed), read
    // again, and fetched again from the origin.
    let b_file = b_images.join(format!("managed/{uid}/v1.qcow2"));
    let damaged = Command::new("dd")
        .args([
            "if=/dev/urandom",
            "bs=4096",
            "count=1",
            "seek=8",
            "conv=notrunc",
        ])
        .arg(format!("of={}", b_file.display()))
        .output()?;
    anyhow::ensure!(damaged.status.success(), "dd: {damaged:?}");
    let damaged_at = Instant::now();
    eventually(
        Duration::from_secs(60),
        "host B fetches lab again",
        || async { Ok((origin.requests("base.qcow2") == 3).then_some(())) },
    )
    .await?;
    wait_image(
        &w,
        &images_ns,
        "lab",
        "lab Ready on 2/2 again",
        distributed("2/2"),
    )
    .await?;
    anyhow::ensure!(sha256(&b_file)? == sum, "host B's copy was not repaired");
    eprintln!(
        "[images] host B's damaged copy found and fetched again: {:.1}s",
        damaged_at.elapsed().as_secs_f64()
    );

    // A wrong sum: refused on the host, nothing left behind.
    let wrong = "0".repeat(64);
    create_image(&w, &images_ns, "bad", &origin.url("base.qcow2"), &wrong).await?;
    let bad = wait_image(&w, &images_ns, "bad", "bad CopyFailed on both hosts", |i| {
        let failed = |c: &deskvirt_crds::image::ImageCopy| c.reason.is_some();
        ready(i) == Some(("False".into(), "CopyFailed".into()))
            && i.status
                .as_ref()
                .is_some_and(|s| s.copies.iter().all(failed))
    })
    .await?;
    let copies = bad.status.clone().unwrap_or_default().copies;
    anyhow::ensure!(copies.len() == 2, "copies: {copies:?}");
    for copy in copies {
        anyhow::ensure!(
            copy.reason.as_deref() == Some("ChecksumMismatch"),
            "copy: {copy:?}"
        );
        let message = copy.message.unwrap_or_default();
        anyhow::ensure!(
            message.contains(&wrong) && message.contains(&sum),
            "the message names both sums: {message}"
        );
    }
    for dir in [&w.image_dir, &b_images] {
        let bad_dir = dir.join(format!("managed/{}", bad.uid().unwrap_or_default()));
        let left: Vec<_> = std::fs::read_dir(&bad_dir)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        anyhow::ensure!(left.is_empty(), "files left for the bad image: {left:?}");
    }

    // A tenant's URL import: refused by the operator, never fetched by the host.
    let asked = origin.requests("tenant.qcow2");
    create_image(
        &w,
        &w.user_ns.name,
        "mine",
        &origin.url("tenant.qcow2"),
        &sum,
    )
    .await?;
    let tenant = wait_image(&w, &w.user_ns.name.clone(), "mine", "mine refused", |i| {
        ready(i) == Some(("False".into(), "SourceNotAllowed".into()))
    })
    .await?;
    anyhow::ensure!(
        tenant.status.as_ref().and_then(|s| s.version).is_none(),
        "a refused source cuts no version"
    );

    // A tenant's desktop clones the verified copy.
    let image_ref = json!({ "disk": { "imageRef": { "name": "lab", "namespace": images_ns },
                                      "persistent": true } });
    guest_in_phase(&w, "from-image", image_ref, Phase::Running).await?;
    let d = w.desktops().get("from-image").await?;
    let pin = d
        .status
        .as_ref()
        .and_then(|s| s.image.clone())
        .context("no status.image")?;
    anyhow::ensure!(
        pin.version == 1 && pin.uid == uid && pin.sha256 == sum,
        "pin {pin:?}"
    );
    let disks: Vec<_> = std::fs::read_dir(&w.disk_dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "qcow2"))
        .collect();
    let info = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .args(&disks)
        .output()?;
    let info = String::from_utf8_lossy(&info.stdout);
    anyhow::ensure!(
        info.contains(&format!("managed/{uid}/v1.qcow2")),
        "the disk is not a clone of the verified copy: {info}"
    );
    eprintln!(
        "[images] from-image Running on its clone: {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // A desktop naming the failed image waits, and says why.
    let to_bad = json!({ "disk": { "imageRef": { "name": "bad", "namespace": images_ns } } });
    w.desktops()
        .create(
            &PostParams::default(),
            &deskvirt_tests::world::guest_desktop(&w, "from-bad", "128Mi", to_bad)?,
        )
        .await?;
    eventually(
        Duration::from_secs(60),
        "from-bad ImageNotReady",
        || async {
            let d = w.desktops().get("from-bad").await?;
            let c = d
                .status
                .as_ref()
                .and_then(|s| find(&s.conditions, "Scheduled").cloned());
            Ok(c.filter(|c| c.reason == "ImageNotReady").map(|_| ()))
        },
    )
    .await?;
    anyhow::ensure!(
        origin.requests("tenant.qcow2") == asked,
        "a host fetched the tenant's URL"
    );

    // Deleting the image waits while a desktop is pinned to it, and says which; once that
    // desktop is gone, so is the image.
    let images: Api<DesktopImage> = Api::namespaced(w.client.clone(), &images_ns);
    images.delete("lab", &Default::default()).await?;
    let user = format!("{}/from-image", w.user_ns.name);
    let waiting = wait_image(&w, &images_ns, "lab", "lab's deletion waits", |i| {
        i.status
            .as_ref()
            .and_then(|s| find(&s.conditions, "Deleting").cloned())
            .is_some_and(|c| c.reason == "InUse" && c.message.contains(&user))
    })
    .await?;
    anyhow::ensure!(waiting.metadata.deletion_timestamp.is_some());
    w.desktops()
        .delete("from-image", &Default::default())
        .await?;
    eventually(Duration::from_secs(120), "lab gone", || async {
        Ok(images.get_opt("lab").await?.is_none().then_some(()))
    })
    .await?;
    capture_and_clone(&w, &node_b, &b_images, started).await?;
    eprintln!("[images] done: {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

/// The teacher's workflow: a tenant's template desktop writes to its disk and is shut down; a
/// DesktopImage of the tenant's namespace captures it (refused while it runs), sealed; two
/// clones of the new image boot, without the template's machine ID, SSH host keys or leases,
/// with its student's files and its own writes.
async fn capture_and_clone(
    w: &deskvirt_tests::world::World,
    node_b: &str,
    b_images: &std::path::Path,
    started: Instant,
) -> anyhow::Result<()> {
    let ns = w.user_ns.name.clone();
    sealable_image(&w.image_dir, "sealable.qcow2")?;
    // The template (and so the capture) goes to host A: host B is in maintenance meanwhile.
    let nodes: Api<deskvirt_crds::DomainNode> = Api::all(w.client.clone());
    let maintenance = |on: bool| json!({ "spec": { "maintenance": on } });
    nodes
        .patch(
            node_b,
            &PatchParams::default(),
            &Patch::Merge(maintenance(true)),
        )
        .await?;
    // The template writes 1 MiB of 'A' at 40 MiB of its disk (past its file system).
    let template = json!({
        "disk": { "image": "sealable.qcow2", "persistent": true },
        "boot": { "kernel": "vmlinuz", "initrd": "initrd.img",
                  "cmdline": "console=ttyS0 deskvirt.write=1 deskvirt.seek=40 deskvirt.byte=101" }
    });
    guest_in_phase(w, "template", template, Phase::Running).await?;
    nodes
        .patch(
            node_b,
            &PatchParams::default(),
            &Patch::Merge(maintenance(false)),
        )
        .await?;
    let domain = domain_of(&w.desktops(), &ns, "template").await?;
    eventually(Duration::from_secs(120), "the template's write", || async {
        Ok((!guest_writes(&serial_log(&domain))?.is_empty()).then_some(()))
    })
    .await?;
    // Asked while it runs: refused, naming the field; nothing is cut.
    let images: Api<DesktopImage> = Api::namespaced(w.client.clone(), &ns);
    let image: DesktopImage = serde_json::from_value(json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "DesktopImage",
        "metadata": { "name": "lab-template", "labels": { RUN_LABEL: w.run } },
        "spec": { "source": { "desktop": { "name": "template" } }, "pools": [w.pool] },
    }))?;
    images.create(&PostParams::default(), &image).await?;
    let refused = wait_image(w, &ns, "lab-template", "TemplateRunning", |i| {
        ready(i).is_some_and(|(_, r)| r == "TemplateRunning")
    })
    .await?;
    anyhow::ensure!(
        refused.status.as_ref().and_then(|s| s.version).is_none(),
        "a version was cut from a running template"
    );
    // Shut down: captured on host A, sealed, with its sum.
    w.desktops()
        .patch(
            "template",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "power": "Off" } })),
        )
        .await?;
    let asked = Instant::now();
    let captured = wait_image(
        w,
        &ns,
        "lab-template",
        "lab-template captured on host A",
        |i| {
            let st = i.status.clone().unwrap_or_default();
            st.sha256.is_some()
                && st
                    .copies
                    .iter()
                    .any(|c| c.node == w.node && c.phase == deskvirt_crds::image::CopyPhase::Ready)
        },
    )
    .await?;
    let st = captured.status.clone().unwrap_or_default();
    let uid = captured.uid().context("uid")?;
    let file = w.image_dir.join(format!("managed/{uid}/v1.qcow2"));
    anyhow::ensure!(
        Some(sha256(&file)?) == st.sha256,
        "the captured file's sum is not the status's"
    );
    let sealed = st
        .copies
        .iter()
        .find(|c| c.node == w.node)
        .and_then(|c| c.message.clone())
        .unwrap_or_default();
    eprintln!(
        "[images] template captured in {:.1}s after its shutdown ({}): {sealed}",
        asked.elapsed().as_secs_f64(),
        st.hosts.clone().unwrap_or_default()
    );
    // Host B keeps its own image directory: it says why it has no copy.
    let b = st.copies.iter().find(|c| c.node != w.node);
    anyhow::ensure!(
        b.is_some_and(|c| c
            .message
            .as_deref()
            .is_some_and(|m| m.contains("not built yet"))),
        "host B's copy: {b:?}"
    );
    anyhow::ensure!(
        !b_images.join(format!("managed/{uid}")).exists(),
        "host B holds a file of the capture"
    );
    check_sealed(&file, "the captured image")?;

    // Two clones of the new image boot; each disk reads the sealed image.
    let clone = json!({ "disk": { "imageRef": { "name": "lab-template" } } });
    for name in ["clone-1", "clone-2"] {
        guest_in_phase(w, name, clone.clone(), Phase::Running).await?;
    }
    for name in ["clone-1", "clone-2"] {
        let domain = domain_of(&w.desktops(), &ns, name).await?;
        let disk = w.disk_dir.join(format!("{domain}.qcow2"));
        check_sealed(&disk, name)?;
    }
    eprintln!(
        "[images] two clones of the captured image Running: {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What sealing leaves in `image` (its chain read through): an empty machine ID, no SSH host
/// key (nor its bytes anywhere), no lease; the student's notes and the template's own write.
fn check_sealed(image: &std::path::Path, what: &str) -> anyhow::Result<()> {
    let id = file_in_image(image, "/etc/machine-id")?;
    anyhow::ensure!(id.as_deref() == Some(""), "{what}: machine-id {id:?}");
    for gone in [
        "/etc/ssh/ssh_host_ed25519_key",
        "/etc/ssh/ssh_host_ed25519_key.pub",
        "/var/lib/dhcp/dhclient.eth0.leases",
    ] {
        anyhow::ensure!(
            file_in_image(image, gone)?.is_none(),
            "{what}: {gone} is still there"
        );
    }
    let notes = file_in_image(image, "/home/student/notes.txt")?;
    anyhow::ensure!(
        notes.as_deref() == Some("lab 3 setup done\n"),
        "{what}: notes {notes:?}"
    );
    let bytes = disk_bytes(image)?;
    anyhow::ensure!(
        !bytes
            .windows(KEY_MARKER.len())
            .any(|w| w == KEY_MARKER.as_bytes()),
        "{what}: the template's SSH key can be read back from the disk"
    );
    let written = bytes.get(40 << 20..41 << 20).unwrap_or_default();
    anyhow::ensure!(
        written.len() == 1 << 20 && written.iter().all(|b| *b == b'A'),
        "{what}: the template's own write is not in the image"
    );
    Ok(())
}
