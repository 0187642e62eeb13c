//! Decides what the source host does with a migration the operator recorded on a Desktop
//! bound here (`status.migration`): it acts only when the console mirror, which tenants cannot
//! write, carries the same stamp (`deskvirt.io/migration`); it reports Started, moves the
//! domain (Live: with [`Hypervisor::migrate_out`]; Cold: [`super::cold`]), then reports
//! Completed (with the figures) or Failed, under its own field manager. Meanwhile, and after a
//! completed move until the operator binds the desktop to the target, this host neither
//! defines nor starts the domain again. After an agent restart the report and the host say
//! where the move got to.

use std::time::Duration;

use deskvirt_core::migration::{MigrationMode, MigrationState};
use deskvirt_crds::constants::{
    ANNOTATION_MIGRATION, MANAGER_AGENT_MIGRATION, console_mirror_name,
};
use deskvirt_crds::desktop::DesktopStatus;
use deskvirt_crds::{Desktop, Migrating, MigrationReport};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::Error;
use super::context::DesktopContext;
use super::inputs::Inputs;
use crate::domain::{ANY_PORT, HostContext, graphics_xml};
use crate::hypervisor::{Hypervisor, Migrated, MoveLimits, Outbound};

/// How often a desktop whose domain is moving, or moved, is looked at again.
pub const MIGRATION_RESYNC: Duration = Duration::from_secs(2);

/// Where the domain is, as this host sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    Absent,
    Running,
    /// Defined, not running.
    Stopped,
    /// Defined, not running, its memory in a managed save image (suspended by the idle
    /// policy): it moves by being restored here, then moved live, then saved at the target.
    Saved,
}

impl Domain {
    /// The domain as libvirt shows it: `None` when it is not defined, else its state and
    /// whether a managed save image holds its memory.
    pub fn of(seen: Option<(crate::hypervisor::DomainState, bool)>) -> Self {
        match seen {
            None => Self::Absent,
            Some((state, _)) if state.is_active() => Self::Running,
            Some((_, true)) => Self::Saved,
            Some(_) => Self::Stopped,
        }
    }
}

/// What a pass knows of the desktop's migration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Facts<'a> {
    /// The live migration recorded on the Desktop, when the mirror confirms it and its target
    /// is another host.
    pub record: Option<&'a Migrating>,
    /// The last report of a migration: its UID and state, when this host wrote it.
    pub reported: Option<(&'a str, MigrationState)>,
    /// The operator moved the desktop here since that report (`status.lastMove` is later).
    pub moved_since: bool,
    pub domain: Domain,
    /// A job runs on the domain.
    pub job: bool,
    /// The move was reported Started longer ago than the pool's completion timeout (and a
    /// grace): the process that ran it would have ended it by now (a restarted agent finds it).
    pub overdue: bool,
}

