//! The DesktopImage controller: cuts the version hosts copy (the next number whenever the
//! source changes; a URL import only in the images namespace), and copies each target host's
//! report of its copy (that host's own DomainNode `status.images`, from nowhere else: agents
//! cannot write DesktopImages) into the image's status, with `Ready` once every Ready host of the
//! target pools holds a verified copy. The write is skipped when nothing but times changed.
//! A deleted image stays (finalizer) while any Desktop is pinned to it, and says which.

use std::sync::Arc;
use std::time::Duration;

use deskvirt_core::images::{self, HostCopy, ImageReason};
use deskvirt_core::reasons::AgentReason;
use deskvirt_crds::conditions::{self, Status, condition};
use deskvirt_crds::constants::condition::{DELETING, READY};
use deskvirt_crds::constants::{FINALIZER_IMAGE_USERS, MANAGER_OPERATOR_IMAGE};
use deskvirt_crds::image::{
    Capture, CopyPhase, DesktopImage, DesktopImageStatus, HostImage, ImageCopy, PoolWriter,
    image_file,
};
use deskvirt_crds::{Desktop, DomainNode, names::fnv1a64};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use tokio::sync::watch;

use super::{
    Categorized, StatusApply, apply_meta, apply_status_as, drive, kube_transient, on_leadership,
    remove_finalizer, watch_config,
};
use crate::context::{Context, stopped};
use crate::heartbeat::Heartbeat;

const NAME: &str = "desktopimage";

/// How often an image looks again without a change: a host whose heartbeat lapses is no longer
/// waited for.
const RECHECK: Duration = Duration::from_secs(60);

/// Why a DesktopImage reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot apply image status")]
    Apply(#[source] kube::Error),
    #[error("cannot add or remove the image's finalizer")]
    Finalizer(#[source] kube::Error),
    #[error("write not sent: the leader Lease may have expired")]
    Fenced,
}

impl Categorized for Error {
    fn category(&self) -> &'static str {
        match self {
            Error::Apply(_) | Error::Finalizer(_) => "KubeApi",
            Error::Fenced => "Fenced",
        }
    }
    fn is_transient(&self) -> bool {
        match self {
            Error::Apply(e) | Error::Finalizer(e) => kube_transient(e),
            Error::Fenced => true,
        }
    }
}

/// Runs the controller until `stop` flips.
pub async fn run(ctx: Arc<Context>, selector: String, stop: watch::Receiver<bool>) {
    let client = ctx.client.clone();
    let images = ctx.stores.images.clone();
    let templates = ctx.stores.images.clone();
    let controller = deskvirt_runtime::cache::controller(
        Api::<DesktopImage>::all(client),
        watch_config(&selector),
    )
    // A host's report of its copies (or its joining a pool) wakes the images of its pool.
    .watches_stream(ctx.stores.node_changes.stream_by_key(node_key), move |n| {
        let pool = n.status.as_ref().and_then(|s| s.pool.clone());
        images
            .state()
            .iter()
            .filter(|i| pool.as_ref().is_some_and(|p| i.spec.pools.contains(p)))
            .map(|i| ObjectRef::from_obj(i.as_ref()))
            .collect::<Vec<_>>()
    })
    // A desktop pinned to an image, or no longer (deleted), wakes a deletion that waits; a
    // template that shuts down (or is bound, or deleted) wakes the images capturing it.
    .watches_stream(
        ctx.stores.desktop_changes.stream_by_key(desktop_key),
        move |d| {
            let ns = d.namespace().unwrap_or_default();
            let name = d.name_any();
            let mut woken: Vec<_> = templates
                .state()
                .iter()
                .filter(|i| i.namespace().as_deref() == Some(ns.as_str()))
                .filter(|i| {
                    i.spec
                        .source
                        .desktop
                        .as_ref()
                        .is_some_and(|t| t.name == name)
                })
                .map(|i| ObjectRef::from_obj(i.as_ref()))
                .collect();
            woken.extend(pinned_image(&d).map(|(ns, name)| ObjectRef::new(&name).within(&ns)));
            woken
        },
    )
    .reconcile_all_on(on_leadership(ctx.leader.clone()))
    .graceful_shutdown_on(stopped(stop.clone()))
    .run(
        reconcile,
        |i, e, c| super::error_policy(NAME, &i, e, &c),
        ctx,
    );
    drive(NAME, controller, stop).await;
}

