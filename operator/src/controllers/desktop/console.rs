//! The console password hand-off of a desktop: its mirror in the operator's namespace (created
//! before the binding is written, relabelled with the host, rotated on request, deleted with the
//! desktop) and the user's Secret, applied from the mirror and never read back.

use deskvirt_crds::constants::{ANNOTATION_ROTATE_PASSWORD, MANAGER_OPERATOR, console_mirror_name};
use deskvirt_crds::desktop::Desktop;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};

use super::{Error, kube};
use crate::allocators::fnv::fnv1a64;
use crate::console::mirror::{self, Mirror, Password};
use crate::console::new_password;
use crate::console::user::{self, Console};
use crate::context::Context;
use crate::controllers::is_conflict;
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
) -> Result<String, Error> {
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
        let written = match &existing {
            Some(e) if mirror::up_to_date(e, &wanted) => return Ok(password),
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
            Ok(_) => {
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
                return Ok(password);
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

/// Applies the user's console Secret from the mirror's password; returns its name. Applied when
/// what it is made from (password, host, port; the rest is fixed for a desktop's UID) or the
/// Desktop's spec, labels or annotations changed since the last apply (touching the Desktop
/// brings a deleted Secret back), and at least every [`USER_SECRET_REFRESH`]. Not on every
/// pass, nor on every change of the Desktop: a change of the desktop's pool or host re-queues
/// every desktop on it, and its status and finalizers change several times on the way to
/// Running and with every activity report.
pub(super) async fn apply_user_secret(
    d: &Desktop,
    ctx: &Context,
    uid: &str,
    node: &str,
    port: Option<u16>,
    password: &str,
) -> Result<String, Error> {
    let name = d.name_any();
    let ns = d.namespace().ok_or(Error::MissingField("namespace"))?;
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
    let secret_name = user::secret_name(&name);
    let m = &d.metadata;
    let fingerprint = fnv1a64(
        format!(
            "{:?}|{:?}|{:?}|{host:?}|{port:?}|{password}",
            m.generation, m.labels, m.annotations
        )
        .as_bytes(),
    );
    if !ctx.user_secret_due(uid, fingerprint, USER_SECRET_REFRESH) {
        return Ok(secret_name);
    }
    let pp = PatchParams::apply(MANAGER_OPERATOR).force();
    let applied = Api::<Secret>::namespaced(ctx.client.clone(), &ns)
        .patch(
            &secret_name,
            &pp,
            &Patch::Apply(&user::secret(&spec, password)),
        )
        .await;
    if let Err(e) = applied {
        ctx.forget_user_secret(uid);
        return Err(kube("apply console secret")(e));
    }
    Ok(secret_name)
}

/// Deletes the mirror of the desktop with UID `uid`; a missing one is fine.
pub(super) async fn delete_mirror(ctx: &Context, uid: &str) -> Result<(), Error> {
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
