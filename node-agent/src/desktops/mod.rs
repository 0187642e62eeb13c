//! The agent's Desktop controller: watches only the Desktops labelled with this host, and for
//! each one converges the host (finalizer, disk, network lease, domain, power, and the idle
//! policy's suspend or shutdown while `status.reclaimed` is set) and reports the agent's part
//! of the status. Runs beside an orphan sweep that reports domains with deskvirt
//! metadata and no Desktop here, without touching them.

mod activity;
mod apply;
pub mod bound;
mod context;
mod held;
mod ip;
mod lifecycle;
pub mod orphan_policy;
pub mod orphans;
mod patch;
pub mod place;
mod power;
mod status;
mod teardown;

use std::sync::Arc;
use std::time::Duration;

use deskvirt_crds::Desktop;
use deskvirt_crds::constants::{ANNOTATION_DESKTOP, LABEL_NODE};
use deskvirt_crds::names::label_value;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::controller::{self, Action};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
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
    /// The Desktop object lacks a field every stored object has.
    #[error("desktop has no {0}")]
    MissingField(&'static str),
}

impl Error {
    fn reason(&self) -> &'static str {
        match self {
            Self::Kube { .. } => "KubeApi",
            Self::Hypervisor(_) => "Libvirt",
            Self::MissingField(_) => "InvalidObject",
        }
    }
}

pub(crate) fn kube(action: &'static str) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Kube { action, source }
}

/// The Desktop a console password mirror belongs to, from its `deskvirt.io/desktop` annotation.
fn desktop_of_mirror(secret: Secret) -> Option<ObjectRef<Desktop>> {
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
    let mirrors: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.config.console_namespace);
    let controller = Controller::new(desktops, watcher::Config::default().labels(&selector));
    let store = controller.store();
    ctx.set_desktop_store(store);
    controller
        .watches(
            mirrors,
            watcher::Config::default().labels(&selector),
            desktop_of_mirror,
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
    let result = if d.metadata.deletion_timestamp.is_some() {
        teardown::teardown(&d, &ctx).await
    } else {
        apply::apply(&d, &ctx).await
    };
    if result.is_ok() {
        ctx.metrics
            .reconciles
            .get_or_create(&[("result", "ok")])
            .inc();
    }
    result
}

fn error_policy<H: Hypervisor>(
    d: Arc<Desktop>,
    err: &Error,
    ctx: Arc<DesktopContext<H>>,
) -> Action {
    ctx.metrics
        .reconciles
        .get_or_create(&[("result", err.reason())])
        .inc();
    let delay = ctx.backoff(&d.uid().unwrap_or_default());
    tracing::warn!(
        desktop = %format!("{}/{}", d.namespace().unwrap_or_default(), d.name_any()),
        reason = err.reason(),
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
