//! Decides which domains on this host are orphans: they carry deskvirt's metadata, but no
//! Desktop with their UID is bound here. A stopped orphan whose Desktop now runs on another host
//! (a woken desktop moved, its disk on shared storage) is undefined here, with the memory saved
//! here and its address lease, never its disk. Other orphans are reported (a Warning Event on
//! the DomainNode, once per domain and process, the `orphan_domains` gauge, and
//! `DomainNode.status.orphans` with what each holds, which the operator charges to the host),
//! and after the pool's grace period the pool's `orphans` policy runs
//! ([`super::orphan_policy`]): report only (the default), stop, or undefine. A disk is never
//! deleted: a domain may belong to a Desktop that is being restored, and a disk is worth more
//! than a tidy host.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use deskvirt_crds::Desktop;
use deskvirt_crds::DomainNode;
use deskvirt_crds::constants::MANAGER_AGENT_SWEEP;
use deskvirt_crds::domain_node::OrphanDomain;
use deskvirt_crds::quantity::{format_bytes, parse_duration};
use deskvirt_crds::resource_pool::OrphanAction;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use tokio::time::Instant;

use super::context::DesktopContext;
use super::ip;
use super::orphan_policy::{Step, decide, spice_port_and_mac};
use crate::agent::error_chain;
use crate::domain::serial_log_path;
use crate::hypervisor::{DomainSummary, Hypervisor};

/// The host a stopped orphan's Desktop `d` now runs on, when that makes the domain here a
/// leftover of a move: the same UID, not being deleted, bound to another host.
pub fn moved_to<'a>(o: &DomainSummary, d: &'a Desktop, here: &str) -> Option<&'a str> {
    let identity = o.identity.as_ref()?;
    let same = d
        .uid()
        .is_some_and(|u| u.eq_ignore_ascii_case(&identity.uid));
    let node = d.status.as_ref()?.node.as_deref()?;
    (same && !o.state.is_active() && d.metadata.deletion_timestamp.is_none() && node != here)
        .then_some(node)
}

/// Undefines the leftover domain of a desktop that moved to host `to`: its saved memory goes
/// with it, and its address lease on this host's network; its disk stays (the desktop runs
/// from it there). Returns whether it did.
async fn clear_moved<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    o: &DomainSummary,
    d: &Desktop,
    to: &str,
) -> bool {
    let hv = &ctx.hypervisor;
    if let Err(e) = hv.undefine_domain(&o.name).await {
        tracing::warn!(domain = %o.name, error = %error_chain(&e), "cannot undefine the domain of a desktop that moved away");
        return false;
    }
    if let (Some(pool), Some(mac)) = (
        ctx.pool(d.pool()),
        d.status.as_ref().and_then(|s| s.mac.as_deref()),
    ) && let Err(e) = ip::release(ctx, &pool, mac).await
    {
        tracing::warn!(domain = %o.name, error = %error_chain(&e), "cannot drop the address lease of a desktop that moved away");
    }
    let _ = tokio::fs::remove_file(serial_log_path(&o.name)).await;
    let here = &ctx.config.node_name;
    let memory = if o.has_managed_save {
        "; the memory saved here is discarded"
    } else {
        ""
    };
    tracing::info!(domain = %o.name, to, "domain of a desktop that moved to another host undefined; disk kept");
    ctx.event(
        d,
        EventType::Normal,
        "LeftHost",
        "Sweep",
        format!(
            "domain {} undefined on host {here}: the desktop runs on host {to} now; its disk is kept{memory}",
            o.name
        ),
    )
    .await;
    true
}

/// The Desktop a domain's metadata names, read from the API (it is not bound here, so not in
/// the cache); `Err` when the API cannot tell.
async fn lookup<H>(ctx: &DesktopContext<H>, o: &DomainSummary) -> Result<Option<Desktop>, ()> {
    let Some(i) = o.identity.as_ref() else {
        return Ok(None);
    };
    let api: Api<Desktop> = Api::namespaced(ctx.client.clone(), &i.namespace);
    api.get_opt(&i.name).await.map_err(|e| {
        tracing::debug!(domain = %o.name, error = %e, "cannot read the Desktop of an orphan domain");
    })
}

/// Whether the Desktop a domain was made for is gone (deleted, or another object of that name),
/// given what [`lookup`] found: `None` when the API could not tell. A domain whose Desktop
/// exists is that Desktop's, accounted where it is bound, and not charged here as an orphan.
fn gone(o: &DomainSummary, found: &Result<Option<Desktop>, ()>) -> Option<bool> {
    let d = found.as_ref().ok()?;
    Some(
        !d.as_ref()
            .is_some_and(|d| d.uid().is_some_and(|u| u.eq_ignore_ascii_case(&o.uuid))),
    )
}