/// What an image's status reads of a host, hashed: its pool, heartbeat-relevant conditions and
/// its copies' versions and phases (not their percent, which the status does not gate on).
fn node_key(n: &DomainNode) -> u64 {
    let st = n.status.as_ref();
    let copies: Vec<_> = st
        .iter()
        .flat_map(|s| s.images.iter())
        .map(|i| {
            (
                &i.uid,
                i.version,
                i.phase,
                i.percent.map(|p| p / 10),
                &i.reason,
            )
        })
        .collect();
    let text = format!(
        "{:?}|{:?}|{copies:?}",
        st.and_then(|s| s.pool.as_ref()),
        st.map(|s| conditions::find(&s.conditions, READY).map(|c| c.status.clone())),
    );
    fnv1a64(text.as_bytes())
}

/// What an image's deletion reads of a desktop: the image it is pinned to, and whether it is
/// being deleted.
type DesktopKey = (
    Option<(String, u32)>,
    bool,
    Option<String>,
    bool,
    Option<String>,
);

fn desktop_key(d: &Desktop) -> DesktopKey {
    let st = d.status.as_ref();
    (
        st.and_then(|s| s.image.as_ref())
            .map(|p| (p.uid.clone(), p.version)),
        d.metadata.deletion_timestamp.is_some(),
        st.and_then(|s| s.node.clone()),
        d.spec.power == deskvirt_crds::desktop::Power::Off,
        st.and_then(|s| {
            conditions::find(&s.conditions, deskvirt_crds::constants::condition::RUNNING)
                .map(|c| c.reason.clone())
        }),
    )
}

/// `(namespace, name)` of the image `d` is pinned to.
fn pinned_image(d: &Desktop) -> Option<(String, String)> {
    let pin = d.status.as_ref()?.image.as_ref()?;
    let (ns, name) = pin.image.split_once('/')?;
    Some((ns.to_string(), name.to_string()))
}

/// `namespace/name` of every cached Desktop pinned to the image with UID `uid`.
pub fn users(desktops: &[Arc<Desktop>], uid: &str) -> Vec<String> {
    let mut out: Vec<String> = desktops
        .iter()
        .filter(|d| {
            d.status
                .as_ref()
                .and_then(|s| s.image.as_ref())
                .is_some_and(|p| p.uid == uid)
        })
        .map(|d| format!("{}/{}", d.namespace().unwrap_or_default(), d.name_any()))
        .collect();
    out.sort();
    out
}

#[tracing::instrument(skip_all, fields(image = %image.name_any()))]
pub async fn reconcile(image: Arc<DesktopImage>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconciled(NAME);
    if !ctx.is_leader() {
        return Ok(Action::await_change());
    }
    let fence = ctx.fence.clone();
    match crate::fence::scope(fence, pass(image, ctx)).await {
        // Someone wrote since the cache was filled (the finalizer's own write, a host's
        // report): its watch event brings the news.
        Err(Error::Apply(e)) if super::is_conflict(&e) => {
            tracing::debug!(error = %e, "lost a write race; looking again");
            Ok(Action::requeue(Duration::from_secs(1)))
        }
        result => result,
    }
}

