//! Converges a live Desktop bound here, as a pipeline of small steps: the agent's finalizer
//! first, then the inputs ([`super::inputs`]: pool, console password, binding, spec), checks
//! against the host (whose domain holds its name, its address, the domain's state and its
//! saved memory, judged by [`super::saved`]), the plan (power step, fresh disk or not), its
//! execution (disk, definition, password of the running domain, power through
//! [`super::lifecycle`]) and the report of the agent's status. A step that cannot go on stops
//! the pipeline with a condition, never a crash loop. A desktop the idle policy reclaimed takes
//! the short path of [`super::held`] instead; a disk that saved memory refers to is never
//! replaced.

use std::path::{Path, PathBuf};
use std::time::Duration;

use deskvirt_crds::Desktop;
use deskvirt_crds::conditions::{self, Status};
use deskvirt_crds::constants::condition::{DOMAIN_DEFINED, RUNNING};
use deskvirt_crds::desktop::{DesktopStatus, Power, Size};
use deskvirt_crds::quantity::format_bytes;
use deskvirt_crds::validation::ValidDesktop;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use tokio::time::Instant;

use super::activity::{self, ActivityStatus, Sample};
use super::context::DesktopContext;
use super::inputs::{self, Inputs};
use super::ip::{self, Pending};
use super::lifecycle::{self, ADMIN_RESYNC};
use super::patch::{add_finalizer, apply_status, has_finalizer};
use super::place::{self, Place};
use super::power::{self, DomainView, Facts, Step};
use super::reason::{Reason, ReasonOf};
use super::saved::{self, Verdict};
use super::status::{Cond, Report, body};
use super::{BUSY_RESYNC, Error, bound, held, lease, migrate};
use crate::disks::{self, DiskPlan, Prepared};
use crate::domain::graphics_xml;
use crate::domain::names::fnv1a64;
use crate::hypervisor::{DomainState, DomainStatus, Hypervisor, HypervisorError, PauseCause};

/// The outcome of converging one desktop: what to report and when to look again.
pub(super) struct Outcome {
    pub report: Report,
    pub requeue: Duration,
}

impl Outcome {
    fn waiting(mut report: Report, cond: Cond, requeue: Duration) -> Self {
        report.defined = Some(cond);
        Self { report, requeue }
    }
}

/// Converges one live Desktop bound to this host and reports.
pub async fn apply<H: Hypervisor>(d: &Desktop, ctx: &DesktopContext<H>) -> Result<Action, Error> {
    let ns = d
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let uid = d.uid().ok_or(Error::MissingField("metadata.uid"))?;
    let status = d.status.clone().unwrap_or_default();
    if let Err(why) = bound::here(ctx, d, &uid) {
        // Labelled for this host, but the operator has not bound it here (not yet, moved away,
        // or a label, finalizer or status written by someone else): nothing is done for it.
        tracing::debug!(desktop = %format!("{ns}/{}", d.name_any()), %why, "not bound to this host");
        return Ok(Action::await_change());
    }
    let api: Api<Desktop> = Api::namespaced(ctx.client.clone(), &ns);
    let steps = &ctx.metrics.steps;
    if !has_finalizer(d) {
        let t = std::time::Instant::now();
        add_finalizer(&api, d).await?;
        steps.record("finalizer", t);
    }
    let outcome = converge(d, ctx, &status, &uid).await?;
    let mut requeue = outcome.requeue;
    if let Some(b) = body(&status, &outcome.report, d.metadata.generation, now()) {
        // What the report decides, without the activity samples (which differ from pass to
        // pass, and wait for the next pass when nothing else changed).
        let decided = Report {
            activity: None,
            ..outcome.report.clone()
        };
        let fingerprint = fnv1a64(format!("{decided:?}/{:?}", d.metadata.generation).as_bytes());
        match ctx.report_in_flight(&uid, fingerprint) {
            // Written already: this copy predates it (no second write, no second Event).
            Some(wait) => requeue = requeue.min(wait),
            None => {
                let t = std::time::Instant::now();
                apply_status(&api, &d.name_any(), b).await?;
                steps.record("status", t);
                ctx.record_report(&uid, fingerprint);
                announce(d, ctx, &status, &outcome.report).await;
            }
        }
    }
    ctx.succeeded(&uid);
    Ok(Action::requeue(requeue))
}

