//! Binding an unbound desktop: place it with the pure scheduler, reserve its port and MAC in the
//! pool's ledger, publish its console password mirror, then write the binding once (metadata,
//! then status), onto the version of the Desktop it was decided on. Or record why it cannot be
//! placed (an invalid spec, a pool it may not use and a quota it would exceed among them).

use std::time::Duration;

use deskvirt_crds::conditions::{self, Status};
use deskvirt_crds::constants::condition::SCHEDULED;
use deskvirt_crds::constants::scheduled_reason::INVALID_POOL;
use deskvirt_crds::desktop::{Allocation, Phase};
use deskvirt_crds::image::ImagePin;
use deskvirt_crds::read::FromPoolSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;

use super::admit::admit;
use super::apply::console_event;
use super::console::{Held, ensure_mirror, write_user_secret};
use super::size;
use super::status::{
    BindFailure, Owned, bound_message, ensure_meta, label_binding, put_binding, write,
};
use super::{Error, Pass};
use crate::allocators::{Bound, Claim};
use crate::console::user::{allowed, secret_name};
use crate::controllers::chain;
use crate::scheduler::{PoolIndex, PoolPolicy, schedule};
use crate::world::host_views_counted;

/// How long after writing a binding a copy without it is taken for an older one.
const BINDING_SETTLE: Duration = Duration::from_secs(5);

/// What the ledger said, decided under its lock; acted on after the lock is released.
enum Placement {
    /// Ask again later (ledgers not rebuilt yet, or the shared cache lags).
    Later(Duration),
    /// Cannot be placed now.
    Unschedulable {
        reason: &'static str,
        message: String,
        /// When to look again; `None` waits for a change.
        retry: Option<Duration>,
        /// Whether an Event is due (the reason is new).
        event: bool,
    },
    /// Port and MAC reserved on `host`.
    Reserved {
        host: String,
        bound: Bound,
        /// The reservation was made by this pass (not kept from an earlier one).
        fresh: bool,
        /// The image version its disk clones, for a desktop with `imageRef`.
        image: Option<ImagePin>,
    },
}