/// What the pass does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing about a migration: converge as always.
    Converge,
    /// Report Started, then move the domain.
    Start,
    /// Leave the domain alone (moving, or moved and not yet bound to the target); look again.
    Hold(&'static str),
    /// Report the move Completed (it ended while the agent was away).
    Completed,
    /// Report the move Failed, for this reason; the domain runs here as before.
    Failed(&'static str),
    /// Abort the move under way (it was cancelled while a restarted agent found it moving);
    /// the next pass reports how it ended.
    Abort,
}

/// Decides the pass.
pub fn decide(f: &Facts<'_>) -> Step {
    // Moved to the target, and the binding has not followed yet: never again here.
    if f.domain == Domain::Absent
        && !f.moved_since
        && f.reported
            .is_some_and(|(_, s)| s == MigrationState::Completed)
    {
        return Step::Hold("the domain runs on the migration's target; waiting for the binding");
    }
    let Some(record) = f.record else {
        return Step::Converge;
    };
    let mine = f
        .reported
        .filter(|(uid, _)| *uid == record.uid)
        .map(|(_, s)| s);
    match (mine, f.domain) {
        (None, Domain::Running | Domain::Saved) => Step::Start,
        // A Cold move takes a stopped domain too (the operator admits one only when the disk is
        // copied: on shared storage a stopped desktop is re-bound instead).
        (None, Domain::Stopped) if record.mode == MigrationMode::Cold => Step::Start,
        (None, _) => Step::Failed(
            "the desktop's domain neither runs on this host nor has its memory saved here",
        ),
        (Some(MigrationState::Started), _) if f.job && (record.cancelled || f.overdue) => {
            Step::Abort
        }
        (Some(MigrationState::Started), _) if f.job => Step::Hold("the domain is moving"),
        (Some(MigrationState::Started), Domain::Absent) => Step::Completed,
        (Some(MigrationState::Started), _) => Step::Failed(
            "the move stopped before it ended (the node-agent restarted); the desktop runs \
             on this host as before",
        ),
        (Some(MigrationState::Completed), Domain::Absent) => {
            Step::Hold("the domain runs on the migration's target; waiting for the binding")
        }
        (Some(MigrationState::Completed), _) => Step::Converge,
        (Some(MigrationState::Failed), _) => Step::Converge,
    }
}

/// The live migration on `status`, when the console mirror of `uid` carries its stamp and its
/// target is another host.
pub fn confirmed<'a, H>(
    ctx: &DesktopContext<H>,
    status: &'a DesktopStatus,
    uid: &str,
) -> Option<&'a Migrating> {
    let m = status.migration.as_ref()?;
    if m.target == ctx.config.node_name {
        return None;
    }
    let mirror = ctx
        .mirrors
        .get(&ObjectRef::new(&console_mirror_name(uid)).within(&ctx.config.console_namespace))?;
    let stamped = mirror.annotations().get(ANNOTATION_MIGRATION) == Some(&m.stamp());
    if !stamped {
        tracing::warn!(target = %m.target, "a migration record the operator's mirror does not confirm is ignored");
    }
    stamped.then_some(m)
}

/// `status` with the migration report this process wrote last, when the cached copy does not
/// show it yet.
fn latest<'a, H>(
    ctx: &DesktopContext<H>,
    status: &'a DesktopStatus,
    uid: &str,
) -> std::borrow::Cow<'a, DesktopStatus> {
    match ctx.last_move(uid) {
        Some(r) if newer(&r, status.migration_report.as_ref()) => {
            std::borrow::Cow::Owned(DesktopStatus {
                migration_report: Some(r),
                ..status.clone()
            })
        }
        _ => std::borrow::Cow::Borrowed(status),
    }
}

/// Whether `written` (by this process) is later than the report `cached`.
fn newer(written: &MigrationReport, cached: Option<&MigrationReport>) -> bool {
    let rank = |s: MigrationState| match s {
        MigrationState::Started => 0,
        MigrationState::Completed | MigrationState::Failed => 1,
    };
    match cached {
        None => true,
        Some(c) if c.uid != written.uid => written.at.0 > c.at.0,
        Some(c) => rank(written.state) > rank(c.state),
    }
}

/// This host's last report of a migration of the desktop, and whether the operator moved the
/// desktop here since (`status.lastMove` to this host, later than the report).
fn own_report<'a, H>(
    ctx: &DesktopContext<H>,
    status: &'a DesktopStatus,
) -> (Option<&'a MigrationReport>, bool) {
    let me = ctx.config.node_name.as_str();
    let report = status.migration_report.as_ref().filter(|r| r.source == me);
    let moved_since = match (report, status.last_move.as_ref()) {
        (Some(r), Some(m)) => m.to == me && m.at.0 > r.at.0,
        _ => false,
    };
    (report, moved_since)
}

/// Whether this host moved the desktop's domain away live and the binding has not followed
/// (so the domain, and its disk, are the target's).
pub fn moved_away<H>(ctx: &DesktopContext<H>, status: &DesktopStatus, uid: &str) -> bool {
    let status = latest(ctx, status, uid);
    let (report, moved_since) = own_report(ctx, &status);
    !moved_since && report.is_some_and(|r| r.state == MigrationState::Completed)
}