/// One pass over `image`, inside the leader's fence.
async fn pass(image: Arc<DesktopImage>, ctx: Arc<Context>) -> Result<Action, Error> {
    let (name, ns) = (image.name_any(), image.namespace());
    let api: Api<DesktopImage> =
        Api::namespaced(ctx.client.clone(), ns.as_deref().unwrap_or_default());
    let held = image
        .finalizers()
        .iter()
        .any(|f| f == FINALIZER_IMAGE_USERS);
    if image.metadata.deletion_timestamp.is_some() {
        return if held {
            release(&image, &api, &ctx).await
        } else {
            Ok(Action::await_change())
        };
    }
    if !held {
        crate::fence::check().map_err(|_| Error::Fenced)?;
        let body = serde_json::json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "DesktopImage",
            "metadata": { "name": name, "namespace": ns, "finalizers": [FINALIZER_IMAGE_USERS] },
        });
        apply_meta(&api, &name, &body)
            .await
            .map_err(Error::Finalizer)?;
        // Its watch event brings the pass that goes on.
        return Ok(Action::await_change());
    }
    let now = Timestamp::now();
    let old = image.status.clone().unwrap_or_default();
    let nodes = ctx.stores.nodes.state();
    // A template is looked up only in the image's own namespace.
    let template = image.spec.source.desktop.as_ref().and_then(|t| {
        ctx.stores
            .desktops
            .get(&ObjectRef::new(&t.name).within(ns.as_deref().unwrap_or_default()))
    });
    let want = plan(
        &image,
        &ctx.images_namespace,
        &nodes,
        |n| matches!(ctx.heartbeat(n, now), Heartbeat::Fresh { .. }),
        |p| ctx.stores.pool(p).is_some_and(|p| p.spec.storage.shared),
        template.as_deref(),
        now,
    );
    if !differs(&old, &want) {
        return Ok(Action::requeue(RECHECK));
    }
    crate::fence::check().map_err(|_| Error::Fenced)?;
    let body = StatusApply::new::<DesktopImage>(&name, ns.as_deref(), &want)
        .guarded(image.metadata.resource_version.as_deref());
    apply_status_as(&api, &body, MANAGER_OPERATOR_IMAGE)
        .await
        .map_err(Error::Apply)?;
    let reason_of = |s: &DesktopImageStatus| {
        conditions::find(&s.conditions, READY).map(|c| (c.status.clone(), c.reason.clone()))
    };
    if old.version != want.version
        && let Some(v) = want.version
    {
        let note = format!(
            "version {v} cut from the source; hosts fetch {}",
            want.file.as_deref().unwrap_or_default()
        );
        ctx.event(image.as_ref(), EventType::Normal, "VersionCut", "Cut", note)
            .await;
    }
    if reason_of(&old) != reason_of(&want)
        && let Some(c) = conditions::find(&want.conditions, READY)
    {
        let type_ = if c.status == "True" || c.reason == ImageReason::Copying.as_str() {
            EventType::Normal
        } else {
            EventType::Warning
        };
        ctx.event(
            image.as_ref(),
            type_,
            &c.reason,
            "Distribute",
            c.message.clone(),
        )
        .await;
    }
    Ok(Action::requeue(RECHECK))
}

/// How often a deletion that waits for its users looks again (their deletions wake it too).
const USERS_RECHECK: Duration = Duration::from_secs(15);

/// A deleted image: waits, saying for whom, while desktops are pinned to it; then lets it go.
/// Its files stay on the hosts (removing them is for a later change).
async fn release(
    image: &DesktopImage,
    api: &Api<DesktopImage>,
    ctx: &Context,
) -> Result<Action, Error> {
    let uid = image.uid().unwrap_or_default();
    let users = users(&ctx.stores.desktops.state(), &uid);
    if users.is_empty() {
        crate::fence::check().map_err(|_| Error::Fenced)?;
        remove_finalizer(api, image, FINALIZER_IMAGE_USERS)
            .await
            .map_err(Error::Finalizer)?;
        return Ok(Action::await_change());
    }
    let old = image.status.clone().unwrap_or_default();
    let mut want = old.clone();
    let c = condition(
        &old.conditions,
        DELETING,
        Status::True,
        ImageReason::InUse.as_str(),
        images::users_message(&users),
        image.metadata.generation,
        Timestamp::now(),
    );
    conditions::upsert(&mut want.conditions, c);
    if differs(&old, &want) {
        crate::fence::check().map_err(|_| Error::Fenced)?;
        let name = image.name_any();
        let ns = image.namespace();
        let body = StatusApply::new::<DesktopImage>(&name, ns.as_deref(), &want)
            .guarded(image.metadata.resource_version.as_deref());
        apply_status_as(api, &body, MANAGER_OPERATOR_IMAGE)
            .await
            .map_err(Error::Apply)?;
    }
    Ok(Action::requeue(USERS_RECHECK))
}

