//! The console password hand-off of a desktop: its mirror in the operator's namespace (created
//! before the binding is written, relabelled with the host, rotated on request, deleted with the
//! desktop) and the user's Secret, written from the mirror and never read back: created once in
//! a namespace the administrator allows, its UID recorded in the mirror, and from then on
//! written and deleted only under that UID, so a Secret of that name someone else made is never
//! touched.

use deskvirt_crds::constants::{
    ANNOTATION_CONSOLE_SECRET_UID, ANNOTATION_ROTATE_PASSWORD, MANAGER_OPERATOR,
    console_mirror_name,
};
use deskvirt_crds::desktop::Desktop;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};

use super::{Error, kube};
use crate::allocators::fnv::fnv1a64;
use crate::console::mirror::{self, Mirror, Password};
use crate::console::new_password;
use crate::console::user::{self, Console, Outcome};
use crate::context::Context;
use crate::controllers::is_conflict;
use crate::fence;
use std::time::Duration;

/// Whether the operator ever bound the desktop with UID `uid` to a host: its console mirror,
/// created before any binding and deleted only after the agent's finalizer is gone, exists.
/// The cache first, the API on a miss (a mirror written a moment ago may not be cached yet). A
/// `status.node` without a mirror was written by someone else.
pub(super) async fn ever_bound(ctx: &Context, uid: &str) -> Result<bool, Error> {
    if ctx.stores.mirror(&ctx.console_namespace, uid).is_some() {
        return Ok(true);
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.console_namespace);
    Ok(api
        .get_opt(&console_mirror_name(uid))
        .await
        .map_err(kube("read console mirror"))?
        .is_some())
}

/// How often a mirror write may lose a race before the pass gives up.
const MIRROR_ATTEMPTS: usize = 3;

/// What the mirror holds after [`ensure_mirror`].
pub(super) struct Held {
    pub password: String,
    /// UID of the user's console Secret the operator created, when recorded.
    pub user_secret_uid: Option<String>,
}

/// Makes the mirror of `d` hold a password for host `node`; returns the password. A rotation
/// asked for since the last pass draws a new one and records a `PasswordRotated` Event.
///
/// The cache is read first and the API on a miss, so a mirror written a moment ago is never
/// taken for missing; every write is a create or an apply guarded by the version it was decided
/// on, so a stale read costs a retry, never a second password.
pub(super) async fn ensure_mirror(
    d: &Desktop,
    ctx: &Context,
    uid: &str,
    node: &str,
) -> Result<Held, Error> {
    let name = console_mirror_name(uid);
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.console_namespace);
    let mut existing = match ctx.stores.mirror(&ctx.console_namespace, uid) {
        Some(m) => Some((*m).clone()),
        None => api
            .get_opt(&name)
            .await
            .map_err(kube("read console mirror"))?,
    };
    let desktop = d.name_any();
    let desktop_namespace = d.namespace().unwrap_or_default();
    let rotation = d
        .annotations()
        .get(ANNOTATION_ROTATE_PASSWORD)
        .map(String::as_str)
        .unwrap_or("");
    let spec = Mirror {
        namespace: &ctx.console_namespace,
        desktop_namespace: &desktop_namespace,
        desktop: &desktop,
        desktop_uid: uid,
        node,
        rotation,
    };
    for _ in 0..MIRROR_ATTEMPTS {
        let decision = mirror::decide(existing.as_ref(), rotation);
        let password = match &decision {
            Password::Keep(p) => p.clone(),
            Password::New | Password::Rotate => new_password().map_err(Error::Random)?,
        };
        let mut wanted = mirror::secret(&spec, &password);
        let recorded = |s: &Secret| mirror::user_secret_uid(s).map(str::to_string);
        if !existing
            .as_ref()
            .is_some_and(|e| mirror::up_to_date(e, &wanted))
        {
            fence::check()?;
        }
        let written = match &existing {
            Some(e) if mirror::up_to_date(e, &wanted) => {
                return Ok(Held {
                    password,
                    user_secret_uid: recorded(e),
                });
            }
            Some(e) => {
                wanted.metadata.resource_version = e.resource_version();
                let pp = PatchParams::apply(MANAGER_OPERATOR).force();
                api.patch(&name, &pp, &Patch::Apply(&wanted)).await
            }
            None => {
                let pp = PostParams {
                    field_manager: Some(MANAGER_OPERATOR.into()),
                    ..Default::default()
                };
                api.create(&pp, &wanted).await
            }
        };
        match written {
            Ok(s) => {
                ctx.mirror_written(uid, &s);
                if decision == Password::Rotate {
                    tracing::info!("console password rotated");
                    ctx.event(
                        d,
                        EventType::Normal,
                        "PasswordRotated",
                        "Rotate",
                        "console password rotated".into(),
                    )
                    .await;
                }
                return Ok(Held {
                    password,
                    user_secret_uid: recorded(&s),
                });
            }
            // Changed or created since it was read: decide again on what is there now.
            Err(e) if is_conflict(&e) => {
                existing = api
                    .get_opt(&name)
                    .await
                    .map_err(kube("read console mirror"))?;
            }
            Err(e) => return Err(kube("write console mirror")(e)),
        }
    }
    Err(Error::MirrorContended)
}