/// `DomainDefined=False`: the name this desktop's domain needs on `node` is held by a domain of
/// `owner`, which is left untouched.
pub(super) fn not_ours(node: &str, name: &str, owner: &str) -> Cond {
    Cond::new(
        Status::False,
        Reason::DomainNotOurs,
        format!(
            "host {node} holds a domain {name} that belongs to {owner}: this desktop's domain is \
             not defined there and nothing of the other is touched; ask the host's admin"
        ),
    )
}

pub(super) fn now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}

/// One Event per change of the agent's condition reasons, so transitions are visible in
/// `kubectl describe` without repeating every resync. Normal changes of one pass (a domain
/// defined and started) make one Event, not one per condition: each is an API write.
async fn announce<H>(d: &Desktop, ctx: &DesktopContext<H>, before: &DesktopStatus, r: &Report) {
    let mut normal: Vec<(&'static str, &Cond)> = Vec::new();
    for (type_, cond) in [(DOMAIN_DEFINED, &r.defined), (RUNNING, &r.running)] {
        let Some(c) = cond else { continue };
        let old = conditions::find(&before.conditions, type_).map(|o| o.reason.as_str());
        if old == Some(c.reason.as_str()) {
            continue;
        }
        if c.reason.is_warning() {
            ctx.event(
                d,
                EventType::Warning,
                c.reason.as_str(),
                type_,
                c.message.clone(),
            )
            .await;
        } else {
            normal.push((type_, c));
        }
    }
    // The last change names the Event (Running's when both changed).
    if let Some((type_, last)) = normal.last() {
        let note = normal
            .iter()
            .map(|(_, c)| c.message.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        ctx.event(d, EventType::Normal, last.reason.as_str(), type_, note)
            .await;
    }
}

/// Why the pipeline of [`converge`] stopped before its end.
pub(super) enum Stop {
    /// Something must change first: `DomainDefined` says what, and the desktop is looked at
    /// again after the delay.
    Wait(Cond, Duration),
    /// The pass failed; the controller's error policy takes it.
    Fail(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Self::Fail(e)
    }
}

impl From<HypervisorError> for Stop {
    fn from(e: HypervisorError) -> Self {
        Self::Fail(e.into())
    }
}

async fn converge<H: Hypervisor>(
    d: &Desktop,
    ctx: &DesktopContext<H>,
    status: &DesktopStatus,
    uid: &str,
) -> Result<Outcome, Error> {
    if let Some(hold) = power::hold(status.reclaimed.as_ref()) {
        return held::converge(d, ctx, status, uid, hold).await;
    }
    let mut report = Report {
        spice_port: status.spice.as_ref().and_then(|s| s.port),
        ..Report::default()
    };
    match pipeline(d, ctx, status, uid, &mut report).await {
        Ok(requeue) => Ok(Outcome { report, requeue }),
        Err(Stop::Wait(c, again)) => Ok(Outcome::waiting(report, c, again)),
        Err(Stop::Fail(e)) => Err(e),
    }
}

/// Inputs, then checks against the host, then the plan, then its execution; fills `report`
/// on the way and says when to look again.
async fn pipeline<H: Hypervisor>(
    d: &Desktop,
    ctx: &DesktopContext<H>,
    status: &DesktopStatus,
    uid: &str,
    report: &mut Report,
) -> Result<Duration, Stop> {
    let (steps, clock) = (&ctx.metrics.steps, std::time::Instant::now);
    let t = clock();
    let inputs = inputs::gather(ctx, d, status, uid, report)?;
    steps.record("inputs", t);
    let t = clock();
    let (inputs, adopt) = locate(ctx, uid, inputs).await?;
    steps.record("locate", t);
    let t = clock();
    report.ip = pin_address(ctx, &inputs, status).await?;
    steps.record("address", t);
    // Moved in cold with its disk copied: it came paused, its guest never run here.
    super::incoming::settle_arrival(ctx, &inputs)
        .await
        .map_err(Stop::Fail)?;
    let t = clock();
    let seen = observe(ctx, d, status, uid, &inputs, adopt).await?;
    steps.record("observe", t);
    let here = migrate::Domain::of(seen.current.map(|s| (s.state, s.has_managed_save)));
    if let Some(requeue) = migrate::drive(ctx, d, status, uid, &inputs, here, report).await? {
        return Ok(requeue);
    }
    // Moved live from another host's subnet: the guest asks for the address pinned here.
    if seen.active()
        && let Some((had, pinned)) = lease::stale(status.ip.as_deref(), report.ip.as_deref())
    {
        lease::renew(ctx, d, &inputs, &seen.domain, had, pinned).await?;
    }
    // The backup recorded on the desktop, before a power change could stop its job.
    let t = clock();
    let here = super::backup::Here {
        pool: &inputs.pool,
        domain: &inputs.domain.domain,
        disk: Some(&seen.disk.target),
        // Off, or paused with no guest code run: a backup started it so, and this agent
        // stopped before it reported (its copy is adopted as the stopped desktop's).
        stopped: d.spec.power == Power::Off
            && seen.current.is_some_and(|s| {
                (s.state == DomainState::ShutOff && !s.has_managed_save)
                    || (s.state == DomainState::Paused && s.paused == Some(PauseCause::Other))
            }),
    };
    let backing_up = super::backup::drive(ctx, d, status, here, seen.active()).await?;
    steps.record("backup", t);
    // The domain runs paused for a stopped desktop's backup (its power waits for the copy),
    // or was just stopped or resumed after it.
    if let Some(b) = backing_up.filter(|b| b.ends_pass) {
        return Ok(b.again);
    }
    // A restore over the stopped desktop's disk, before a power change could start it.
    let here = super::restore_over::Here {
        pool: &inputs.pool,
        domain: &inputs.domain.domain,
        disk: &seen.disk,
        image_dir: PathBuf::from(&inputs.host.image_dir),
        active: seen.active(),
        running: seen
            .current
            .is_some_and(|s| s.state == DomainState::Running),
        saved: seen.current.is_some_and(|s| s.has_managed_save),
    };
    if let Some(again) = super::restore_over::drive(ctx, d, status, here).await? {
        return Ok(again);
    }
    let plan = plan(d, status, &seen, ctx.resume_due(uid));
    let t = clock();
    let requeue = execute(ctx, d, uid, &inputs, &seen, plan, report).await?;
    steps.record("execute", t);
    Ok(backing_up.map_or(requeue, |b| requeue.min(b.again)))
}

/// Which domain is this desktop's: by its UID, never by name alone. Returns the inputs under
/// the name it has, and whether it was found (its disk may then be adopted).
async fn locate<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    uid: &str,
    inputs: Inputs,
) -> Result<(Inputs, bool), Stop> {
    match place::locate(&ctx.hypervisor, uid, &inputs.domain.domain).await? {
        Place::Ours { name } => {
            let domain = inputs.domain.under_name(&name, &inputs.host);
            Ok((Inputs { domain, ..inputs }, true))
        }
        Place::Free { .. } => Ok((inputs, false)),
        Place::Taken { name, owner } => Err(Stop::Wait(
            not_ours(&ctx.config.node_name, &name, &owner),
            ADMIN_RESYNC,
        )),
    }
}

/// The desktop's address on the pool network, pinned to its MAC.
async fn pin_address<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    inputs: &Inputs,
    status: &DesktopStatus,
) -> Result<Option<String>, Stop> {
    match ip::pin(ctx, &inputs.pool, &inputs.domain.mac, status.ip.as_deref()).await {
        Ok(ip) => Ok(ip.map(|a| a.to_string())),
        Err(Pending::Wait(c)) => Err(Stop::Wait(c, BUSY_RESYNC)),
        Err(Pending::Failed(e)) => Err(e.into()),
    }
}