/// The image's status from its spec, its current status and the hosts: pure, so tests build
/// the inputs.
pub fn plan(
    image: &DesktopImage,
    images_namespace: &str,
    nodes: &[Arc<DomainNode>],
    host_ready: impl Fn(&str) -> bool,
    shared: impl Fn(&str) -> bool,
    template: Option<&Desktop>,
    now: Timestamp,
) -> DesktopImageStatus {
    let old = image.status.clone().unwrap_or_default();
    let prev = &old.conditions;
    let gen_ = image.metadata.generation;
    let name = image.name_any();
    let ns = image.namespace().unwrap_or_default();
    let uid = image.uid().unwrap_or_default();
    // A refusal keeps what was cut before: hosts keep the current version, desktops keep
    // cloning it.
    let refuse = |reason: ImageReason, message: String| DesktopImageStatus {
        conditions: vec![condition(
            prev,
            READY,
            Status::False,
            reason.as_str(),
            message,
            gen_,
            now,
        )],
        observed_generation: gen_,
        ..old.clone()
    };
    let same = old.source.as_ref() == Some(&image.spec.source);
    let source = &image.spec.source;
    let capture = match (&source.http, &source.desktop) {
        (Some(_), None) if !images::may_import_url(&ns, images_namespace) => {
            let message = format!(
                "spec.source.http: only DesktopImages of the images namespace {images_namespace} \
                 may import from a URL (a URL a tenant controls could reach inside the cluster); \
                 ask an administrator to import it there"
            );
            return refuse(ImageReason::SourceNotAllowed, message);
        }
        (Some(_), None) => None,
        // Kept once cut, unless the template moved or was made again before its host made
        // the file (the capture can only happen where the disk is).
        (None, Some(_)) if same && (old.sha256.is_some() || capture_holds(&old, template)) => {
            old.capture.clone()
        }
        (None, Some(t)) => match template_capture(image, &t.name, template) {
            Ok(c) => Some(c),
            Err((reason, message)) => return refuse(reason, message),
        },
        _ => {
            let message = "spec.source: set exactly one of http and desktop".to_string();
            return refuse(ImageReason::InvalidSource, message);
        }
    };
    // A capture whose template moved is cut again, as the next version.
    let recut = same && source.desktop.is_some() && capture != old.capture;
    let version = images::version_for(old.version, same && !recut);
    let same = same && !recut;
    let mut copies = Vec::new();
    let mut facts = Vec::new();
    // The pool of each of `facts`.
    let mut copies_pools = Vec::new();
    let mut sizes = None;
    // The sum the capturing host reported with its Ready copy.
    let mut captured_sum = None;
    for n in nodes {
        let Some(pool) = n.status.as_ref().and_then(|s| s.pool.clone()) else {
            continue;
        };
        if !image.spec.pools.contains(&pool) {
            continue;
        }
        let node = n.name_any();
        let report: Option<&HostImage> = n.status.as_ref().and_then(|s| {
            s.images
                .iter()
                .find(|i| i.uid == uid && i.version == version)
        });
        let phase = report.map_or(CopyPhase::Pending, |r| r.phase);
        if phase == CopyPhase::Ready && sizes.is_none() {
            sizes = report.map(|r| (r.bytes, r.virtual_bytes));
        }
        if phase == CopyPhase::Ready && capture.as_ref().is_some_and(|c| c.node == node) {
            captured_sum = report.and_then(|r| r.sha256.clone());
        }
        copies_pools.push(pool.clone());
        facts.push(HostCopy {
            node: node.clone(),
            host_ready: host_ready(&node),
            phase,
            reason: report.and_then(|r| r.reason.clone()),
        });
        copies.push(ImageCopy {
            node,
            pool,
            phase,
            percent: report
                .and_then(|r| r.percent)
                .filter(|_| phase == CopyPhase::Copying),
            reason: report.and_then(|r| r.reason.clone()),
            message: report.and_then(|r| r.message.clone()),
        });
    }
    copies.sort_by(|a, b| a.node.cmp(&b.node));
    copies.truncate(1000);
    // A capture's sum is the one its host computed; an http source names its own.
    let sha256 = match (&capture, source.named_sha256()) {
        (_, Some(sum)) => Some(sum.to_string()),
        (Some(_), None) => old.sha256.clone().filter(|_| same).or(captured_sum),
        (None, None) => None,
    };
    let pools: std::collections::BTreeSet<&String> = image.spec.pools.iter().collect();
    let writers = pools
        .into_iter()
        .filter(|p| shared(p))
        .filter_map(|pool| {
            // The host capturing the version writes its pool's file.
            if let Some(c) = capture.as_ref().filter(|c| &c.pool == pool) {
                return Some(PoolWriter {
                    pool: pool.clone(),
                    node: c.node.clone(),
                });
            }
            let hosts: Vec<HostCopy> = facts
                .iter()
                .zip(&copies_pools)
                .filter(|(_, p)| *p == pool)
                .map(|(f, _)| f.clone())
                .collect();
            let current = old
                .writers
                .iter()
                .find(|w| &w.pool == pool)
                .map(|w| w.node.as_str());
            let node = images::shared_writer(current, &hosts)?;
            Some(PoolWriter {
                pool: pool.clone(),
                node,
            })
        })
        .collect();
    let mut summary = images::summarize(&format!("{ns}/{name}"), version, &facts);
    if let Some(c) = capture.as_ref().filter(|_| sha256.is_none())
        && summary.reason != ImageReason::CopyFailed
    {
        summary.reason = ImageReason::Capturing;
        summary.message = format!(
            "host {} captures Desktop {ns}/{} into v{version}",
            c.node, c.desktop
        );
    }
    let status = if summary.holds {
        Status::True
    } else {
        Status::False
    };
    let (actual_bytes, virtual_bytes) = sizes.unwrap_or((old.actual_bytes, old.virtual_bytes));
    DesktopImageStatus {
        version: Some(version),
        file: Some(image_file(&uid, version)),
        source: Some(image.spec.source.clone()),
        sha256,
        capture,
        hosts: Some(format!("{}/{}", summary.ready, summary.total)),
        actual_bytes: if same {
            actual_bytes
        } else {
            sizes.and_then(|s| s.0)
        },
        virtual_bytes: if same {
            virtual_bytes
        } else {
            sizes.and_then(|s| s.1)
        },
        copies,
        writers,
        conditions: vec![condition(
            prev,
            READY,
            status,
            summary.reason.as_str(),
            summary.message,
            gen_,
            now,
        )],
        observed_generation: gen_,
    }
}

