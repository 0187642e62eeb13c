//! Decides how the source host moves a desktop cold (a `Cold` migration): it reports Started,
//! shuts the guest down (ACPI, then a hard power-off after the shutdown grace), then
//! - on shared storage, undefines it here, keeping the disk;
//! - without, starts it paused (no guest code runs) and moves it to the target with the disk's
//!   own layer copied into the empty disk the target made (libvirt's incremental storage copy:
//!   the base image is the target's own), then deletes the disk here;
//! - into another pool (shared storage or not), does the same with a carrier holding the disk
//!   in place of the domain ([`super::carrier`]), into the target pool's disk directory;
//!
//! then shows the desktop as moved (`DomainDefined` Unknown and `Running` False, reason
//! `MovedCold`: the phase is Scheduled, never Running, until the target boots it) and reports
//! Completed. The operator then binds the desktop to the target, whose agent boots it. A move
//! cancelled while the guest shuts down, or a copy that fails, boots it here again and is
//! reported Failed.

use std::time::Duration;

use deskvirt_core::migration::MigrationState;
use deskvirt_crds::conditions::Status;
use deskvirt_crds::{Desktop, Migrating};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};

use super::Error;
use super::context::DesktopContext;
use super::inputs::Inputs;
use super::migrate::{completed, fail, marked_cancelled, report_of, write};
use super::reason::Reason;
use super::status::{self, Cond, Report};
use crate::hypervisor::{DomainState, Hypervisor, HypervisorError, Migrated};
use deskvirt_crds::desktop::Power;

/// How often a cold move looks whether the guest has shut down.
const POLL: Duration = Duration::from_millis(250);

/// Moves domain `name` of `d` cold to the target of `m`; `report` (the pass's) gets the
/// conditions written. A failure to stop it leaves what is left of the domain here, reports
/// Failed, and the desktop runs here again.
pub(super) async fn move_out<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    d: &Desktop,
    inputs: &Inputs,
    name: &str,
    m: &Migrating,
    report: &mut Report,
) -> Result<(), Error> {
    let me = ctx.config.node_name.as_str();
    // Without shared storage, or into another pool, the disk is copied (into another pool by a
    // carrier, whose XML here is kept): checked before the guest is stopped.
    let copy = match super::carrier::other_pool(d, m) {
        Some(pool) => match super::carrier::outbound(ctx, d, inputs, name, m, pool).await {
            Ok((out, here)) => Some((out, Some(here))),
            Err(why) => return fail(ctx, d, m, why).await,
        },
        None if inputs.pool.spec.storage.shared => None,
        None => match super::incoming::outbound_copy(ctx, d, inputs, m).await {
            Ok(out) => Some((out, None)),
            Err(why) => return fail(ctx, d, m, why).await,
        },
    };
    write(ctx, d, &report_of(me, m, MigrationState::Started, None)).await?;
    tracing::info!(domain = name, target = %m.target, "moving the domain cold: shutting it down here");
    ctx.event(
        d,
        EventType::Normal,
        "MigrationStarted",
        "Migrate",
        format!("shutting down to boot on host {}", m.target),
    )
    .await;
    let started = std::time::Instant::now();
    match stop(ctx, d, name, &m.uid, copy.is_none()).await {
        Ok(Stopped::ForTheMove) => {
            let bytes = match &copy {
                None => 0,
                Some((out, carrier)) => match super::incoming::copy_out(
                    ctx,
                    d,
                    inputs,
                    name,
                    m,
                    out,
                    carrier.as_deref(),
                )
                .await?
                {
                    Ok(bytes) => bytes,
                    Err(why) => {
                        tracing::warn!(domain = name, target = %m.target, %why, "the copy failed; the desktop runs here again");
                        back_here(ctx, d, name).await;
                        return fail(ctx, d, m, why).await;
                    }
                },
            };
            let took = started.elapsed();
            tracing::info!(domain = name, target = %m.target, ms = took.as_millis() as u64, bytes, "domain stopped and gone from here; it boots on the target");
            show_moved(ctx, d, m, report).await?;
            let moved = Migrated {
                total: took,
                downtime: took,
                bytes,
            };
            write(ctx, d, &completed(me, m, &moved)).await
        }
        Ok(Stopped::Cancelled) => {
            tracing::info!(
                domain = name,
                "the cold move was cancelled while the guest shut down; it booted here again"
            );
            let why = "cancelled while the guest shut down to move; it booted here again";
            fail(ctx, d, m, why.to_string()).await
        }
        Err(e @ HypervisorError::Timeout { .. }) => Err(e.into()),
        Err(e) => {
            tracing::warn!(domain = name, error = %e, "the cold move failed; the desktop runs here again");
            fail(
                ctx,
                d,
                m,
                format!("the guest could not be stopped to move it: {e}"),
            )
            .await
        }
    }
}