/// The domain as it is on the host, after its saved memory has been judged.
struct Observed {
    /// The domain's name.
    domain: String,
    /// Its status; `None` when it is not defined.
    current: Option<DomainStatus>,
    /// Its saved memory was discarded now because the desktop ran on another host since.
    ran_elsewhere: bool,
    /// Its disk.
    disk: DiskPlan,
    /// Whether its disk may be adopted (the domain was found by its UID).
    adopt: bool,
}

impl Observed {
    fn active(&self) -> bool {
        self.current.is_some_and(|s| s.state.is_active())
    }
}

/// Reads the domain's state and judges its saved memory ([`saved::judge`]): stale memory is
/// discarded, memory that cannot be judged stops the pass with a condition.
async fn observe<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    d: &Desktop,
    status: &DesktopStatus,
    uid: &str,
    inputs: &Inputs,
    adopt: bool,
) -> Result<Observed, Stop> {
    let domain = inputs.domain.domain_name();
    let mut current = match ctx.hypervisor.domain_status(&domain).await {
        Ok(s) => Some(s),
        Err(e) if e.is_not_found() => None,
        Err(e) => return Err(e.into()),
    };
    let mut disk = inputs.disk_plan(d, uid, adopt);
    if disk.unverified.is_none() {
        disk.unverified = unverified_image(ctx, d, &disk.base);
    }
    let mut ran_elsewhere = false;
    if let Some(s) = current
        .as_mut()
        .filter(|s| s.has_managed_save && !s.state.is_active())
    {
        let last_move = status.last_move.as_ref();
        let image = ctx.config.managed_save_image(&domain);
        let seen = saved::see_disk(&disk.target).await;
        let written = saved::written(&image, last_move).await;
        match saved::judge(&disk.target, &seen, &image, &written, last_move) {
            Verdict::Keep => {}
            Verdict::Discard { why, moved } => {
                lifecycle::discard_saved_memory(ctx, d, &domain, &why).await?;
                s.has_managed_save = false;
                ran_elsewhere = moved;
            }
            Verdict::Blocked(c) => {
                let again = lifecycle::resync(c.status == Status::Unknown);
                return Err(Stop::Wait(c, again));
            }
        }
    }
    Ok(Observed {
        domain,
        current,
        ran_elsewhere,
        disk,
        adopt,
    })
}

