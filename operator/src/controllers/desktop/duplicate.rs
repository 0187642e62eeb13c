//! A duplicate binding found by a pass: a recorded SPICE port or MAC that the pool's ledger
//! gives to another desktop (a fenced-out leader's late binding that landed). The younger claim
//! gets new values ([`crate::repair`] decides), with a Warning naming both desktops and the
//! resource; nothing is stopped.

use kube::ResourceExt;
use kube::runtime::events::EventType;

use super::bound::{Seen, Told};
use super::status::Owned;
use super::txn::Txn;
use crate::allocators::{Claim, Conflict};
use crate::context::{Context, seniority};
use crate::repair::{self, Repair};

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
/// leader that landed): the younger claim gets new values on its host (in `want`), with a
/// Warning naming both desktops and the resource. Nothing is stopped: the host's agent
/// redefines the domain with the new values, which a running domain takes at its next start.
pub(super) fn repair(
    seen: &Seen<'_>,
    ctx: &Context,
    txn: &mut Txn<'_>,
    (port, mac): (u16, &str),
    dups: Vec<repair::Duplicate>,
    want: &mut Owned,
) -> Option<Told> {
    let (d, uid, node) = (seen.d, seen.uid, seen.node.as_str());
    let holders: Vec<_> = dups
        .into_iter()
        .map(|dup| {
            let s = ctx
                .stores
                .desktop_by_uid(&dup.holder)
                .map(|h| seniority(h.as_ref()));
            (dup, s)
        })
        .collect();
    let mine = seniority(d);
    match repair::decide(&mine, &holders) {
        Repair::MoveMine => {
            let claim = Claim {
                desktop: uid,
                host: node,
                fixed_mac: d.spec.network.mac.as_deref(),
            };
            let b = match txn.ledger()?.bind(&claim) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(host = node, error = %e, "cannot repair a duplicate binding");
                    return None;
                }
            };
            want.port = Some(b.port);
            want.mac = Some(b.mac.to_string());
            // The holder that keeps the resource: older, or not a desktop.
            let keeper = holders
                .iter()
                .find(|(_, s)| s.as_ref().is_none_or(|s| *s <= mine));
            let mac_now = b.mac.to_string();
            let note = keeper.map(|(dup, _)| {
                repair::message(
                    &dup.resource,
                    &name(ctx, uid),
                    &name(ctx, &dup.holder),
                    b.port,
                    &mac_now,
                )
            });
            Some(Told {
                once: Some((node.to_string(), port, mac.to_string())),
                due: note.map(|note| (EventType::Warning, "DuplicateBinding", "Repair", note)),
            })
        }
        Repair::MoveTheirs(younger) => {
            let ledger = txn.ledger()?;
            for y in &younger {
                ledger.release(y);
            }
            ledger.adopt(uid, node, port, mac);
            // Each younger holder gets new values on its next pass, with the Warning.
            let ledgers = txn.ledgers();
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
            None
        }
    }
}
