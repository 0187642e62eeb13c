//! Decides which hosts may take a desktop that clones from a DesktopImage
//! (`spec.disk.imageRef`): the image must be of the desktop's namespace or of the images
//! namespace, list the desktop's pool, and have a version cut; the desktop then goes only to a
//! host that reports a verified copy of that version. A refusal names the field and waits.

use std::collections::BTreeSet;
use std::time::Duration;

use deskvirt_crds::constants::scheduled_reason::{
    IMAGE_DELETING, IMAGE_NOT_ALLOWED, IMAGE_NOT_FOUND, IMAGE_NOT_IN_POOL, IMAGE_NOT_READY,
};
use deskvirt_crds::desktop::Desktop;
use deskvirt_crds::image::{DesktopImage, ImagePin};
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use super::admit::Refusal;
use crate::context::Context;
use crate::controllers::image::ready_hosts;

/// How often a desktop waiting for its image looks again; a host's report of a Ready copy
/// wakes it at once.
const IMAGE_RECHECK: Duration = Duration::from_secs(30);

/// Where a desktop cloning from an image may go, and the version it clones.
pub(super) struct ForImage {
    /// The hosts of its pool holding a verified copy of `pin`.
    pub hosts: BTreeSet<String>,
    pub pin: ImagePin,
}

/// The hosts a desktop may go to for its image, and the version it is pinned to (kept from an
/// earlier binding, else the image's current one): `None` for a desktop without `imageRef`.
pub(super) fn image_hosts(d: &Desktop, ctx: &Context) -> Result<Option<ForImage>, Refusal> {
    let Some(r) = d.spec.disk.image_ref.as_ref() else {
        return Ok(None);
    };
    let own = d.namespace().unwrap_or_default();
    let ns = r.namespace.clone().unwrap_or_else(|| own.clone());
    let refuse = |reason, message: String, retry| Refusal {
        reason,
        message,
        retry,
    };
    if ns != own && ns != ctx.images_namespace {
        let message = format!(
            "spec.disk.imageRef.namespace: {ns} is neither the desktop's namespace nor the \
             images namespace {}",
            ctx.images_namespace
        );
        return Err(refuse(IMAGE_NOT_ALLOWED, message, None));
    }
    let Some(image) = ctx.stores.images.get(&ObjectRef::new(&r.name).within(&ns)) else {
        let message = format!("spec.disk.imageRef: DesktopImage {ns}/{} not found", r.name);
        return Err(refuse(IMAGE_NOT_FOUND, message, Some(IMAGE_RECHECK)));
    };
    if !image.spec.pools.contains(&d.spec.pool) {
        let message = format!(
            "spec.disk.imageRef: DesktopImage {ns}/{} is not copied to pool {} (its pools: {})",
            r.name,
            d.spec.pool,
            image.spec.pools.join(", ")
        );
        return Err(refuse(IMAGE_NOT_IN_POOL, message, Some(IMAGE_RECHECK)));
    }
    let pinned = d.status.as_ref().and_then(|s| s.image.clone());
    // A deleted image waits for its users; it takes no new ones.
    if image.metadata.deletion_timestamp.is_some() && pinned.is_none() {
        let message = format!(
            "spec.disk.imageRef: DesktopImage {ns}/{} is being deleted",
            r.name
        );
        return Err(refuse(IMAGE_DELETING, message, Some(IMAGE_RECHECK)));
    }
    let pin = match pinned {
        // A disk made from a version keeps it; only a desktop never bound takes the newest.
        Some(p) if p.uid == image.uid().unwrap_or_default() => p,
        _ => match current_pin(&image) {
            Some(p) => p,
            None => {
                let why = image
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.first())
                    .map(|c| format!(" ({}: {})", c.reason, c.message))
                    .unwrap_or_default();
                let message = format!(
                    "spec.disk.imageRef: DesktopImage {ns}/{} has no version yet{why}",
                    r.name
                );
                return Err(refuse(IMAGE_NOT_READY, message, Some(IMAGE_RECHECK)));
            }
        },
    };
    let nodes = ctx.stores.nodes.state();
    let pool_hosts: Vec<_> = nodes
        .iter()
        .filter(|n| n.status.as_ref().and_then(|s| s.pool.as_deref()) == Some(&d.spec.pool))
        .cloned()
        .collect();
    let hosts: BTreeSet<String> = ready_hosts(&pool_hosts, &pin.uid, pin.version)
        .into_iter()
        .collect();
    if hosts.is_empty() {
        let message = format!(
            "spec.disk.imageRef: DesktopImage {ns}/{} v{} is Ready on 0 of {} hosts of pool {}",
            r.name,
            pin.version,
            pool_hosts.len(),
            d.spec.pool
        );
        return Err(refuse(IMAGE_NOT_READY, message, Some(IMAGE_RECHECK)));
    }
    Ok(Some(ForImage { hosts, pin }))
}

/// The image's current version as a pin: set once the operator cut it and its sum is known (an
/// http source's at once, a capture's once its host made it).
fn current_pin(image: &DesktopImage) -> Option<ImagePin> {
    let st = image.status.as_ref()?;
    Some(ImagePin {
        image: format!("{}/{}", image.namespace()?, image.name_any()),
        uid: image.uid()?,
        version: st.version?,
        file: st.file.clone()?,
        sha256: st.sha256.clone()?,
    })
}