/// Why the DesktopImage version `d` is pinned to may not be cloned here (`None`: it may, or
/// `d` names a hand-placed image): this host must hold a verified copy of exactly that
/// version, at `base`, with the pinned SHA-256.
fn unverified_image<H>(ctx: &DesktopContext<H>, d: &Desktop, base: &Path) -> Option<String> {
    d.spec.disk.image_ref.as_ref()?;
    let pin = d.status.as_ref()?.image.as_ref()?;
    match ctx.images.ready_copy(&pin.uid, pin.version) {
        Some(c) if c.sha256 == pin.sha256 && c.path == base => None,
        Some(c) if c.sha256 != pin.sha256 => Some(format!(
            "this host's copy of {} v{} has SHA-256 {}, the desktop is pinned to {}",
            pin.image, pin.version, c.sha256, pin.sha256
        )),
        Some(c) => Some(format!(
            "this host's copy of {} v{} is {}, not {}",
            pin.image,
            pin.version,
            c.path.display(),
            base.display()
        )),
        None => Some(format!(
            "{} v{} has no verified copy on this host yet",
            pin.image, pin.version
        )),
    }
}

/// What this pass does: the power step, and whether the disk is a fresh clone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Plan {
    step: Step,
    /// A non-persistent desktop booting gets a fresh clone (never under saved memory, which
    /// refers to the disk it has, nor right after it ran elsewhere).
    fresh: bool,
}