/// Runs the migration part of a pass over a desktop bound here, after its inputs were read
/// and its domain observed: `Some(requeue)` when the pass ends here, `None` to converge.
/// `out`, the pass's status report, gets the conditions a step wrote itself (a cold move's).
pub(super) async fn drive<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    d: &Desktop,
    status: &DesktopStatus,
    uid: &str,
    inputs: &Inputs,
    domain: Domain,
    out: &mut super::status::Report,
) -> Result<Option<Duration>, Error> {
    if status.migration.is_none() && status.migration_report.is_none() {
        return Ok(None);
    }
    let name = inputs.domain.domain_name();
    let status = &*latest(ctx, status, uid);
    let record = confirmed(ctx, status, uid);
    let (report, moved_since) = own_report(ctx, status);
    let job = match (record, domain) {
        (Some(_), Domain::Running) => ctx.hypervisor.job_running(&name).await?,
        _ => false,
    };
    // The disk is copied without shared storage, and into another pool.
    let copies = !inputs.pool.spec.storage.shared
        || record.is_some_and(|m| super::carrier::other_pool(d, m).is_some());
    let facts = Facts {
        record,
        reported: report.map(|r| (r.uid.as_str(), r.state)),
        moved_since,
        domain,
        job,
        overdue: report.is_some_and(|r| {
            let timeout = limits(&inputs.pool.spec.migration).completion_timeout;
            let timeout = if copies {
                timeout.max(super::incoming::COPY_TIMEOUT)
            } else {
                timeout
            };
            overdue(r, timeout)
        }),
    };
    let step = decide(&facts);
    match (step, record) {
        (Step::Converge, _) => Ok(None),
        (Step::Hold(why), _) => {
            tracing::debug!(domain = %name, why, "held for a migration");
            Ok(Some(MIGRATION_RESYNC))
        }
        (Step::Start, Some(m))
            if super::carrier::other_pool(d, m).is_some() && !cold_stopped(m, domain) =>
        {
            let why = "a move into another pool is Cold only, and takes no saved memory (the \
                       desktop's MAC changes there, and the saved guest holds it)";
            fail(ctx, d, m, why.to_string()).await?;
            Ok(None)
        }
        (Step::Start, Some(m)) if m.mode == MigrationMode::Cold => {
            if domain == Domain::Saved {
                // Copying the disk, the saved memory goes along: restored, moved, saved there.
                if !inputs.pool.spec.storage.shared {
                    move_out(ctx, d, inputs, &name, m, true).await?;
                    return Ok(Some(MIGRATION_RESYNC));
                }
                let why = "on shared storage a suspended desktop moves Live only: a Cold move \
                           would lose its saved memory";
                fail(ctx, d, m, why.to_string()).await?;
                return Ok(None);
            }
            super::cold::move_out(ctx, d, inputs, &name, m, out).await?;
            Ok(Some(MIGRATION_RESYNC))
        }
        (Step::Start, Some(m)) => {
            move_out(ctx, d, inputs, &name, m, domain == Domain::Saved).await?;
            Ok(Some(MIGRATION_RESYNC))
        }
        (Step::Completed, Some(m)) => {
            if m.mode == MigrationMode::Cold {
                super::cold::show_moved(ctx, d, m, out).await?;
            }
            if copies {
                super::incoming::remove_left_disk(ctx, inputs, d).await;
            }
            let why = Some("moved while the node-agent was away".into());
            let r = report_of(&ctx.config.node_name, m, MigrationState::Completed, why);
            write(ctx, d, &r).await?;
            Ok(Some(MIGRATION_RESYNC))
        }
        (Step::Failed(why), Some(m)) => {
            // A Cold move stopped the guest (and may have started it paused to copy it): it
            // runs here again as it did.
            if m.mode == MigrationMode::Cold {
                super::cold::back_here(ctx, d, &name).await;
            }
            fail(ctx, d, m, why.to_string()).await?;
            Ok(None)
        }
        (Step::Abort, _) => {
            tracing::info!(domain = %name, overdue = facts.overdue, "a move found under way after a restart was cancelled or outlived the pool's completion timeout; aborting it");
            if let Err(e) = ctx.hypervisor.abort_migration(&name).await {
                tracing::warn!(domain = %name, error = %e, "could not abort the move");
            }
            Ok(Some(MIGRATION_RESYNC))
        }
        // Each step but Converge and Hold comes with a record.
        (_, None) => Ok(None),
    }
}

