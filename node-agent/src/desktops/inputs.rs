//! The first steps of converging a live Desktop: gathers what its domain is made from (the
//! pool and this host's part of it, the console password, the operator's binding, dedicated
//! CPUs, the typed domain inputs and the disk plan) and checks each, so that every input that is
//! not there yet or is wrong becomes one condition, never a crash loop. Reads only caches.

use std::path::PathBuf;
use std::sync::Arc;

use deskvirt_core::pinning::{Pinned, pin};
use deskvirt_crds::conditions::Status;
use deskvirt_crds::constants::{SECRET_KEY_PASSWORD, console_mirror_name};
use deskvirt_crds::desktop::DesktopStatus;
use deskvirt_crds::validation::{ValidDesktop, read_desktop, summary};
use deskvirt_crds::{Desktop, ResourcePool};
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use super::apply::Stop;
use super::context::DesktopContext;
use super::lifecycle::{ADMIN_RESYNC, resync};
use super::reason::Reason;
use super::status::{Cond, Report};
use crate::disks::{DiskPlan, RestorePlan};
use crate::domain::{Binding, DomainInputs, HostContext, Secret};

/// Everything a live desktop's domain is made from, checked.
pub(super) struct Inputs {
    pub pool: Arc<ResourcePool>,
    pub host: HostContext,
    pub domain: DomainInputs,
    /// A fingerprint of the console password (not the mirror's resourceVersion: the operator
    /// rewrites a mirror's labels and annotations without changing its password, and each
    /// rewrite would push the same password into the running domain again).
    pub password_version: String,
    /// The spec read once against its pool.
    pub valid: ValidDesktop,
}

impl Inputs {
    /// The disk plan of the domain named as `self.domain` says (after [`super::place`]).
    pub fn disk_plan(&self, d: &Desktop, uid: &str, adopt: bool) -> DiskPlan {
        let base = d.base_image();
        DiskPlan {
            base: PathBuf::from(&self.host.image_dir).join(base.as_deref().unwrap_or_default()),
            unverified: base.is_none().then(|| {
                "spec.disk.imageRef: the operator has not pinned an image version yet".to_string()
            }),
            target: PathBuf::from(&self.domain.disk_path),
            clone: d.spec.disk.clone,
            size: self.valid.disk_size,
            owner: uid.to_string(),
            adopt,
            restore: d
                .status
                .as_ref()
                .and_then(|s| s.restore.as_ref())
                .filter(|_| d.spec.disk.restore_from.is_some())
                .map(|r| RestorePlan {
                    dir: self
                        .pool
                        .spec
                        .backup
                        .as_ref()
                        .map(|b| PathBuf::from(&b.dir)),
                    layers: r
                        .layers
                        .iter()
                        .map(|l| (PathBuf::from(&l.location), l.checksum.clone()))
                        .collect(),
                }),
        }
    }
}

fn wait(status: Status, reason: Reason, message: impl Into<String>) -> Stop {
    let again = resync(status == Status::Unknown);
    Stop::Wait(Cond::new(status, reason, message), again)
}

