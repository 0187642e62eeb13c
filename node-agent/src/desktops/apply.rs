//! Decides what a live Desktop bound here needs on the host, in order: the agent's finalizer
//! first, then its inputs (pool, console password, binding, address), the disk, the domain
//! definition, the password of the running domain, and power; then reports the outcome as the
//! agent's status. An input that is not there yet becomes a condition, never a crash loop.
//! A desktop the idle policy reclaimed takes the short path of [`super::held`] instead; a
//! disk that saved memory refers to is never replaced.

use std::path::PathBuf;
use std::time::Duration;

use deskvirt_crds::Desktop;
use deskvirt_crds::conditions::{self, Status};
use deskvirt_crds::constants::condition::{DOMAIN_DEFINED, RUNNING};
use deskvirt_crds::constants::{SECRET_KEY_PASSWORD, console_mirror_name};
use deskvirt_crds::desktop::{DesktopStatus, Power, Size};
use deskvirt_crds::quantity::{format_bytes, parse_bytes};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use tokio::time::Instant;

use super::activity::{self, ActivityStatus, Sample};
use super::context::DesktopContext;
use super::ip::{self, Pending};
use super::lifecycle::{self, ADMIN_RESYNC};
use super::patch::{add_finalizer, apply_status, has_finalizer};
use super::place::{self, Place};
use super::power::{self, DomainView, Facts, Step};
use super::status::{Cond, Report, body};
use super::{BUSY_RESYNC, Error, bound, held};
use crate::disks::{self, DiskPlan, Prepared};
use crate::domain::names::fnv1a64;
use crate::domain::{Binding, DomainInputs, HostContext, Secret, graphics_xml};
use crate::hypervisor::{DomainState, Hypervisor};

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
    if !has_finalizer(d) {
        add_finalizer(&api, d).await?;
    }
    let outcome = converge(d, ctx, &status, &uid).await?;
    if let Some(b) = body(&status, &outcome.report, d.metadata.generation, now()) {
        apply_status(&api, &d.name_any(), b).await?;
        announce(d, ctx, &status, &outcome.report).await;
    }
    ctx.succeeded(&uid);
    Ok(Action::requeue(outcome.requeue))
}

