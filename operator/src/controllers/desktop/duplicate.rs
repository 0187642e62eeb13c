//! A duplicate binding found by a pass: a recorded SPICE port or MAC that the pool's ledger
//! gives to another desktop (a fenced-out leader's late binding that landed). The younger claim
//! gets new values ([`crate::repair`] decides), with a Warning naming both desktops and the
//! resource; nothing is stopped.

use kube::ResourceExt;
use kube::runtime::events::EventType;

use super::status::Owned;
use crate::allocators::{Claim, Conflict};
use crate::context::{Context, seniority};
use crate::repair::{self, Repair};
use deskvirt_crds::desktop::Desktop;

/// A claim of the ledger in words: `Desktop namespace/name`, else its key.
pub(super) fn name(ctx: &Context, uid: &str) -> String {
    match ctx.stores.desktop_by_uid(uid) {
        Some(d) => format!(
            "Desktop {}/{}",
            d.namespace().unwrap_or_default(),
            d.name_any()
        ),
        None => format!("{uid} (not a desktop: an orphan domain, or deleted)"),
    }
}

/// A recorded port or MAC another desktop holds in the ledger (a late binding of a fenced-out
/// leader that landed): the younger claim gets new values on its host, with a Warning naming
/// both desktops and the resource. Nothing is stopped: the host's agent redefines the domain
/// with the new values, which a running domain takes at its next start.
pub(super) async fn repair(
    d: &Desktop,
    ctx: &Context,
    uid: &str,
    node: &str,
    (port, mac): (u16, &str),
    dups: Vec<repair::Duplicate>,
    want: &mut Owned,
) {
    let known = |holder: &str| ctx.stores.desktop_by_uid(holder);
    let holders: Vec<_> = dups
        .into_iter()
        .map(|dup| {
            let s = known(&dup.holder).map(|h| seniority(h.as_ref()));
            (dup, s)
        })
        .collect();
    let named = |holder: &str| name(ctx, holder);
    let me = name(ctx, uid);
    let recorded = (node.to_string(), port, mac.to_string());
    let mut ledgers = ctx.ledgers.lock().await;
    if crate::fence::check().is_err() {
        return;
    }
    let Some(ledger) = ledgers.get_mut(&d.spec.pool) else {
        return;
    };
    let mine = seniority(d);
    match repair::decide(&mine, &holders) {
        Repair::MoveMine => {
            let claim = Claim {
                desktop: uid,
                host: node,
                fixed_mac: d.spec.network.mac.as_deref(),
            };
            let b = match ledger.bind(&claim) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(host = node, error = %e, "cannot repair a duplicate binding");
                    return;
                }
            };
            drop(ledgers);
            want.port = Some(b.port);
            want.mac = Some(b.mac.to_string());
            let said = ctx
                .repaired
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(uid.to_string(), recorded.clone());
            if said.as_ref() == Some(&recorded) {
                return;
            }
            ctx.metrics.binding_repairs.inc();
            // The holder that keeps the resource: older, or not a desktop.
            let Some((dup, _)) = holders
                .iter()
                .find(|(_, s)| s.as_ref().is_none_or(|s| *s <= mine))
            else {
                return;
            };
            let mac = b.mac.to_string();
            let message = repair::message(&dup.resource, &me, &named(&dup.holder), b.port, &mac);
            tracing::warn!(%message, "duplicate binding repaired");
            ctx.event(d, EventType::Warning, "DuplicateBinding", "Repair", message)
                .await;
        }
        Repair::MoveTheirs(younger) => {
            for y in &younger {
                ledger.release(y);
            }
            ledger.adopt(uid, node, port, mac);
            // Each younger holder gets new values on its next pass, with the Warning.
            for (dup, _) in holders {
                ledgers.rebind.insert(dup.holder.clone());
                ledgers.rebind_why.insert(
                    dup.holder.clone(),
                    Conflict::Taken {
                        resource: dup.resource,
                        holder: uid.to_string(),
                        loser: dup.holder,
                    },
                );
            }
        }
    }
}
