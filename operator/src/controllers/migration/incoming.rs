//! A Cold move in a pool whose hosts do not share storage copies the disk: before the move is
//! recorded on the Desktop (which starts the source host), the target host is asked, in its
//! DomainNode's `status.incoming`, to make the empty disk the copy goes into, and the move
//! waits for its answer (`status.prepared`). The request is withdrawn when the migration ends,
//! and a leader-only sweep withdraws those whose migration is gone without ending (its
//! finalizer removed by hand).

use deskvirt_core::migration::MigrationMode;
use deskvirt_crds::constants::MANAGER_OPERATOR_INCOMING;
use deskvirt_crds::domain_node::{IncomingDisk, PreparedDisk};
use deskvirt_crds::names::domain_name;
use deskvirt_crds::{Desktop, DesktopMigration, DomainNode};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::{Error, Pass, kube, plan};
use crate::fence;

/// What the target host said of the disk a migration copies to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Answer {
    /// No copy: the pool's storage is shared (or the move is Live).
    NotNeeded,
    /// The empty disk is made.
    Ready,
    /// Asked; no answer yet.
    Waiting,
    /// The host cannot make it, and says why.
    Refused(String),
}

/// Whether migration `m` of desktop `d` copies the disk: Cold, in a pool not declaring
/// `storage.shared`, or into another pool (whose storage is its own).
pub(super) fn copies(pass: &Pass<'_>, m: &DesktopMigration, d: &Desktop) -> bool {
    let other_pool = m
        .status
        .as_ref()
        .and_then(|s| s.target_pool.as_deref())
        .is_some_and(|p| p != d.pool());
    m.spec.mode == MigrationMode::Cold
        && (other_pool
            || pass
                .ctx
                .stores
                .pool(d.pool())
                .is_some_and(|p| !p.spec.storage.shared))
}

/// The disk of desktop `d` as the target must make it.
fn request(m_uid: &str, d: &Desktop) -> Option<IncomingDisk> {
    let (ns, uid) = (d.namespace()?, d.uid()?);
    let domain = domain_name(&ns, &d.name_any(), &uid);
    Some(IncomingDisk {
        migration: m_uid.to_string(),
        desktop: format!("{ns}/{}", d.name_any()),
        desktop_uid: uid,
        file: format!("{domain}.qcow2"),
        image: d.base_image()?,
        clone: d.spec.disk.clone,
        size_bytes: d
            .spec
            .disk
            .size
            .as_deref()
            .and_then(|s| deskvirt_core::quantity::parse_bytes(s).ok()),
    })
}

/// Asks the target of `m` for the empty disk unless asked already, and returns its answer.
pub(super) async fn ask(pass: &Pass<'_>, m: &DesktopMigration) -> Result<Answer, Error> {
    let Some(d) = plan::desktop_of(&pass.ctx.stores, m) else {
        return Ok(Answer::NotNeeded);
    };
    if !copies(pass, m, &d) {
        return Ok(Answer::NotNeeded);
    }
    let Some(target) = m.status.as_ref().and_then(|s| s.target.clone()) else {
        return Ok(Answer::Waiting);
    };
    let Some(node) = pass.ctx.stores.node(&target) else {
        return Ok(Answer::Refused(format!("host {target} is gone")));
    };
    let status = node.status.clone().unwrap_or_default();
    if let Some(p) = status.prepared.iter().find(|p| p.migration == pass.uid) {
        return Ok(answer_of(p));
    }
    if !status.incoming.iter().any(|i| i.migration == pass.uid) {
        let Some(want) = request(&pass.uid, &d) else {
            return Err(Error::MissingField("desktop namespace or uid"));
        };
        let mut list = status.incoming.clone();
        list.push(want);
        write(
            &pass.ctx.client,
            &node,
            &list,
            "ask the target host for the disk",
        )
        .await?;
        tracing::info!(%target, "asked the target host to make the disk a cold move copies into");
    }
    Ok(Answer::Waiting)
}

fn answer_of(p: &PreparedDisk) -> Answer {
    if p.ready {
        Answer::Ready
    } else {
        Answer::Refused(
            p.message
                .clone()
                .unwrap_or_else(|| "no reason given".to_string()),
        )
    }
}

