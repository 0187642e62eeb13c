//! The Desktop controller: validates, binds a desktop once to a host (port, MAC) with the pure
//! scheduler and the pool's ledger, keeps its console Secret, derives its phase from the agent's
//! conditions and the host's heartbeat, and releases the ledger when it is deleted.

use std::sync::Arc;
use std::time::Duration;

use deskvirt_crds::conditions::{self, Status, condition};
use deskvirt_crds::constants::condition::{READY, SCHEDULED};
use deskvirt_crds::constants::{
    ANNOTATION_FORCE_DELETE, ANNOTATION_ROTATE_PASSWORD, FINALIZER_AGENT, FINALIZER_OPERATOR,
    LABEL_DESKTOP, LABEL_NODE, LABEL_POOL,
};
use deskvirt_crds::desktop::{Desktop, DesktopStatus, Phase};
use deskvirt_crds::quantity::parse_duration;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio::sync::watch;

use super::{Categorized, apply_meta, apply_status, kube_transient, on_leadership};
use crate::allocators::Claim;
use crate::console::{self, Console};
use crate::context::{Context, stopped};
use crate::phase::{self, Facts};
use crate::scheduler::{PoolIndex, Request, schedule};
use crate::world::{host_views, pool_of};

const NAME: &str = "desktop";

/// Why a Desktop reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot {action}")]
    Kube {
        action: &'static str,
        source: kube::Error,
    },
    #[error("cannot draw a console password")]
    Random(#[source] getrandom::Error),
    #[error("desktop has no {0}")]
    MissingField(&'static str),
}

impl Categorized for Error {
    fn category(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "KubeApi",
            Error::Random(_) => "Random",
            Error::MissingField(_) => "InvalidObject",
        }
    }
    fn is_transient(&self) -> bool {
        match self {
            Error::Kube { source, .. } => kube_transient(source),
            Error::Random(_) => true,
            Error::MissingField(_) => false,
        }
    }
}

fn kube(action: &'static str) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Kube { action, source }
}

