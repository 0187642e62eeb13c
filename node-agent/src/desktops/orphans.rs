//! Decides which domains on this host are orphans: they carry deskvirt's metadata, but no
//! Desktop with their UID is bound here. A stopped orphan whose Desktop now runs on another host
//! (a woken desktop moved, its disk on shared storage) is undefined here, with the memory saved
//! here and its address lease, never its disk. Other orphans are reported (a Warning Event on
//! the DomainNode, once per domain and process, and the `orphan_domains` gauge), never deleted:
//! a domain may belong to a Desktop that is being restored, and a disk is worth more than a
//! tidy host.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use deskvirt_crds::Desktop;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};

use super::context::DesktopContext;
use super::ip;
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
        ctx.pool(&d.spec.pool),
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
/// the cache).
async fn desktop_of<H>(ctx: &DesktopContext<H>, o: &DomainSummary) -> Option<Desktop> {
    let i = o.identity.as_ref()?;
    let api: Api<Desktop> = Api::namespaced(ctx.client.clone(), &i.namespace);
    match api.get_opt(&i.name).await {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(domain = %o.name, error = %e, "cannot read the Desktop of an orphan domain");
            None
        }
    }
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

/// Sweeps every `every` until the future is dropped.
pub async fn run<H: Hypervisor>(ctx: Arc<DesktopContext<H>>, every: Duration) {
    let mut reported: HashSet<String> = HashSet::new();
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(store) = ctx.desktops() else {
            continue;
        };
        if store.wait_until_ready().await.is_err() {
            continue;
        }
        let domains = match ctx.hypervisor.list_domains().await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(error = %error_chain(&e), "orphan sweep skipped");
                continue;
            }
        };
        let bound: BTreeSet<String> = store
            .state()
            .iter()
            .filter_map(|d| d.uid())
            .map(|u| u.to_ascii_lowercase())
            .collect();
        let mut found = orphans(&domains, &bound);
        // Leftovers of desktops that moved to another host go; the rest is reported.
        let mut cleared = BTreeSet::new();
        for o in found.iter().filter(|o| !o.state.is_active()) {
            if let Some(d) = desktop_of(&ctx, o).await
                && let Some(to) = moved_to(o, &d, &ctx.config.node_name)
                && clear_moved(&ctx, o, &d, to).await
            {
                cleared.insert(o.uuid.clone());
            }
        }
        found.retain(|o| !cleared.contains(&o.uuid));
        ctx.metrics.orphan_domains.set(found.len() as i64);
        for o in found {
            if !reported.insert(o.uuid.clone()) {
                continue;
            }
            let who = o
                .identity
                .as_ref()
                .map(|i| format!("{}/{} (UID {})", i.namespace, i.name, i.uid))
                .unwrap_or_default();
            tracing::warn!(domain = %o.name, desktop = %who, "orphan domain: no Desktop bound here; left untouched");
            if let Some(node) = ctx.domain_node() {
                ctx.event(
                    node.as_ref(),
                    EventType::Warning,
                    "OrphanDomain",
                    "Sweep",
                    format!(
                        "domain {} belongs to Desktop {who}, which is not bound to this host; left untouched (delete it with virsh once you are sure)",
                        o.name
                    ),
                )
                .await;
            }
        }
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
