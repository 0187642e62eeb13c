//! Decides where a golden image (DesktopImage) stands: which version its hosts copy (a new one
//! each time its source changes, never reusing a number), who may import from a URL, and its
//! `Ready` condition from the copies its hosts report.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::reasons::ImageReason;

/// Where one host's copy of an image version stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum CopyPhase {
    /// Not started, or not reported yet.
    #[default]
    Pending,
    /// Being fetched.
    Copying,
    /// Verified against the sum and in place, never to be written again.
    Ready,
    /// Fetched and refused, or not fetched; retried with backoff.
    Failed,
}

impl CopyPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Copying => "Copying",
            Self::Ready => "Ready",
            Self::Failed => "Failed",
        }
    }
}

/// The version a source gets: the current one while the source is the one it was cut from,
/// else the next number (numbers are never reused, so no file is ever written twice).
pub fn version_for(current: Option<u32>, same_source: bool) -> u32 {
    match current {
        Some(v) if same_source => v,
        Some(v) => v.saturating_add(1),
        None => 1,
    }
}

/// Whether an image in `namespace` may import from a URL: only in the images namespace, which
/// only administrators can write (a URL a tenant controls could reach inside the cluster).
pub fn may_import_url(namespace: &str, images_namespace: &str) -> bool {
    namespace == images_namespace
}

/// The message of a deletion that waits for `users` (`namespace/name` of each Desktop pinned
/// to the image): at most 10 named, then how many more.
pub fn users_message(users: &[String]) -> String {
    const NAMED: usize = 10;
    let named = users
        .iter()
        .take(NAMED)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    let more = users.len().saturating_sub(NAMED);
    let tail = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    format!(
        "the deletion waits: {} desktop(s) clone from this image: {named}{tail}",
        users.len()
    )
}

/// One host of the target pools and its copy of the current version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostCopy {
    pub node: String,
    /// Whether the host heartbeats (only those are waited for).
    pub host_ready: bool,
    pub phase: CopyPhase,
    /// The host's reason, while Failed.
    pub reason: Option<String>,
}

/// The host that downloads the one copy of a pool whose hosts share their image directory
/// (`storage.shared`); the others check the file it put in place. `current` stays while its
/// host is Ready (a copy it started is not thrown away); else a Ready host already copying or
/// holding a copy, else the first Ready host by name. `None` while no host of the pool is
/// Ready. `hosts` are the pool's hosts and their copies of the current version.
pub fn shared_writer(current: Option<&str>, hosts: &[HostCopy]) -> Option<String> {
    let ready = || hosts.iter().filter(|h| h.host_ready);
    if let Some(c) = current
        && ready().any(|h| h.node == c)
    {
        return Some(c.to_string());
    }
    let busy = ready()
        .filter(|h| matches!(h.phase, CopyPhase::Copying | CopyPhase::Ready))
        .map(|h| h.node.as_str())
        .min();
    busy.or_else(|| ready().map(|h| h.node.as_str()).min())
        .map(str::to_string)
}

/// What the copies add up to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// Hosts holding a verified copy.
    pub ready: usize,
    /// Hosts of the target pools.
    pub total: usize,
    /// The `Ready` condition: whether it holds, its reason and message.
    pub holds: bool,
    pub reason: ImageReason,
    pub message: String,
}