/// Schedules and binds an unbound desktop, or records why it cannot be placed.
pub(super) async fn bind(pass: &Pass<'_>) -> Result<Action, Error> {
    let (d, ctx, api) = (&pass.d, pass.ctx, &pass.api);
    let (uid, now) = (pass.uid.as_str(), pass.now);
    let current = &Owned::from_status(&d.status.clone().unwrap_or_default());
    let gen_ = d.metadata.generation;
    let prev = d
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let (host, bound, fresh, image) = match place(pass, &prev).await {
        Placement::Later(delay) => return Ok(Action::requeue(delay)),
        Placement::Unschedulable {
            reason,
            message,
            retry,
            event,
        } => {
            // The labels and finalizer a bound desktop gets with its binding.
            if let Some(fresh) = ensure_meta(d, api, None).await? {
                ctx.steps.record(&fresh);
            }
            let mut want = current.clone();
            want.phase = Phase::Pending;
            want.generation = gen_;
            want.judge(
                &prev,
                now,
                (Status::False, reason, message.clone()),
                (Status::False, reason, message.clone()),
            );
            write(d, api, current, &want).await?;
            if event {
                ctx.event(d.as_ref(), EventType::Warning, reason, "Schedule", message)
                    .await;
            }
            return Ok(retry.map_or_else(Action::await_change, Action::requeue));
        }
        Placement::Reserved {
            host,
            bound,
            fresh,
            image,
        } => (host, bound, fresh, image),
    };

    let mut want = current.clone();
    want.node = Some(host.clone());
    want.port = Some(bound.port);
    want.mac = Some(bound.mac.to_string());
    // Named once written; a namespace without console Secrets never gets one.
    want.secret = d
        .namespace()
        .filter(|ns| allowed(&ctx.console_user_namespaces, ns))
        .map(|_| secret_name(&d.name_any()));
    want.phase = Phase::Scheduled;
    want.generation = gen_;
    if image.is_some() {
        want.image = image;
    }
    want.allocation = Some(Allocation {
        pool: d.spec.pool.clone(),
        cpu: d.spec.cpu,
        memory: d.spec.memory.clone(),
    });
    size::admitted(&mut want, &prev, gen_, now);
    let msg = bound_message(&host, want.port, want.mac.as_deref());
    want.judge(
        &prev,
        now,
        (Status::True, "Bound", msg.clone()),
        (
            Status::False,
            "WaitingForHost",
            "bound; the host has not defined the domain yet".into(),
        ),
    );

    if let Some(delay) = ctx.test_bind_delay {
        tracing::info!(?delay, "test: pausing before the binding is written");
        tokio::time::sleep(delay).await;
    }
    // The password first, so the host finds it as soon as it sees the binding.
    let written = match ensure_mirror(d, ctx, uid, &host).await {
        Ok(held) => commit_binding(pass, &host, &held, &prev, &mut want).await,
        Err(error) => Err(BindFailure {
            error,
            labelled: false,
        }),
    };
    if let Err(BindFailure { error, labelled }) = written {
        // Nothing landed (the finalizer neither, so no later pass would release it), or the
        // desktop is gone: the reservation goes back. Once labelled, a conflict may mean the
        // binding landed after all (or someone else's did): keep the reservation; the next
        // pass reuses it or corrects the ledger from the recorded one.
        if error.is_gone() || (fresh && (!labelled || !error.is_conflict())) {
            let mut ledgers = ctx.ledgers.lock().await;
            if let Some(l) = ledgers.get_mut(&d.spec.pool) {
                l.release(uid);
            }
        }
        return Err(error);
    }
    ctx.binding_written(uid);
    ctx.status_written(uid, want.fingerprint());
    ctx.metrics.bindings.inc();
    tracing::info!(host = %host, port = bound.port, "desktop bound");
    ctx.event(d.as_ref(), EventType::Normal, "Scheduled", "Bind", msg)
        .await;
    if let Some((reason, message)) = console_event(current, &want) {
        ctx.event(d.as_ref(), EventType::Warning, &reason, "Console", message)
            .await;
    }
    Ok(Action::await_change())
}

/// Writes the binding: the labels and finalizer, then the user's console Secret (made from
/// the labelled Desktop, so the first bound pass finds it as due nothing), then the status
/// with its `ConsoleSecret` condition. A console Secret that cannot be written does not hold
/// the binding back: the bound pass tries it again.
async fn commit_binding(
    pass: &Pass<'_>,
    host: &str,
    held: &Held,
    prev: &[Condition],
    want: &mut Owned,
) -> Result<(), BindFailure> {
    let (ctx, uid) = (pass.ctx, pass.uid.as_str());
    let labelled = label_binding(&pass.d, &pass.api, host).await?;
    // The pass goes on from the labelled version: its watch event brings nothing new.
    ctx.steps.record(&labelled);
    match write_user_secret(&labelled, ctx, uid, host, want.port, held).await {
        Ok(Some(outcome)) => {
            want.secret = outcome.secret().map(str::to_string);
            want.console(prev, pass.now, labelled.metadata.generation, &outcome);
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %chain(&e), "console Secret not written with the binding"),
    }
    let bound = put_binding(&labelled, &pass.api, want).await?;
    // What a bound pass would find in it is what this one wrote: the labels, the console
    // Secret and its condition, the binding, its size and phase. So its watch event wakes no
    // pass either; the host's first report does.
    ctx.steps.record(&bound);
    Ok(())
}

