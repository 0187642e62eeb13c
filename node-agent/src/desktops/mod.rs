//! The agent's Desktop controller: watches only the Desktops labelled with this host, and for
//! each one converges the host (finalizer, disk, network lease, domain, power, and the idle
//! policy's suspend or shutdown while `status.reclaimed` is set) and reports the agent's part
//! of the status. Runs beside an orphan sweep that reports domains with deskvirt
//! metadata and no Desktop here, without touching them.

mod activity;
mod apply;
mod backup;
pub mod backup_removal;
pub mod bound;
mod carrier;
#[cfg(test)]
mod carrier_tests;
mod cold;
mod context;
#[cfg(test)]
mod converge_tests;
mod failure;
mod held;
pub mod inbound;
pub mod incoming;
mod inputs;
mod ip;
mod lease;
mod lifecycle;
mod migrate;
mod move_end;
pub mod orphan_policy;
pub mod orphans;
mod patch;
pub mod place;
mod power;
mod reason;
mod restore_over;
mod saved;
mod status;
mod teardown;
#[cfg(test)]
mod teardown_tests;
#[cfg(test)]
mod testkit;

use std::sync::Arc;
use std::time::Duration;

use deskvirt_crds::Desktop;
use deskvirt_crds::constants::{ANNOTATION_DESKTOP, LABEL_NODE};
use deskvirt_crds::names::label_value;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::controller::{self, Action};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};

pub use context::{DesktopConfig, DesktopContext};

use crate::agent::error_chain;
use crate::hypervisor::Hypervisor;

/// Why a Desktop reconcile failed (conditions carry the user-facing part).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("cannot {action}")]
    Kube {
        action: &'static str,
        source: kube::Error,
    },
    /// A libvirt call failed.
    #[error(transparent)]
    Hypervisor(#[from] crate::hypervisor::HypervisorError),
    /// The desktop's disk could not be prepared, for a reason that may go away by itself.
    #[error(transparent)]
    Disk(#[from] crate::disks::DiskError),
    /// The Desktop object lacks a field every stored object has.
    #[error("desktop has no {0}")]
    MissingField(&'static str),
}

impl Error {
    /// Short category for metrics labels.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Kube { .. } => "KubeApi",
            Self::Hypervisor(_) => "Libvirt",
            Self::Disk(_) => "Disk",
            Self::MissingField(_) => "InvalidObject",
        }
    }

    /// Whether trying again soon may help: the API's conflicts, throttling and server errors,
    /// and what libvirt itself calls transient.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Kube { source, .. } => kube_transient(source),
            Self::Hypervisor(e) => e.is_transient(),
            Self::Disk(e) => e.is_transient(),
            Self::MissingField(_) => false,
        }
    }

    /// The reason the failure is shown with on the Desktop.
    pub fn reason(&self) -> reason::Reason {
        match self {
            Self::Kube { .. } => reason::Reason::KubeApiFailed,
            Self::Hypervisor(e) => <reason::Reason as reason::ReasonOf>::of_hypervisor(e),
            Self::Disk(e) => <reason::Reason as reason::ReasonOf>::of_disk(e),
            Self::MissingField(_) => reason::Reason::InvalidObject,
        }
    }
}

/// Whether a Kubernetes API error may go away by itself.
fn kube_transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code == 409 || s.code == 429 || s.code >= 500,
        _ => true,
    }
}

pub(crate) fn kube(action: &'static str) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Kube { action, source }
}

/// The Desktop a console password mirror belongs to, from its `deskvirt.io/desktop` annotation.
pub(super) fn desktop_of_mirror(secret: &Secret) -> Option<ObjectRef<Desktop>> {
    let (ns, name) = secret
        .annotations()
        .get(ANNOTATION_DESKTOP)?
        .split_once('/')?;
    Some(ObjectRef::new(name).within(ns))
}

/// Desktops reconciled at once on this host. Unbounded, a burst held one apiserver connection
/// per reconcile in flight (216 with 200 desktops) and as many libvirt calls; 8 keeps a boot
/// storm moving without that.
const CONCURRENCY: u16 = 8;

/// Runs the controller until the future is dropped.
pub async fn run<H: Hypervisor + Clone + 'static>(ctx: Arc<DesktopContext<H>>) {
    let node = ctx.config.node_name.clone();
    let selector = format!("{LABEL_NODE}={}", label_value(&node));
    let desktops: Api<Desktop> = Api::all(ctx.client.clone());
    let controller =
        deskvirt_runtime::cache::controller(desktops, watcher::Config::default().labels(&selector));
    ctx.set_desktop_store(controller.store());
    controller
        .reconcile_on(
            ctx.take_mirror_touches()
                .map(StreamExt::boxed)
                .unwrap_or_else(|| futures::stream::empty().boxed()),
        )
        .with_config(controller::Config::default().concurrency(CONCURRENCY))
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

async fn reconcile<H: Hypervisor + Clone + 'static>(
    d: Arc<Desktop>,
    ctx: Arc<DesktopContext<H>>,
) -> Result<Action, Error> {
    let _busy = ctx.reconciles.begin();
    let result = if d.metadata.deletion_timestamp.is_some() {
        teardown::teardown(&d, &ctx).await
    } else {
        apply::apply(&d, &ctx).await
    };
    match &result {
        Ok(_) => {
            ctx.metrics
                .reconciles
                .get_or_create(&[("result", "ok")])
                .inc();
        }
        Err(e) => show_failure(&d, &ctx, e).await,
    }
    result
}

/// Counts the failure and, once [`failure::shown`] says so, writes it on the Desktop. Only a
/// Desktop bound here gets it (the passes fail only after that check).
async fn show_failure<H>(d: &Desktop, ctx: &DesktopContext<H>, err: &Error) {
    let Some(uid) = d.uid() else { return };
    let failures = ctx.record_failure(&uid);
    let transient = err.is_transient();
    if !failure::shown(transient, failures) {
        return;
    }
    let status = d.status.clone().unwrap_or_default();
    let report = failure::report(&status, err.reason(), transient, &error_chain(err));
    let Some(body) = status::body(&status, &report, d.metadata.generation, apply::now()) else {
        return;
    };
    let Some(ns) = d.namespace() else { return };
    let api: Api<Desktop> = Api::namespaced(ctx.client.clone(), &ns);
    if let Err(e) = patch::apply_status(&api, &d.name_any(), body).await {
        tracing::debug!(error = %error_chain(&e), "cannot show the failure on the desktop");
    }
}

fn error_policy<H: Hypervisor>(
    d: Arc<Desktop>,
    err: &Error,
    ctx: Arc<DesktopContext<H>>,
) -> Action {
    ctx.metrics
        .reconciles
        .get_or_create(&[("result", err.category())])
        .inc();
    let failures = ctx.failures(&d.uid().unwrap_or_default());
    let delay = failure::retry_in(err.is_transient(), failures);
    tracing::warn!(
        desktop = %format!("{}/{}", d.namespace().unwrap_or_default(), d.name_any()),
        category = err.category(),
        transient = err.is_transient(),
        failures,
        error = %error_chain(err),
        retry_in = ?delay,
        "desktop reconcile failed"
    );
    Action::requeue(delay)
}

/// How long a reconcile waits before looking again at a desktop in a steady state (status
/// refresh: power state, crashes, address).
pub const STEADY_RESYNC: Duration = Duration::from_secs(30);
/// How long it waits while something is on its way (a start, a shutdown, a missing input).
pub const BUSY_RESYNC: Duration = Duration::from_secs(3);
