//! A live Desktop's pass: binding when unbound ([`super::bind`]); once bound, a binding the
//! operator never made is refused, the labels and finalizer are kept, and the rest is the bound
//! pass ([`super::bound`]).

use std::sync::Arc;

use deskvirt_crds::conditions::{self, Status, condition};
use deskvirt_crds::constants::condition::SCHEDULED;
use kube::runtime::controller::Action;

use super::bind::bind;
use super::bound::bound;
use super::console::ever_bound;
use super::status::{Owned, ensure_meta, write};
use super::{Error, Pass};

/// One pass over a Desktop that is not being deleted. An unbound desktop gets the operator's
/// labels and finalizer with its binding, in one write (or, when it cannot be placed, with its
/// Pending status).
pub(super) async fn apply(mut pass: Pass<'_>) -> Result<Action, Error> {
    let Some(node) = pass.d.status.as_ref().and_then(|s| s.node.clone()) else {
        return bind(&pass).await;
    };
    if !ever_bound(pass.ctx, &pass.uid).await? {
        return forged(&pass, &node).await;
    }
    if let Some(fresh) = ensure_meta(&pass.d, &pass.api, Some(&node)).await? {
        pass.ctx.steps.record(&fresh);
        pass.d = Arc::new(fresh);
    }
    bound(&pass, &node).await
}

/// Reason of `Scheduled=False` for a binding the operator did not make.
pub const BINDING_NOT_OURS: &str = "BindingNotOurs";

/// A `status.node` the operator never wrote (no console mirror was ever made for the
/// desktop): nothing is bound, charged or handed to a host; `Scheduled=False` says why.
async fn forged(pass: &Pass<'_>, node: &str) -> Result<Action, Error> {
    let (d, api) = (&pass.d, &pass.api);
    let status = d.status.clone().unwrap_or_default();
    let current = Owned::from_status(&status);
    let mut want = current.clone();
    let scheduled = condition(
        &status.conditions,
        SCHEDULED,
        Status::False,
        BINDING_NOT_OURS,
        format!(
            "status.node names host {node}, but the operator never bound this desktop: the status \
             was written by someone else and is ignored (no host acts on it, nothing is charged)"
        ),
        d.metadata.generation,
        pass.now,
    );
    conditions::upsert(&mut want.conditions, scheduled);
    write(d, api, &current, &want).await?;
    Ok(Action::await_change())
}

/// The Warning a `ConsoleSecret` that turned False deserves: its reason and message.
pub(super) fn console_event(current: &Owned, want: &Owned) -> Option<(String, String)> {
    let now = want.console_condition().filter(|c| c.status == "False")?;
    let before = current.console_condition();
    if before.is_some_and(|b| b.status == now.status && b.reason == now.reason) {
        return None;
    }
    Some((now.reason.clone(), now.message.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::user::Outcome;

    #[test]
    fn a_console_secret_refused_anew_is_worth_one_warning() {
        use deskvirt_crds::desktop::DesktopStatus;
        let at = k8s_openapi::jiff::Timestamp::UNIX_EPOCH;
        let with = |outcome: &Outcome| {
            let mut o = Owned::from_status(&DesktopStatus::default());
            o.console(&[], at, Some(1), outcome);
            o
        };
        let none = Owned::from_status(&DesktopStatus::default());
        let written = with(&Outcome::Written {
            namespace: "ns".into(),
            secret: "d-console".into(),
        });
        let foreign = with(&Outcome::NotOurs {
            namespace: "ns".into(),
            secret: "d-console".into(),
        });
        let refused = with(&Outcome::NamespaceNotAllowed {
            namespace: "ns".into(),
        });
        assert_eq!(console_event(&none, &written), None);
        let (reason, message) = console_event(&written, &foreign).unwrap_or_default();
        assert_eq!(reason, "SecretNotOurs");
        assert!(message.contains("ns/d-console"), "{message}");
        assert_eq!(console_event(&foreign, &foreign), None, "said once");
        let (reason, _) = console_event(&none, &refused).unwrap_or_default();
        assert_eq!(reason, "NamespaceNotAllowed");
        assert_eq!(console_event(&foreign, &written), None);
    }
}
