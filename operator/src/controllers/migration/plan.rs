//! What a migration's pass decides, from the caches and the pool's ledger, under the ledger
//! lock and without calling the API: whether it may go ahead (`core::migration::admit`), whether
//! a slot of its pool and hosts is free (`limits`), which host it goes to (`choose_target`),
//! and the reservation there; or, once it holds a target, whether it keeps it (`held`).

use std::sync::Arc;
use std::time::Duration;

use deskvirt_core::migration::{self, Active, Held, Slots, admit, choose_target};
use deskvirt_core::reasons::MigrationReason;
use deskvirt_crds::conditions;
use deskvirt_crds::constants::condition::{READY, RUNNING};
use deskvirt_crds::read::FromPoolSpec;
use deskvirt_crds::{Desktop, DesktopMigration};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use crate::context::{Ledgers, MigrationSettings, Stores, seniority};
use crate::controllers::image::PinnedHosts;
use crate::heartbeat::Heartbeat;
use crate::scheduler::PoolPolicy;
use crate::world::{charged, host_views_counted};

/// How often a waiting migration looks again at most, besides the watches that wake it.
const WAIT_RECHECK: Duration = Duration::from_secs(10);

/// What the pass does.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Decision {
    /// The ledgers are not rebuilt yet or the caches lag: look again after this long.
    Later(Duration),
    /// Stay Pending, for this reason; look again after `retry`.
    Wait {
        reason: MigrationReason,
        message: String,
        retry: Duration,
    },
    /// End (Failed) for this reason; whatever it holds is freed.
    Fail {
        reason: MigrationReason,
        message: String,
    },
    /// A target is reserved (or was, by an earlier pass whose write did not land).
    Reserved(Reserved),
    /// Keep the target held; look again after this long at the latest.
    Keep(Duration),
    /// The source host reported it is moving the desktop (phase Running).
    Moving,
    /// The desktop runs on the target and is bound there (Succeeded).
    Arrived,
}

/// A target reserved for a migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Reserved {
    pub desktop_uid: String,
    /// The pool whose ledger holds the reservation: the desktop's, or the one it moves into.
    pub pool: String,
    /// A move into another pool: the MAC reserved there.
    pub mac: Option<String>,
    pub source: String,
    pub target: String,
    pub port: u16,
}

/// The Desktop a migration acts on: by the UID it pinned, else by the name in its spec.
pub(super) fn desktop_of(stores: &Stores, m: &DesktopMigration) -> Option<Arc<Desktop>> {
    let ns = m.namespace();
    let pinned = super::pinned(m).and_then(|uid| stores.desktop_by_uid(uid));
    pinned.filter(|d| d.namespace() == ns).or_else(|| {
        let r = ObjectRef::new(&m.spec.desktop).within(ns.as_deref().unwrap_or_default());
        stores.desktops.get(&r)
    })
}

/// Whether `other` is about the same desktop as `m` (by pinned UID, else by name).
fn same_desktop(m: &DesktopMigration, other: &DesktopMigration, uid: Option<&str>) -> bool {
    if m.namespace() != other.namespace() {
        return false;
    }
    match (super::pinned(other), uid) {
        (Some(p), Some(u)) => p == u,
        _ => other.spec.desktop == m.spec.desktop,
    }
}

/// The pool a held migration's target is in: the one it moves into (`status.targetPool`),
/// else its desktop's.
pub(crate) fn target_pool_of(stores: &Stores, m: &DesktopMigration) -> Option<String> {
    let st = m.status.as_ref()?;
    st.target_pool.clone().or_else(|| {
        Some(
            stores
                .desktop_by_uid(st.desktop_uid.as_deref()?)?
                .pool()
                .to_string(),
        )
    })
}

/// The pool migration `m` of desktop `d` asks to move it into, when that is another pool
/// than the desktop's: the one its status pinned, else its spec's.
fn other_pool<'a>(m: &'a DesktopMigration, d: &Desktop) -> Option<&'a str> {
    m.status
        .as_ref()
        .and_then(|s| s.target_pool.as_deref())
        .or(m.spec.target_pool.as_deref())
        .filter(|p| *p != d.pool())
}