/// Gathers and checks the inputs of `d`; the SPICE host goes into `report` as soon as the
/// pool is known.
pub(super) fn gather<H>(
    ctx: &DesktopContext<H>,
    d: &Desktop,
    status: &DesktopStatus,
    uid: &str,
    report: &mut Report,
) -> Result<Inputs, Stop> {
    let cfg = &ctx.config;
    let pool = ctx.pool(d.pool()).ok_or_else(|| {
        wait(
            Status::Unknown,
            Reason::WaitingForPool,
            format!("ResourcePool {} is not known to this host yet", d.pool()),
        )
    })?;
    let host = HostContext::for_pool(&cfg.node_name, &cfg.node_address, cfg.domain_type, &pool)
        .map_err(|e| wait(Status::False, Reason::InvalidPool, e.to_string()))?;
    report.spice_host = Some(if host.spice_listen == "0.0.0.0" {
        cfg.node_address.clone()
    } else {
        host.spice_listen.clone()
    });
    let (password, password_version) = console_password(ctx, uid).ok_or_else(|| {
        wait(
            Status::Unknown,
            Reason::WaitingForConsolePassword,
            "the operator has not published this desktop's console password yet",
        )
    })?;
    let mut binding = Binding::from_status(Some(status), password)
        .map_err(|e| wait(Status::Unknown, Reason::WaitingForBinding, e.to_string()))?;
    binding.pinned_cpus = pinned_cpus(ctx, d).map_err(|c| Stop::Wait(c, ADMIN_RESYNC))?;
    // The spec read once against the pool. What only the pool forbids (a looser USB policy,
    // a MAC outside its prefix) is the operator's to refuse; the value holds the pool's bound.
    let valid = read_desktop(&d.spec, Some(&pool.spec))
        .map_err(|errors| wait(Status::False, Reason::InvalidSpec, summary(&errors)))?;
    let domain = DomainInputs::from_desktop(d, &valid, &binding, &host).map_err(|e| {
        let s = if e.is_transient() {
            Status::Unknown
        } else {
            Status::False
        };
        wait(s, Reason::InvalidSpec, e.to_string())
    })?;
    Ok(Inputs {
        pool,
        host,
        domain,
        password_version,
        valid,
    })
}

/// The console password from this desktop's mirror, with the mirror's version.
pub(super) fn console_password<H>(ctx: &DesktopContext<H>, uid: &str) -> Option<(Secret, String)> {
    let mirror = ctx
        .mirrors
        .get(&ObjectRef::new(&console_mirror_name(uid)).within(&ctx.config.console_namespace))?;
    let bytes = mirror.data.as_ref()?.get(SECRET_KEY_PASSWORD)?;
    let password = String::from_utf8(bytes.0.clone()).ok()?;
    if password.is_empty() {
        return None;
    }
    let version = format!(
        "{:016x}",
        deskvirt_crds::names::fnv1a64(password.as_bytes())
    );
    Some((Secret::new(password), version))
}

/// Host CPUs for a desktop with dedicated CPUs, by the core's one rule
/// ([`deskvirt_core::pinning`]): the host keeps its pool's `reserved.cpu` first threads, and
/// the desktops bound here that ask for dedicated CPUs share out the rest, oldest first.
fn pinned_cpus<H>(ctx: &DesktopContext<H>, d: &Desktop) -> Result<Vec<u32>, Cond> {
    if !d.spec.performance.dedicated_cpus {
        return Ok(Vec::new());
    }
    let threads = ctx
        .domain_node()
        .and_then(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.cpu.as_ref().map(|c| c.threads))
        })
        .unwrap_or(0);
    let reserved = ctx.pool(d.pool()).map(|p| p.spec.reserved.cpu).unwrap_or(1);
    let others = ctx.desktops().map(|s| s.state()).unwrap_or_default();
    let uids: Vec<(Option<i64>, String, u32)> = others
        .iter()
        .filter(|o| o.spec.performance.dedicated_cpus && o.metadata.deletion_timestamp.is_none())
        .map(|o| {
            let created = o
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_second());
            (created, o.uid().unwrap_or_default(), admitted_cpu(o))
        })
        .collect();
    let pinned: Vec<Pinned<'_>> = uids
        .iter()
        .map(|(created, uid, vcpus)| Pinned {
            created: *created,
            uid,
            vcpus: *vcpus,
        })
        .collect();
    let uid = d.uid().unwrap_or_default();
    let me = Pinned {
        created: d
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_second()),
        uid: &uid,
        vcpus: admitted_cpu(d),
    };
    pin(threads, reserved, &pinned, &me).map_err(|e| {
        Cond::new(
            Status::False,
            Reason::InsufficientDedicatedCpus,
            e.to_string(),
        )
    })
}

/// The vCPUs the operator admitted for the desktop (its spec's, before it recorded any).
fn admitted_cpu(d: &Desktop) -> u32 {
    deskvirt_crds::read::admitted_cpu(&d.spec, d.status.as_ref())
}