/// The orphans among `domains`, given the UIDs of the Desktops bound here.
pub fn orphans<'a>(
    domains: &'a [DomainSummary],
    bound: &BTreeSet<String>,
) -> Vec<&'a DomainSummary> {
    domains
        .iter()
        .filter(|d| {
            d.identity
                .as_ref()
                .is_some_and(|i| !bound.contains(&i.uid.to_ascii_lowercase()))
        })
        .collect()
}

/// How often the cache is checked for a Desktop that left it: a Desktop deleted without its
/// finalizers leaves its domain running, and that domain is reported within this long rather
/// than at the next full sweep.
const NOTICE: Duration = Duration::from_secs(2);

/// Whether a sweep is due: the full interval passed, or a Desktop left the cache since the
/// last sweep (`left`: deleted, or bound elsewhere).
pub fn sweep_due(now: Instant, due: Instant, left: bool) -> bool {
    now >= due || left
}

/// Whether a Desktop in the cache at the last look (`before`) is gone from it (`now`).
pub fn one_left(before: &BTreeSet<String>, now: &BTreeSet<String>) -> bool {
    !before.is_subset(now)
}

/// Sweeps every `every`, and within [`NOTICE`] of a bound Desktop leaving the cache, until the
/// future is dropped.
pub async fn run<H: Hypervisor>(ctx: Arc<DesktopContext<H>>, every: Duration) {
    let mut reported: HashSet<String> = HashSet::new();
    let mut shutdowns: HashMap<String, Instant> = HashMap::new();
    let mut due = Instant::now();
    // The Desktops in the cache at the last look, every NOTICE; whether one left since the
    // last sweep that listed the domains.
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut left = false;
    loop {
        tokio::time::sleep_until(due.min(Instant::now() + NOTICE)).await;
        let Some(store) = ctx.desktops() else {
            continue;
        };
        if store.wait_until_ready().await.is_err() {
            continue;
        }
        let bound: BTreeSet<String> = store
            .state()
            .iter()
            .filter_map(|d| d.uid())
            .map(|u| u.to_ascii_lowercase())
            .collect();
        left |= one_left(&seen, &bound);
        seen = bound.clone();
        if !sweep_due(Instant::now(), due, left) {
            continue;
        }
        due = Instant::now() + every;
        let domains = match ctx.hypervisor.list_domains().await {
            Ok(d) => d,
            Err(e) => {
                // Retried at the next full sweep, not every NOTICE while libvirt is down.
                tracing::debug!(error = %error_chain(&e), "orphan sweep skipped");
                left = false;
                continue;
            }
        };
        left = false;
        let mut found = orphans(&domains, &bound);
        // The Desktop each orphan names, read once per sweep.
        let mut owners: HashMap<String, Result<Option<Desktop>, ()>> = HashMap::new();
        for o in &found {
            owners.insert(o.uuid.clone(), lookup(&ctx, o).await);
        }
        // Leftovers of desktops that moved to another host go; the rest is reported.
        let mut cleared = BTreeSet::new();
        for o in found.iter().filter(|o| !o.state.is_active()) {
            if let Some(Ok(Some(d))) = owners.get(&o.uuid)
                && let Some(to) = moved_to(o, d, &ctx.config.node_name)
                && clear_moved(&ctx, o, d, to).await
            {
                cleared.insert(o.uuid.clone());
            }
        }
        found.retain(|o| !cleared.contains(&o.uuid));
        ctx.metrics.orphan_domains.set(found.len() as i64);
        let previous: BTreeMap<String, OrphanDomain> = ctx
            .domain_node()
            .and_then(|n| n.status.clone())
            .map(|s| s.orphans.into_iter().map(|o| (o.uid.clone(), o)).collect())
            .unwrap_or_default();
        let mut report = Vec::new();
        for o in &found {
            let before = previous.get(&o.uuid.to_ascii_lowercase());
            match owners.get(&o.uuid).and_then(|found| gone(o, found)) {
                Some(false) => continue,
                None if before.is_none() => continue,
                _ => {}
            }
            // A domain that cannot be read now keeps what was last reported of it.
            let Some(mut entry) = describe(&ctx, o, before).await.or_else(|| before.cloned())
            else {
                continue;
            };
            if reported.insert(o.uuid.clone()) {
                announce(&ctx, o, &entry.desktop).await;
            }
            if let Some(done) = enforce(&ctx, o, &entry, &mut shutdowns).await {
                entry.action = Some(done.into());
            }
            report.push(entry);
        }
        let alive: HashSet<String> = report.iter().map(|e| e.uid.clone()).collect();
        shutdowns.retain(|uid, _| alive.contains(uid));
        publish(&ctx, &previous, report).await;
    }
}

