//! Capacity truth over random histories, driven through the core's own decisions as the
//! operator drives them: creates (placed by the scheduler on what each host is charged), resizes
//! (admitted or refused by the resize rule), restarts and stops of the domains, pool edits,
//! deletions, host losses and returns, and operator restarts (the ledger rebuilt from the
//! recorded bindings). After every step no host is charged more than it can hold, no (host,
//! port) and no MAC is held twice, and a rebuild finds no duplicate.

use std::collections::BTreeSet;

use deskvirt_core::allocators::{Claim, DesktopBinding, Ledger, NetworkSpec, Seniority};
use deskvirt_core::resize::{charge, decide};
use deskvirt_core::scheduler::{
    HostCapacity, HostFacts, HostView, PolicySpec, PoolPolicy, Request, Usage, place_in_pool,
};
use deskvirt_core::types::PortRange;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

const GI: u64 = 1 << 30;
const POOL: &str = "lab";

#[derive(Clone, Debug)]
enum Op {
    Create { vcpus: u32, gib: u64, pinned: bool },
    Resize { which: usize, vcpus: u32, gib: u64 },
    Restart { which: usize },
    Stop { which: usize },
    EditPool { which: usize },
    Delete { which: usize },
    LoseHost { which: usize },
    HostBack { which: usize },
    RestartOperator,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u32..=6, 1u64..=12, proptest::bool::weighted(0.2))
            .prop_map(|(vcpus, gib, pinned)| Op::Create { vcpus, gib, pinned }),
        3 => (any::<usize>(), 1u32..=8, 1u64..=16)
            .prop_map(|(which, vcpus, gib)| Op::Resize { which, vcpus, gib }),
        2 => any::<usize>().prop_map(|which| Op::Restart { which }),
        1 => any::<usize>().prop_map(|which| Op::Stop { which }),
        1 => any::<usize>().prop_map(|which| Op::EditPool { which }),
        2 => any::<usize>().prop_map(|which| Op::Delete { which }),
        1 => any::<usize>().prop_map(|which| Op::LoseHost { which }),
        1 => any::<usize>().prop_map(|which| Op::HostBack { which }),
        1 => Just(Op::RestartOperator),
    ]
}

/// One desktop as its status records it.
#[derive(Clone, Debug)]
struct Desk {
    uid: String,
    created: i64,
    /// `spec.pool`: what the user asks; the binding's pool never follows it.
    spec_pool: String,
    /// `status.allocation.pool`.
    pool: String,
    host: String,
    port: u16,
    mac: String,
    admitted: Request,
    running: Option<Request>,
}

struct World {
    policy: PoolPolicy,
    hosts: Vec<(String, HostCapacity, bool)>,
    desks: Vec<Desk>,
    ledger: Ledger,
    next: i64,
}

fn request(vcpus: u32, gib: u64, pinned: bool) -> Request {
    let r = Request::new(vcpus, gib * GI);
    if pinned { r.dedicated() } else { r }
}

impl World {
    fn new(hosts: &[(u32, u64)]) -> Self {
        let spec = PolicySpec {
            reserved_cpu: 0,
            reserved_memory: "0",
            cpu_ratio: 2.0,
            ports: PortRange {
                first: 5900,
                last: 5905,
            },
            ..PolicySpec::DEFAULT
        };
        let policy = PoolPolicy::read(&spec).unwrap_or_else(|e| panic!("{e}"));
        let hosts = hosts
            .iter()
            .enumerate()
            .map(|(i, (threads, gib))| {
                let facts = HostFacts {
                    threads: *threads,
                    memory: gib * GI,
                    hugepages: 0,
                };
                (format!("h{i}"), HostCapacity::new(&facts, &policy), true)
            })
            .collect();
        Self {
            ledger: Ledger::read(&network()).unwrap_or_else(|e| panic!("{e}")),
            policy,
            hosts,
            desks: vec![],
            next: 0,
        }
    }

    /// What each desktop on `host` is charged, except `except`.
    fn usage(&self, host: &str, except: Option<&str>) -> Usage {
        let charges: Vec<Request> = self
            .desks
            .iter()
            .filter(|d| d.host == host && Some(d.uid.as_str()) != except)
            .map(|d| charge(d.admitted, d.running))
            .collect();
        Usage::of(&charges)
    }

    fn views(&self) -> Vec<HostView> {
        self.hosts
            .iter()
            .map(|(name, cap, ready)| {
                let mut v = HostView::new(name.clone(), POOL, *cap)
                    .with_allocated(self.usage(name, None))
                    .with_ports_in_use(self.ledger.ports_in_use(name));
                v.ready = *ready;
                v
            })
            .collect()
    }

