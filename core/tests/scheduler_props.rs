//! Properties of the pure scheduler and allocators, over random inputs: capacity is never
//! exceeded, no (host, port) is handed out twice, placement is deterministic, MACs are unique
//! across a pool, and a ledger rebuild reports every duplicate exactly once.

use std::collections::{BTreeMap, BTreeSet};

use deskvirt_core::allocators::macs::{MacBinding, MacError, MacLedger};
use deskvirt_core::allocators::ports::{PortBinding, PortError, PortLedger};
use deskvirt_core::allocators::{
    Claim, Conflict, DesktopBinding, Ledger, LedgerConfig, Mac, MacPrefix, Resource, Seniority,
    SubnetBinding, SubnetPlan,
};
use deskvirt_core::scheduler::filter::{Verdict, judge};
use deskvirt_core::scheduler::{
    HostCapacity, HostView, PoolPolicy, Ratio, ReferenceDesktop, Request, Unschedulable,
    place_in_pool,
};
use deskvirt_core::types::{Placement, PortRange};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

const GI: u64 = 1 << 30;
const MI: u64 = 1 << 20;
const POOL: &str = "lab";

// ---------- generators ----------

fn placement() -> impl Strategy<Value = Placement> {
    prop_oneof![Just(Placement::Spread), Just(Placement::Pack)]
}

fn port_range(max_len: u16) -> impl Strategy<Value = PortRange> {
    (1024u16..=65535, 1..=max_len).prop_map(|(first, len)| PortRange {
        first,
        last: first.saturating_add(len - 1),
    })
}

fn policy() -> impl Strategy<Value = PoolPolicy> {
    (
        1u64..=8_000_000,
        1_000_000u64..=2_000_000,
        placement(),
        port_range(12),
    )
        .prop_map(|(cpu, memory, placement, ports)| PoolPolicy {
            reserved_cpus: 0,
            reserved_memory: 0,
            cpu_ratio: Ratio::from_millionths(cpu),
            memory_ratio: Ratio::from_millionths(memory),
            reference: ReferenceDesktop {
                vcpus: 2,
                memory: 4 * GI,
            },
            placement,
            ports,
            cpu_model: None,
        })
}

/// Hosts named h00, h01, … with sizes from a small set (so ties happen), a few unhealthy, and a
/// few in another pool.
fn hosts(policy: PoolPolicy, max: usize) -> impl Strategy<Value = Vec<HostView>> {
    let host = (
        prop_oneof![Just(0u32), Just(2), Just(4), Just(8), 1u32..64],
        prop_oneof![Just(0u64), Just(4), Just(16), 1u64..256],
        0u64..=8,
        prop::bool::weighted(0.85),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.05),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.1),
    );
    prop::collection::vec(host, 0..max).prop_map(move |specs| {
        specs
            .into_iter()
            .enumerate()
            .map(
                |(i, (cpus, mem_gi, huge_gi, ready, cordoned, maintenance, foreign, no_model))| {
                    let capacity = HostCapacity {
                        physical_cpus: cpus,
                        cpu_ratio: policy.cpu_ratio,
                        memory: policy.memory_ratio.scale(mem_gi * GI),
                        hugepages: huge_gi * GI,
                    };
                    let pool = if foreign { "elsewhere" } else { POOL };
                    let mut h = HostView::new(format!("h{i:02}"), pool, capacity);
                    h.ready = ready;
                    h.unschedulable = cordoned;
                    h.maintenance = maintenance;
                    h.lacks_cpu_model = no_model;
                    h
                },
            )
            .collect()
    })
}

fn request() -> impl Strategy<Value = Request> {
    (
        0u32..=16,
        0u64..=(32 * 1024),
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.15),
    )
        .prop_map(|(vcpus, mem_mi, dedicated_cpus, hugepages)| Request {
            vcpus,
            memory: mem_mi * MI,
            dedicated_cpus,
            hugepages,
        })
}

fn fail(message: String) -> TestCaseError {
    TestCaseError::fail(message)
}

// ---------- (a) capacity is never exceeded ----------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Place random requests one after another, binding a real port for each; after every step
    /// no host holds more than its capacity or more ports than its range, the chosen host passed
    /// every filter, and a refusal means no host of the pool could take the request.
    #[test]
    fn capacity_is_never_exceeded(
        (policy, hosts, requests) in policy().prop_flat_map(|p| {
            (Just(p), hosts(p, 10), prop::collection::vec(request(), 1..120))
        })
    ) {
        check_capacity(&policy, hosts, &requests)?;
    }
}