/// What an orphan holds, with when it was first found (kept from the last report).
async fn describe<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    o: &DomainSummary,
    before: Option<&OrphanDomain>,
) -> Option<OrphanDomain> {
    let identity = o.identity.as_ref()?;
    let hv = &ctx.hypervisor;
    let status = hv.domain_status(&o.name).await.ok()?;
    let xml = hv.domain_xml(&o.name, false).await.unwrap_or_default();
    let (spice_port, mac) = spice_port_and_mac(&xml);
    Some(OrphanDomain {
        uid: o.uuid.to_ascii_lowercase(),
        domain: o.name.clone(),
        desktop: format!("{}/{}", identity.namespace, identity.name),
        pool: identity.pool.clone(),
        running: o.state.is_active(),
        cpu: status.vcpus,
        memory: format_bytes(status.max_memory_kib.saturating_mul(1024)),
        spice_port,
        mac,
        since: before
            .map(|b| b.since.clone())
            .unwrap_or_else(|| Time(Timestamp::now())),
        action: before.and_then(|b| b.action.clone()),
    })
}

/// A Warning Event on the DomainNode, once per orphan and process.
async fn announce<H>(ctx: &DesktopContext<H>, o: &DomainSummary, desktop: &str) {
    tracing::warn!(domain = %o.name, desktop, "orphan domain: no Desktop bound here; charged to this host until it is gone");
    if let Some(node) = ctx.domain_node() {
        ctx.event(
            node.as_ref(),
            EventType::Warning,
            "OrphanDomain",
            "Sweep",
            format!(
                "domain {} belongs to Desktop {desktop} (UID {}), which is not bound to this host; it stays charged to this host (CPU and memory while it runs, its SPICE port and MAC) and the pool's orphans policy decides what happens to it; its disk is never deleted",
                o.name, o.uuid
            ),
        )
        .await;
    }
}

/// Runs the pool's orphan policy on `o` once its grace period is over; what it did, when
/// something is done for good.
async fn enforce<H: Hypervisor>(
    ctx: &DesktopContext<H>,
    o: &DomainSummary,
    entry: &OrphanDomain,
    shutdowns: &mut HashMap<String, Instant>,
) -> Option<&'static str> {
    let policy = ctx
        .pool(&entry.pool)
        .map(|p| p.spec.orphans.clone())
        .unwrap_or_default();
    let after = parse_duration(&policy.after).unwrap_or(Duration::from_secs(3600));
    let age = Timestamp::now()
        .duration_since(entry.since.0)
        .unsigned_abs();
    let due = age >= after;
    let asked = shutdowns.get(&entry.uid).map(Instant::elapsed);
    let step = decide(
        policy.action,
        due,
        o.state.is_active(),
        asked,
        ctx.config.shutdown_grace,
    );
    let hv = &ctx.hypervisor;
    let (result, done, what) = match step {
        Step::Keep => {
            let stopped = policy.action == OrphanAction::Stop && due && !o.state.is_active();
            return stopped.then_some("Stopped");
        }
        Step::Shutdown => {
            shutdowns.insert(entry.uid.clone(), Instant::now());
            (
                hv.shutdown_domain(&o.name).await.map(|_| ()),
                None,
                "asked to shut down",
            )
        }
        Step::PowerOff => (
            hv.destroy_domain(&o.name).await.map(|_| ()),
            Some("Stopped"),
            "powered off",
        ),
        Step::Undefine => (
            hv.undefine_domain(&o.name).await.map(|_| ()),
            Some("Undefined"),
            "undefined (its disk is kept)",
        ),
    };
    if let Err(e) = result {
        tracing::warn!(domain = %o.name, error = %error_chain(&e), "orphan policy step failed");
        return None;
    }
    tracing::info!(domain = %o.name, desktop = %entry.desktop, what, "orphan policy");
    if let Some(node) = ctx.domain_node() {
        ctx.event(
            node.as_ref(),
            EventType::Normal,
            "OrphanPolicy",
            "Sweep",
            format!(
                "orphan domain {} of Desktop {} {what}: the pool's orphans policy ({:?} after {})",
                o.name, entry.desktop, policy.action, policy.after
            ),
        )
        .await;
    }
    done
}

