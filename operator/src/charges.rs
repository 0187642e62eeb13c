//! Keeps what each host is charged up to date as the caches and ledgers change, so placing a
//! desktop reads its hosts' usage without walking every desktop. The watches mark the desktops
//! whose object or console mirror changed, the ledgers name those whose port or admitted size
//! changed, and only those are charged again, by the one rule the full count uses
//! ([`crate::world::charge_of`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use deskvirt_core::scheduler::ChargeIndex;
use deskvirt_crds::Desktop;
use deskvirt_crds::constants::CONSOLE_MIRROR_PREFIX;
use deskvirt_crds::domain_node::OrphanDomain;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use crate::context::Ledgers;
use crate::scheduler::{Request, Usage};

/// What each host is charged, kept one desktop at a time; clones share it.
#[derive(Clone, Default)]
pub struct Charges(Arc<Mutex<State>>);

#[derive(Default)]
struct State {
    index: ChargeIndex,
    /// Desktops whose object or console mirror changed since the last count, by UID.
    dirty: HashSet<String>,
    /// Every desktop is counted again (a watch listed everything anew).
    all: bool,
    /// Where each desktop the desktop watch has shown is in its cache, by UID.
    refs: HashMap<String, ObjectRef<Desktop>>,
    /// The ledgers (by [`Ledgers::epoch`]) the charges were last counted with.
    epoch: Option<u64>,
    /// Where a host whose pinned CPUs may have changed is named, once someone listens.
    pinned: Option<UnboundedSender<String>>,
}

impl Charges {
    fn state(&self) -> MutexGuard<'_, State> {
        // The state holds no invariant a panicking writer could break halfway that a full
        // recount would not mend.
        let mut s = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if self.0.is_poisoned() {
            self.0.clear_poison();
            s.all = true;
        }
        s
    }

    /// The desktop watch added, changed or deleted `d`. A desktop with dedicated CPUs names the
    /// host it is bound to and the one it was last charged to ([`Self::pinned_changes`]).
    pub fn desktop_touched(&self, d: &Desktop) {
        let Some(uid) = d.metadata.uid.clone() else {
            return;
        };
        let mut s = self.state();
        if let Some(tx) = &s.pinned {
            let charged = s.index.charge_of(&uid).filter(|(_, r)| r.dedicated_cpus);
            let bound = d
                .spec
                .performance
                .dedicated_cpus
                .then(|| d.status.as_ref()?.node.as_deref());
            for host in [charged.map(|(h, _)| h), bound.flatten()]
                .into_iter()
                .flatten()
            {
                // Nobody listens any more: the operator is stopping.
                let _ = tx.send(host.to_string());
            }
        }
        s.refs.insert(uid.clone(), ObjectRef::from_obj(d));
        s.dirty.insert(uid);
    }

    /// The hosts whose pinned CPUs a desktop watch event may have changed (a desktop with
    /// dedicated CPUs bound, moved, resized or gone), by name, from now on: the threads a host
    /// still has free for pinning are shown in its status, and nothing else of the host's own
    /// object changes when they do. Only the latest receiver is told.
    pub fn pinned_changes(&self) -> UnboundedReceiver<String> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.state().pinned = Some(tx);
        rx
    }

    /// The mirror watch added, changed or deleted `mirror`: its desktop's binding may now be
    /// confirmed, or no longer.
    pub fn mirror_touched(&self, mirror: &Secret) {
        let uid = mirror
            .metadata
            .name
            .as_deref()
            .and_then(|n| n.strip_prefix(CONSOLE_MIRROR_PREFIX));
        if let Some(uid) = uid {
            self.state().dirty.insert(uid.to_string());
        }
    }

    /// Where the desktop with UID `uid` is in the cache, as the desktop watch last showed it
    /// (perhaps deleted since).
    pub fn desktop_ref(&self, uid: &str) -> Option<ObjectRef<Desktop>> {
        self.state().refs.get(uid).cloned()
    }

    /// A watch listed everything anew: what it dropped was never shown as deleted.
    pub fn relisted(&self) {
        self.state().all = true;
    }

    /// Counts again the desktops that changed since the last count, and returns the charges.
    /// `desktop` looks a desktop up in the cache, `charge` is [`crate::world::charge_of`]
    /// with the ledger and the operator's record of its bindings.
    pub fn count(
        &self,
        ledgers: &mut Ledgers,
        desktop: impl Fn(&ObjectRef<Desktop>) -> Option<Arc<Desktop>>,
        charge: impl Fn(&Desktop, &Ledgers) -> Option<(String, Request)>,
    ) -> Counted<'_> {
        let mut guard = self.state();
        let s = &mut *guard;
        let mut todo = std::mem::take(&mut s.dirty);
        if std::mem::take(&mut s.all) || s.epoch != Some(ledgers.epoch()) {
            todo.extend(s.refs.keys().cloned());
            todo.extend(s.index.desktops().map(str::to_string));
            s.epoch = Some(ledgers.epoch());
        }
        todo.extend(ledgers.take_changed());
        for uid in todo {
            let d = s
                .refs
                .get(&uid)
                .and_then(&desktop)
                .filter(|d| d.metadata.uid.as_deref() == Some(uid.as_str()));
            let Some(d) = d else {
                s.refs.remove(&uid);
                s.index.set(&uid, None);
                continue;
            };
            let c = charge(&d, ledgers);
            s.index.set(&uid, c.as_ref().map(|(h, r)| (h.as_str(), *r)));
        }
        let targets = ledgers
            .targets()
            .map(|(uid, t)| (t.host.to_string(), uid.to_string(), t.size))
            .collect();
        Counted {
            state: guard,
            except: None,
            targets,
        }
    }
}