fn check_capacity(
    policy: &PoolPolicy,
    mut hosts: Vec<HostView>,
    requests: &[Request],
) -> Result<(), TestCaseError> {
    let mut ports = PortLedger::new();
    let range = policy.ports;
    for (n, request) in requests.iter().enumerate() {
        match place_in_pool(POOL, policy, request, &hosts) {
            Ok(decision) => {
                let index = decision.index;
                let host = decision.host;
                prop_assert!(
                    host.in_pool(POOL) && host.eligible(),
                    "{} not eligible",
                    host.name
                );
                prop_assert_eq!(judge(host, request, range), Verdict::Fits);
                let name = host.name.clone();
                let port = ports
                    .allocate(&format!("d{n}"), &name, range)
                    .map_err(|e| fail(format!("scheduler chose {name} but: {e}")))?;
                prop_assert!(port >= range.first && port <= range.last);
                hosts[index].allocated = hosts[index].allocated.plus(request);
                hosts[index].ports_in_use = ports.in_use(&name, range);
            }
            Err(u) => {
                let mut in_pool = hosts.iter().filter(|h| h.in_pool(POOL));
                let none_fits = in_pool.all(|h| judge(h, request, range) != Verdict::Fits);
                prop_assert!(none_fits, "refused with {} although a host fits", u);
                let report = u
                    .report()
                    .ok_or_else(|| fail(format!("no report in {u:?}")))?;
                let in_pool = hosts.iter().filter(|h| h.in_pool(POOL)).count();
                prop_assert_eq!(report.hosts as usize, in_pool);
            }
        }
        for h in &hosts {
            let holds = h.capacity.holds(&h.allocated);
            prop_assert!(
                holds,
                "{} over capacity: {:?} > {:?}",
                h.name,
                h.allocated,
                h.capacity
            );
            prop_assert!(h.ports_in_use <= range.len());
        }
    }
    Ok(())
}

// ---------- (b) no (host, port) is handed out twice ----------

#[derive(Clone, Debug)]
enum PortOp {
    Allocate { desktop: u8, host: u8 },
    Release { desktop: u8 },
    Rebuild,
}

fn port_op() -> impl Strategy<Value = PortOp> {
    prop_oneof![
        6 => (0u8..24, 0u8..3).prop_map(|(desktop, host)| PortOp::Allocate { desktop, host }),
        3 => (0u8..24).prop_map(|desktop| PortOp::Release { desktop }),
        1 => Just(PortOp::Rebuild),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The port ledger against a model: every answer is the model's (the same port again, the
    /// lowest free port, or exhaustion), so no (host, port) ever has two holders, across
    /// releases, re-allocations and rebuilds from its own bindings.
    #[test]
    fn no_port_is_handed_out_twice(
        range in port_range(6),
        ops in prop::collection::vec(port_op(), 1..200),
    ) {
        check_ports(range, ops)?;
    }
}

/// The model: who holds each (host, port), and what each desktop holds.
#[derive(Default)]
struct PortModel {
    held: BTreeMap<(String, u16), String>,
    of: BTreeMap<String, (String, u16)>,
}

fn check_ports(range: PortRange, ops: Vec<PortOp>) -> Result<(), TestCaseError> {
    let mut ledger = PortLedger::new();
    let mut model = PortModel::default();
    for op in ops {
        match op {
            PortOp::Allocate { desktop, host } => {
                let (desktop, host) = (format!("d{desktop}"), format!("h{host}"));
                let got = ledger.allocate(&desktop, &host, range);
                match model.of.get(&desktop) {
                    Some((h, p)) if *h == host => prop_assert_eq!(got, Ok(*p)),
                    Some((h, p)) => {
                        let (host, port) = (h.clone(), *p);
                        let desktop = desktop.clone();
                        prop_assert_eq!(
                            got,
                            Err(PortError::BoundElsewhere {
                                desktop,
                                host,
                                port
                            })
                        );
                    }
                    None => {
                        let key = |p: u16| (host.clone(), p);
                        match (range.first..=range.last)
                            .find(|p| !model.held.contains_key(&key(*p)))
                        {
                            Some(p) => {
                                prop_assert_eq!(got, Ok(p));
                                model.held.insert(key(p), desktop.clone());
                                model.of.insert(desktop, key(p));
                            }
                            None => {
                                let exhausted = matches!(got, Err(PortError::Exhausted { .. }));
                                prop_assert!(exhausted, "expected exhaustion, got {:?}", got);
                            }
                        }
                    }
                }
            }
            PortOp::Release { desktop } => {
                let desktop = format!("d{desktop}");
                let expected = model.of.remove(&desktop);
                if let Some(key) = &expected {
                    model.held.remove(key);
                }
                prop_assert_eq!(ledger.release(&desktop), expected);
            }
            PortOp::Rebuild => {
                let bindings: Vec<PortBinding> = ledger
                    .iter()
                    .map(|(d, h, p)| PortBinding {
                        desktop: d.to_owned(),
                        seniority: Seniority::new(0, d),
                        host: h.to_owned(),
                        port: p,
                    })
                    .collect();
                prop_assert_eq!(ledger.rebuild(bindings), vec![]);
            }
        }
        let actual: BTreeMap<(String, u16), String> = ledger
            .iter()
            .map(|(d, h, p)| ((h.to_owned(), p), d.to_owned()))
            .collect();
        prop_assert_eq!(&actual, &model.held);
        prop_assert_eq!(ledger.len(), model.of.len());
    }
    Ok(())
}

// ---------- (c) same input, same placement ----------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Placing the same request twice, or with the hosts listed in another order, picks the same
    /// host, or fails with the same reason and message.
    #[test]
    fn placement_is_deterministic(
        (policy, hosts, shuffled, request) in policy().prop_flat_map(|p| {
            (Just(p), hosts(p, 16), request())
        }).prop_flat_map(|(p, hosts, request)| {
            (Just(p), Just(hosts.clone()), Just(hosts).prop_shuffle(), Just(request))
        })
    ) {
        let first = outcome(&policy, &request, &hosts);
        prop_assert_eq!(&first, &outcome(&policy, &request, &hosts));
        prop_assert_eq!(&first, &outcome(&policy, &request, &shuffled));
    }
}