/// Writes `status.orphans` of this host's DomainNode when it changed (its own field manager,
/// so the agent's other status writes leave it alone).
async fn publish<H>(
    ctx: &DesktopContext<H>,
    previous: &BTreeMap<String, OrphanDomain>,
    report: Vec<OrphanDomain>,
) {
    let now: BTreeMap<String, OrphanDomain> =
        report.into_iter().map(|o| (o.uid.clone(), o)).collect();
    if &now == previous || ctx.domain_node().is_none() {
        return;
    }
    let orphans: Vec<&OrphanDomain> = now.values().collect();
    let api: Api<DomainNode> = Api::all(ctx.client.clone());
    let written = if orphans.is_empty() {
        // An apply of an empty list is refused by Kubernetes 1.20 ("must be of type array:
        // null"); a merge patch removes the field.
        let body = serde_json::json!({ "status": { "orphans": null } });
        let pp = PatchParams {
            field_manager: Some(MANAGER_AGENT_SWEEP.into()),
            ..Default::default()
        };
        api.patch_status(&ctx.config.node_name, &pp, &Patch::Merge(&body))
            .await
    } else {
        let body = serde_json::json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "DomainNode",
            "metadata": { "name": ctx.config.node_name },
            "status": { "orphans": orphans },
        });
        let pp = PatchParams::apply(MANAGER_AGENT_SWEEP).force();
        api.patch_status(&ctx.config.node_name, &pp, &Patch::Apply(&body))
            .await
    };
    if let Err(e) = written {
        tracing::warn!(error = %e, "cannot report orphan domains on the DomainNode");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::DesktopIdentity;
    use crate::hypervisor::DomainState;

    fn summary(name: &str, uid: Option<&str>) -> DomainSummary {
        DomainSummary {
            name: name.into(),
            uuid: uid.unwrap_or("00000000-0000-0000-0000-000000000000").into(),
            state: DomainState::Running,
            persistent: true,
            has_managed_save: false,
            identity: uid.map(|u| DesktopIdentity {
                namespace: "ns".into(),
                name: name.into(),
                uid: u.into(),
                user: Some("u".into()),
                pool: "p".into(),
            }),
        }
    }

    #[test]
    fn a_desktop_leaving_the_cache_makes_a_sweep_due_before_the_interval() {
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        let set =
            |uids: &[&str]| -> BTreeSet<String> { uids.iter().map(|u| u.to_string()).collect() };
        assert!(!one_left(&set(&["a", "b"]), &set(&["a", "b"])));
        assert!(
            !one_left(&set(&["a"]), &set(&["a", "b"])),
            "a new desktop is no orphan"
        );
        assert!(
            one_left(&set(&["a", "b"]), &set(&["a"])),
            "b left the cache"
        );
        assert!(!sweep_due(now, later, false));
        assert!(sweep_due(now, later, true));
        assert!(sweep_due(later, later, false), "the interval passed");
    }

    #[test]
    fn only_deskvirt_domains_without_a_desktop_are_orphans() {
        let domains = vec![
            summary("mine", Some("0b7e9a4c-1111-4222-8333-444455556666")),
            summary("gone", Some("0b7e9a4c-1111-4222-8333-444455557777")),
            summary("not-deskvirt", None),
        ];
        let bound: BTreeSet<String> = ["0b7e9a4c-1111-4222-8333-444455556666".to_string()].into();
        let names: Vec<&str> = orphans(&domains, &bound)
            .iter()
            .map(|d| d.name.as_str())
            .collect();
        assert_eq!(names, ["gone"]);
    }

    #[test]
    fn only_a_stopped_domain_of_a_desktop_bound_elsewhere_moved_away() {
        let uid = "0b7e9a4c-1111-4222-8333-444455556666";
        let desktop = |uid: &str, node: Option<&str>| -> Desktop {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop",
                "metadata": { "name": "d", "namespace": "ns", "uid": uid },
                "spec": { "pool": "p", "disk": { "image": "b.qcow2" } },
                "status": { "node": node }
            }))
            .unwrap_or_else(|e| panic!("{e}"))
        };
        let mut stopped = summary("ns_d", Some(uid));
        stopped.state = DomainState::ShutOff;
        let there = desktop(&uid.to_ascii_uppercase(), Some("b"));
        assert_eq!(moved_to(&stopped, &there, "a"), Some("b"));
        // Bound here again, never bound, another desktop of that name, or still running: kept.
        assert_eq!(moved_to(&stopped, &desktop(uid, Some("a")), "a"), None);
        assert_eq!(moved_to(&stopped, &desktop(uid, None), "a"), None);
        let other = desktop("0b7e9a4c-1111-4222-8333-444455557777", Some("b"));
        assert_eq!(moved_to(&stopped, &other, "a"), None);
        let running = summary("ns_d", Some(uid));
        assert_eq!(moved_to(&running, &there, "a"), None);
    }
}
