//! Keeps the pool's ledger in step with a bound desktop's recorded binding: a binding a rebuild
//! refused gets a new port and MAC on the same host, a duplicate is repaired
//! ([`super::duplicate`]), a wake whose write stopped half-way gets its port back, and one the
//! ledger lost track of (a write given up on that landed after all) is adopted when nobody else
//! holds its values.

use kube::runtime::events::EventType;

use super::bound::{Seen, Told};
use super::duplicate;
use super::status::Owned;
use super::txn::Txn;
use crate::allocators::{Claim, Conflict};
use crate::context::Context;
use crate::repair;

/// Decides, in the transaction, what the ledger and the recorded binding need to agree; new
/// values go into `want`. Returns the Warning due, if any.
pub(super) fn keep(
    seen: &Seen<'_>,
    ctx: &Context,
    txn: &mut Txn<'_>,
    want: &mut Owned,
) -> Option<Told> {
    let (d, uid, node) = (seen.d, seen.uid, seen.node.as_str());
    // Released by the idle policy: it holds no port (its MAC stays with the ledger).
    if !seen.holds {
        return None;
    }
    if txn.ledgers().rebind.contains(uid) {
        let claim = Claim {
            desktop: uid,
            host: node,
            fixed_mac: d.spec.network.mac.as_deref(),
        };
        let b = txn.ledger()?.bind(&claim).ok()?;
        want.port = Some(b.port);
        want.mac = Some(b.mac.to_string());
        let ledgers = txn.ledgers();
        ledgers.rebind.remove(uid);
        let note = match ledgers.rebind_why.remove(uid) {
            Some(Conflict::Taken {
                resource, holder, ..
            }) => repair::message(
                &resource,
                &duplicate::name(ctx, uid),
                &duplicate::name(ctx, &holder),
                b.port,
                &b.mac.to_string(),
            ),
            _ => format!(
                "recorded port or MAC was held by an older desktop; now port {} MAC {}",
                b.port, b.mac
            ),
        };
        return Some(Told {
            once: None,
            due: Some((EventType::Warning, "BindingConflict", "Rebind", note)),
        });
    }
    let ledger = txn.ledger()?;
    // Holds resources but no port: a wake whose write stopped half-way (`reclaimed` cleared,
    // the port not written yet). The ledger's port, else its lowest free one.
    if want.port.is_none() {
        match ledger.restore_port(uid, node, None) {
            Ok(port) => want.port = Some(port),
            Err(e) => tracing::warn!(host = node, error = %e, "no SPICE port for a bound desktop"),
        }
        return None;
    }
    let (Some(port), Some(mac)) = (want.port, want.mac.clone()) else {
        return None;
    };
    if ledger.holds(uid, node, port, &mac) {
        return None;
    }
    let dups = repair::duplicates(ledger, uid, node, port, &mac);
    if !dups.is_empty() {
        return duplicate::repair(seen, ctx, txn, (port, &mac), dups, want);
    }
    // No port (a woken desktop's reservation given up on, whose write landed after all): adopt.
    if ledger.port_of(uid).is_none() {
        if ledger.adopt(uid, node, port, &mac) {
            tracing::info!(host = node, port, mac, "ledger adopted a recorded binding");
        }
    } else {
        // Newer than the cache (a rebind just written), or older: the cache settles it.
        tracing::debug!(host = node, port, mac, "ledger and recorded binding differ");
    }
    None
}