/// Whether `m` moves the domain cold and its memory is not saved (a move into another pool
/// takes only such).
fn cold_stopped(m: &Migrating, domain: Domain) -> bool {
    m.mode == MigrationMode::Cold && domain != Domain::Saved
}

/// The migration part of a pass over a desktop the idle policy holds (`status.reclaimed`):
/// the same as [`drive`] for domain `name` (as [`super::place`] found it), its inputs read
/// with the SPICE port the record reserved on the target, since a suspended desktop holds no
/// port on its host. `None` to go on holding it.
pub(super) async fn drive_held<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    d: &Desktop,
    status: &DesktopStatus,
    uid: &str,
    name: &str,
    domain: Domain,
    out: &mut super::status::Report,
) -> Result<Option<Duration>, Error> {
    if status.migration.is_none() && status.migration_report.is_none() {
        return Ok(None);
    }
    let port = status
        .migration
        .as_ref()
        .map(|m| m.port)
        .or_else(|| status.spice.as_ref().and_then(|s| s.port))
        .unwrap_or(ANY_PORT);
    let mut with_port = status.clone();
    with_port.spice.get_or_insert_default().port = Some(port);
    // What reading the inputs would report (a SPICE host) is not the held desktop's to say.
    let mut scratch = super::status::Report::keeping(status);
    let mut inputs = match super::inputs::gather(ctx, d, &with_port, uid, &mut scratch) {
        Ok(inputs) => inputs,
        Err(super::apply::Stop::Fail(e)) => return Err(e),
        Err(super::apply::Stop::Wait(why, _)) => {
            tracing::debug!(domain = name, why = %why.message, "a held desktop's migration waits for its inputs");
            return Ok(None);
        }
    };
    inputs.domain = inputs.domain.under_name(name, &inputs.host);
    drive(ctx, d, status, uid, &inputs, domain, out).await
}

/// Reports Started, moves the domain, reports how it went.
async fn move_out<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    d: &Desktop,
    inputs: &Inputs,
    name: &str,
    m: &Migrating,
    saved: bool,
) -> Result<(), Error> {
    // Without shared storage (a suspended desktop's Cold move) the disk is copied along.
    let copy = !inputs.pool.spec.storage.shared;
    let out = if copy {
        super::incoming::outbound_copy(ctx, d, inputs, m).await
    } else {
        outbound(ctx, inputs, m)
    };
    let out = match out {
        Ok(out) => out,
        Err(why) => return fail(ctx, d, m, why).await,
    };
    let me = ctx.config.node_name.as_str();
    write(ctx, d, &report_of(me, m, MigrationState::Started, None)).await?;
    if saved && let Err(e) = restore_to_move(ctx, inputs, name).await {
        tracing::warn!(domain = name, error = %e, "cannot restore the saved memory to move it; it stays saved here");
        let why = format!("the memory saved on this host could not be restored to move it: {e}");
        return fail(ctx, d, m, why).await;
    }
    tracing::info!(domain = name, target = %m.target, uri = %out.dest_uri, limits = ?out.limits, "moving the domain live");
    ctx.event(
        d,
        EventType::Normal,
        "MigrationStarted",
        "Migrate",
        format!("moving live to host {}", m.target),
    )
    .await;
    match run_move(ctx, d, name, &out, &m.uid).await {
        Ok(moved) => {
            tracing::info!(domain = name, target = %m.target, total_ms = moved.total.as_millis() as u64,
                downtime_ms = moved.downtime.as_millis() as u64, bytes = moved.bytes, "domain moved");
            if copy {
                super::incoming::remove_left_disk(ctx, inputs, d).await;
            }
            let r = completed(me, m, &moved);
            write(ctx, d, &r).await
        }
        // The call's deadline passed while libvirt may still move the domain: nothing is
        // reported; the next pass finds the job running (and holds) or the domain gone.
        Err(e @ crate::hypervisor::HypervisorError::Timeout { .. }) => Err(e.into()),
        Err(e) => {
            // Where the domain is now says how the move ended; unreadable, the next pass looks.
            let here = match ctx.hypervisor.domain_status(name).await {
                Ok(s) => Some(s.state),
                Err(x) if x.is_not_found() => None,
                Err(x) => return Err(x.into()),
            };
            let how = super::move_end::ended(here);
            let why = super::move_end::message(how, &e.to_string());
            if how == super::move_end::Ended::Moved {
                tracing::warn!(domain = name, target = %m.target, error = %e, "libvirt reported an error, but the domain left this host: it runs on the target");
                if copy {
                    super::incoming::remove_left_disk(ctx, inputs, d).await;
                }
                let r = report_of(me, m, MigrationState::Completed, Some(why));
                return write(ctx, d, &r).await;
            }
            tracing::warn!(domain = name, target = %m.target, error = %e, ended = ?how, "the move failed");
            fail(ctx, d, m, why).await
        }
    }
}