/// Whether `new` says anything `old` does not, transition times aside.
fn differs(old: &DesktopImageStatus, new: &DesktopImageStatus) -> bool {
    let strip = |s: &DesktopImageStatus| DesktopImageStatus {
        conditions: vec![],
        ..s.clone()
    };
    strip(old) != strip(new) || conditions::differ_ignoring_time(&old.conditions, &new.conditions)
}

/// Whether the capture recorded in `old` still names `template` where it is bound now.
fn capture_holds(old: &DesktopImageStatus, template: Option<&Desktop>) -> bool {
    let (Some(c), Some(d)) = (old.capture.as_ref(), template) else {
        return false;
    };
    d.metadata.uid.as_deref() == Some(c.desktop_uid.as_str())
        && d.status.as_ref().and_then(|s| s.node.as_deref()) == Some(c.node.as_str())
}

/// The capture of template `name` for `image`, or why it cannot be cut now (the reason and a
/// message naming the field). `template` is the Desktop of that name in the image's namespace.
fn template_capture(
    image: &DesktopImage,
    name: &str,
    template: Option<&Desktop>,
) -> Result<Capture, (ImageReason, String)> {
    let ns = image.namespace().unwrap_or_default();
    let field = "spec.source.desktop.name";
    let Some(d) = template.filter(|d| d.metadata.deletion_timestamp.is_none()) else {
        let m = format!("{field}: Desktop {ns}/{name} not found");
        return Err((ImageReason::TemplateNotFound, m));
    };
    let st = d.status.clone().unwrap_or_default();
    let (Some(node), Some(desktop_uid)) = (st.node.clone(), d.uid()) else {
        let m = format!("{field}: Desktop {ns}/{name} is not bound to a host yet");
        return Err((ImageReason::TemplateNotBound, m));
    };
    let pool = d.pool().to_string();
    if !image.spec.pools.contains(&pool) {
        let m = format!(
            "{field}: Desktop {ns}/{name} is in pool {pool}, which is not in spec.pools ({})",
            image.spec.pools.join(", ")
        );
        return Err((ImageReason::TemplateNotInPool, m));
    }
    // Off as its host reported it (the phase says Stopped as soon as spec.power is Off, while
    // the guest still shuts down and QEMU holds the disk).
    let off = conditions::find(&st.conditions, deskvirt_crds::constants::condition::RUNNING)
        .filter(|c| c.status == "False")
        .and_then(|c| AgentReason::parse(&c.reason))
        .is_some_and(|r| {
            matches!(
                r,
                AgentReason::Stopped | AgentReason::Shutdown | AgentReason::IdleShutdown
            )
        });
    // Its memory saved (suspended by the idle policy): its file systems are mounted.
    let saved = crate::controllers::drain::memory_saved(d);
    let stopped = st.phase == Some(deskvirt_crds::desktop::Phase::Stopped) && off && !saved;
    if d.spec.power != deskvirt_crds::desktop::Power::Off || !stopped {
        let m = format!(
            "{field}: Desktop {ns}/{name} is not stopped (phase {}); shut it down \
             (spec.power: Off) to capture it",
            st.phase.map_or("unknown", |p| p.as_str())
        );
        return Err((ImageReason::TemplateRunning, m));
    }
    Ok(Capture {
        desktop: name.to_string(),
        desktop_uid,
        node,
        pool,
    })
}

