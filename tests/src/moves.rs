//! What the migration tests read back: a migration's `Ready` reason, its end, and the bytes a
//! disk holds (read with `qemu-io`, shared, so a running domain may hold the disk).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use deskvirt_crds::DesktopMigration;
use deskvirt_crds::conditions::find;
use deskvirt_crds::constants::condition;
use kube::Api;

use crate::host::eventually;

/// The reason and message of migration `m`'s `Ready` condition.
pub fn ready_reason(m: &DesktopMigration) -> (String, String) {
    m.status
        .as_ref()
        .and_then(|st| find(&st.conditions, condition::READY))
        .map(|c| (c.reason.clone(), c.message.clone()))
        .unwrap_or_default()
}

/// Waits (up to 4 minutes) until migration `name` ended; returns it.
pub async fn ended(
    migrations: &Api<DesktopMigration>,
    name: &str,
) -> anyhow::Result<DesktopMigration> {
    eventually(
        Duration::from_secs(240),
        &format!("{name} ended"),
        || async {
            let m = migrations.get(name).await?;
            Ok(m.phase().is_terminal().then_some(m))
        },
    )
    .await
}

/// Whether `disk` holds `mib` MiB of byte `byte` from `seek_mib` MiB on.
pub fn holds(disk: &Path, seek_mib: u64, mib: u64, byte: u8) -> anyhow::Result<bool> {
    let out = Command::new("qemu-io")
        .args(["-r", "-U", "-f", "qcow2", "-c"])
        .arg(format!("read -P {byte:#x} {seek_mib}M {mib}M"))
        .arg(disk)
        .output()
        .context("cannot run qemu-io")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(out.status.success() && !text.contains("verification failed"))
}

/// Waits (up to 2 minutes) until the guest of `domain` on this machine is up, has it write
/// 2 MiB of 0x55 at 24 MiB into its disk `disk`, and checks the bytes are in the disk.
pub async fn guest_wrote_into(domain: &str, disk: &Path) -> anyhow::Result<()> {
    let serial = std::path::PathBuf::from(format!("/var/log/libvirt/qemu/{domain}-serial.log"));
    eventually(Duration::from_secs(120), "the guest up", || async {
        Ok(std::fs::read_to_string(&serial)
            .unwrap_or_default()
            .contains("DESKVIRT-GUEST-READY")
            .then_some(()))
    })
    .await?;
    crate::world::guest_command(domain, "deskvirt-write 2 24 125").await?;
    eventually(Duration::from_secs(60), "the guest's write", || async {
        Ok((!crate::world::guest_writes(&serial)?.is_empty()).then_some(()))
    })
    .await?;
    anyhow::ensure!(
        holds(disk, 24, 2, 0x55)?,
        "the write is not in {}",
        disk.display()
    );
    Ok(())
}

/// Fails unless migration `m` of desktop `desktop` Succeeded, saying why and where the desktop
/// is otherwise.
pub async fn ensure_succeeded(
    m: &DesktopMigration,
    desktops: &Api<deskvirt_crds::Desktop>,
    desktop: &str,
) -> anyhow::Result<()> {
    if m.phase() == deskvirt_crds::migration::MigrationPhase::Succeeded {
        return Ok(());
    }
    let (reason, message) = ready_reason(m);
    anyhow::bail!(
        "{} ended {:?}: {reason}: {message}; desktop: {:#?}",
        kube::ResourceExt::name_any(m),
        m.phase(),
        desktops.get(desktop).await?.status
    )
}