/// The chosen host's name, or the refusal's reason and message.
fn outcome(
    policy: &PoolPolicy,
    request: &Request,
    hosts: &[HostView],
) -> Result<String, (&'static str, String)> {
    place_in_pool(POOL, policy, request, hosts)
        .map(|d| d.host.name.to_string())
        .map_err(|u: Unschedulable| (u.reason(), u.to_string()))
}

// ---------- (d) MACs are unique across a pool ----------

/// A UID-shaped string from a seed (splitmix64), so thousands are cheap to make.
fn uid(seed: u64, i: u64) -> String {
    let mut z = seed.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        z >> 32,
        (z >> 16) & 0xffff,
        z & 0xfff,
        i & 0xffff,
        z & 0xffff_ffff_ffff
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// Thousands of desktops get distinct unicast MACs under the pool prefix, also when some
    /// fixed MACs under the prefix force probing; a second ledger handing them out in the same
    /// order gives the same MACs, and a rebuild from them finds no conflict.
    #[test]
    fn macs_are_unique_across_a_pool(
        seed in any::<u64>(),
        count in 2000u64..5000,
        prefix in (0u8..=127, any::<u8>(), any::<u8>()),
        fixed in prop::collection::vec(any::<[u8; 3]>(), 0..50),
    ) {
        let prefix = format!("{:02x}:{:02x}:{:02x}", prefix.0 << 1, prefix.1, prefix.2);
        let prefix: MacPrefix = prefix.parse().map_err(|e| fail(format!("{e}")))?;
        check_macs(prefix, seed, count, &fixed)?;
    }
}