/// Whether Desktop `uid` is the template of an image version whose capture is not made yet.
pub fn capturing(images: &[Arc<DesktopImage>], uid: &str) -> bool {
    images
        .iter()
        .filter_map(|i| i.status.as_ref())
        .any(|s| s.sha256.is_none() && s.capture.as_ref().is_some_and(|c| c.desktop_uid == uid))
}

/// Where a bound desktop's disk may go, for its image: the hosts holding a verified copy of
/// the version it is pinned to (`status.image`), since its disk's backing file is that copy.
/// `None` for a desktop cloned from a plain file (no constraint).
pub struct PinnedHosts {
    /// What the desktop is pinned to, for messages (`<ns>/<name> v<N>`).
    pub what: String,
    pub hosts: std::collections::BTreeSet<String>,
}

impl PinnedHosts {
    /// The constraint of `d`, read from `nodes`' reports.
    pub fn of(d: &Desktop, nodes: &[Arc<DomainNode>]) -> Option<Self> {
        let pin = d.status.as_ref()?.image.as_ref()?;
        Some(Self {
            what: format!("DesktopImage {} v{}", pin.image, pin.version),
            hosts: ready_hosts(nodes, &pin.uid, pin.version)
                .into_iter()
                .collect(),
        })
    }

    /// Whether host `h` holds the verified copy.
    pub fn allows(&self, h: &str) -> bool {
        self.hosts.contains(h)
    }

    /// Why host `h` is left out.
    pub fn refusal(&self, h: &str) -> String {
        format!(
            "host {h} holds no verified copy of {}, the base of the desktop's disk",
            self.what
        )
    }
}