/// Decides a Pending migration's pass, reserving its target when it may go.
pub(super) fn pending(
    stores: &Stores,
    settings: &MigrationSettings,
    ledgers: &mut Ledgers,
    m: &DesktopMigration,
    now: Timestamp,
    heartbeat: impl Fn(&str) -> Heartbeat,
) -> Decision {
    let waited = age(m, now);
    let wait =
        |reason: MigrationReason, message: String, retry: Duration| match migration::held::pending(
            reason,
            &message,
            waited,
            settings.pending_timeout,
        ) {
            Ok(left) => Decision::Wait {
                reason,
                message,
                retry: retry.min(left),
            },
            Err(message) => Decision::Fail { reason, message },
        };
    if !ledgers.ready {
        return Decision::Later(Duration::from_secs(1));
    }
    let d = desktop_of(stores, m);
    let uid = d.as_ref().and_then(|d| d.uid());
    let all = stores.migrations.state();
    let me = seniority(m);
    let others: Vec<_> = all
        .iter()
        .filter(|o| o.uid() != m.uid() && same_desktop(m, o, uid.as_deref()))
        .collect();
    let older_active = others
        .iter()
        .any(|o| !o.phase().is_terminal() && seniority(o.as_ref()) < me);
    let into = d.as_deref().and_then(|d| {
        let name = other_pool(m, d)?;
        Some((name, super::to_pool::access(stores, d, name)))
    });
    let facts = migration::Facts {
        mode: m.spec.mode,
        desktop: d.as_deref().map(|d| migration::admit::Desktop {
            uid: d.metadata.uid.as_deref().unwrap_or_default(),
            node: d
                .status
                .as_ref()
                .and_then(|s| s.node.as_deref())
                .filter(|_| stores.binding_confirmed(d)),
            running: d
                .status
                .as_ref()
                .is_some_and(|s| conditions::is_true(&s.conditions, RUNNING)),
            suspended: crate::controllers::drain::memory_saved(d),
            // As a drain sees it: off as its host reported, by `spec.power` or the idle policy.
            stopped: crate::controllers::drain::desktop_facts(d, "").power
                == deskvirt_core::drain::Power::Stopped,
            deleting: d.metadata.deletion_timestamp.is_some(),
            pinned_to_host: d.spec.performance.dedicated_cpus
                || !d.spec.performance.sriov.is_empty(),
            backing_up: d
                .status
                .as_ref()
                .is_some_and(|s| s.backup.is_some() || s.restore_over.is_some()),
            capturing: d.metadata.uid.as_deref().is_some_and(|uid| {
                crate::controllers::image::capturing(&stores.images.state(), uid)
            }),
        }),
        pinned_uid: super::pinned(m),
        shared_storage: d
            .as_ref()
            .and_then(|d| stores.pool(d.pool()))
            .is_some_and(|p| p.spec.storage.shared),
        older_active,
        other_pool: into.as_ref().map(|(_, access)| access.is_ok()),
    };
    if let Err(reason) = admit(&facts) {
        let message = match (&into, reason) {
            (Some((_, Err(why))), MigrationReason::PoolNotAllowed) => why.clone(),
            _ => admit_message(reason, m),
        };
        return wait(reason, message, WAIT_RECHECK);
    }
    // `admit` refuses a missing, unbound desktop.
    let (Some(d), Some(desktop_uid)) = (d, uid) else {
        return Decision::Later(Duration::from_secs(1));
    };
    let source = d
        .status
        .as_ref()
        .and_then(|s| s.node.clone())
        .unwrap_or_default();
    if others
        .iter()
        .any(|o| o.phase().is_terminal() && super::has_finalizer(o))
    {
        let msg = "an earlier migration of the desktop is still freeing its target".to_string();
        return wait(MigrationReason::Queued, msg, Duration::from_secs(2));
    }
    let pool_name = d.pool().to_string();
    let Some(pool) = stores.pool(&pool_name) else {
        let msg = format!("the desktop's pool {pool_name} does not exist");
        return wait(MigrationReason::NoTarget, msg, WAIT_RECHECK);
    };
    // The migrations of the pool that hold a target, and the older ones queued for a slot.
    let active: Vec<(String, String)> = all
        .iter()
        .filter(|o| o.uid() != m.uid() && o.phase().holds_target())
        .filter_map(|o| {
            let st = o.status.as_ref()?;
            (stores.desktop_by_uid(st.desktop_uid.as_deref()?)?.pool() == pool_name)
                .then_some(())?;
            Some((st.source.clone()?, st.target.clone()?))
        })
        .collect();
    let active: Vec<Active<'_>> = active
        .iter()
        .map(|(s, t)| Active {
            source: s,
            target: t,
        })
        .collect();
    let older_waiting = all
        .iter()
        .filter(|o| o.uid() != m.uid() && o.phase() == migration::MigrationPhase::Pending)
        .filter(|o| seniority(o.as_ref()) < me && waits_for_a_slot(o))
        .filter(|o| desktop_of(stores, o).is_some_and(|d| d.pool() == pool_name))
        .count();
    let slots = Slots {
        limits: settings.limits,
        active: &active,
        older_waiting,
    };
    if let Err(msg) = slots.pool_slot().and_then(|()| slots.source_slot(&source)) {
        return wait(MigrationReason::Queued, msg, Duration::from_secs(5));
    }
    // The pool the target is chosen in and whose ledger holds it: the desktop's, or the one
    // it moves into (`admit` let only an accessible one through).
    let (to_name, to_pool) = match &into {
        Some((name, Ok(p))) => (name.to_string(), p.clone()),
        _ => (pool_name.clone(), pool.clone()),
    };
    let moves_pool = to_name != pool_name;
    let policy = match PoolPolicy::from_spec(&to_pool.spec) {
        Ok(p) => p,
        Err(e) => {
            let msg = format!("pool {to_name}: {e}");
            return wait(MigrationReason::NoTarget, msg, WAIT_RECHECK);
        }
    };
    if let Err(e) = ledgers.of(&to_pool, stores) {
        let msg = format!("pool {to_name}: {e}");
        return wait(MigrationReason::NoTarget, msg, WAIT_RECHECK);
    }
    let Some(size) = charged(&d) else {
        let msg = "the desktop's size cannot be read".to_string();
        return wait(MigrationReason::NoTarget, msg, WAIT_RECHECK);
    };
    // A reservation an earlier pass made (its status write did not land) is reused.
    let kept = ledgers
        .get(&to_name)
        .and_then(|l| l.target_of(&desktop_uid))
        .map(|t| t.host.to_string());
    let target = match kept {
        Some(host) => host,
        None => {
            let hosts = {
                let charges = stores.charges(ledgers);
                host_views_counted(
                    &to_name,
                    &policy,
                    &stores.nodes.state(),
                    &stores.pools.state(),
                    &charges,
                    ledgers.get(&to_name),
                    heartbeat,
                    &stores.views,
                )
            };
            let wanted = m.spec.target_node.as_deref();
            // A disk cloned from a DesktopImage goes only where that version's verified copy
            // is: its own layer moves, its backing file does not.
            let image = PinnedHosts::of(&d, &stores.nodes.state());
            if let (Some(w), Some(image)) = (wanted, &image)
                && !image.allows(w)
            {
                return wait(MigrationReason::NoTarget, image.refusal(w), WAIT_RECHECK);
            }
            let lacks_image = |h: &str| image.as_ref().is_some_and(|i| !i.allows(h));
            // A Cold move on shared storage boots the desktop there: any host of the pool takes
            // it in. One that copies the disk (into another pool, always) needs the target's
            // libvirt, as a Live move does.
            let cold = m.spec.mode == migration::MigrationMode::Cold
                && pool.spec.storage.shared
                && !moves_pool;
            let takes_in = |h: &str| cold || endpoint_of(stores, h).is_some();
            match choose_target(&to_name, &policy, &size, &source, wanted, &hosts, |h| {
                slots.host_full(h) || (wanted.is_none() && !takes_in(h)) || lacks_image(h)
            }) {
                Ok(h) if !takes_in(&h.name) => {
                    let msg = format!("host {} takes in no migrations: its {NO_ENDPOINT}", h.name);
                    return wait(MigrationReason::NoTarget, msg, WAIT_RECHECK);
                }
                Ok(h) => h.name.to_string(),
                Err(r) if wanted.is_none() && r.reason == MigrationReason::NoTarget => {
                    let images = image
                        .as_ref()
                        .map(|i| format!(", and those without a verified copy of {}", i.what))
                        .unwrap_or_default();
                    let msg = format!(
                        "{} (hosts whose {NO_ENDPOINT}{images} are left out)",
                        r.message
                    );
                    return wait(r.reason, msg, WAIT_RECHECK);
                }
                Err(r) => return wait(r.reason, r.message, WAIT_RECHECK),
            }
        }
    };
    let Some(ledger) = ledgers.get_mut(&to_name) else {
        return Decision::Later(Duration::from_secs(1));
    };
    let reserved = if moves_pool {
        let fixed = d.spec.network.mac.as_deref();
        ledger
            .reserve_entry(&desktop_uid, &target, size, fixed)
            .map(|(port, mac)| (port, Some(mac.to_string())))
    } else {
        ledger
            .reserve_target(&desktop_uid, &target, size)
            .map(|port| (port, None))
    };
    match reserved {
        Ok((port, mac)) => Decision::Reserved(Reserved {
            desktop_uid,
            pool: to_name,
            mac,
            source,
            target,
            port,
        }),
        Err(e) => wait(MigrationReason::NoTarget, e.to_string(), WAIT_RECHECK),
    }
}