/// Shows `d` as shut down here for its move to the target of `m`, before the move is
/// reported Completed (so the target's own report, written after it boots the domain, comes
/// last). `report` (the pass's) gets the same conditions, so that the pass's own status write,
/// made from the status it read before the move, cannot undo them.
pub(super) async fn show_moved<H>(
    ctx: &DesktopContext<H>,
    d: &Desktop,
    m: &Migrating,
    report: &mut Report,
) -> Result<(), Error> {
    let why = format!("shut down here by a cold move; host {} boots it", m.target);
    report.defined = Some(Cond::new(Status::Unknown, Reason::MovedCold, why.clone()));
    report.running = Some(Cond::new(Status::False, Reason::MovedCold, why));
    let current = d.status.clone().unwrap_or_default();
    let now = super::apply::now();
    let Some(body) = status::body(&current, report, d.metadata.generation, now) else {
        return Ok(());
    };
    let ns = d
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<Desktop> = Api::namespaced(ctx.client.clone(), &ns);
    super::patch::apply_status(&api, &d.name_any(), body).await
}

/// After a Cold move that did not happen: the domain `name` of `d`, left paused (started so
/// for the copy, its guest never run, or a carrier in its place, which goes and leaves the
/// stopped domain's definition), is powered off, and booted again when the desktop should run
/// (`power: On`, no idle hold). Failures are logged: the next pass converges.
pub(super) async fn back_here<H: Hypervisor>(ctx: &DesktopContext<H>, d: &Desktop, name: &str) {
    let hv = &ctx.hypervisor;
    let state = match hv.domain_status(name).await {
        Ok(s) => s.state,
        Err(e) => {
            tracing::warn!(domain = name, error = %e, "cannot read the domain a Cold move left here");
            return;
        }
    };
    if state == DomainState::Paused
        && let Err(e) = hv.destroy_domain(name).await
    {
        tracing::warn!(domain = name, error = %e, "cannot power off the domain paused for a copy");
        return;
    }
    let held = d.status.as_ref().is_some_and(|s| s.reclaimed.is_some());
    if d.spec.power == Power::On
        && !held
        && !(state.is_active() && state != DomainState::Paused)
        && let Err(e) = hv.start_domain(name).await
    {
        tracing::warn!(domain = name, error = %e, "cannot boot the desktop again after its Cold move failed");
    }
}

/// How a cold move's shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopped {
    /// Shut down and undefined here: the target boots it.
    ForTheMove,
    /// The migration was cancelled while the guest shut down: it was started here again.
    Cancelled,
}

/// Shuts domain `name` down (ACPI, then a hard power-off after the shutdown grace) and, with
/// `undefine`, undefines it; its disk is left alone. A cancel of migration `uid` seen by then
/// (the guest cannot be told to stop shutting down) starts it here again instead.
async fn stop<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    d: &Desktop,
    name: &str,
    uid: &str,
    undefine: bool,
) -> Result<Stopped, HypervisorError> {
    // A stopped desktop (moved with its disk copied) is off already.
    if !ctx.hypervisor.domain_status(name).await?.state.is_active() {
        return Ok(Stopped::ForTheMove);
    }
    ctx.hypervisor.shutdown_domain(name).await?;
    let deadline = tokio::time::Instant::now() + ctx.config.shutdown_grace;
    while ctx.hypervisor.domain_status(name).await?.state.is_active() {
        if tokio::time::Instant::now() >= deadline {
            tracing::info!(
                domain = name,
                "the guest did not shut down within the grace; powering it off"
            );
            ctx.hypervisor.destroy_domain(name).await?;
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    if marked_cancelled(ctx, d, uid) {
        ctx.hypervisor.start_domain(name).await?;
        return Ok(Stopped::Cancelled);
    }
    if undefine {
        ctx.hypervisor.undefine_domain(name).await?;
    }
    Ok(Stopped::ForTheMove)
}
