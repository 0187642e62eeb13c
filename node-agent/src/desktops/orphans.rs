//! Decides which domains on this host are orphans: they carry deskvirt's metadata, but no
//! Desktop with their UID is bound here. Orphans are reported (a Warning Event on the
//! DomainNode, once per domain and process, and the `orphan_domains` gauge), never deleted:
//! a domain may belong to a Desktop that is being restored, and a disk is worth more than a
//! tidy host.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::events::EventType;

use super::context::DesktopContext;
use crate::agent::error_chain;
use crate::hypervisor::{DomainSummary, Hypervisor};

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
        let found = orphans(&domains, &bound);
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
}
