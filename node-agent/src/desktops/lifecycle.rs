//! Carries out the power step [`power::decide`](super::power::decide) chose, on the host: starts
//! (a restore first gets the current definition written into the saved memory image, or the
//! image is discarded when it cannot take it), powers off with a grace, saves memory for the
//! idle policy; and says what `Running` is afterwards and when to look again.

use std::time::Duration;

use deskvirt_crds::Desktop;
use deskvirt_crds::conditions::Status;
use kube::runtime::events::EventType;
use tokio::time::Instant;

use super::context::DesktopContext;
use super::power::{self, Step};
use super::reason::Reason;
use super::status::Cond;
use super::{BUSY_RESYNC, Error, STEADY_RESYNC};
use crate::hypervisor::{DomainState, DomainStatus, Hypervisor, HypervisorError, PauseCause};

/// How long to wait before looking again at a desktop that needs an admin.
pub(super) const ADMIN_RESYNC: Duration = Duration::from_secs(60);

/// When to look again at a desktop waiting on something: soon when it may resolve by itself
/// (`transient`), at an admin's pace otherwise.
pub(super) fn resync(transient: bool) -> Duration {
    if transient { BUSY_RESYNC } else { ADMIN_RESYNC }
}

/// What the power step did.
#[derive(Debug)]
pub(super) struct Done {
    /// `Running` after it.
    pub running: Cond,
    /// When to look again.
    pub requeue: Duration,
    /// The domain was started (booted or restored) now.
    pub started: bool,
}

impl Done {
    fn steady(running: Cond) -> Self {
        Self {
            running,
            requeue: STEADY_RESYNC,
            started: false,
        }
    }
}

/// `Running` for an active domain (`None`: its status is not known).
pub(super) fn running_cond(current: Option<DomainStatus>) -> Cond {
    match current.and_then(|s| s.paused.filter(|_| s.state == DomainState::Paused)) {
        Some(PauseCause::IoError) => Cond::new(
            Status::False,
            Reason::Paused,
            "paused by libvirt after an I/O error (a full disk, say); the agent resumes it every \
             30 s while it should run, and it runs on once the cause is gone",
        ),
        Some(PauseCause::PostCopyFailed) => Cond::new(
            Status::False,
            Reason::Paused,
            "paused after a post-copy migration broke: its memory is split between two hosts; an \
             admin recovers it (virsh migrate --postcopy-resume) or destroys it",
        ),
        Some(PauseCause::Other) => Cond::new(
            Status::False,
            Reason::Paused,
            "the domain is paused (by virsh suspend, say); it is left so",
        ),
        None => Cond::new(Status::True, Reason::Running, "the domain runs"),
    }
}

/// Carries out `step` on `domain` of `d` (UID `uid`), whose state was `state` when it was decided.
pub(super) async fn execute<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    d: &Desktop,
    uid: &str,
    domain: &str,
    current: Option<DomainStatus>,
    step: Step,
) -> Result<Done, Error> {
    if !matches!(step, Step::PowerOff { .. }) {
        ctx.clear_shutdown(uid);
    }
    let done = match step {
        Step::KeepRunning => Done::steady(running_cond(current)),
        Step::Resume => {
            ctx.record_resume(uid);
            ctx.hypervisor.resume_domain(domain).await?;
            tracing::info!(
                domain,
                "resumed a domain libvirt had paused on an I/O error"
            );
            Done {
                running: Cond::new(
                    Status::True,
                    Reason::Running,
                    "the domain runs (resumed after libvirt had paused it on an I/O error)",
                ),
                requeue: BUSY_RESYNC,
                started: false,
            }
        }
        Step::Start { restore } => start(ctx, d, domain, restore).await?,
        Step::StayOff => Done::steady(Cond::new(
            Status::False,
            Reason::Shutdown,
            "the guest shut itself down; set spec.power to Off and back to On to start it again",
        )),
        Step::PowerOff { idle } => {
            power_off(ctx, d, uid, domain, idle).await?;
            let running = if idle {
                power::reclaiming(false)
            } else {
                Cond::new(
                    Status::False,
                    Reason::Stopping,
                    "shutting the guest down (spec.power is Off)",
                )
            };
            Done {
                running,
                requeue: BUSY_RESYNC,
                started: false,
            }
        }
        Step::Stopped { saved } => Done::steady(power::stopped(saved)),
        Step::AnnounceSave => Done {
            running: power::reclaiming(true),
            requeue: BUSY_RESYNC,
            started: false,
        },
        Step::Save => save(ctx, domain).await?,
        Step::Suspended { saved } => Done::steady(power::suspended(saved)),
        Step::IdleShutdown => Done::steady(power::idle_shutdown()),
    };
    Ok(done)
}