/// The hosts where version `version` of the image with UID `uid` is Ready, as they report.
pub fn ready_hosts(nodes: &[Arc<DomainNode>], uid: &str, version: u32) -> Vec<String> {
    nodes
        .iter()
        .filter(|n| {
            n.status.as_ref().is_some_and(|s| {
                s.images
                    .iter()
                    .any(|i| i.uid == uid && i.version == version && i.phase == CopyPhase::Ready)
            })
        })
        .map(|n| n.name_any())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use deskvirt_crds::DomainNodeStatus;
    use deskvirt_crds::image::{DesktopImageSpec, HttpSource, ImageSource};

    fn image(ns: &str) -> DesktopImage {
        let mut i = DesktopImage::new(
            "lab",
            DesktopImageSpec {
                source: ImageSource {
                    desktop: None,
                    http: Some(HttpSource {
                        url: "http://origin/lab.qcow2".into(),
                        sha256: "a".repeat(64),
                    }),
                },
                pools: vec!["p".into()],
            },
        );
        i.metadata.namespace = Some(ns.into());
        i.metadata.uid = Some("u1".into());
        i.metadata.generation = Some(1);
        i
    }

    fn node(name: &str, pool: &str, copies: Vec<HostImage>) -> Arc<DomainNode> {
        let mut n = DomainNode::new(name, Default::default());
        n.status = Some(DomainNodeStatus {
            pool: Some(pool.into()),
            images: copies,
            ..Default::default()
        });
        Arc::new(n)
    }

    fn copy(version: u32, phase: CopyPhase) -> HostImage {
        HostImage {
            sha256: (phase == CopyPhase::Ready).then(|| "a".repeat(64)),
            bytes: Some(10),
            virtual_bytes: Some(20),
            ..HostImage::new("u1", "deskvirt-images/lab", version, phase)
        }
    }

    #[test]
    fn copies_come_from_each_host_of_the_pools_and_ready_waits_for_all() {
        let nodes = vec![
            node("a", "p", vec![copy(1, CopyPhase::Ready)]),
            node("b", "p", vec![copy(1, CopyPhase::Copying)]),
            node("c", "other", vec![copy(1, CopyPhase::Ready)]),
        ];
        let st = plan(
            &image("deskvirt-images"),
            "deskvirt-images",
            &nodes,
            |_| true,
            |_| false,
            None,
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(st.version, Some(1));
        assert_eq!(st.file.as_deref(), Some("managed/u1/v1.qcow2"));
        assert_eq!(st.hosts.as_deref(), Some("1/2"));
        assert_eq!(st.copies.len(), 2);
        assert_eq!(st.actual_bytes, Some(10));
        assert_eq!(st.conditions[0].reason, "Copying");
        assert_eq!(ready_hosts(&nodes, "u1", 1), ["a", "c"]);
    }

    #[test]
    fn a_tenant_url_import_is_refused_and_cuts_no_version() {
        let st = plan(
            &image("team-a"),
            "deskvirt-images",
            &[],
            |_| true,
            |_| false,
            None,
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(st.version, None);
        assert_eq!(st.conditions[0].reason, "SourceNotAllowed");
        assert!(st.conditions[0].message.contains("spec.source.http"));
    }

    #[test]
    fn a_new_source_cuts_the_next_version_and_old_reports_do_not_count() {
        let mut img = image("deskvirt-images");
        let mut old = plan(
            &img,
            "deskvirt-images",
            &[],
            |_| true,
            |_| false,
            None,
            Timestamp::UNIX_EPOCH,
        );
        old.version = Some(3);
        img.status = Some(old);
        if let Some(h) = img.spec.source.http.as_mut() {
            h.sha256 = "b".repeat(64);
        }
        let nodes = vec![node("a", "p", vec![copy(3, CopyPhase::Ready)])];
        let st = plan(
            &img,
            "deskvirt-images",
            &nodes,
            |_| true,
            |_| false,
            None,
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(st.version, Some(4));
        assert_eq!(st.file.as_deref(), Some("managed/u1/v4.qcow2"));
        assert_eq!(st.hosts.as_deref(), Some("0/1"));
    }

    #[test]
    fn a_shared_pool_names_one_writer_and_keeps_it() {
        let nodes = vec![
            node("b", "p", vec![]),
            node("a", "p", vec![]),
            node("c", "other", vec![]),
        ];
        let st = plan(
            &image("deskvirt-images"),
            "deskvirt-images",
            &nodes,
            |_| true,
            |p| p == "p",
            None,
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(
            st.writers,
            [PoolWriter {
                pool: "p".into(),
                node: "a".into()
            }]
        );
        // Kept while host a is Ready; another host once it is not.
        let mut img = image("deskvirt-images");
        img.status = Some(st);
        let writer = |host_ready: &dyn Fn(&str) -> bool, shared: bool| {
            let st = plan(
                &img,
                "deskvirt-images",
                &nodes,
                host_ready,
                |p| shared && p == "p",
                None,
                Timestamp::UNIX_EPOCH,
            );
            st.writers.first().map(|w| w.node.clone())
        };
        assert_eq!(writer(&|_| true, true).as_deref(), Some("a"));
        assert_eq!(writer(&|n| n != "a", true).as_deref(), Some("b"));
        // Not shared: every host fetches its own.
        assert_eq!(writer(&|_| true, false), None);
        // A pool named twice still has one writer (the list is keyed by pool).
        let mut twice = image("deskvirt-images");
        twice.spec.pools = vec!["p".into(), "p".into()];
        let st = plan(
            &twice,
            "deskvirt-images",
            &nodes,
            |_| true,
            |p| p == "p",
            None,
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(st.writers.len(), 1);
    }

    /// Desktop `team-a/template` (UID `t-uid`), bound to `node` when given, in pool `pool`.
    fn template(node: Option<&str>, pool: &str, power: &str, running: bool) -> Desktop {
        let running = if running { "True" } else { "False" };
        serde_json::from_value(serde_json::json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop",
            "metadata": {"name": "template", "namespace": "team-a", "uid": "t-uid"},
            "spec": {"pool": pool, "cpu": 1, "memory": "1Gi", "power": power,
                     "disk": {"image": "i.qcow2"}},
            "status": {"node": node, "phase": if power == "Off" { "Stopped" } else { "Running" },
                       "conditions": [
                {"type": "Running", "status": running,
                 "reason": if running == "True" { "Running" } else { "Stopped" }, "message": "",
                 "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn captured_image() -> DesktopImage {
        let mut i = image("team-a");
        i.spec.source = ImageSource {
            http: None,
            desktop: Some(deskvirt_crds::image::DesktopSource {
                name: "template".into(),
                revision: None,
            }),
        };
        i
    }

    #[test]
    fn a_template_is_captured_only_shut_down_on_its_host_and_its_sum_comes_from_there() {
        let img = captured_image();
        let nodes = vec![node("a", "p", vec![]), node("b", "p", vec![])];
        let plan_with = |img: &DesktopImage, nodes: &[Arc<DomainNode>], t: Option<&Desktop>| {
            plan(
                img,
                "deskvirt-images",
                nodes,
                |_| true,
                |_| true,
                t,
                Timestamp::UNIX_EPOCH,
            )
        };
        let reason = |st: &DesktopImageStatus| st.conditions[0].reason.clone();
        let missing = plan_with(&img, &nodes, None);
        assert_eq!(reason(&missing), "TemplateNotFound");
        assert!(
            missing.conditions[0]
                .message
                .contains("spec.source.desktop.name")
        );
        assert_eq!(missing.version, None);
        let unbound = template(None, "p", "Off", false);
        assert_eq!(
            reason(&plan_with(&img, &nodes, Some(&unbound))),
            "TemplateNotBound"
        );
        let running = template(Some("b"), "p", "On", true);
        assert_eq!(
            reason(&plan_with(&img, &nodes, Some(&running))),
            "TemplateRunning"
        );
        // Off by spec but still shutting down: QEMU holds the disk.
        let mut stopping = template(Some("b"), "p", "Off", false);
        if let Some(c) = stopping
            .status
            .as_mut()
            .and_then(|s| s.conditions.first_mut())
        {
            c.reason = "Stopping".into();
        }
        assert_eq!(
            reason(&plan_with(&img, &nodes, Some(&stopping))),
            "TemplateRunning"
        );
        let elsewhere = template(Some("b"), "other", "Off", false);
        assert_eq!(
            reason(&plan_with(&img, &nodes, Some(&elsewhere))),
            "TemplateNotInPool"
        );

        // Shut down on host b: v1 is cut there, host b writes the shared pool's file.
        let stopped = template(Some("b"), "p", "Off", false);
        let cut = plan_with(&img, &nodes, Some(&stopped));
        assert_eq!(cut.version, Some(1));
        assert_eq!(reason(&cut), "Capturing");
        assert_eq!(cut.sha256, None);
        assert_eq!(
            cut.capture
                .as_ref()
                .map(|c| (c.node.as_str(), c.desktop_uid.as_str())),
            Some(("b", "t-uid"))
        );
        assert_eq!(cut.writers[0].node, "b");
        // Moved to host a before host b made the file: cut again there, as v2.
        let mut moved_img = img.clone();
        moved_img.status = Some(cut.clone());
        let on_a = template(Some("a"), "p", "Off", false);
        let recut = plan_with(&moved_img, &nodes, Some(&on_a));
        assert_eq!(recut.version, Some(2));
        assert_eq!(recut.capture.as_ref().map(|c| c.node.as_str()), Some("a"));
        assert_eq!(recut.writers[0].node, "a");
        // Kept once cut, whatever the template does next.
        let mut img = img;
        img.status = Some(cut);
        let later = template(Some("b"), "p", "On", true);
        let done = vec![
            node("a", "p", vec![]),
            node("b", "p", vec![copy(1, CopyPhase::Ready)]),
        ];
        let st = plan_with(&img, &done, Some(&later));
        assert_eq!(st.version, Some(1));
        assert_eq!(st.sha256, Some("a".repeat(64)));
        assert_eq!(st.hosts.as_deref(), Some("1/2"));

        // Both sources, or none: refused, naming the field.
        let mut both = captured_image();
        both.spec.source.http = image("team-a").spec.source.http;
        assert_eq!(
            reason(&plan_with(&both, &nodes, Some(&stopped))),
            "InvalidSource"
        );
    }
}