fn check_macs(
    prefix: MacPrefix,
    seed: u64,
    count: u64,
    fixed: &[[u8; 3]],
) -> Result<(), TestCaseError> {
    let [p0, p1, p2] = prefix.octets();
    let mut ledger = MacLedger::new(prefix);
    for (i, [a, b, c]) in fixed.iter().enumerate() {
        let mac = Mac::new([p0, p1, p2, *a, *b, *c]);
        match ledger.allocate(&format!("fixed-{i}"), Some(&mac.to_string())) {
            Ok(got) => prop_assert_eq!(got, mac),
            // Two random suffixes can coincide; the second is refused, which is the point.
            Err(MacError::Collision { .. }) => {}
            Err(e) => return Err(fail(format!("fixed {mac}: {e}"))),
        }
    }
    let mut seen: BTreeSet<Mac> = ledger.iter().map(|(_, mac)| mac).collect();
    let mut handed = Vec::new();
    for i in 0..count {
        let desktop = uid(seed, i);
        let mac = ledger
            .allocate(&desktop, None)
            .map_err(|e| fail(format!("{e}")))?;
        prop_assert!(mac.is_unicast());
        prop_assert_eq!(&mac.octets()[..3], &[p0, p1, p2][..]);
        prop_assert!(seen.insert(mac), "{} handed out twice", mac);
        handed.push((desktop, mac));
    }

    let mut again = MacLedger::new(prefix);
    for (desktop, mac) in ledger.iter().filter(|(d, _)| d.starts_with("fixed-")) {
        again
            .allocate(desktop, Some(&mac.to_string()))
            .map_err(|e| fail(format!("{e}")))?;
    }
    for (desktop, mac) in &handed {
        let got = again
            .allocate(desktop, None)
            .map_err(|e| fail(format!("{e}")))?;
        prop_assert_eq!(got, *mac, "{} is not stable", desktop);
    }

    let bindings: Vec<MacBinding> = ledger
        .iter()
        .map(|(d, m)| MacBinding {
            desktop: d.to_owned(),
            seniority: Seniority::new(0, d),
            mac: m.to_string(),
        })
        .collect();
    prop_assert_eq!(MacLedger::new(prefix).rebuild(bindings), vec![]);
    Ok(())
}

// ---------- (e) rebuild reports every duplicate exactly once ----------

/// One desktop's recorded (creation time, host, port, MAC suffix), from small domains so that
/// duplicates happen on their own.
type Recorded = (i64, Option<u8>, Option<u16>, Option<u8>);