/// Why a host without a published migration endpoint is no target.
const NO_ENDPOINT: &str = "node-agent runs without --migration-uri";

/// Where host `name` takes in migrations, as its agent published it.
pub(super) fn endpoint_of(
    stores: &Stores,
    name: &str,
) -> Option<deskvirt_crds::migration::MigrationEndpoint> {
    stores.node(name)?.status.as_ref()?.migration.clone()
}

/// Decides the pass of a migration that holds a target (Scheduling, Running).
pub(super) fn held(
    stores: &Stores,
    settings: &MigrationSettings,
    ledgers: &Ledgers,
    m: &DesktopMigration,
    now: Timestamp,
) -> Decision {
    if !ledgers.ready {
        return Decision::Later(Duration::from_secs(1));
    }
    let st = m.status.clone().unwrap_or_default();
    let Some(pinned) = st.desktop_uid.as_deref() else {
        return Decision::Fail {
            reason: MigrationReason::TargetLost,
            message: "the migration's status names no desktop".into(),
        };
    };
    // The desktop it was made for, being deleted or not: a move it reported goes on.
    let pinned_desktop =
        desktop_of(stores, m).filter(|d| d.metadata.uid.as_deref() == Some(pinned));
    let deleting = pinned_desktop
        .as_ref()
        .is_some_and(|d| d.metadata.deletion_timestamp.is_some());
    let d = desktop_of(stores, m).filter(|d| d.metadata.deletion_timestamp.is_none());
    let target_held = d
        .as_ref()
        .and_then(|_| ledgers.get(&target_pool_of(stores, m)?))
        .and_then(|l| l.target_of(pinned))
        .is_some_and(|t| Some(t.host) == st.target.as_deref() && Some(t.port) == st.target_port);
    let since = st.scheduled_time.as_ref().map_or(now, |t| t.0);
    let dst = pinned_desktop.as_ref().and_then(|d| d.status.as_ref());
    let me = m.metadata.uid.as_deref();
    let report = dst
        .and_then(|s| s.migration_report.as_ref())
        .filter(|r| Some(r.uid.as_str()) == me)
        .map(|r| (r.state, r.message.as_deref().unwrap_or("no reason given")));
    // The Desktop pass moved the binding to the target: the move is done.
    let arrived = pinned_desktop.as_ref().is_some_and(|d| {
        st.target.is_some()
            && dst.and_then(|s| s.node.as_deref()) == st.target.as_deref()
            && stores.binding_confirmed(d)
    });
    let facts = migration::held::Facts {
        desktop_uid: d.as_ref().and_then(|d| d.metadata.uid.as_deref()),
        deleting,
        pinned_uid: pinned,
        target_held,
        waited: elapsed(since, now),
        start_timeout: settings.start_timeout,
        report,
        arrived,
    };
    match migration::held::decide(&facts) {
        Held::Keep(left) => Decision::Keep(left),
        Held::End(reason, message) => Decision::Fail { reason, message },
        Held::Moving => Decision::Moving,
        Held::Arrived => Decision::Arrived,
    }
}