/// Moves domain `name` as `out` says, aborting the move when migration `uid` is cancelled
/// meanwhile.
pub(super) async fn run_move<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    d: &Desktop,
    name: &str,
    out: &Outbound,
    uid: &str,
) -> Result<Migrated, crate::hypervisor::HypervisorError> {
    let moving = ctx.hypervisor.migrate_out(name, out);
    tokio::pin!(moving);
    tokio::select! {
        done = &mut moving => done,
        () = cancelled(ctx, d, uid) => {
            tracing::info!(domain = name, "the migration was cancelled while the domain moves; aborting the move");
            // Tried until it lands: the job may not have begun when the cancel is seen.
            loop {
                match ctx.hypervisor.abort_migration(name).await {
                    Ok(_) => break,
                    Err(e) => tracing::warn!(domain = name, error = %e, "could not abort the move yet"),
                }
                tokio::select! {
                    done = &mut moving => return done,
                    () = tokio::time::sleep(CANCEL_POLL) => {}
                }
            }
            // The move ends now (aborted), or completed before the abort reached it.
            moving.await
        }
    }
}

/// Restores a suspended desktop's saved memory so that it can move live: its definition gets
/// a SPICE server on any free port (the desktop gave its port back when it was suspended, and
/// that port may be another desktop's by now), the saved image takes that definition (libvirt
/// refuses one whose guest ABI differs: the memory then stays saved, untouched), and the
/// domain starts from it. If the move then fails the guest runs here, and the idle policy's
/// hold saves it again.
async fn restore_to_move<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    inputs: &Inputs,
    name: &str,
) -> Result<(), crate::hypervisor::HypervisorError> {
    let mut here = inputs.domain.clone();
    here.spice.port = ANY_PORT;
    let xml = here
        .to_xml()
        .map_err(|e| crate::hypervisor::HypervisorError::Failed {
            op: "restore to move",
            target: name.to_string(),
            message: e.to_string(),
        })?;
    ctx.hypervisor.define_domain(&xml).await?;
    let image = ctx.config.managed_save_image(name);
    ctx.hypervisor.sync_managed_save(name, &image).await?;
    ctx.hypervisor.start_domain(name).await?;
    tracing::info!(domain = name, "saved memory restored to move the desktop");
    Ok(())
}

/// Returns once the operator marks migration `uid` of desktop `d` cancelled in the record on
/// the Desktop (its DesktopMigration was deleted while the domain moves), as the cache shows
/// it; never when there is no cache.
async fn cancelled<H>(ctx: &DesktopContext<H>, d: &Desktop, uid: &str) {
    if ctx.desktops().is_none() {
        return std::future::pending().await;
    }
    while !marked_cancelled(ctx, d, uid) {
        tokio::time::sleep(CANCEL_POLL).await;
    }
}