/// Decides where the desktop goes and reserves its port and MAC, under the ledger lock.
async fn place(pass: &Pass<'_>, prev: &[Condition]) -> Placement {
    let (d, ctx, uid, now) = (pass.d.as_ref(), pass.ctx, pass.uid.as_str(), pass.now);
    // Capacity is counted over the shared cache: a desktop reserved before the cache holds it
    // would be invisible to the next placement.
    if ctx.stores.desktops.get(&ObjectRef::from_obj(d)).is_none() {
        return Placement::Later(Duration::from_millis(200));
    }
    let unschedulable = |reason: &'static str, message: String, retry: Option<Duration>| {
        let was = conditions::find(prev, SCHEDULED).map(|c| c.reason.as_str());
        Placement::Unschedulable {
            reason,
            message,
            retry,
            event: was != Some(reason),
        }
    };
    let mut ledgers = ctx.ledgers.lock().await;
    // The wait for the lock may have outlasted the Lease.
    if !ledgers.ready || crate::fence::check().is_err() {
        return Placement::Later(Duration::from_secs(1));
    }
    let pool = ctx.stores.pool(&d.spec.pool);
    let request = match admit(d, uid, pool.as_deref(), ctx, &ledgers) {
        Ok(Some(valid)) => valid.asked,
        Ok(None) => return Placement::Later(Duration::from_secs(1)),
        Err(r) => return unschedulable(r.reason, r.message, r.retry),
    };
    let for_image = match super::image::image_hosts(d, ctx) {
        Ok(hosts) => hosts,
        Err(r) => return unschedulable(r.reason, r.message, r.retry),
    };
    let mut index = PoolIndex::new();
    if let Some(p) = &pool {
        index.apply(&d.spec.pool, PoolPolicy::from_spec(&p.spec));
    }
    if let Some(p) = &pool
        && let Err(e) = ledgers.of(p, &ctx.stores)
    {
        let msg = format!("pool {}: {e}", d.spec.pool);
        return unschedulable(INVALID_POOL, msg, None);
    }
    // A reservation kept from an earlier pass (its write failed, or is not in the cache yet)
    // is reused rather than placed again.
    let reserved = ledgers
        .get(&d.spec.pool)
        .and_then(|l| l.port_of(uid))
        .map(|(h, _)| h.to_string());
    // Bound a moment ago by this replica: this copy is older than the binding; its watch event
    // brings the pass that sees it (the requeue is for a binding undone meanwhile).
    if reserved.is_some()
        && let Some(wait) = ctx.binding_in_flight(uid, BINDING_SETTLE)
    {
        return Placement::Later(wait);
    }
    let host = match reserved.clone() {
        Some(h) => h,
        None => {
            let hosts = match (&pool, index.get(&d.spec.pool)) {
                (Some(_), Some(Ok(policy))) => {
                    let charges = ctx.stores.charges(&mut ledgers);
                    host_views_counted(
                        &d.spec.pool,
                        policy,
                        &ctx.stores.nodes.state(),
                        &ctx.stores.pools.state(),
                        &charges,
                        ledgers.get(&d.spec.pool),
                        |n| ctx.heartbeat(n, now),
                        &ctx.stores.views,
                    )
                }
                _ => vec![],
            };
            // A desktop cloning from an image goes only where a verified copy is.
            let hosts = match &for_image {
                Some(image) => hosts
                    .into_iter()
                    .filter(|h| image.hosts.contains(h.name.as_ref()))
                    .collect(),
                None => hosts,
            };
            match schedule(&d.spec.pool, &index, &request, &hosts) {
                Ok(decision) => decision.host.name.to_string(),
                // Capacity changes arrive as DomainNode and ResourcePool events.
                Err(why) => {
                    let retry = Some(Duration::from_secs(300));
                    return unschedulable(why.reason(), why.to_string(), retry);
                }
            }
        }
    };
    let Some(ledger) = pool.as_ref().and_then(|_| ledgers.get_mut(&d.spec.pool)) else {
        return Placement::Later(Duration::from_secs(1));
    };
    let claim = Claim {
        desktop: uid,
        host: &host,
        fixed_mac: d.spec.network.mac.as_deref(),
    };
    match ledger.bind(&claim) {
        Ok(bound) => Placement::Reserved {
            host,
            bound,
            fresh: reserved.is_none(),
            image: for_image.map(|i| i.pin),
        },
        Err(e) => unschedulable(e.category(), e.to_string(), Some(Duration::from_secs(300))),
    }
}