/// `DomainDefined=False`: the name this desktop's domain needs on `node` is held by a domain of
/// `owner`, which is left untouched.
pub(super) fn not_ours(node: &str, name: &str, owner: &str) -> Cond {
    Cond::new(
        Status::False,
        "DomainNotOurs",
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
        if old == Some(c.reason) {
            continue;
        }
        // Failures are warnings even when the domain still runs (SuspendFailed).
        let warning = [
            "Fail",
            "Missing",
            "Invalid",
            "Exhausted",
            "Insufficient",
            "NotOurs",
        ]
        .iter()
        .any(|w| c.reason.contains(w));
        if warning {
            ctx.event(d, EventType::Warning, c.reason, type_, c.message.clone())
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
        ctx.event(d, EventType::Normal, last.reason, type_, note)
            .await;
    }
}

/// The console password from this desktop's mirror, with the mirror's version.
fn console_password<H>(ctx: &DesktopContext<H>, uid: &str) -> Option<(Secret, String)> {
    let mirror = ctx
        .mirrors
        .get(&ObjectRef::new(&console_mirror_name(uid)).within(&ctx.config.console_namespace))?;
    let bytes = mirror.data.as_ref()?.get(SECRET_KEY_PASSWORD)?;
    let password = String::from_utf8(bytes.0.clone()).ok()?;
    if password.is_empty() {
        return None;
    }
    Some((
        Secret::new(password),
        mirror.resource_version().unwrap_or_default(),
    ))
}

/// Host CPUs for a desktop with dedicated CPUs: desktops bound here that ask for them share
/// out the host's logical CPUs from CPU 1 up (CPU 0 stays with the host), oldest first.
fn pinned_cpus<H>(ctx: &DesktopContext<H>, d: &Desktop) -> Result<Vec<u32>, Cond> {
    if !d.spec.performance.dedicated_cpus {
        return Ok(Vec::new());
    }
    let total = ctx
        .domain_node()
        .and_then(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.cpu.as_ref().map(|c| c.threads))
        })
        .unwrap_or(0);
    let mut dedicated: Vec<_> = ctx
        .desktops()
        .map(|s| s.state())
        .unwrap_or_default()
        .into_iter()
        .filter(|o| o.spec.performance.dedicated_cpus && o.metadata.deletion_timestamp.is_none())
        .map(|o| (o.metadata.creation_timestamp.clone(), o.uid(), o.spec.cpu))
        .collect();
    if !dedicated.iter().any(|(_, u, _)| *u == d.uid()) {
        dedicated.push((d.metadata.creation_timestamp.clone(), d.uid(), d.spec.cpu));
    }
    dedicated
        .sort_by(|a, b| (a.0.as_ref().map(|t| t.0), &a.1).cmp(&(b.0.as_ref().map(|t| t.0), &b.1)));
    let mut next = 1u32;
    for (_, u, cpus) in dedicated {
        let end = next.saturating_add(cpus);
        if u == d.uid() {
            if end > total {
                return Err(Cond::new(
                    Status::False,
                    "InsufficientDedicatedCpus",
                    format!(
                        "{cpus} dedicated CPUs do not fit: this host has {total} logical CPUs, CPU 0 stays with the host and {} are dedicated to older desktops",
                        next.saturating_sub(1)
                    ),
                ));
            }
            return Ok((next..end).collect());
        }
        next = end;
    }
    Ok(Vec::new())
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
    let cfg = &ctx.config;
    let mut report = Report {
        spice_port: status.spice.as_ref().and_then(|s| s.port),
        ..Report::default()
    };

    // Inputs: pool, host context, password, binding.
    let Some(pool) = ctx.pool(d.pool()) else {
        let c = Cond::new(
            Status::Unknown,
            "WaitingForPool",
            format!("ResourcePool {} is not known to this host yet", d.pool()),
        );
        return Ok(Outcome::waiting(report, c, BUSY_RESYNC));
    };
    let host =
        match HostContext::for_pool(&cfg.node_name, &cfg.node_address, cfg.domain_type, &pool) {
            Ok(h) => h,
            Err(e) => {
                let c = Cond::new(Status::False, "InvalidPool", e.to_string());
                return Ok(Outcome::waiting(report, c, ADMIN_RESYNC));
            }
        };
    report.spice_host = Some(if host.spice_listen == "0.0.0.0" {
        cfg.node_address.clone()
    } else {
        host.spice_listen.clone()
    });
    let Some((password, password_version)) = console_password(ctx, uid) else {
        let c = Cond::new(
            Status::Unknown,
            "WaitingForConsolePassword",
            "the operator has not published this desktop's console password yet",
        );
        return Ok(Outcome::waiting(report, c, BUSY_RESYNC));
    };
    let mut binding = match Binding::from_status(Some(status), password) {
        Ok(b) => b,
        Err(e) => {
            let c = Cond::new(Status::Unknown, "WaitingForBinding", e.to_string());
            return Ok(Outcome::waiting(report, c, BUSY_RESYNC));
        }
    };
    binding.pinned_cpus = match pinned_cpus(ctx, d) {
        Ok(p) => p,
        Err(c) => return Ok(Outcome::waiting(report, c, ADMIN_RESYNC)),
    };
    let inputs = match DomainInputs::from_desktop(d, &binding, &host) {
        Ok(i) => i,
        Err(e) => {
            let (s, wait) = if e.is_transient() {
                (Status::Unknown, BUSY_RESYNC)
            } else {
                (Status::False, ADMIN_RESYNC)
            };
            let c = Cond::new(s, "InvalidSpec", e.to_string());
            return Ok(Outcome::waiting(report, c, wait));
        }
    };
    // Which domain is this desktop's: by its UID, never by name alone.
    let hv = &ctx.hypervisor;
    let (inputs, adopt) = match place::locate(hv, uid, &inputs.domain).await? {
        Place::Ours { name } => (inputs.under_name(&name, &host), true),
        Place::Free { .. } => (inputs, false),
        Place::Taken { name, owner } => {
            let c = not_ours(&cfg.node_name, &name, &owner);
            return Ok(Outcome::waiting(report, c, ADMIN_RESYNC));
        }
    };

    // Address.
    match ip::pin(ctx, &pool, &inputs.mac, status.ip.as_deref()).await {
        Ok(ip) => report.ip = ip.map(|a| a.to_string()),
        Err(Pending::Wait(c)) => return Ok(Outcome::waiting(report, c, BUSY_RESYNC)),
        Err(Pending::Failed(e)) => return Err(e.into()),
    }

    // What the domain is now.
    let domain = inputs.domain_name();
    let mut current = match hv.domain_status(&domain).await {
        Ok(s) => Some(s),
        Err(e) if e.is_not_found() => None,
        Err(e) => return Err(e.into()),
    };
    let active = current.is_some_and(|s| s.state.is_active());
    let size = match d.spec.disk.size.as_deref().map(parse_bytes).transpose() {
        Ok(s) => s,
        Err(e) => {
            let c = Cond::new(Status::False, "InvalidSpec", format!("spec.disk.size: {e}"));
            return Ok(Outcome::waiting(report, c, ADMIN_RESYNC));
        }
    };
    let plan = DiskPlan {
        base: PathBuf::from(&host.image_dir).join(&d.spec.disk.image),
        target: PathBuf::from(&inputs.disk_path),
        clone: d.spec.disk.clone,
        size,
        owner: uid.to_string(),
        adopt,
    };
    // Saved memory whose disk is gone can never be restored: a new disk under it would be
    // corrupted at once.
    if let Some(s) = current
        .as_mut()
        .filter(|s| s.has_managed_save && !s.state.is_active())
        && !tokio::fs::try_exists(&plan.target).await.unwrap_or(true)
    {
        let why = format!("its disk {} is gone", plan.target.display());
        lifecycle::discard_saved_memory(ctx, d, &domain, &why).await?;
        s.has_managed_save = false;
    }
    // Saved memory from before the desktop last moved here: it ran on another host since, from
    // the same (shared) disk, so the memory no longer matches the disk. The disk is what it
    // has now: it boots from it, never from a fresh clone.
    let mut ran_elsewhere = false;
    if let Some(s) = current
        .as_mut()
        .filter(|s| s.has_managed_save && !s.state.is_active())
        && let Some(m) = status.last_move.as_ref()
        && lifecycle::saved_before(ctx, &domain, m.at.0).await
    {
        let why = format!(
            "the desktop ran on host {} after it was saved here (it moved at {})",
            m.from, m.at.0
        );
        lifecycle::discard_saved_memory(ctx, d, &domain, &why).await?;
        s.has_managed_save = false;
        ran_elsewhere = true;
    }
    let step = power::decide(&Facts {
        hold: None,
        want_on: d.spec.power == Power::On,
        domain: current.map(|s| DomainView {
            active: s.state.is_active(),
            managed_save: s.has_managed_save,
        }),
        running_reason: conditions::find(&status.conditions, RUNNING).map(|c| c.reason.as_str()),
        shut_itself_down: guest_shut_down(d, status),
    });

    // Disk: made once; a non-persistent desktop gets a fresh clone each time it boots (never
    // under saved memory, which refers to the disk it has, nor right after it ran elsewhere).
    let fresh = step == (Step::Start { restore: false })
        && !d.spec.disk.persistent
        && !ran_elsewhere
        && current.is_some_and(|s| s.state == DomainState::ShutOff && !s.has_managed_save);
    if active && adopt {
        // A running domain an earlier release defined: its disk gets its owner record now.
        if let Err(e) = disks::adopt(&plan.target, uid).await {
            tracing::warn!(disk = %inputs.disk_path, error = %e, "cannot record the owner of an adopted disk");
        }
    }
    if !active {
        match disks::prepare(&cfg.qemu_img, &plan, fresh).await {
            Ok(Prepared::Created) => {
                tracing::info!(disk = %inputs.disk_path, clone = ?plan.clone, fresh, "disk created");
            }
            Ok(Prepared::Existing) => {}
            Err(e) => {
                let wait = if e.is_transient() {
                    BUSY_RESYNC
                } else {
                    ADMIN_RESYNC
                };
                let c = Cond::new(Status::False, e.reason(), e.to_string());
                return Ok(Outcome::waiting(report, c, wait));
            }
        }
    }

    // Definition (skipped when unchanged since this process defined it).
    let xml = match inputs.to_xml() {
        Ok(x) => x,
        Err(e) => {
            let c = Cond::new(Status::False, "InvalidSpec", e.to_string());
            return Ok(Outcome::waiting(report, c, ADMIN_RESYNC));
        }
    };
    let xml_hash = fnv1a64(xml.as_bytes());
    if current.is_none() || !ctx.defined_already(uid, xml_hash) {
        match hv.define_domain(&xml).await {
            Ok(_) => ctx.record_defined(uid, xml_hash),
            Err(e) if e.is_transient() => return Err(e.into()),
            Err(e) => {
                let c = Cond::new(Status::False, "DefineFailed", e.to_string());
                return Ok(Outcome::waiting(report, c, ADMIN_RESYNC));
            }
        }
    }
    report.defined = Some(Cond::new(
        Status::True,
        "Defined",
        format!("domain {domain} is defined on {}", cfg.node_name),
    ));

    // A rotated password reaches the running domain at once (the definition has it already).
    if active && !ctx.password_pushed(uid, &password_version) {
        let graphics = graphics_xml(&inputs).map_err(|e| {
            Error::Hypervisor(crate::hypervisor::HypervisorError::Rejected {
                op: "update live device",
                target: domain.clone(),
                message: e.to_string(),
            })
        })?;
        hv.update_live_device(&domain, &graphics).await?;
        ctx.record_password(uid, &password_version);
    }

    // Power.
    let done = lifecycle::execute(ctx, d, uid, &domain, current.map(|s| s.state), step).await?;
    // A running desktop is looked at again when its activity is due for a sample.
    let requeue = if done.running.status == Status::True {
        done.requeue.min(ctx.config.activity_interval)
    } else {
        done.requeue
    };
    report.running_size = match current {
        Some(s) if s.state.is_active() => {
            Some(size_of(s.vcpus, s.max_memory_kib.saturating_mul(1024)))
        }
        // Started from its definition now (a restore from saved memory keeps the saved size:
        // the next pass reads it from the domain).
        Some(s) if done.started && !s.has_managed_save => {
            Some(size_of(inputs.vcpus, inputs.memory_bytes))
        }
        None if done.started => Some(size_of(inputs.vcpus, inputs.memory_bytes)),
        _ => None,
    };
    report.running = Some(done.running);
    report.activity = Some(if done.started {
        // The definition (or the saved memory, updated from it) has the current password, and
        // a fresh QEMU starts its idle countdown from zero.
        ctx.record_password(uid, &password_version);
        ctx.forget_sample(uid);
        ctx.record_session(uid, false);
        activity::started(status, now())
    } else {
        observe_activity(ctx, d, &pool, status, uid, &domain, active).await
    });
    Ok(Outcome { report, requeue })
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
    d: &Desktop,
    pool: &deskvirt_crds::ResourcePool,
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
    let connected_is_active = d
        .spec
        .idle
        .as_ref()
        .or(pool.spec.defaults.idle.as_ref())
        .is_none_or(|p| p.connected_is_active);
    let in_use = activity::in_use(guest, counters.spice_client.is_some(), connected_is_active);
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