fn plan(d: &Desktop, status: &DesktopStatus, seen: &Observed, resume_due: bool) -> Plan {
    let current = seen.current;
    let step = power::decide(&Facts {
        hold: None,
        want_on: d.spec.power == Power::On,
        domain: current.as_ref().map(DomainView::of),
        running_reason: conditions::find(&status.conditions, RUNNING).map(|c| c.reason.as_str()),
        shut_itself_down: guest_shut_down(d, status),
        resume_due,
    });
    let fresh = step == (Step::Start { restore: false })
        && !d.spec.disk.persistent
        && !seen.ran_elsewhere
        && current.is_some_and(|s| s.state == DomainState::ShutOff && !s.has_managed_save);
    Plan { step, fresh }
}

/// Carries the plan out: disk, definition, password, power; then the activity report.
async fn execute<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    d: &Desktop,
    uid: &str,
    inputs: &Inputs,
    seen: &Observed,
    plan: Plan,
    report: &mut Report,
) -> Result<Duration, Stop> {
    let active = seen.active();
    prepare_disk(ctx, uid, seen, plan.fresh).await?;
    define(ctx, uid, inputs, seen.current.is_some()).await?;
    report.defined = Some(Cond::new(
        Status::True,
        Reason::Defined,
        format!(
            "domain {} is defined on {}",
            seen.domain, ctx.config.node_name
        ),
    ));
    if active {
        push_password(ctx, uid, inputs, &seen.domain).await?;
    }
    let done = lifecycle::execute(ctx, d, uid, &seen.domain, seen.current, plan.step).await?;
    // A running desktop is looked at again when its activity is due for a sample.
    let requeue = if done.running.status == Status::True {
        done.requeue.min(ctx.config.activity_interval)
    } else {
        done.requeue
    };
    report.running_size = match seen.current {
        Some(s) if s.state.is_active() => {
            Some(size_of(s.vcpus, s.max_memory_kib.saturating_mul(1024)))
        }
        // Started from its definition now (a restore from saved memory keeps the saved size:
        // the next pass reads it from the domain).
        Some(s) if done.started && !s.has_managed_save => {
            Some(size_of(inputs.domain.vcpus, inputs.domain.memory_bytes))
        }
        None if done.started => Some(size_of(inputs.domain.vcpus, inputs.domain.memory_bytes)),
        _ => None,
    };
    report.running = Some(done.running);
    let status = d.status.clone().unwrap_or_default();
    report.activity = Some(if done.started {
        // The definition (or the saved memory, updated from it) has the current password, and
        // a fresh QEMU starts its idle countdown from zero.
        ctx.record_password(uid, &inputs.password_version);
        ctx.forget_sample(uid);
        ctx.record_session(uid, false);
        activity::started(&status, now())
    } else {
        observe_activity(ctx, &inputs.valid, &status, uid, &seen.domain, active).await
    });
    Ok(requeue)
}

/// The disk: made once (a fresh clone when the plan says so), never touched under a running
/// domain; a running domain an earlier release defined gets its disk's owner record.
async fn prepare_disk<H>(
    ctx: &DesktopContext<H>,
    uid: &str,
    seen: &Observed,
    fresh: bool,
) -> Result<(), Stop> {
    let target = seen.disk.target.display();
    if seen.active() {
        if seen.adopt
            && let Err(e) = disks::adopt(&seen.disk.target, uid).await
        {
            tracing::warn!(disk = %target, error = %e, "cannot record the owner of an adopted disk");
        }
        return Ok(());
    }
    match disks::prepare(&ctx.config.qemu_img, &seen.disk, fresh).await {
        Ok(Prepared::Created) => {
            tracing::info!(disk = %target, clone = ?seen.disk.clone, fresh, "disk created");
            Ok(())
        }
        Ok(Prepared::Existing) => Ok(()),
        // A slow, busy or failing disk may come back by itself: retried with the backoff and
        // shown once it keeps failing ([`super::failure`]), like any transient failure.
        Err(e) if e.is_transient() => Err(Stop::Fail(e.into())),
        Err(e) => {
            let c = Cond::new(Status::False, Reason::of_disk(&e), e.to_string());
            Err(Stop::Wait(c, ADMIN_RESYNC))
        }
    }
}