/// How often the user's console Secret is applied even when nothing it is made from changed,
/// so a deleted one comes back (it is never read).
const USER_SECRET_REFRESH: Duration = Duration::from_secs(600);

/// Writes the user's console Secret from the mirror's password in `held`; returns what became
/// of it, or `None` when nothing was due. Written when what it is made from (password, host,
/// port; the rest is fixed for a desktop's UID) or the Desktop's spec, labels or annotations
/// changed since the last write (touching the Desktop brings a deleted Secret back), and at
/// least every [`USER_SECRET_REFRESH`]. Not on every pass, nor on every change of the Desktop:
/// a change of the desktop's pool or host re-queues every desktop on it, and its status and
/// finalizers change several times on the way to Running and with every activity report.
/// A desktop outside the allowed namespaces gets no Secret, on every pass.
pub(super) async fn write_user_secret(
    d: &Desktop,
    ctx: &Context,
    uid: &str,
    node: &str,
    port: Option<u16>,
    held: &Held,
) -> Result<Option<Outcome>, Error> {
    let name = d.name_any();
    let ns = d.namespace().ok_or(Error::MissingField("namespace"))?;
    if !user::allowed(&ctx.console_user_namespaces, &ns) {
        return Ok(Some(Outcome::NamespaceNotAllowed { namespace: ns }));
    }
    let host = d
        .status
        .as_ref()
        .and_then(|s| s.spice.as_ref())
        .and_then(|s| s.host.clone())
        .or_else(|| {
            ctx.stores
                .node(node)
                .and_then(|n| n.status.as_ref()?.address.clone())
        });
    let spec = Console {
        namespace: &ns,
        desktop: &name,
        desktop_uid: uid,
        host: host.as_deref(),
        port,
    };
    let password = &held.password;
    let m = &d.metadata;
    let fingerprint = fnv1a64(
        format!(
            "{:?}|{:?}|{:?}|{host:?}|{port:?}|{password}",
            m.generation, m.labels, m.annotations
        )
        .as_bytes(),
    );
    if !ctx.user_secret_due(uid, fingerprint, USER_SECRET_REFRESH) {
        return Ok(None);
    }
    let wanted = user::secret(&spec, password);
    match create_or_rewrite(ctx, uid, &ns, &wanted, held.user_secret_uid.clone()).await {
        // Someone else's Secret: look again on the next pass, it may be gone by then.
        Ok(outcome @ Outcome::NotOurs { .. }) => {
            ctx.forget_user_secret(uid);
            Ok(Some(outcome))
        }
        Ok(outcome) => Ok(Some(outcome)),
        Err(e) => {
            ctx.forget_user_secret(uid);
            Err(e)
        }
    }
}

