//! Converges a desktop the idle policy reclaimed (`status.reclaimed` is set): its domain is
//! kept suspended or off whatever `spec.power` says, and saved or shut down first when it still
//! runs. Nothing of the binding is needed: once the operator has released the SPICE port the
//! domain is kept exactly as it is (never redefined, its disk never touched) and no SPICE URI is
//! reported. The address and SPICE host already reported are kept. A migration recorded on it
//! moves it with its saved memory ([`migrate::drive_held`]).

use deskvirt_crds::Desktop;
use deskvirt_crds::conditions;
use deskvirt_crds::constants::condition::RUNNING;
use deskvirt_crds::desktop::{DesktopStatus, Power};
use kube::ResourceExt;

use super::Error;
use super::activity;
use super::apply::{Outcome, not_ours, now};
use super::context::DesktopContext;
use super::lifecycle;
use super::migrate;
use super::place::{self, Place};
use super::power::{self, DomainView, Facts, Hold};
use super::status::Report;
use crate::domain::domain_name;
use crate::hypervisor::Hypervisor;

/// Keeps the domain of `d` in `hold`.
pub(super) async fn converge<H: Hypervisor>(
    d: &Desktop,
    ctx: &DesktopContext<H>,
    status: &DesktopStatus,
    uid: &str,
    hold: Hold,
) -> Result<Outcome, Error> {
    let ns = d
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let mut report = Report::keeping(status);
    let wanted = domain_name(&ns, &d.name_any(), uid);
    let domain = match place::locate(&ctx.hypervisor, uid, &wanted).await? {
        Place::Ours { name } | Place::Free { name } => name,
        Place::Taken { name, owner } => {
            report.defined = Some(not_ours(&ctx.config.node_name, &name, &owner));
            return Ok(Outcome {
                report,
                requeue: lifecycle::ADMIN_RESYNC,
            });
        }
    };
    // Moved in cold by a copy: it arrived paused, its guest never run.
    if let Some(pool) = ctx.pool(d.pool()) {
        let disk = crate::domain::names::disk_path(&pool.spec.storage.disk_dir, &domain);
        super::incoming::settle(ctx, &domain, std::path::Path::new(&disk)).await?;
    }
    let current = match ctx.hypervisor.domain_status(&domain).await {
        Ok(s) => Some(s),
        Err(e) if e.is_not_found() => None,
        Err(e) => return Err(e.into()),
    };
    let active = current.is_some_and(|s| s.state.is_active());
    // A migration of the suspended desktop (a drain's, say) moves it with its saved memory.
    let here = migrate::Domain::of(current.map(|s| (s.state, s.has_managed_save)));
    if let Some(requeue) =
        migrate::drive_held(ctx, d, status, uid, &domain, here, &mut report).await?
    {
        return Ok(Outcome { report, requeue });
    }
    let step = power::decide(&Facts {
        hold: Some(hold),
        want_on: d.spec.power == Power::On,
        domain: current.as_ref().map(DomainView::of),
        running_reason: conditions::find(&status.conditions, RUNNING).map(|c| c.reason.as_str()),
        shut_itself_down: false,
        // Held off: a paused domain is saved or shut down, never resumed.
        resume_due: false,
    });
    let done = lifecycle::execute(ctx, d, uid, &domain, current, step).await?;
    report.running = Some(done.running);
    report.activity = Some(if active {
        // Being saved or shut down: nothing new is learnt, nothing is changed.
        activity::unchanged(status)
    } else {
        ctx.record_session(uid, false);
        activity::next(status, None, None, now())
    });
    Ok(Outcome {
        report,
        requeue: done.requeue,
    })
}
