//! Which console password mirrors are orphans: those whose Desktop no longer exists (deleted
//! while no operator led, or a deletion that never reached the mirror). The leader deletes them
//! on gaining leadership and then periodically.

use std::sync::Arc;
use std::time::Duration;

use deskvirt_crds::Desktop;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Preconditions};
use kube::{Api, ResourceExt};
use tokio::sync::watch;

use crate::console::mirror;
use crate::context::{Context, stopped};

/// Runs until `stop`: one sweep each time this replica becomes leader, then one per `every`.
pub async fn run(ctx: Arc<Context>, every: Duration, stop: watch::Receiver<bool>) {
    while_leading(&ctx, every, stop, || sweep(&ctx)).await;
}

/// Runs `pass` until `stop`: once each time this replica becomes leader, then once per
/// `every` while it leads.
pub async fn while_leading<F, Fut>(
    ctx: &Context,
    every: Duration,
    stop: watch::Receiver<bool>,
    pass: F,
) where
    F: Fn() -> Fut,
    Fut: Future,
{
    let mut leader = ctx.leader.clone();
    loop {
        tokio::select! {
            r = leader.wait_for(|l| *l) => if r.is_err() { return },
            () = stopped(stop.clone()) => return,
        }
        pass().await;
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            r = leader.wait_for(|l| !*l) => if r.is_err() { return },
            () = stopped(stop.clone()) => return,
        }
    }
}

/// Deletes every cached mirror whose Desktop is gone; returns how many.
pub async fn sweep(ctx: &Context) -> usize {
    let mut deleted = 0;
    for m in ctx.stores.mirrors.state() {
        if !ctx.is_leader() {
            break;
        }
        let Some(uid) = mirror::uid_of(&m) else {
            continue;
        };
        if ctx.stores.desktop_by_uid(uid).is_some() {
            continue;
        }
        // Not in this replica's cache: a Desktop outside its label selector, or one the cache
        // has not seen yet. Only the API can say it is gone.
        match desktop_exists(ctx, &m, uid).await {
            Ok(false) => {}
            Ok(true) => continue,
            Err(e) => {
                tracing::warn!(error = %e, mirror = %m.name_any(), "cannot check a mirror's desktop");
                continue;
            }
        }
        // The check above may have waited past the Lease (`crate::fence`).
        if ctx.fence.check().is_err() {
            break;
        }
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.console_namespace);
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: m.uid(),
                resource_version: None,
            }),
            ..Default::default()
        };
        match api.delete(&m.name_any(), &dp).await {
            Ok(_) => {
                deleted += 1;
                tracing::info!(mirror = %m.name_any(), desktop_uid = uid, "deleted an orphaned console mirror");
            }
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => {
                tracing::warn!(error = %e, mirror = %m.name_any(), "cannot delete an orphaned console mirror");
            }
        }
    }
    deleted
}

/// Whether the Desktop the mirror names still exists with the mirror's UID.
async fn desktop_exists(ctx: &Context, m: &Secret, uid: &str) -> Result<bool, kube::Error> {
    let Some((ns, name)) = mirror::desktop_of(m) else {
        return Ok(false);
    };
    let api: Api<Desktop> = Api::namespaced(ctx.client.clone(), ns);
    Ok(api
        .get_opt(name)
        .await?
        .is_some_and(|d| d.uid().as_deref() == Some(uid)))
}