/// Defines the domain, unless this process defined the same XML already and it exists.
async fn define<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    uid: &str,
    inputs: &Inputs,
    exists: bool,
) -> Result<(), Stop> {
    let xml = inputs.domain.to_xml().map_err(|e| {
        Stop::Wait(
            Cond::new(Status::False, Reason::InvalidSpec, e.to_string()),
            ADMIN_RESYNC,
        )
    })?;
    let xml_hash = fnv1a64(xml.as_bytes());
    if exists && ctx.defined_already(uid, xml_hash) {
        return Ok(());
    }
    match ctx.hypervisor.define_domain(&xml).await {
        Ok(_) => {
            ctx.record_defined(uid, xml_hash);
            Ok(())
        }
        Err(e) if e.is_transient() => Err(e.into()),
        Err(e) => Err(Stop::Wait(
            Cond::new(Status::False, Reason::DefineFailed, e.to_string()),
            ADMIN_RESYNC,
        )),
    }
}

/// A rotated password reaches the running domain at once (the definition has it already).
async fn push_password<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    uid: &str,
    inputs: &Inputs,
    domain: &str,
) -> Result<(), Stop> {
    if ctx.password_pushed(uid, &inputs.password_version) {
        return Ok(());
    }
    let graphics = graphics_xml(&inputs.domain).map_err(|e| HypervisorError::Rejected {
        op: "update live device",
        target: domain.to_string(),
        message: e.to_string(),
    })?;
    ctx.hypervisor.update_live_device(domain, &graphics).await?;
    ctx.record_password(uid, &inputs.password_version);
    Ok(())
}

/// A size as the Desktop's status reports it.
fn size_of(vcpus: u32, memory_bytes: u64) -> Size {
    Size {
        cpu: vcpus,
        memory: format_bytes(memory_bytes),
    }
}

/// Samples the running domain and derives the session and idleness fields; a domain that is
/// not running reports no client and leaves the idleness fields as they are.
async fn observe_activity<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    valid: &ValidDesktop,
    status: &DesktopStatus,
    uid: &str,
    domain: &str,
    active: bool,
) -> ActivityStatus {
    if !active {
        ctx.record_session(uid, false);
        return activity::next(status, None, None, now());
    }
    let counters = match ctx.hypervisor.activity(domain).await {
        Ok(c) => c,
        Err(e) => {
            // Nothing learnt: the session and the countdown stay as reported.
            tracing::debug!(domain, error = %e, "cannot read activity");
            return activity::unchanged(status);
        }
    };
    ctx.record_session(uid, counters.spice_client.is_some());
    let sample = Sample {
        at: Instant::now(),
        cpu_time_ns: counters.cpu_time_ns,
        block_bytes: counters.block_bytes,
        net_bytes: counters.net_bytes,
    };
    let prev = ctx.swap_sample(uid, sample);
    let guest = prev.and_then(|prev| activity::guest_active(&prev, &sample));
    if let Some(p) = prev {
        tracing::debug!(
            domain,
            window = ?sample.at.saturating_duration_since(p.at),
            cpu_ns = sample.cpu_time_ns.saturating_sub(p.cpu_time_ns),
            block_bytes = sample.block_bytes.saturating_sub(p.block_bytes),
            net_bytes = sample.net_bytes.saturating_sub(p.net_bytes),
            active = ?guest,
            "activity sample"
        );
    }
    let in_use = activity::in_use(
        guest,
        counters.spice_client.is_some(),
        valid.connected_is_active,
    );
    activity::next(status, in_use, counters.spice_client.as_deref(), now())
}

/// Whether an inactive domain with power On went down by itself (the agent saw it run, or
/// already reported the shutdown for this generation), so it is not started again until the
/// user asks.
fn guest_shut_down(d: &Desktop, status: &DesktopStatus) -> bool {
    let Some(c) = conditions::find(&status.conditions, RUNNING) else {
        return false;
    };
    c.status == "True" || (c.reason == "Shutdown" && c.observed_generation == d.metadata.generation)
}
