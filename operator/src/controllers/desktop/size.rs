//! A bound desktop's size and pool, observed then decided by the core's resize rule: a resize
//! the host can hold is admitted (applied at the next restart, charged at the larger of old and
//! new until then), one it cannot hold is refused and the old size keeps running and counting,
//! and a `spec.pool` edit never moves the binding. Sets `status.allocation`, `SizeApplied` and
//! `PoolApplied`.

use deskvirt_core::resize::{SizeDecision, SizeVerdict, caught_up, decide, pool_condition};
use deskvirt_crds::conditions::{self, Status, condition};
use deskvirt_crds::constants::condition::{POOL_APPLIED, SIZE_APPLIED};
use deskvirt_crds::desktop::{Allocation, Desktop};
use deskvirt_crds::read::{FromPoolSpec, allocation};
use deskvirt_crds::validation::ValidDesktop;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;

use super::bound::Seen;
use super::status::Owned;
use super::txn::Txn;
use crate::context::Context;
use crate::scheduler::{PoolPolicy, Request};
use crate::world::{host_room, running_size};

/// A Warning the pass owes: a condition that newly turned False for a reason a human acts on.
pub(super) struct Warning {
    pub reason: &'static str,
    pub action: &'static str,
    pub message: String,
}

/// The allocation a bound desktop has: recorded, else (bound by a release that did not record
/// one) its spec's pool and size.
pub(super) fn recorded(d: &Desktop) -> Allocation {
    d.status
        .as_ref()
        .and_then(|s| s.allocation.clone())
        .unwrap_or_else(|| Allocation {
            pool: d.spec.pool.clone(),
            cpu: d.spec.cpu,
            memory: d.spec.memory.clone(),
        })
}

/// The two conditions of a desktop just bound with its spec's pool and size.
pub(super) fn admitted(
    want: &mut Owned,
    prev: &[Condition],
    generation: Option<i64>,
    now: Timestamp,
) {
    let Some(a) = want.allocation.clone() else {
        return;
    };
    let size = Request::read(a.cpu, &a.memory).unwrap_or_default();
    let (_, pool, pool_message) = pool_condition(&a.pool, &a.pool);
    let (_, sized, size_message) = SizeVerdict::Applied.condition(&size);
    for (type_, reason, message) in [
        (POOL_APPLIED, pool.as_str(), pool_message),
        (SIZE_APPLIED, sized.as_str(), size_message),
    ] {
        let c = condition(prev, type_, Status::True, reason, message, generation, now);
        conditions::upsert(&mut want.conditions, c);
    }
}

/// Decides the allocation and the two conditions of a desktop bound to `node`, into `want`, in
/// the pass's ledger transaction; returns the Warnings due.
pub(super) fn settle(
    seen: &Seen<'_>,
    valid: Option<&ValidDesktop>,
    ctx: &Context,
    txn: &mut Txn<'_>,
    node: &str,
    want: &mut Owned,
) -> Vec<Warning> {
    let (d, uid, now) = (seen.d, seen.uid, seen.now);
    let mut warnings = Vec::new();
    let prev = d
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let gen_ = d.metadata.generation;
    let mut alloc = recorded(d);
    let mut say = |type_: &str, (ok, reason, message): (bool, &'static str, String)| {
        let was = conditions::find(&prev, type_).map(|c| (c.status.clone(), c.reason.clone()));
        if !ok && was != Some(("False".into(), reason.into())) {
            let action = if type_ == SIZE_APPLIED {
                "Resize"
            } else {
                "ChangePool"
            };
            warnings.push(Warning {
                reason,
                action,
                message: message.clone(),
            });
        }
        let c = condition(
            &prev,
            type_,
            Status::from_bool(ok),
            reason,
            message,
            gen_,
            now,
        );
        conditions::upsert(&mut want.conditions, c);
    };

    let (ok, reason, message) = pool_condition(&alloc.pool, &d.spec.pool);
    say(POOL_APPLIED, (ok, reason.as_str(), message));

    // An unreadable spec is `Ready=False InvalidSpec`'s to report; nothing changes here.
    let Some(valid) = valid else {
        want.allocation = Some(alloc);
        return warnings;
    };
    let wanted = valid.asked;
    // An unreadable recorded size is taken for the spec's (its next admission writes it anew).
    let admitted = valid
        .admitted(allocation(d.status.as_ref()))
        .unwrap_or(wanted);
    let running = running_size(d);
    // The transaction holds the ledger of the pool the desktop is bound in (`alloc.pool`).
    if admitted == wanted
        && let Some(l) = txn.existing()
    {
        // Recorded as asked (or reverted): whatever the ledger admitted no longer counts.
        l.size_settled(uid);
    }
    let decision = if !seen.holds || admitted == wanted {
        // Released by the idle policy (a wake places it again at the size asked), or nothing
        // changed: only whether the running domain has caught up is left to say.
        SizeDecision {
            admitted: wanted,
            verdict: caught_up(wanted, running.filter(|_| seen.holds)),
        }
    } else {
        // In the transaction, counting what the ledger admitted and the cache may not show
        // yet: two resizes (or a resize and a binding) on one host never both take its room.
        // Without a ledger (leadership just gained, or the pool's network settings rejected,
        // which its own condition reports) the cache alone decides, as it does for the pool.
        let pool = ctx.stores.pool(&alloc.pool);
        let room = pool
            .as_deref()
            .and_then(|p| PoolPolicy::from_spec(&p.spec).ok())
            .and_then(|policy| {
                host_room(
                    node,
                    &policy,
                    &ctx.stores.nodes.state(),
                    txn.charges_without(uid),
                )
            });
        let decision = match room {
            Some((capacity, others)) => decide(node, &capacity, &others, admitted, wanted, running),
            None => SizeDecision {
                admitted,
                verdict: SizeVerdict::Refused {
                    message: format!(
                        "the capacity of host {node} in pool {} is not known, so the new size \
                         waits; it keeps running with {} vCPU and {}",
                        alloc.pool, alloc.cpu, alloc.memory
                    ),
                },
            },
        };
        if let Some(l) = txn.ledger() {
            l.admit_size(uid, decision.admitted);
        }
        decision
    };
    if decision.admitted == wanted && !matches!(decision.verdict, SizeVerdict::Refused { .. }) {
        alloc.cpu = d.spec.cpu;
        alloc.memory = d.spec.memory.clone();
    }
    let (ok, reason, message) = decision.verdict.condition(&decision.admitted);
    say(SIZE_APPLIED, (ok, reason.as_str(), message));
    want.allocation = Some(alloc);
    warnings
}