/// Frees the target a migration holds in its desktop's pool's ledger, if the ledger holds the
/// one its status records. Returns the host and port freed.
pub(super) fn release(
    stores: &Stores,
    ledgers: &mut Ledgers,
    m: &DesktopMigration,
) -> Option<(String, u16)> {
    let st = m.status.as_ref()?;
    let uid = st.desktop_uid.as_deref()?;
    let pool = target_pool_of(stores, m)?;
    let ledger = ledgers.get_mut(&pool)?;
    let t = ledger.target_of(uid)?;
    (Some(t.host) == st.target.as_deref() && Some(t.port) == st.target_port).then_some(())?;
    ledger.release_target(uid)
}

/// Whether a Pending migration waits for a free slot (its `Ready` reason says Queued).
fn waits_for_a_slot(m: &DesktopMigration) -> bool {
    m.status
        .as_ref()
        .and_then(|s| conditions::find(&s.conditions, READY))
        .is_some_and(|c| c.reason == MigrationReason::Queued.as_str())
}

/// What a refusal by `admit` tells the user.
fn admit_message(reason: MigrationReason, m: &DesktopMigration) -> String {
    use MigrationReason as R;
    let name = &m.spec.desktop;
    match reason {
        R::DesktopNotFound => format!("Desktop {name} does not exist in this namespace"),
        R::DesktopDeleted => format!("Desktop {name} was deleted"),
        R::DesktopReplaced => {
            format!("Desktop {name} was deleted and made again; this migration was for the first")
        }
        R::DesktopNotBound => format!("Desktop {name} is not bound to a host yet"),
        R::DesktopNotRunning => {
            format!(
                "Desktop {name} does not run: a Live move takes a running desktop or one \
                 suspended with its memory saved; a Cold move a running one, and in a pool \
                 without shared storage a stopped or suspended one too (on shared storage a \
                 stopped desktop needs no migration: a drain re-binds it)"
            )
        }
        R::AlreadyMigrating => format!("an older migration of Desktop {name} has not ended"),
        R::PinnedToHost => {
            format!("Desktop {name} has dedicated CPUs or SR-IOV devices, which tie it to its host")
        }
        R::StorageNotShared => format!(
            "the pool of Desktop {name} does not declare storage.shared: true, which live migration \
             needs; mode Cold moves it by copying its disk (the guest is shut down and boots on \
             the target)"
        ),
        R::ModeNotSupported => format!("Desktop {name} cannot move in this mode"),
        R::CaptureInProgress => format!(
            "Desktop {name} is the template of a DesktopImage whose capture is not made yet; the \
             move waits for it"
        ),
        other => other.as_str().to_string(),
    }
}

fn age(m: &DesktopMigration, now: Timestamp) -> Duration {
    m.metadata
        .creation_timestamp
        .as_ref()
        .map_or(Duration::ZERO, |t| elapsed(t.0, now))
}

fn elapsed(since: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(now.duration_since(since)).unwrap_or(Duration::ZERO)
}