/// Whether the cache shows migration `uid` of desktop `d` cancelled: marked so, or its record
/// gone or another's (the operator let the target go).
pub(super) fn marked_cancelled<H>(ctx: &DesktopContext<H>, d: &Desktop, uid: &str) -> bool {
    let Some(store) = ctx.desktops() else {
        return false;
    };
    store
        .get(&ObjectRef::from_obj(d))
        .and_then(|d| d.status.clone())
        .is_some_and(|s| s.migration.is_none_or(|m| m.uid != uid || m.cancelled))
}

/// How often a move looks for its cancellation.
const CANCEL_POLL: Duration = Duration::from_millis(500);

/// Where and how the domain goes: the target's libvirt and address from the record, its
/// SPICE port there, listening as the pool's policy says on the target.
pub(super) fn outbound<H>(
    ctx: &DesktopContext<H>,
    inputs: &Inputs,
    m: &Migrating,
) -> Result<Outbound, String> {
    let uri = m
        .uri
        .clone()
        .ok_or_else(|| format!("host {} published no migration endpoint", m.target))?;
    let spice_address = m.spice_address.clone().unwrap_or_default();
    let address = m.address.clone().unwrap_or_else(|| spice_address.clone());
    if address.is_empty() {
        return Err(format!("host {} published no address", m.target));
    }
    let there = HostContext::for_pool(
        &m.target,
        &spice_address,
        ctx.config.domain_type,
        &inputs.pool,
    )
    .map_err(|e| e.to_string())?;
    let mut dest = inputs.domain.clone();
    dest.spice.port = m.port;
    dest.spice.listen = there.spice_listen.clone();
    let graphics = graphics_xml(&dest).map_err(|e| e.to_string())?;
    let client_host = if there.spice_listen == "0.0.0.0" {
        spice_address
    } else {
        there.spice_listen
    };
    Ok(Outbound {
        dest_uri: uri,
        migrate_uri: format!("tcp://{}", bracketed(&address)),
        graphics_xml: graphics,
        graphics_uri: Some(format!("spice://{}:{}", bracketed(&client_host), m.port)),
        declared_shared: inputs.pool.spec.storage.shared,
        copy_disks: false,
        carrier_xml: None,
        limits: limits(&inputs.pool.spec.migration),
    })
}

/// How long past the pool's completion timeout a move found under way is left to the process
/// that started it (which ends it at the timeout) before this one aborts it.
const OVERDUE_GRACE: Duration = Duration::from_secs(30);

/// Whether a move reported Started by `r` has outlived the pool's completion timeout by
/// [`OVERDUE_GRACE`]: the process that ran it would have ended it (aborted, or switched to
/// post-copy, which is no longer a job that can be aborted), so it was lost with that process.
fn overdue(r: &MigrationReport, completion_timeout: Duration) -> bool {
    if r.state != MigrationState::Started {
        return false;
    }
    let limit = completion_timeout.saturating_add(OVERDUE_GRACE);
    let now = k8s_openapi::jiff::Timestamp::now();
    let age = now.duration_since(r.at.0);
    age.is_positive() && age.unsigned_abs() > limit
}

/// Shortest completion timeout a pool may set: a move needs a few seconds to start.
const MIN_COMPLETION: Duration = Duration::from_secs(5);

/// The pool's migration settings as the hypervisor applies them. A timeout the schema let
/// through but that does not parse (or is shorter than [`MIN_COMPLETION`]) is raised to it.
fn limits(p: &deskvirt_crds::resource_pool::PoolMigration) -> MoveLimits {
    let timeout = deskvirt_core::quantity::parse_duration(&p.completion_timeout)
        .unwrap_or(MoveLimits::default().completion_timeout)
        .max(MIN_COMPLETION);
    MoveLimits {
        bandwidth_mib: p.bandwidth_mib_per_second.map(u64::from),
        completion_timeout: timeout,
        auto_converge: p.auto_converge,
        post_copy: p.post_copy,
    }
}