/// The charges as last counted; hold it only while reading them.
pub struct Counted<'a> {
    state: MutexGuard<'a, State>,
    /// The desktop read as if it did not exist.
    except: Option<String>,
    /// The migration targets the ledgers hold: host, desktop UID and the size charged there.
    targets: Vec<(String, String, Request)>,
}

impl Counted<'_> {
    /// These charges as if the desktop with UID `uid` did not exist: the room it would find.
    pub fn without(mut self, uid: &str) -> Self {
        self.except = Some(uid.to_string());
        self
    }

    /// What the desktops charged to `host` hold, and the running orphan domains it reports
    /// (a domain whose Desktop is gone still takes its CPU and memory).
    pub fn on(&self, host: &str, orphans: &[OrphanDomain]) -> Usage {
        let except = self.except.as_deref();
        let mut usage = match except {
            Some(uid) => self.state.index.on_except(host, uid),
            None => self.state.index.on(host),
        };
        let live = |uid: &str| Some(uid) != except && self.state.refs.contains_key(uid);
        for r in crate::world::orphan_charges(orphans, live) {
            usage = usage.plus(&r);
        }
        // A migration's target is charged the desktop's size until it arrives or the migration
        // ends (the desktop read as absent is absent there too).
        for (_, _, r) in self
            .targets
            .iter()
            .filter(|(h, uid, _)| h == host && Some(uid.as_str()) != except)
        {
            usage = usage.plus(r);
        }
        usage
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocators::{Claim, Ledger};
    use crate::world::{Bindings, charge_of, usage_by_host};
    use deskvirt_crds::read::FromPoolSpec;
    use deskvirt_crds::resource_pool::ResourcePoolSpec;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    const HOSTS: [&str; 3] = ["h0", "h1", "h2"];

    fn desktop(i: u8, cpu: u32, node: Option<&str>, deleted: bool) -> Desktop {
        let mut meta =
            serde_json::json!({"name": format!("d{i}"), "namespace": "ns", "uid": format!("u{i}")});
        if deleted {
            meta["deletionTimestamp"] = "2026-01-01T00:00:00Z".into();
            meta["finalizers"] = serde_json::json!([deskvirt_crds::constants::FINALIZER_OPERATOR]);
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop", "metadata": meta,
            "spec": {"pool": "p", "cpu": cpu, "memory": "1Gi", "disk": {"image": "i.qcow2"}},
            "status": {"node": node}
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn mirror(i: u8) -> Secret {
        let mut s = Secret::default();
        s.metadata.name = Some(deskvirt_crds::constants::console_mirror_name(&format!(
            "u{i}"
        )));
        s
    }

    #[test]
    fn a_pinned_desktop_names_the_host_it_is_bound_to_and_the_one_it_was_charged_to() {
        let charges = Charges::default();
        let mut rx = charges.pinned_changes();
        let mut drained = || std::iter::from_fn(|| rx.try_recv().ok()).collect::<Vec<_>>();
        // A shared desktop names no host, bound or not.
        charges.desktop_touched(&desktop(1, 2, Some("h0"), false));
        assert!(drained().is_empty());
        let pinned = |node| {
            let mut d = desktop(2, 2, node, false);
            d.spec.performance.dedicated_cpus = true;
            d
        };
        charges.desktop_touched(&pinned(None));
        assert!(drained().is_empty(), "not bound, never charged");
        charges.desktop_touched(&pinned(Some("h1")));
        assert_eq!(drained(), ["h1"]);
        // Charged to h1, now bound to h2 (a move): both hosts' free threads change.
        let size = Request::new(2, 1 << 30).dedicated();
        charges.state().index.set("u2", Some(("h1", size)));
        charges.desktop_touched(&pinned(Some("h2")));
        assert_eq!(drained(), ["h1", "h2"]);
        // Gone from the binding (released, or the object deleted): the host it was charged to.
        charges.desktop_touched(&pinned(None));
        assert_eq!(drained(), ["h1"]);
    }

    #[test]
    fn a_desktop_is_found_by_uid_where_the_watch_showed_it() {
        let charges = Charges::default();
        assert_eq!(charges.desktop_ref("u1"), None);
        let d = desktop(1, 1, None, false);
        charges.desktop_touched(&d);
        assert_eq!(charges.desktop_ref("u1"), Some(ObjectRef::from_obj(&d)));
        assert_eq!(charges.desktop_ref("u2"), None);
    }

    /// One change a watch or a pass could make.
    #[derive(Clone, Debug)]
    enum Change {
        Node(u8, Option<u8>),
        Cpu(u8, u32),
        Deleting(u8),
        Gone(u8),
        GoneUnseen(u8),
        Confirm(u8, bool),
        Bind(u8, u8),
        Release(u8),
        Admit(u8, u32),
        Settled(u8),
        Reserve(u8, u8),
        Unreserve(u8),
        NewTerm,
    }

    fn change() -> impl Strategy<Value = Change> {
        let d = 0u8..6;
        prop_oneof![
            (d.clone(), prop::option::of(0u8..3)).prop_map(|(d, h)| Change::Node(d, h)),
            (d.clone(), 1u32..5).prop_map(|(d, c)| Change::Cpu(d, c)),
            d.clone().prop_map(Change::Deleting),
            d.clone().prop_map(Change::Gone),
            d.clone().prop_map(Change::GoneUnseen),
            (d.clone(), any::<bool>()).prop_map(|(d, c)| Change::Confirm(d, c)),
            (d.clone(), 0u8..3).prop_map(|(d, h)| Change::Bind(d, h)),
            d.clone().prop_map(Change::Release),
            (d.clone(), 1u32..9).prop_map(|(d, c)| Change::Admit(d, c)),
            d.clone().prop_map(Change::Settled),
            (d.clone(), 0u8..3).prop_map(|(d, h)| Change::Reserve(d, h)),
            d.prop_map(Change::Unreserve),
            Just(Change::NewTerm),
        ]
    }

    fn ledger() -> Ledger {
        let spec: ResourcePoolSpec =
            serde_json::from_value(serde_json::json!({})).unwrap_or_else(|e| panic!("{e}"));
        Ledger::from_spec(&spec).unwrap_or_else(|e| panic!("{e}"))
    }

    proptest! {
        /// Whatever the watches and the ledger do, in any order, the charges counted one
        /// desktop at a time are those a full count of every desktop gives.
        #[test]
        fn counted_charges_equal_a_full_count(changes in prop::collection::vec(change(), 1..60)) {
            let charges = Charges::default();
            let mut ledgers = Ledgers::fresh();
            ledgers.put("p", ledger());
            // The cache: (cpu, node, deleting) by desktop; confirmed bindings by UID.
            let mut cache: BTreeMap<u8, (u32, Option<u8>, bool)> = BTreeMap::new();
            let mut confirmed: BTreeSet<String> = BTreeSet::new();
            let object = |i: u8, (cpu, node, deleting): (u32, Option<u8>, bool)| {
                desktop(i, cpu, node.map(|h| HOSTS[usize::from(h)]), deleting)
            };
            for (i, c) in changes.into_iter().enumerate() {
                let put = |d: u8, v: (u32, Option<u8>, bool), cache: &mut BTreeMap<_, _>| {
                    cache.insert(d, v);
                    charges.desktop_touched(&object(d, v));
                };
                let now = |d: u8, cache: &BTreeMap<u8, (u32, Option<u8>, bool)>| {
                    cache.get(&d).copied().unwrap_or((1, None, false))
                };
                match c {
                    Change::Node(d, h) => { let v = now(d, &cache); put(d, (v.0, h, v.2), &mut cache) }
                    Change::Cpu(d, cpu) => { let v = now(d, &cache); put(d, (cpu, v.1, v.2), &mut cache) }
                    Change::Deleting(d) => { let v = now(d, &cache); put(d, (v.0, v.1, true), &mut cache) }
                    Change::Gone(d) => {
                        if let Some(v) = cache.remove(&d) {
                            charges.desktop_touched(&object(d, v));
                        }
                    }
                    Change::GoneUnseen(d) => {
                        cache.remove(&d);
                        charges.relisted();
                    }
                    Change::Confirm(d, yes) => {
                        let uid = format!("u{d}");
                        if yes { confirmed.insert(uid); } else { confirmed.remove(&uid); }
                        charges.mirror_touched(&mirror(d));
                    }
                    Change::Bind(d, h) => {
                        if let Some(l) = ledgers.get_mut("p") {
                            let uid = format!("u{d}");
                            let _ = l.bind(&Claim { desktop: &uid, host: HOSTS[usize::from(h)], fixed_mac: None });
                        }
                    }
                    Change::Release(d) => { if let Some(l) = ledgers.get_mut("p") { l.release(&format!("u{d}")); } }
                    Change::Admit(d, cpu) => {
                        if let Some(l) = ledgers.get_mut("p") { l.admit_size(&format!("u{d}"), Request::new(cpu, 1 << 30)); }
                    }
                    Change::Settled(d) => { if let Some(l) = ledgers.get_mut("p") { l.size_settled(&format!("u{d}")); } }
                    Change::Reserve(d, h) => {
                        if let Some(l) = ledgers.get_mut("p") {
                            let _ = l.reserve_target(&format!("u{d}"), HOSTS[usize::from(h)], Request::new(3, 1 << 30));
                        }
                    }
                    Change::Unreserve(d) => { if let Some(l) = ledgers.get_mut("p") { l.release_target(&format!("u{d}")); } }
                    Change::NewTerm => {
                        let kept = ledgers.get("p").cloned();
                        ledgers = Ledgers::fresh();
                        if let Some(l) = kept { ledgers.put("p", l); }
                    }
                }
                let objects: BTreeMap<String, Arc<Desktop>> = cache
                    .iter()
                    .map(|(d, v)| (format!("u{d}"), Arc::new(object(*d, *v))))
                    .collect();
                let is_confirmed = |d: &Desktop| {
                    d.status.as_ref().and_then(|s| s.node.as_ref()).is_none()
                        || d.metadata.uid.as_ref().is_some_and(|u| confirmed.contains(u))
                };
                let counted = charges.count(
                    &mut ledgers,
                    |r| objects.values().find(|d| ObjectRef::from_obj(d.as_ref()) == *r).cloned(),
                    |d, l| charge_of(d, l.get(d.pool()), &is_confirmed),
                );
                let all: Vec<Arc<Desktop>> = objects.values().cloned().collect();
                let full = usage_by_host(&all, &[], Bindings { ledger: ledgers.get("p"), confirmed: &is_confirmed });
                for h in HOSTS {
                    prop_assert_eq!(
                        counted.on(h, &[]),
                        full.get(h).copied().unwrap_or_default(),
                        "host {} after change {}", h, i
                    );
                }
            }
        }
    }
}