/// Runs the controller until `stop`.
pub async fn run(ctx: Arc<Context>, selector: String, stop: watch::Receiver<bool>) {
    let client = ctx.client.clone();
    let cfg = if selector.is_empty() {
        watcher::Config::default()
    } else {
        watcher::Config::default().labels(&selector)
    };
    let stores = ctx.stores.clone();
    let by_node = stores.clone();
    let by_pool = stores.clone();
    Controller::new(Api::<Desktop>::all(client.clone()), cfg.clone())
        .owns(
            Api::<Secret>::all(client.clone()),
            watcher::Config::default().labels(LABEL_DESKTOP),
        )
        .watches(
            Api::<deskvirt_crds::DomainNode>::all(client.clone()),
            cfg.clone(),
            move |node| {
                // Desktops on the host (health) and pending desktops of its pool (capacity).
                let name = node.name_any();
                let pool = pool_of(&node, &by_node.pools.state());
                by_node
                    .desktops
                    .state()
                    .iter()
                    .filter(|d| {
                        let bound = d.status.as_ref().and_then(|s| s.node.as_deref());
                        bound == Some(name.as_str())
                            || (bound.is_none() && Some(&d.spec.pool) == pool.as_ref())
                    })
                    .map(|d| ObjectRef::from_obj(d.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .watches(
            Api::<deskvirt_crds::ResourcePool>::all(client.clone()),
            cfg,
            move |pool| {
                let name = pool.name_any();
                by_pool
                    .desktops
                    .state()
                    .iter()
                    .filter(|d| d.spec.pool == name)
                    .map(|d| ObjectRef::from_obj(d.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .reconcile_all_on(on_leadership(ctx.leader.clone()))
        .graceful_shutdown_on(stopped(stop))
        .run(
            reconcile,
            |d, e, c| super::error_policy(NAME, &d, e, &c),
            ctx,
        )
        .for_each(|_| async {})
        .await;
}

/// One pass over a Desktop.
#[tracing::instrument(skip_all, fields(desktop = %d.name_any(), ns = d.namespace().unwrap_or_default()))]
pub async fn reconcile(d: Arc<Desktop>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconciled(NAME);
    if !ctx.is_leader() {
        return Ok(Action::await_change());
    }
    let ns = d.namespace().ok_or(Error::MissingField("namespace"))?;
    let uid = d.uid().ok_or(Error::MissingField("uid"))?;
    let api: Api<Desktop> = Api::namespaced(ctx.client.clone(), &ns);
    let action = if d.metadata.deletion_timestamp.is_some() {
        cleanup(&d, &ctx, &api, &uid).await?
    } else {
        apply(&d, &ctx, &api, &ns, &uid).await?
    };
    ctx.succeeded(&format!("{NAME}/{uid}"));
    Ok(action)
}

fn meta_body(d: &Desktop, node: Option<&str>, finalizer: bool) -> serde_json::Value {
    let mut labels = serde_json::Map::new();
    labels.insert(LABEL_POOL.into(), json!(d.spec.pool));
    if let Some(n) = node {
        labels.insert(LABEL_NODE.into(), json!(n));
    }
    let finalizers: Vec<&str> = if finalizer {
        vec![FINALIZER_OPERATOR]
    } else {
        vec![]
    };
    json!({
        "apiVersion": "deskvirt.io/v1alpha1",
        "kind": "Desktop",
        "metadata": {
            "name": d.name_any(),
            "namespace": d.namespace(),
            "labels": labels,
            "finalizers": finalizers,
        }
    })
}

fn has_meta(d: &Desktop, node: Option<&str>) -> bool {
    let labels = d.labels();
    d.finalizers().iter().any(|f| f == FINALIZER_OPERATOR)
        && labels.get(LABEL_POOL) == Some(&d.spec.pool)
        && node.is_none_or(|n| labels.get(LABEL_NODE).map(String::as_str) == Some(n))
}

/// The operator's part of the status, as applied.
#[derive(Clone, Debug, PartialEq)]
struct Owned {
    phase: Phase,
    node: Option<String>,
    port: Option<u16>,
    mac: Option<String>,
    secret: Option<String>,
    conditions: Vec<Condition>,
    generation: Option<i64>,
}

impl Owned {
    fn from_status(st: &DesktopStatus) -> Self {
        Self {
            phase: st.phase.unwrap_or_default(),
            node: st.node.clone(),
            port: st.spice.as_ref().and_then(|s| s.port),
            mac: st.mac.clone(),
            secret: st.spice.as_ref().and_then(|s| s.password_secret.clone()),
            conditions: st
                .conditions
                .iter()
                .filter(|c| c.type_ == SCHEDULED || c.type_ == READY)
                .cloned()
                .collect(),
            generation: st.observed_generation,
        }
    }

    fn same_as(&self, o: &Owned) -> bool {
        self.phase == o.phase
            && self.node == o.node
            && self.port == o.port
            && self.mac == o.mac
            && self.secret == o.secret
            && self.generation == o.generation
            && !conditions::differ_ignoring_time(&self.conditions, &o.conditions)
    }

    fn body(&self, d: &Desktop) -> serde_json::Value {
        let mut status = serde_json::Map::new();
        status.insert("phase".into(), json!(self.phase));
        if let Some(n) = &self.node {
            status.insert("node".into(), json!(n));
        }
        let mut spice = serde_json::Map::new();
        if let Some(p) = self.port {
            spice.insert("port".into(), json!(p));
        }
        if let Some(s) = &self.secret {
            spice.insert("passwordSecret".into(), json!(s));
        }
        if !spice.is_empty() {
            status.insert("spice".into(), spice.into());
        }
        if let Some(m) = &self.mac {
            status.insert("mac".into(), json!(m));
        }
        status.insert("conditions".into(), json!(self.conditions));
        if let Some(g) = self.generation {
            status.insert("observedGeneration".into(), json!(g));
        }
        json!({
            "apiVersion": "deskvirt.io/v1alpha1",
            "kind": "Desktop",
            "metadata": { "name": d.name_any(), "namespace": d.namespace() },
            "status": status,
        })
    }
}

async fn write(
    d: &Desktop,
    api: &Api<Desktop>,
    current: &Owned,
    want: &Owned,
) -> Result<(), Error> {
    if current.same_as(want) {
        return Ok(());
    }
    apply_status(api, &d.name_any(), &want.body(d))
        .await
        .map_err(kube("apply desktop status"))?;
    Ok(())
}

async fn apply(
    d: &Arc<Desktop>,
    ctx: &Context,
    api: &Api<Desktop>,
    ns: &str,
    uid: &str,
) -> Result<Action, Error> {
    let now = Timestamp::now();
    let status = d.status.clone().unwrap_or_default();
    let current = Owned::from_status(&status);
    let gen_ = d.metadata.generation;
    if !has_meta(d, status.node.as_deref()) {
        apply_meta(
            api,
            &d.name_any(),
            &meta_body(d, status.node.as_deref(), true),
        )
        .await
        .map_err(kube("add finalizer and labels"))?;
    }
    let Some(node) = status.node.clone() else {
        return bind(d, ctx, api, uid, &current, now).await;
    };

    // Bound: a refused binding after a ledger rebuild gets a new port and MAC on the same host.
    let mut want = current.clone();
    {
        let mut ledgers = ctx.ledgers.lock().await;
        if ledgers.ready
            && ledgers.rebind.contains(uid)
            && let Some(pool) = ctx.stores.pool(&d.spec.pool)
            && let Ok(ledger) = ledgers.of(&pool, &ctx.stores)
        {
            let claim = Claim {
                desktop: uid,
                host: &node,
                fixed_mac: d.spec.network.mac.as_deref(),
            };
            if let Ok(b) = ledger.bind(&claim) {
                want.port = Some(b.port);
                want.mac = Some(b.mac.to_string());
                ledgers.rebind.remove(uid);
                ctx.event(
                    d.as_ref(),
                    EventType::Warning,
                    "BindingConflict",
                    "Rebind",
                    format!(
                        "recorded port or MAC was held by an older desktop; now port {} MAC {}",
                        b.port, b.mac
                    ),
                )
                .await;
            }
        }
    }

    // Console Secret.
    let secret = ensure_console(d, ctx, ns, uid, &node, want.port).await?;
    want.secret = Some(secret);

    // Phase from the agent's conditions and the host's heartbeat.
    let heartbeat = ctx.heartbeat(&node, now);
    let alive = heartbeat.is_fresh() && ctx.stores.node(&node).is_some();
    let derived = phase::derive(&Facts {
        bound: true,
        host_alive: alive,
        power: d.spec.power,
        conditions: &status.conditions,
    });
    want.phase = derived.phase;
    want.generation = gen_;
    let prev = &status.conditions;
    let mut conds = want.conditions.clone();
    conditions::upsert(
        &mut conds,
        condition(
            prev,
            SCHEDULED,
            Status::True,
            "Bound",
            format!("bound to host {node}"),
            gen_,
            now,
        ),
    );
    let ready_status = if derived.phase == Phase::Unknown {
        Status::Unknown
    } else {
        Status::from_bool(derived.ready)
    };
    conditions::upsert(
        &mut conds,
        condition(
            prev,
            READY,
            ready_status,
            derived.reason,
            derived.message.clone(),
            gen_,
            now,
        ),
    );
    want.conditions = conds;
    write(d, api, &current, &want).await?;
    if current.phase != want.phase {
        let t = if matches!(want.phase, Phase::Unknown | Phase::Failed) {
            EventType::Warning
        } else {
            EventType::Normal
        };
        ctx.event(d.as_ref(), t, want.phase.as_str(), "Phase", derived.message)
            .await;
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// Schedules and binds an unbound desktop, or records why it cannot be placed.
async fn bind(
    d: &Arc<Desktop>,
    ctx: &Context,
    api: &Api<Desktop>,
    uid: &str,
    current: &Owned,
    now: Timestamp,
) -> Result<Action, Error> {
    let gen_ = d.metadata.generation;
    let prev = d
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let unschedulable = |reason: &str, message: String| {
        let mut want = current.clone();
        want.phase = Phase::Pending;
        want.generation = gen_;
        conditions::upsert(
            &mut want.conditions,
            condition(
                &prev,
                SCHEDULED,
                Status::False,
                reason,
                message.clone(),
                gen_,
                now,
            ),
        );
        conditions::upsert(
            &mut want.conditions,
            condition(&prev, READY, Status::False, reason, message, gen_, now),
        );
        want
    };
    let mut ledgers = ctx.ledgers.lock().await;
    if !ledgers.ready {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let request = match Request::from_spec(&d.spec) {
        Ok(r) => r,
        Err(e) => {
            let want = unschedulable("InvalidSpec", e.to_string());
            write(d, api, current, &want).await?;
            return Ok(Action::await_change());
        }
    };
    let mut index = PoolIndex::new();
    let pool = ctx.stores.pool(&d.spec.pool);
    if let Some(p) = &pool {
        index.apply(&d.spec.pool, &p.spec);
    }
    let ledger = match &pool {
        Some(p) => match ledgers.of(p, &ctx.stores) {
            Ok(l) => Some(l),
            Err(e) => {
                let want = unschedulable("InvalidPool", format!("pool {}: {e}", d.spec.pool));
                write(d, api, current, &want).await?;
                return Ok(Action::await_change());
            }
        },
        None => None,
    };
    let hosts = match (&pool, index.get(&d.spec.pool)) {
        (Some(_), Some(Ok(policy))) => host_views(
            &d.spec.pool,
            policy,
            &ctx.stores.nodes.state(),
            &ctx.stores.pools.state(),
            &ctx.stores.desktops.state(),
            ledger.as_deref(),
            |n| ctx.heartbeat(n, now),
        ),
        _ => vec![],
    };
    let host = match schedule(&d.spec.pool, &index, &request, &hosts) {
        Ok(decision) => decision.host.name.clone(),
        Err(why) => {
            let was = conditions::find(&prev, SCHEDULED).map(|c| c.reason.clone());
            let want = unschedulable(why.reason(), why.to_string());
            write(d, api, current, &want).await?;
            if was.as_deref() != Some(why.reason()) {
                ctx.event(
                    d.as_ref(),
                    EventType::Warning,
                    why.reason(),
                    "Schedule",
                    why.to_string(),
                )
                .await;
            }
            // Capacity changes arrive as DomainNode and ResourcePool events.
            return Ok(Action::requeue(Duration::from_secs(300)));
        }
    };
    let Some(ledger) = ledger else {
        return Ok(Action::requeue(Duration::from_secs(1)));
    };
    let claim = Claim {
        desktop: uid,
        host: &host,
        fixed_mac: d.spec.network.mac.as_deref(),
    };
    let bound = match ledger.bind(&claim) {
        Ok(b) => b,
        Err(e) => {
            let want = unschedulable(e.category(), e.to_string());
            write(d, api, current, &want).await?;
            return Ok(Action::requeue(Duration::from_secs(300)));
        }
    };
    let name = d.name_any();
    let mut want = current.clone();
    want.node = Some(host.clone());
    want.port = Some(bound.port);
    want.mac = Some(bound.mac.to_string());
    want.secret = Some(console::secret_name(&name));
    want.phase = Phase::Scheduled;
    want.generation = gen_;
    let msg = format!(
        "bound to host {host}, SPICE port {}, MAC {}",
        bound.port, bound.mac
    );
    conditions::upsert(
        &mut want.conditions,
        condition(
            &prev,
            SCHEDULED,
            Status::True,
            "Bound",
            msg.clone(),
            gen_,
            now,
        ),
    );
    conditions::upsert(
        &mut want.conditions,
        condition(
            &prev,
            READY,
            Status::False,
            "WaitingForHost",
            "bound; the host has not defined the domain yet",
            gen_,
            now,
        ),
    );
    let written = async {
        apply_meta(api, &name, &meta_body(d, Some(&host), true))
            .await
            .map_err(kube("label the bound desktop"))?;
        apply_status(api, &name, &want.body(d))
            .await
            .map_err(kube("bind desktop"))
    }
    .await;
    if let Err(e) = written {
        ledger.release(uid);
        return Err(e);
    }
    drop(ledgers);
    ctx.metrics.bindings.inc();
    tracing::info!(host = %host, port = bound.port, "desktop bound");
    ctx.event(d.as_ref(), EventType::Normal, "Scheduled", "Bind", msg)
        .await;
    Ok(Action::await_change())
}

/// Creates or refreshes the console Secret; returns its name.
async fn ensure_console(
    d: &Desktop,
    ctx: &Context,
    ns: &str,
    uid: &str,
    node: &str,
    port: Option<u16>,
) -> Result<String, Error> {
    let name = d.name_any();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let existing = secrets
        .get_opt(&console::secret_name(&name))
        .await
        .map_err(kube("read console secret"))?;
    let rotation = d
        .annotations()
        .get(ANNOTATION_ROTATE_PASSWORD)
        .cloned()
        .unwrap_or_default();
    let host = d
        .status
        .as_ref()
        .and_then(|s| s.spice.as_ref())
        .and_then(|s| s.host.clone())
        .or_else(|| {
            ctx.stores
                .node(node)
                .and_then(|n| n.status.as_ref()?.address.clone())
        });
    let spec = Console {
        namespace: ns,
        desktop: &name,
        desktop_uid: uid,
        host: host.as_deref(),
        port,
        rotation: &rotation,
    };
    let (password, rotated) = match console::kept_password(existing.as_ref(), &rotation) {
        Some(p) => (p, false),
        None => (
            console::new_password().map_err(Error::Random)?,
            existing.is_some(),
        ),
    };
    let wanted = console::secret(&spec, &password);
    if !console::up_to_date(existing.as_ref(), &wanted) {
        let pp = PatchParams::apply(deskvirt_crds::constants::MANAGER_OPERATOR).force();
        secrets
            .patch(&console::secret_name(&name), &pp, &Patch::Apply(&wanted))
            .await
            .map_err(kube("apply console secret"))?;
        if rotated {
            ctx.event(
                d,
                EventType::Normal,
                "PasswordRotated",
                "Rotate",
                "console password rotated".into(),
            )
            .await;
        }
    }
    Ok(console::secret_name(&name))
}

/// Deletion: wait for the agent's teardown (or a forced delete of a lost host), then release
/// the ledger and drop the operator's finalizer.
async fn cleanup(
    d: &Arc<Desktop>,
    ctx: &Context,
    api: &Api<Desktop>,
    uid: &str,
) -> Result<Action, Error> {
    if !d.finalizers().iter().any(|f| f == FINALIZER_OPERATOR) {
        return Ok(Action::await_change());
    }
    let now = Timestamp::now();
    if let Some(i) = d.finalizers().iter().position(|f| f == FINALIZER_AGENT) {
        if !d.annotations().contains_key(ANNOTATION_FORCE_DELETE) {
            return Ok(Action::await_change());
        }
        let node = d.status.as_ref().and_then(|s| s.node.clone());
        let after = ctx
            .stores
            .pool(&d.spec.pool)
            .and_then(|p| parse_duration(&p.spec.failover.after).ok())
            .unwrap_or(Duration::from_secs(300));
        let lost_for = match &node {
            Some(n) if ctx.stores.node(n).is_some() => ctx.heartbeat(n, now).lost_for(now),
            _ => Duration::MAX,
        };
        if lost_for <= after {
            // The host may still clean up; look again when the grace period ends.
            let wait = if lost_for.is_zero() {
                Duration::from_secs(60)
            } else {
                after - lost_for
            };
            return Ok(Action::requeue(wait + Duration::from_secs(1)));
        }
        // Merge patch guarded by resourceVersion: fails with a conflict if anyone changed the
        // list since we read it.
        let mut rest = d.finalizers().to_vec();
        rest.remove(i);
        let patch = json!({
            "metadata": { "resourceVersion": d.resource_version(), "finalizers": rest }
        });
        api.patch(
            &d.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map_err(kube("remove the agent finalizer"))?;
        ctx.event(
            d.as_ref(),
            EventType::Warning,
            "ForceDeleted",
            "Delete",
            format!(
                "host {} is gone or lost for longer than {}; deleted without host cleanup",
                node.unwrap_or_default(),
                deskvirt_crds::quantity::format_duration(after)
            ),
        )
        .await;
        return Ok(Action::await_change());
    }
    {
        let mut ledgers = ctx.ledgers.lock().await;
        if !ledgers.ready {
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
        if let Some(pool) = ctx.stores.pool(&d.spec.pool)
            && let Ok(ledger) = ledgers.of(&pool, &ctx.stores)
        {
            let freed = ledger.release(uid);
            tracing::info!(?freed, "released ledger entries");
        } else if let Some(l) = ledgers.get_mut(&d.spec.pool) {
            l.release(uid);
        }
        ledgers.rebind.remove(uid);
        let node = d.status.as_ref().and_then(|s| s.node.as_deref());
        apply_meta(api, &d.name_any(), &meta_body(d, node, false))
            .await
            .map_err(kube("remove the operator finalizer"))?;
    }
    Ok(Action::await_change())
}