fn recorded() -> impl Strategy<Value = Recorded> {
    (
        0i64..10,
        prop::option::weighted(0.9, 0u8..3),
        prop::option::weighted(0.9, 5900u16..5906),
        prop::option::weighted(0.8, 0u8..10),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Rebuild from random bindings plus injected copies of some of them (each copy a different,
    /// younger desktop claiming the same port and MAC): every claim that loses a port, MAC or
    /// subnet is reported exactly once as the younger side, the oldest claim keeps each resource,
    /// and re-binding the losers leaves a ledger with no duplicate at all.
    #[test]
    fn rebuild_reports_every_duplicate_once(
        desktops in prop::collection::vec(recorded(), 0..40),
        copies in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
        hosts in prop::collection::vec((0i64..5, 0u8..4), 0..8),
    ) {
        let bindings = desktop_bindings(&desktops, &copies);
        let host_bindings: Vec<SubnetBinding> = hosts
            .iter()
            .enumerate()
            .map(|(i, (created, subnet))| SubnetBinding {
                host: format!("h{i}"),
                seniority: Seniority::new(*created, format!("h{i}")),
                subnet: format!("10.200.{subnet}.0/24"),
            })
            .collect();
        check_rebuild(&bindings, &host_bindings)?;
    }
}

fn desktop_bindings(desktops: &[Recorded], copies: &[prop::sample::Index]) -> Vec<DesktopBinding> {
    let mut bindings: Vec<DesktopBinding> = desktops
        .iter()
        .enumerate()
        .map(|(i, (created, host, port, mac))| DesktopBinding {
            desktop: format!("d{i:03}"),
            seniority: Seniority::new(*created, format!("d{i:03}")),
            host: host.map(|h| format!("h{h}")),
            port: *port,
            mac: mac.map(|m| format!("52:54:00:00:00:{m:02x}")),
        })
        .collect();
    if desktops.is_empty() {
        return bindings;
    }
    for (n, index) in copies.iter().enumerate() {
        let original = &bindings[index.index(desktops.len())];
        let desktop = format!("copy{n:03}");
        let seniority = Seniority::new(original.seniority.created + 100, desktop.clone());
        let copy = DesktopBinding {
            desktop,
            seniority,
            ..original.clone()
        };
        bindings.push(copy);
    }
    bindings
}

/// Claims on one value (a port, MAC or subnet, as text), with their seniority.
type Claims = BTreeMap<String, Vec<(Seniority, String)>>;

/// (value, loser) for every claim but the oldest on each value.
fn losers(groups: Claims, into: &mut BTreeSet<(String, String)>) {
    for (value, mut claims) in groups {
        claims.sort();
        for (_, loser) in claims.into_iter().skip(1) {
            into.insert((value.clone(), loser));
        }
    }
}

fn port_key(host: &str, port: u16) -> String {
    format!("port {host}:{port}")
}

fn check_rebuild(
    bindings: &[DesktopBinding],
    host_bindings: &[SubnetBinding],
) -> Result<(), TestCaseError> {
    let mut ports = Claims::new();
    let mut macs = Claims::new();
    let mut subnets = Claims::new();
    let mut orphans = BTreeSet::new();
    for b in bindings {
        let claim = (b.seniority.clone(), b.desktop.clone());
        match (&b.host, b.port) {
            (Some(h), Some(p)) => ports.entry(port_key(h, p)).or_default().push(claim.clone()),
            (None, Some(_)) => {
                orphans.insert(b.desktop.clone());
            }
            _ => {}
        }
        if let Some(m) = &b.mac {
            macs.entry(format!("mac {m}")).or_default().push(claim);
        }
    }
    for h in host_bindings {
        let claim = (h.seniority.clone(), h.host.clone());
        subnets
            .entry(format!("subnet {}", h.subnet))
            .or_default()
            .push(claim);
    }
    let mut expected = BTreeSet::new();
    losers(ports, &mut expected);
    losers(macs, &mut expected);
    losers(subnets, &mut expected);

    let config = LedgerConfig {
        ports: PortRange {
            first: 5900,
            last: 6899,
        },
        mac_prefix: "52:54:00".parse().map_err(|e| fail(format!("{e}")))?,
        subnets: Some(SubnetPlan::parse("10.200.0.0/16", 24).map_err(|e| fail(format!("{e}")))?),
    };
    let mut ledger = Ledger::new(config);
    let conflicts = ledger.rebuild(bindings.to_vec(), host_bindings.to_vec());

    let mut reported = Vec::new();
    let mut invalid = BTreeSet::new();
    for c in &conflicts {
        match c {
            Conflict::Taken {
                resource,
                holder,
                loser,
            } => {
                prop_assert_ne!(holder, loser);
                let value = match resource {
                    Resource::Port { host, port } => port_key(host, *port),
                    Resource::Mac(m) => format!("mac {m}"),
                    Resource::Subnet(s) => format!("subnet {s}"),
                };
                reported.push((value, loser.clone()));
            }
            Conflict::Invalid { owner, .. } => {
                invalid.insert(owner.clone());
            }
        }
    }
    let reported_once: BTreeSet<(String, String)> = reported.iter().cloned().collect();
    prop_assert_eq!(
        reported.len(),
        reported_once.len(),
        "a duplicate was reported twice"
    );
    prop_assert_eq!(&reported_once, &expected);
    prop_assert_eq!(&invalid, &orphans);

    // Winners keep exactly what they recorded; losers do not hold the contested value.
    for b in bindings {
        if let (Some(h), Some(p)) = (&b.host, b.port) {
            let lost = expected.contains(&(port_key(h, p), b.desktop.clone()));
            prop_assert_eq!(ledger.port_of(&b.desktop) == Some((h.as_str(), p)), !lost);
        }
        if let Some(m) = &b.mac {
            let lost = expected.contains(&(format!("mac {m}"), b.desktop.clone()));
            let kept = ledger
                .mac_of(&b.desktop)
                .map(|mac| mac.to_string())
                .as_ref()
                == Some(m);
            prop_assert_eq!(kept, !lost);
        }
    }

    // Re-home every loser: afterwards no (host, port), MAC or subnet has two holders, which a
    // rebuild from the final state confirms.
    for b in bindings {
        if let Some(host) = &b.host {
            ledger
                .bind(&Claim {
                    desktop: &b.desktop,
                    host,
                    fixed_mac: None,
                })
                .map_err(|e| fail(format!("re-binding {}: {e}", b.desktop)))?;
        }
    }
    for h in host_bindings {
        ledger
            .assign_subnet(&h.host)
            .map_err(|e| fail(format!("subnet of {}: {e}", h.host)))?;
    }
    let replay: Vec<DesktopBinding> = bindings
        .iter()
        .map(|b| DesktopBinding {
            desktop: b.desktop.clone(),
            seniority: b.seniority.clone(),
            host: ledger.port_of(&b.desktop).map(|(h, _)| h.to_owned()),
            port: ledger.port_of(&b.desktop).map(|(_, p)| p),
            mac: ledger.mac_of(&b.desktop).map(|m| m.to_string()),
        })
        .collect();
    let hosts_replay: Vec<SubnetBinding> = host_bindings
        .iter()
        .filter_map(|h| {
            let subnet = ledger.subnet_of(&h.host)?.to_string();
            Some(SubnetBinding {
                subnet,
                ..h.clone()
            })
        })
        .collect();
    prop_assert_eq!(Ledger::new(config).rebuild(replay, hosts_replay), vec![]);
    Ok(())
}