/// Starts the domain; a restore first carries the definition into the saved memory image. A
/// start that fails keeps the image (the cause may well be elsewhere, such as a SPICE port
/// taken by another process): it is retried, or reported as `StartFailed` when refused, or as
/// `SpicePortBusy` when QEMU could not listen on the desktop's SPICE port.
async fn start<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    d: &Desktop,
    domain: &str,
    restore: bool,
) -> Result<Done, Error> {
    // A template whose disk is being captured into a DesktopImage waits; the lock is held
    // until the start is done, so no capture begins under it.
    let lock = ctx
        .images
        .disk_locks()
        .lock(d.metadata.uid.as_deref().unwrap_or_default());
    let Ok(_free) = lock.try_lock() else {
        return Ok(Done {
            running: Cond::new(
                Status::False,
                Reason::Capturing,
                "its disk is being captured into a DesktopImage; it starts once that ends",
            ),
            requeue: BUSY_RESYNC,
            started: false,
        });
    };
    let restore = restore && prepare_restore(ctx, d, domain).await?;
    let began = Instant::now();
    match ctx.hypervisor.start_domain(domain).await {
        Ok(_) => {
            let took = began.elapsed();
            let message = if restore {
                tracing::info!(domain, took = ?took, "domain restored from its saved memory");
                "the domain runs, restored from the memory saved when it was suspended"
            } else {
                tracing::info!(domain, took = ?took, "domain started");
                "the domain runs"
            };
            Ok(Done {
                running: Cond::new(Status::True, Reason::Running, message),
                requeue: STEADY_RESYNC,
                started: true,
            })
        }
        // Another process on the host listens on the desktop's SPICE port: retrying cannot
        // help; the operator gives the desktop another port, and its change brings a pass.
        Err(e)
            if deskvirt_core::spice::port_taken(&e.to_string())
                && let Some(port) = d.status.as_ref().and_then(|s| s.spice.as_ref()?.port) =>
        {
            ctx.metrics.start_failures.inc();
            tracing::warn!(domain, port, error = %e, "the SPICE port is taken on this host");
            Ok(Done {
                running: Cond::new(
                    Status::False,
                    Reason::SpicePortBusy,
                    deskvirt_core::spice::busy_message(port, &e.to_string()),
                ),
                requeue: ADMIN_RESYNC,
                started: false,
            })
        }
        Err(e) if e.is_transient() => Err(e.into()),
        Err(e) => {
            ctx.metrics.start_failures.inc();
            Ok(Done {
                running: Cond::new(Status::False, Reason::StartFailed, e.to_string()),
                requeue: ADMIN_RESYNC,
                started: false,
            })
        }
    }
}

/// Writes the domain's definition (SPICE port and password included) into its managed save
/// image, so the restore matches what the Desktop's status says. Only libvirt's positive
/// refusal (the guest ABI changed, the disks differ) discards the image, and the desktop boots
/// from its disk; `Ok(false)` then. Any other failure, an image that cannot be read now among
/// them, keeps the saved memory: the pass fails transiently (retried with backoff, shown on the
/// Desktop once it keeps failing), naming the way out if the image can never be read.
async fn prepare_restore<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    d: &Desktop,
    domain: &str,
) -> Result<bool, Error> {
    let image = ctx.config.managed_save_image(domain);
    match ctx.hypervisor.sync_managed_save(domain, &image).await {
        Ok(_) => Ok(true),
        Err(e @ HypervisorError::Rejected { .. }) => {
            discard_saved_memory(ctx, d, domain, &e.to_string()).await?;
            Ok(false)
        }
        Err(HypervisorError::Failed {
            op,
            target,
            message,
        }) => Err(HypervisorError::Failed {
            op,
            target,
            message: format!(
                "{message}; the memory saved at suspend ({}) is kept and the desktop waits \
                     for it. If it can never be read, `virsh managedsave-remove {domain}` on \
                     host {} lets the desktop boot from its disk, losing what was only in memory",
                image.display(),
                ctx.config.node_name
            ),
        }
        .into()),
        Err(e) => Err(e.into()),
    }
}

/// Deletes the domain's saved memory image because it cannot be restored (`why`), with a
/// Warning Event: the desktop boots from its disk and its unsaved work is lost.
pub(super) async fn discard_saved_memory<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    d: &Desktop,
    domain: &str,
    why: &str,
) -> Result<(), Error> {
    ctx.hypervisor.remove_managed_save(domain).await?;
    ctx.metrics.saved_memory_discarded.inc();
    tracing::warn!(
        domain,
        reason = why,
        "saved memory discarded; the desktop boots from its disk"
    );
    ctx.event(
        d,
        EventType::Warning,
        "SavedMemoryDiscarded",
        "Start",
        format!(
            "the memory saved when the desktop was suspended cannot be restored ({why}); it boots from its disk, and what was only in memory is lost"
        ),
    )
    .await;
    Ok(())
}

/// ACPI shutdown, then a hard power-off once the grace has passed.
async fn power_off<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    d: &Desktop,
    uid: &str,
    domain: &str,
    idle: bool,
) -> Result<(), Error> {
    let asked = ctx.shutdown_asked_at(uid);
    let grace = ctx.config.shutdown_grace;
    if Instant::now().duration_since(asked) <= grace {
        ctx.hypervisor.shutdown_domain(domain).await?;
        return Ok(());
    }
    ctx.hypervisor.destroy_domain(domain).await?;
    let why = if idle {
        "for the idle policy"
    } else {
        "(spec.power is Off)"
    };
    ctx.event(
        d,
        EventType::Warning,
        "PoweredOff",
        "Stop",
        format!(
            "the guest did not shut down within {}s {why}; powered off",
            grace.as_secs()
        ),
    )
    .await;
    Ok(())
}

/// Saves the running domain's memory with libvirt's managed save (the domain ends off).
async fn save<H: Hypervisor>(ctx: &DesktopContext<H>, domain: &str) -> Result<Done, Error> {
    let began = Instant::now();
    match ctx.hypervisor.managed_save(domain).await {
        Ok(_) => {
            tracing::info!(domain, took = ?began.elapsed(), "domain memory saved for the idle policy");
            Ok(Done::steady(power::suspended(true)))
        }
        Err(e) if e.is_transient() => Err(e.into()),
        Err(e) => Ok(Done {
            running: power::suspend_failed(&e.to_string()),
            requeue: ADMIN_RESYNC,
            started: false,
        }),
    }
}