fn bracketed(address: &str) -> String {
    if address.contains(':') {
        format!("[{address}]")
    } else {
        address.to_string()
    }
}

pub(super) fn report_of(
    source: &str,
    m: &Migrating,
    state: MigrationState,
    message: Option<String>,
) -> MigrationReport {
    MigrationReport {
        uid: m.uid.clone(),
        source: source.to_string(),
        state,
        at: Time(k8s_openapi::jiff::Timestamp::now()),
        message,
        total_millis: None,
        downtime_millis: None,
        bytes: None,
    }
}

pub(super) fn completed(source: &str, m: &Migrating, moved: &Migrated) -> MigrationReport {
    let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    MigrationReport {
        total_millis: Some(millis(moved.total)),
        downtime_millis: Some(millis(moved.downtime)),
        bytes: Some(moved.bytes),
        ..report_of(source, m, MigrationState::Completed, None)
    }
}

pub(super) async fn fail<H>(
    ctx: &DesktopContext<H>,
    d: &Desktop,
    m: &Migrating,
    why: String,
) -> Result<(), Error> {
    let mut why = why;
    why.truncate(1000);
    ctx.event(
        d,
        EventType::Warning,
        "MigrationFailed",
        "Migrate",
        format!("the move to host {} failed: {why}", m.target),
    )
    .await;
    let me = ctx.config.node_name.as_str();
    write(ctx, d, &report_of(me, m, MigrationState::Failed, Some(why))).await
}