/// The user Secret `wanted`: rewritten under the recorded UID `ours` when there is one, else
/// created, and its UID recorded in the mirror. A name taken by a Secret the operator did not
/// create is [`Outcome::NotOurs`], and that Secret is left as it is.
async fn create_or_rewrite(
    ctx: &Context,
    uid: &str,
    ns: &str,
    wanted: &Secret,
    mut ours: Option<String>,
) -> Result<Outcome, Error> {
    let name = wanted.name_any();
    let api = Api::<Secret>::namespaced(ctx.client.clone(), ns);
    let written = Outcome::Written {
        namespace: ns.to_string(),
        secret: name.clone(),
    };
    let not_ours = Outcome::NotOurs {
        namespace: ns.to_string(),
        secret: name.clone(),
    };
    // Twice at most: a create that finds the name taken looks once more at the mirror, which
    // the cache may not show with the UID a pass recorded a moment ago.
    for second_look in [false, true] {
        if let Some(owned) = &ours {
            let pp = PatchParams {
                field_manager: Some(MANAGER_OPERATOR.into()),
                ..Default::default()
            };
            let patch = Patch::Merge(user::guarded_patch(wanted, owned));
            fence::check()?;
            match api.patch(&name, &pp, &patch).await {
                Ok(_) => return Ok(written),
                // Deleted: ours to create again.
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                // Another Secret by that name now (the UID precondition failed).
                Err(kube::Error::Api(s)) if s.code == 409 || s.code == 422 => return Ok(not_ours),
                Err(e) => return Err(kube("write console secret")(e)),
            }
        }
        let pp = PostParams {
            field_manager: Some(MANAGER_OPERATOR.into()),
            ..Default::default()
        };
        fence::check()?;
        match api.create(&pp, wanted).await {
            Ok(created) => {
                record_user_secret(ctx, uid, &api, &created).await?;
                return Ok(written);
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                if second_look || ours.is_some() {
                    return Ok(not_ours);
                }
                ours = read_recorded(ctx, uid).await?;
                if ours.is_none() {
                    return Ok(not_ours);
                }
            }
            Err(e) => return Err(kube("create console secret")(e)),
        }
    }
    Ok(not_ours)
}

/// The user Secret UID recorded in the mirror, read from the API (not the cache).
async fn read_recorded(ctx: &Context, uid: &str) -> Result<Option<String>, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.console_namespace);
    Ok(api
        .get_opt(&console_mirror_name(uid))
        .await
        .map_err(kube("read console mirror"))?
        .as_ref()
        .and_then(mirror::user_secret_uid)
        .map(str::to_string))
}

/// Records the UID of the user Secret just `created` in the mirror. When that fails the
/// Secret is deleted again (under its UID): unrecorded, a later pass would take it for someone
/// else's.
async fn record_user_secret(
    ctx: &Context,
    uid: &str,
    user_api: &Api<Secret>,
    created: &Secret,
) -> Result<(), Error> {
    let secret_uid = created
        .uid()
        .ok_or(Error::MissingField("console Secret uid"))?;
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.console_namespace);
    let patch = serde_json::json!({
        "metadata": { "annotations": { ANNOTATION_CONSOLE_SECRET_UID: secret_uid } }
    });
    let pp = PatchParams {
        field_manager: Some(MANAGER_OPERATOR.into()),
        ..Default::default()
    };
    let recorded = api
        .patch(&console_mirror_name(uid), &pp, &Patch::Merge(&patch))
        .await;
    if let Ok(mirror) = &recorded {
        ctx.mirror_written(uid, mirror);
    }
    if let Err(e) = recorded {
        let dp = only(&secret_uid);
        if let Err(undo) = user_api.delete(&created.name_any(), &dp).await {
            tracing::warn!(error = %undo, "cannot delete an unrecorded console Secret");
        }
        return Err(kube("record the console secret's uid")(e));
    }
    Ok(())
}

/// Delete options that delete only the object with `uid`.
fn only(uid: &str) -> DeleteParams {
    DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some(uid.to_string()),
            resource_version: None,
        }),
        ..Default::default()
    }
}

/// Deletes the user's console Secret of the desktop with UID `uid` in `ns`, only when it is
/// the one the operator created (its UID recorded in the mirror). Best effort: its owner
/// reference lets the garbage collector remove it anyway, so a failure is only logged.
pub(super) async fn delete_user_secret(ctx: &Context, uid: &str, ns: &str, desktop: &str) {
    if !user::allowed(&ctx.console_user_namespaces, ns) {
        return;
    }
    let recorded = match ctx.stores.mirror(&ctx.console_namespace, uid) {
        Some(m) => mirror::user_secret_uid(&m).map(str::to_string),
        None => read_recorded(ctx, uid).await.ok().flatten(),
    };
    let Some(secret_uid) = recorded else {
        return;
    };
    let api = Api::<Secret>::namespaced(ctx.client.clone(), ns);
    match api
        .delete(&user::secret_name(desktop), &only(&secret_uid))
        .await
    {
        Ok(_) => {}
        // Gone, or another Secret by that name (the UID precondition failed): not ours.
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
        Err(e) => tracing::warn!(error = %e, "cannot delete the console secret"),
    }
}

/// Deletes the mirror of the desktop with UID `uid`; a missing one is fine.
pub(super) async fn delete_mirror(ctx: &Context, uid: &str) -> Result<(), Error> {
    fence::check()?;
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.console_namespace);
    match api
        .delete(&console_mirror_name(uid), &DeleteParams::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(kube("delete console mirror")(e)),
    }
}