/// The `Ready` condition of version `version` of image `name` from its hosts' copies: True once
/// every Ready host holds a verified copy (a host that is down is not waited for, but a
/// desktop is never placed there either).
pub fn summarize(name: &str, version: u32, copies: &[HostCopy]) -> Summary {
    let ready = copies
        .iter()
        .filter(|c| c.phase == CopyPhase::Ready)
        .count();
    let total = copies.len();
    let live: Vec<&HostCopy> = copies.iter().filter(|c| c.host_ready).collect();
    let failed: Vec<String> = live
        .iter()
        .filter(|c| c.phase == CopyPhase::Failed)
        .map(|c| format!("{} ({})", c.node, c.reason.as_deref().unwrap_or("unknown")))
        .collect();
    let waiting = live.iter().filter(|c| c.phase != CopyPhase::Ready).count();
    let (holds, reason, message) = if live.is_empty() {
        (
            false,
            ImageReason::NoHosts,
            format!("{name} v{version}: no Ready host in the target pools"),
        )
    } else if !failed.is_empty() {
        (
            false,
            ImageReason::CopyFailed,
            format!(
                "{name} v{version} is Ready on {ready} of {total} hosts; failed on {}",
                failed.join(", ")
            ),
        )
    } else if waiting > 0 {
        (
            false,
            ImageReason::Copying,
            format!("{name} v{version} is Ready on {ready} of {total} hosts; {waiting} copying"),
        )
    } else {
        (
            true,
            ImageReason::Distributed,
            format!("{name} v{version} is Ready on {ready} of {total} hosts"),
        )
    };
    Summary {
        ready,
        total,
        holds,
        reason,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(node: &str, host_ready: bool, phase: CopyPhase) -> HostCopy {
        HostCopy {
            node: node.into(),
            host_ready,
            phase,
            reason: (phase == CopyPhase::Failed).then(|| "ChecksumMismatch".into()),
        }
    }

    #[test]
    fn a_new_source_is_a_new_version_and_numbers_are_never_reused() {
        assert_eq!(version_for(None, false), 1);
        assert_eq!(version_for(None, true), 1);
        assert_eq!(version_for(Some(3), true), 3);
        assert_eq!(version_for(Some(3), false), 4);
        assert_eq!(version_for(Some(u32::MAX), false), u32::MAX);
    }

    #[test]
    fn a_long_list_of_users_names_ten_and_counts_the_rest() {
        let users: Vec<String> = (0..12).map(|i| format!("ns/d{i}")).collect();
        let m = users_message(&users);
        assert!(
            m.contains("12 desktop(s)") && m.contains("ns/d9") && !m.contains("ns/d10"),
            "{m}"
        );
        assert!(m.ends_with("and 2 more"), "{m}");
        assert!(users_message(&users[..1]).ends_with("ns/d0"));
    }

    #[test]
    fn only_the_images_namespace_imports_from_a_url() {
        assert!(may_import_url("deskvirt-images", "deskvirt-images"));
        assert!(!may_import_url("team-a", "deskvirt-images"));
    }

    #[test]
    fn ready_waits_for_every_live_host_and_names_failures() {
        use CopyPhase::*;
        let s = summarize(
            "lab",
            2,
            &[copy("a", true, Ready), copy("b", true, Copying)],
        );
        assert_eq!(
            (s.ready, s.total, s.holds, s.reason),
            (1, 2, false, ImageReason::Copying)
        );
        assert!(s.message.contains("1 of 2"), "{}", s.message);
        let s = summarize("lab", 2, &[copy("a", true, Ready), copy("b", true, Failed)]);
        assert_eq!(s.reason, ImageReason::CopyFailed);
        assert!(s.message.contains("b (ChecksumMismatch)"), "{}", s.message);
        let s = summarize(
            "lab",
            2,
            &[copy("a", true, Ready), copy("b", false, Pending)],
        );
        assert_eq!(
            (s.ready, s.total, s.holds),
            (1, 2, true),
            "a down host is not waited for"
        );
        let s = summarize("lab", 1, &[]);
        assert_eq!((s.holds, s.reason), (false, ImageReason::NoHosts));
        let s = summarize("lab", 1, &[copy("b", false, Failed)]);
        assert_eq!(s.reason, ImageReason::NoHosts);
    }

    #[test]
    fn a_shared_pool_has_one_writer_kept_while_its_host_is_ready() {
        let host = |node: &str, host_ready: bool, phase: CopyPhase| HostCopy {
            node: node.into(),
            host_ready,
            phase,
            reason: None,
        };
        let pending = [
            host("h3", true, CopyPhase::Pending),
            host("h1", false, CopyPhase::Pending),
            host("h2", true, CopyPhase::Pending),
        ];
        assert_eq!(shared_writer(None, &pending).as_deref(), Some("h2"));
        assert_eq!(shared_writer(Some("h3"), &pending).as_deref(), Some("h3"));
        // Its host went down: a Ready host takes over, one copying first.
        let copying = [
            host("h1", false, CopyPhase::Copying),
            host("h2", true, CopyPhase::Pending),
            host("h3", true, CopyPhase::Copying),
        ];
        assert_eq!(shared_writer(Some("h1"), &copying).as_deref(), Some("h3"));
        assert_eq!(
            shared_writer(Some("h1"), &[host("h1", false, CopyPhase::Failed)]),
            None
        );
        assert_eq!(shared_writer(None, &[]), None);
    }
}