/// Writes the report under the agent's migration field manager.
pub(super) async fn write<H>(
    ctx: &DesktopContext<H>,
    d: &Desktop,
    r: &MigrationReport,
) -> Result<(), Error> {
    let uid = d.uid().ok_or(Error::MissingField("metadata.uid"))?;
    let ns = d
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<Desktop> = Api::namespaced(ctx.client.clone(), &ns);
    let status = json!({ "migrationReport": r });
    super::patch::apply_status_as(
        &api,
        &d.name_any(),
        status,
        MANAGER_AGENT_MIGRATION,
        "report the migration",
    )
    .await?;
    ctx.record_move(&uid, r);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    #[test]
    fn the_pools_settings_bound_the_move_and_a_too_short_timeout_is_raised() {
        use deskvirt_crds::resource_pool::PoolMigration;
        let d = limits(&PoolMigration::default());
        assert_eq!(d.completion_timeout, Duration::from_secs(300));
        assert!(d.auto_converge && !d.post_copy && d.bandwidth_mib.is_none());
        let capped = PoolMigration {
            bandwidth_mib_per_second: Some(50),
            completion_timeout: "1s".into(),
            auto_converge: false,
            post_copy: true,
        };
        let l = limits(&capped);
        assert_eq!(l.bandwidth_mib, Some(50));
        assert_eq!(l.completion_timeout, MIN_COMPLETION);
        assert!(!l.auto_converge && l.post_copy);
    }

    fn record() -> Migrating {
        Migrating {
            name: "m".into(),
            uid: "m1".into(),
            mode: MigrationMode::Live,
            target: "h2".into(),
            port: 5901,
            since: Time(Timestamp::UNIX_EPOCH),
            uri: Some("qemu+tcp://h2/system".into()),
            address: None,
            spice_address: Some("10.0.0.2".into()),
            base_image_bytes: None,
            pool: None,
            cancelled: false,
        }
    }

    fn facts<'a>(
        record: Option<&'a Migrating>,
        reported: Option<(&'static str, MigrationState)>,
        domain: Domain,
    ) -> Facts<'a> {
        Facts {
            record,
            reported,
            moved_since: false,
            domain,
            job: false,
            overdue: false,
        }
    }

    use MigrationState::{Completed, Failed, Started};

    #[test]
    fn a_confirmed_record_of_a_running_domain_starts_the_move() {
        let m = record();
        assert_eq!(decide(&facts(Some(&m), None, Domain::Running)), Step::Start);
        // An older migration's report does not count.
        assert_eq!(
            decide(&facts(Some(&m), Some(("m0", Failed)), Domain::Running)),
            Step::Start
        );
        assert!(matches!(
            decide(&facts(Some(&m), None, Domain::Stopped)),
            Step::Failed(_)
        ));
        // A Cold move takes a stopped domain (its disk is copied).
        let cold = Migrating {
            mode: MigrationMode::Cold,
            ..record()
        };
        assert_eq!(
            decide(&facts(Some(&cold), None, Domain::Stopped)),
            Step::Start
        );
        assert_eq!(decide(&facts(None, None, Domain::Running)), Step::Converge);
        assert_eq!(
            decide(&facts(Some(&m), None, Domain::Saved)),
            Step::Start,
            "a suspended desktop moves with its saved memory"
        );
        assert_eq!(
            decide(&facts(Some(&m), Some(("m1", Started)), Domain::Saved)),
            Step::Failed(
                "the move stopped before it ended (the node-agent restarted); the desktop runs \
                 on this host as before"
            ),
        );
    }

    #[test]
    fn a_started_report_is_overdue_past_the_completion_timeout_and_a_grace() {
        let pool = Duration::from_secs(10);
        let at = |secs_ago: i64| {
            let t = k8s_openapi::jiff::Timestamp::now()
                - k8s_openapi::jiff::SignedDuration::from_secs(secs_ago);
            let mut r = report_of("h1", &record(), Started, None);
            r.at = Time(t);
            r
        };
        assert!(!overdue(&at(5), pool));
        assert!(!overdue(&at(35), pool), "within the grace");
        assert!(overdue(&at(45), pool));
        let mut done = at(45);
        done.state = Completed;
        assert!(!overdue(&done, pool), "only a move under way");
    }

    #[test]
    fn after_a_restart_the_host_says_where_the_move_got_to() {
        let m = record();
        let moving = Facts {
            job: true,
            ..facts(Some(&m), Some(("m1", Started)), Domain::Running)
        };
        assert!(matches!(decide(&moving), Step::Hold(_)));
        let mut cancelled = record();
        cancelled.cancelled = true;
        let to_abort = Facts {
            job: true,
            ..facts(Some(&cancelled), Some(("m1", Started)), Domain::Running)
        };
        assert_eq!(
            decide(&to_abort),
            Step::Abort,
            "a cancel reaches a move found moving"
        );
        let overdue = Facts {
            job: true,
            overdue: true,
            ..facts(Some(&m), Some(("m1", Started)), Domain::Running)
        };
        assert_eq!(
            decide(&overdue),
            Step::Abort,
            "a move found moving past the pool's completion timeout is ended"
        );
        assert_eq!(
            decide(&facts(Some(&m), Some(("m1", Started)), Domain::Absent)),
            Step::Completed
        );
        assert!(matches!(
            decide(&facts(Some(&m), Some(("m1", Started)), Domain::Running)),
            Step::Failed(_)
        ));
        assert_eq!(
            decide(&facts(Some(&m), Some(("m1", Failed)), Domain::Running)),
            Step::Converge
        );
    }

    #[test]
    fn a_moved_domain_is_never_made_again_here_until_the_binding_follows() {
        let m = record();
        assert!(matches!(
            decide(&facts(Some(&m), Some(("m1", Completed)), Domain::Absent)),
            Step::Hold(_)
        ));
        // The record is cleared (the migration ended) but the binding did not move.
        assert!(matches!(
            decide(&facts(None, Some(("m1", Completed)), Domain::Absent)),
            Step::Hold(_)
        ));
        // Moved since (later moved back here, say): converge as always.
        let back = Facts {
            moved_since: true,
            ..facts(None, Some(("m1", Completed)), Domain::Absent)
        };
        assert_eq!(decide(&back), Step::Converge);
    }
}
