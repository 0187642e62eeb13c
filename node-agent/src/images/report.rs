//! Decides when this host's report of its image copies (`DomainNode.status.images`) is
//! written, and writes it: only when it changed, where a change of progress alone counts once
//! it moved 5 points and the last write is 2 s old; again when the DomainNode shows something
//! else half a minute after the last write (lost, or changed by someone else). Written by
//! server-side apply under the agent's image field manager, which owns that field alone.

use std::time::Duration;

use deskvirt_crds::DomainNode;
use deskvirt_crds::constants::MANAGER_AGENT_IMAGE;
use deskvirt_crds::image::HostImage;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use tokio::time::Instant;

/// Smallest change of a copy's percent worth a write on its own.
pub const PERCENT_STEP: u8 = 5;
/// Shortest time between two writes of progress alone.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// How long after a write the DomainNode may show something else before it is written again.
pub const RESYNC_AFTER: Duration = Duration::from_secs(30);
/// Deadline of the write.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(15);

/// The report last written, and when.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    pub report: Vec<HostImage>,
    pub at: Instant,
}

/// Whether `report` should be written now, given the last write and the DomainNode's copy
/// (`shown`); with no write yet, only when the DomainNode shows something else.
pub fn due(
    last: Option<&Written>,
    report: &[HostImage],
    shown: &[HostImage],
    now: Instant,
) -> bool {
    let Some(last) = last else {
        return report != shown;
    };
    if report == last.report.as_slice() {
        return shown != report && now.duration_since(last.at) >= RESYNC_AFTER;
    }
    match progress_only(&last.report, report) {
        Some(moved) => moved >= PERCENT_STEP && now.duration_since(last.at) >= PROGRESS_EVERY,
        None => true,
    }
}

/// When `a` and `b` differ in percents only, the largest move; `None` when anything else
/// differs.
fn progress_only(a: &[HostImage], b: &[HostImage]) -> Option<u8> {
    if a.len() != b.len() {
        return None;
    }
    let mut moved = 0u8;
    for (x, y) in a.iter().zip(b) {
        let strip = |h: &HostImage| HostImage {
            percent: None,
            ..h.clone()
        };
        if strip(x) != strip(y) {
            return None;
        }
        let (p, q) = (x.percent.unwrap_or(0), y.percent.unwrap_or(0));
        moved = moved.max(p.abs_diff(q));
    }
    Some(moved)
}

/// Why the report was not written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("cannot report the image copies on DomainNode {node}")]
    Api { node: String, source: kube::Error },
    #[error("reporting the image copies on DomainNode {node} took longer than {after:?}")]
    Timeout { node: String, after: Duration },
}

/// Writes `report` as the `status.images` of DomainNode `node`.
pub async fn write(client: &Client, node: &str, report: &[HostImage]) -> Result<(), WriteError> {
    let api: Api<DomainNode> = Api::all(client.clone());
    let call = async {
        if report.is_empty() {
            // An apply of an empty list is refused by Kubernetes 1.20 ("must be of type
            // array: null"); a merge patch removes the field.
            let body = serde_json::json!({ "status": { "images": null } });
            let pp = PatchParams {
                field_manager: Some(MANAGER_AGENT_IMAGE.into()),
                ..Default::default()
            };
            api.patch_status(node, &pp, &Patch::Merge(&body)).await
        } else {
            let body = serde_json::json!({
                "apiVersion": "deskvirt.io/v1alpha1", "kind": "DomainNode",
                "metadata": { "name": node },
                "status": { "images": report },
            });
            let pp = PatchParams::apply(MANAGER_AGENT_IMAGE).force();
            api.patch_status(node, &pp, &Patch::Apply(&body)).await
        }
    };
    match tokio::time::timeout(WRITE_TIMEOUT, call).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(source)) => Err(WriteError::Api {
            node: node.to_string(),
            source,
        }),
        Err(_) => Err(WriteError::Timeout {
            node: node.to_string(),
            after: WRITE_TIMEOUT,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deskvirt_crds::image::CopyPhase;

    fn copying(uid: &str, percent: u8) -> HostImage {
        HostImage {
            percent: Some(percent),
            ..HostImage::new(
                uid,
                &format!("deskvirt-images/{uid}"),
                1,
                CopyPhase::Copying,
            )
        }
    }

    #[test]
    fn progress_is_written_in_steps_and_changes_at_once() {
        let t0 = Instant::now();
        let last = Written {
            report: vec![copying("a", 10)],
            at: t0,
        };
        let later = t0 + Duration::from_secs(3);
        // A small move, or a big one too soon, waits.
        assert!(!due(Some(&last), &[copying("a", 13)], &[], later));
        assert!(!due(
            Some(&last),
            &[copying("a", 40)],
            &[],
            t0 + Duration::from_secs(1)
        ));
        assert!(due(Some(&last), &[copying("a", 15)], &[], later));
        // Anything else at once.
        let mut ready = copying("a", 10);
        ready.phase = CopyPhase::Ready;
        assert!(due(Some(&last), &[ready], &[], t0));
        assert!(due(Some(&last), &[], &[], t0));
        assert!(due(
            Some(&last),
            &[copying("a", 10), copying("b", 0)],
            &[],
            t0
        ));
        // The same report: only when the DomainNode still shows something else later on.
        let same = [copying("a", 10)];
        assert!(!due(Some(&last), &same, &same, later + RESYNC_AFTER));
        assert!(!due(Some(&last), &same, &[], later));
        assert!(due(Some(&last), &same, &[], t0 + RESYNC_AFTER));
        // Nothing written yet: only a report the DomainNode does not show.
        assert!(!due(None, &same, &same, t0));
        assert!(due(None, &same, &[], t0));
        assert!(!due(None, &[], &[], t0));
    }
}