    fn pick(&self, which: usize) -> Option<usize> {
        (!self.desks.is_empty()).then(|| which % self.desks.len())
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Create { vcpus, gib, pinned } => {
                let wanted = request(vcpus, gib, pinned);
                let views = self.views();
                let Ok(decision) = place_in_pool(POOL, &self.policy, &wanted, &views) else {
                    return;
                };
                let host = decision.host.name.clone();
                self.next += 1;
                let uid = format!("d{}", self.next);
                let claim = Claim {
                    desktop: &uid,
                    host: &host,
                    fixed_mac: None,
                };
                let Ok(bound) = self.ledger.bind(&claim) else {
                    return;
                };
                self.desks.push(Desk {
                    uid,
                    created: self.next,
                    spec_pool: POOL.into(),
                    pool: POOL.into(),
                    host: host.to_string(),
                    port: bound.port,
                    mac: bound.mac.to_string(),
                    admitted: wanted,
                    running: Some(wanted),
                });
            }
            Op::Resize { which, vcpus, gib } => {
                let Some(i) = self.pick(which) else { return };
                let d = &self.desks[i];
                let wanted = request(vcpus, gib, d.admitted.dedicated_cpus);
                let Some((_, cap, _)) = self.hosts.iter().find(|h| h.0 == d.host) else {
                    return;
                };
                let others = self.usage(&d.host, Some(&d.uid));
                let decision = decide(&d.host, cap, &others, d.admitted, wanted, d.running);
                self.desks[i].admitted = decision.admitted;
            }
            Op::Restart { which } => {
                if let Some(i) = self.pick(which) {
                    self.desks[i].running = Some(self.desks[i].admitted);
                }
            }
            Op::Stop { which } => {
                if let Some(i) = self.pick(which) {
                    self.desks[i].running = None;
                }
            }
            Op::EditPool { which } => {
                if let Some(i) = self.pick(which) {
                    self.desks[i].spec_pool = "elsewhere".into();
                }
            }
            Op::Delete { which } => {
                if let Some(i) = self.pick(which) {
                    let d = self.desks.remove(i);
                    self.ledger.release(&d.uid);
                }
            }
            Op::LoseHost { which } => {
                let n = self.hosts.len();
                self.hosts[which % n].2 = false;
            }
            Op::HostBack { which } => {
                let n = self.hosts.len();
                self.hosts[which % n].2 = true;
            }
            Op::RestartOperator => {
                let mut fresh = Ledger::read(&network()).unwrap_or_else(|e| panic!("{e}"));
                let conflicts = fresh.rebuild(
                    self.desks
                        .iter()
                        .filter(|d| d.pool == POOL)
                        .map(|d| DesktopBinding {
                            desktop: d.uid.clone(),
                            seniority: Seniority::new(d.created, d.uid.clone()),
                            host: Some(d.host.clone()),
                            port: Some(d.port),
                            mac: Some(d.mac.clone()),
                        }),
                    [],
                );
                assert!(conflicts.is_empty(), "a rebuild found {conflicts:?}");
                self.ledger = fresh;
            }
        }
    }

    fn check(&self) -> Result<(), TestCaseError> {
        for (name, cap, _) in &self.hosts {
            // The oracle, independent of `charge`: what runs now, and what is admitted for the
            // next start, must both fit at once.
            let need: Vec<Request> = self
                .desks
                .iter()
                .filter(|d| &d.host == name)
                .map(|d| {
                    let r = d.running.unwrap_or(Request {
                        vcpus: 0,
                        memory: 0,
                        ..d.admitted
                    });
                    Request {
                        vcpus: d.admitted.vcpus.max(r.vcpus),
                        memory: d.admitted.memory.max(r.memory),
                        ..d.admitted
                    }
                })
                .collect();
            let used = Usage::of(&need);
            prop_assert!(cap.holds(&used), "{name} holds {used:?} beyond {cap:?}");
            prop_assert_eq!(used, self.usage(name, None), "what {} is charged", name);
        }
        let mut ports = BTreeSet::new();
        let mut macs = BTreeSet::new();
        for d in &self.desks {
            prop_assert!(ports.insert((d.host.clone(), d.port)), "port twice: {d:?}");
            prop_assert!(macs.insert(d.mac.clone()), "MAC twice: {d:?}");
            prop_assert_eq!(&d.pool, POOL, "a pool edit moved the binding");
            prop_assert_eq!(self.ledger.port_of(&d.uid), Some((d.host.as_str(), d.port)));
        }
        Ok(())
    }
}

fn network() -> NetworkSpec<'static> {
    NetworkSpec {
        ports: PortRange {
            first: 5900,
            last: 5905,
        },
        ..NetworkSpec::DEFAULT
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn no_history_overcharges_a_host_or_hands_out_a_port_or_mac_twice(
        hosts in proptest::collection::vec((2u32..=8, 4u64..=32), 1..=4),
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        let mut world = World::new(&hosts);
        for op in &ops {
            world.apply(op);
            world.check()?;
        }
    }
}