/// Withdraws the request of migration `m` from its target, if it is there.
pub(super) async fn withdraw(pass: &Pass<'_>, m: &DesktopMigration) -> Result<(), Error> {
    let Some(target) = m.status.as_ref().and_then(|s| s.target.clone()) else {
        return Ok(());
    };
    let Some(node) = pass.ctx.stores.node(&target) else {
        return Ok(());
    };
    let uid = m.metadata.uid.as_deref().unwrap_or_default();
    let incoming = node
        .status
        .as_ref()
        .map(|s| s.incoming.clone())
        .unwrap_or_default();
    if !incoming.iter().any(|i| i.migration == uid) {
        return Ok(());
    }
    let left: Vec<_> = incoming
        .into_iter()
        .filter(|i| i.migration != uid)
        .collect();
    write(
        &pass.ctx.client,
        &node,
        &left,
        "withdraw the disk asked of the target host",
    )
    .await
}

/// Replaces the host's `status.incoming` with `list`, guarded by the version of `node` read (a
/// merge patch: the whole list, so that an entry left out goes).
async fn write(
    client: &kube::Client,
    node: &DomainNode,
    list: &[IncomingDisk],
    action: &'static str,
) -> Result<(), Error> {
    let api: Api<DomainNode> = Api::all(client.clone());
    let body = json!({
        "metadata": { "resourceVersion": node.resource_version() },
        "status": { "incoming": if list.is_empty() { serde_json::Value::Null } else { json!(list) } },
    });
    fence::check()?;
    api.patch_status(
        &node.name_any(),
        &PatchParams {
            field_manager: Some(MANAGER_OPERATOR_INCOMING.to_string()),
            ..PatchParams::default()
        },
        &Patch::Merge(&body),
    )
    .await
    .map_err(kube(action))?;
    Ok(())
}

/// How often the requests are looked over while this operator leads.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs the sweep while this operator leads, until `stop`.
pub async fn run(
    ctx: std::sync::Arc<crate::context::Context>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    crate::sweep::while_leading(&ctx, SWEEP_EVERY, stop, || sweep(&ctx)).await;
}

/// Withdraws every request whose DesktopMigration the cache does not hold and a live list of
/// its namespace confirms gone; returns how many.
pub async fn sweep(ctx: &crate::context::Context) -> usize {
    let mut withdrawn = 0;
    for node in ctx.stores.nodes.state() {
        let incoming = node
            .status
            .as_ref()
            .map(|s| s.incoming.clone())
            .unwrap_or_default();
        let mut keep = Vec::new();
        for i in &incoming {
            let cached = ctx
                .stores
                .migrations
                .state()
                .iter()
                .any(|m| m.uid().as_deref() == Some(i.migration.as_str()));
            if cached || !ctx.is_leader() || live(ctx, i).await {
                keep.push(i.clone());
            }
        }
        if keep.len() == incoming.len() {
            continue;
        }
        let done = crate::fence::scope(ctx.fence.clone(), async {
            write(
                &ctx.client,
                &node,
                &keep,
                "withdraw a request whose migration is gone",
            )
            .await
        })
        .await;
        match done {
            Ok(()) => {
                withdrawn += incoming.len() - keep.len();
                tracing::info!(node = %node.name_any(), "withdrew disks asked for migrations that are gone");
            }
            Err(e) => {
                tracing::warn!(node = %node.name_any(), error = %e, "cannot withdraw disks asked for migrations that are gone")
            }
        }
    }
    withdrawn
}

/// Whether the migration of request `i` still exists (or cannot be told: kept).
async fn live(ctx: &crate::context::Context, i: &IncomingDisk) -> bool {
    let Some((ns, _)) = i.desktop.split_once('/') else {
        return false;
    };
    let api: Api<DesktopMigration> = Api::namespaced(ctx.client.clone(), ns);
    match api.list(&kube::api::ListParams::default()).await {
        Ok(list) => list
            .items
            .iter()
            .any(|m| m.uid().as_deref() == Some(i.migration.as_str())),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list migrations to check a disk request");
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_says_why() {
        let p = |ready, message: Option<&str>| PreparedDisk {
            migration: "m".into(),
            ready,
            message: message.map(str::to_string),
            image_bytes: None,
        };
        assert_eq!(answer_of(&p(true, None)), Answer::Ready);
        assert_eq!(
            answer_of(&p(false, Some("a disk is there"))),
            Answer::Refused("a disk is there".into())
        );
    }
}
