//! Decides which DesktopImages this host copies: those whose `spec.pools` holds the host's
//! pool and whose status names a version cut by the operator (version, file and source). An
//! image with an http source counts only in the images namespace: elsewhere a tenant would
//! choose what the hosts fetch. A status naming any file but the version's own is refused.
//! Pure.

use deskvirt_crds::DesktopImage;
use deskvirt_crds::image::image_file;
use kube::ResourceExt;

/// One image version this host should hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// UID of the DesktopImage.
    pub uid: String,
    /// `<namespace>/<name>`.
    pub image: String,
    /// The version cut.
    pub version: u32,
    /// Where its bytes come from.
    pub url: String,
    /// The SHA-256 they must have.
    pub sha256: String,
    /// Why it cannot be copied (reported as `BadFile`), when it cannot.
    pub refused: Option<String>,
    /// The host that downloads the copy of this host's pool, when the pool's hosts share their
    /// image directory and that host is another one: this host only checks the file it puts
    /// there (and never fetches or repairs it itself).
    pub written_by: Option<String>,
    /// The template Desktop whose disk this host captures into the version (its disk path is
    /// filled in by the caller, which knows the host's desktops).
    pub capture: Option<super::capture::CaptureFrom>,
    /// Why this host can get no copy of the version (reported while Pending).
    pub unavailable: Option<String>,
}

/// What [`select`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// The versions to hold, by UID.
    pub targets: Vec<Target>,
    /// Images of the pool with an http source outside the images namespace (`ns/name`, uid),
    /// ignored.
    pub elsewhere: Vec<(String, String)>,
}

/// The images of `images` this host (`node`), in `pool`, copies; `namespace` is the images
/// namespace; `shared` whether the pool's hosts share their image directory.
pub fn select<'a>(
    images: impl IntoIterator<Item = &'a DesktopImage>,
    pool: &str,
    namespace: &str,
    node: &str,
    shared: bool,
) -> Selection {
    let mut out = Selection::default();
    for d in images {
        if !d.spec.pools.iter().any(|p| p == pool) {
            continue;
        }
        let Some(uid) = d.metadata.uid.clone() else {
            continue;
        };
        let Some(status) = d.status.as_ref() else {
            continue;
        };
        let (Some(version), Some(file), Some(source)) = (
            status.version,
            status.file.as_deref(),
            status.source.as_ref(),
        ) else {
            continue;
        };
        let ns = d.namespace().unwrap_or_default();
        let image = format!("{ns}/{}", d.name_any());
        let Some(http) = source.http.as_ref() else {
            if source.desktop.is_some() {
                out.targets
                    .extend(captured(d, &uid, image, version, file, pool, node, shared));
            }
            continue;
        };
        if ns != namespace {
            out.elsewhere.push((image, uid));
            continue;
        }
        let refused = refusal(&uid, version, file, &http.sha256);
        let written_by = status
            .writers
            .iter()
            .find(|w| shared && w.pool == pool && w.node != node)
            .map(|w| w.node.clone());
        out.targets.push(Target {
            uid,
            image,
            version,
            url: http.url.clone(),
            sha256: http.sha256.clone(),
            refused,
            written_by,
            capture: None,
            unavailable: None,
        });
    }
    out.targets.sort_by(|a, b| a.uid.cmp(&b.uid));
    out
}

/// The target of a version captured from a template Desktop (any namespace: a tenant captures
/// its own desktops): the capturing host makes it; a host sharing its pool's image directory
/// checks the file it made; others cannot get it yet (copies between hosts are not built).
#[allow(clippy::too_many_arguments)]
fn captured(
    d: &DesktopImage,
    uid: &str,
    image: String,
    version: u32,
    file: &str,
    pool: &str,
    node: &str,
    shared: bool,
) -> Option<Target> {
    let status = d.status.as_ref()?;
    let capture = status.capture.as_ref()?;
    let sha256 = status.sha256.clone().unwrap_or_default();
    let mut refused = refusal(uid, version, file, &sha256);
    // The sum of a capture is known once it is made.
    if sha256.is_empty() && refused.as_deref() == Some(NOT_A_SUM) {
        refused = None;
    }
    let here = capture.node == node;
    let (written_by, unavailable) = if here {
        (None, None)
    } else if shared && capture.pool == pool {
        (Some(capture.node.clone()), None)
    } else {
        let why = format!(
            "captured on host {} (pool {}); this host does not share its image directory, and \
             copies between hosts are not built yet",
            capture.node, capture.pool
        );
        (None, Some(why))
    };
    Some(Target {
        uid: uid.to_string(),
        image,
        version,
        url: String::new(),
        sha256,
        refused,
        written_by,
        capture: here.then(|| super::capture::CaptureFrom {
            desktop_uid: capture.desktop_uid.clone(),
            disk: std::path::PathBuf::new(),
        }),
        unavailable,
    })
}

/// The versions Desktops bound to this host are pinned to (`status.image`) that `targets` does
/// not hold already: kept while a desktop may clone from them again (a fresh clone at each
/// start, a restore), after the image moved on to a newer version. Their source is the
/// image's no more: a copy in place is verified and kept; a missing one cannot be fetched.
pub fn pinned<'a>(
    desktops: impl IntoIterator<Item = &'a deskvirt_crds::Desktop>,
    node: &str,
    targets: &[Target],
) -> Vec<Target> {
    let mut out: Vec<Target> = Vec::new();
    for d in desktops {
        let Some(st) = d.status.as_ref() else {
            continue;
        };
        let (Some(pin), Some(true)) = (st.image.as_ref(), st.node.as_deref().map(|n| n == node))
        else {
            continue;
        };
        let held = |t: &Target| t.uid == pin.uid && t.version == pin.version;
        if targets.iter().any(held) || out.iter().any(held) {
            continue;
        }
        out.push(Target {
            uid: pin.uid.clone(),
            image: pin.image.clone(),
            version: pin.version,
            url: String::new(),
            sha256: pin.sha256.clone(),
            refused: refusal(&pin.uid, pin.version, &pin.file, &pin.sha256),
            written_by: None,
            capture: None,
            unavailable: None,
        });
    }
    out.sort_by(|a, b| (&a.uid, a.version).cmp(&(&b.uid, b.version)));
    out
}

/// The refusal of a sum that is not one.
const NOT_A_SUM: &str = "the version's sha256 is not 64 lowercase hex digits";

/// Why the cut version cannot be copied, if it cannot.
fn refusal(uid: &str, version: u32, file: &str, sha256: &str) -> Option<String> {
    if !deskvirt_crds::image::is_managed_file(&image_file(uid, version)) {
        return Some("the image's UID cannot name a directory".into());
    }
    let want = image_file(uid, version);
    if file != want {
        return Some(format!(
            "the status names the file {file:?}; version {version} of this image is {want:?}"
        ));
    }
    let sum = sha256.len() == 64
        && sha256
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
    if !sum {
        return Some(NOT_A_SUM.into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SUM: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn image(
        ns: &str,
        name: &str,
        uid: &str,
        pools: &[&str],
        cut: Option<(u32, &str)>,
    ) -> DesktopImage {
        let source = json!({"http": {"url": "https://img.lab/x.qcow2", "sha256": SUM}});
        let status = cut.map(|(v, file)| json!({"version": v, "file": file, "source": source}));
        serde_json::from_value(json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "DesktopImage",
            "metadata": {"name": name, "namespace": ns, "uid": uid},
            "spec": {"source": source, "pools": pools},
            "status": status,
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn images_of_the_pool_cut_in_the_images_namespace_are_copied() {
        let images = [
            image(
                "deskvirt-images",
                "debian",
                "a1",
                &["lab", "b"],
                Some((2, "managed/a1/v2.qcow2")),
            ),
            image(
                "deskvirt-images",
                "other-pool",
                "a2",
                &["b"],
                Some((1, "managed/a2/v1.qcow2")),
            ),
            image("deskvirt-images", "not-cut", "a3", &["lab"], None),
            image(
                "team",
                "tenant",
                "a4",
                &["lab"],
                Some((1, "managed/a4/v1.qcow2")),
            ),
        ];
        let got = select(&images, "lab", "deskvirt-images", "h1", false);
        assert_eq!(
            got.targets,
            vec![Target {
                uid: "a1".into(),
                image: "deskvirt-images/debian".into(),
                version: 2,
                url: "https://img.lab/x.qcow2".into(),
                sha256: SUM.into(),
                refused: None,
                written_by: None,
                capture: None,
                unavailable: None,
            }]
        );
        assert_eq!(got.elsewhere, vec![("team/tenant".into(), "a4".into())]);
    }

    #[test]
    fn a_status_naming_another_file_is_refused() {
        let images = [
            image(
                "deskvirt-images",
                "a",
                "a1",
                &["lab"],
                Some((2, "managed/a1/v1.qcow2")),
            ),
            image(
                "deskvirt-images",
                "b",
                "a2",
                &["lab"],
                Some((1, "../../etc/x")),
            ),
            image(
                "deskvirt-images",
                "c",
                "../a3",
                &["lab"],
                Some((1, "managed/../a3/v1.qcow2")),
            ),
        ];
        let got = select(&images, "lab", "deskvirt-images", "h1", false);
        assert_eq!(got.targets.len(), 3);
        assert!(got.targets.iter().all(|t| t.refused.is_some()), "{got:?}");
    }
}

#[cfg(test)]
mod pinned_tests {
    use super::*;
    use serde_json::json;

    fn desktop(node: &str, uid: &str, version: u32) -> deskvirt_crds::Desktop {
        serde_json::from_value(json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop",
            "metadata": { "name": "d", "namespace": "ns" },
            "spec": { "pool": "p", "user": "u@x", "disk": { "imageRef": { "name": "lab" } } },
            "status": { "node": node, "image": {
                "image": "ns/lab", "uid": uid, "version": version,
                "file": format!("managed/{uid}/v{version}.qcow2"), "sha256": "b".repeat(64) } },
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn an_old_version_pinned_here_is_kept_with_no_source() {
        let current = Target {
            uid: "0a".into(),
            image: "ns/lab".into(),
            version: 2,
            url: "http://x/y".into(),
            sha256: "c".repeat(64),
            refused: None,
            written_by: None,
            capture: None,
            unavailable: None,
        };
        let ds = [
            desktop("h1", "0a", 1),
            desktop("h1", "0a", 1),
            desktop("h1", "0a", 2),
            desktop("h2", "0b", 1),
        ];
        let kept = pinned(ds.iter(), "h1", std::slice::from_ref(&current));
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert_eq!((kept[0].version, kept[0].url.as_str()), (1, ""));
        assert_eq!(kept[0].sha256, "b".repeat(64));
        assert_eq!(kept[0].refused, None);
    }

    /// Tenant `team`'s image `lab-t` (UID `c1`) capturing a template on host `h1` (pool
    /// `lab`), its sum known when `sum` is set.
    fn capture(sum: Option<&str>) -> DesktopImage {
        let source = json!({"desktop": {"name": "template"}});
        serde_json::from_value(json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "DesktopImage",
            "metadata": {"name": "lab-t", "namespace": "team", "uid": "c1"},
            "spec": {"source": source, "pools": ["lab"]},
            "status": {"version": 1, "file": "managed/c1/v1.qcow2", "source": source,
                       "sha256": sum,
                       "capture": {"desktop": "template", "desktopUid": "t-uid",
                                   "node": "h1", "pool": "lab"}},
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_capture_is_made_by_its_host_taken_in_place_by_sharers_and_unavailable_elsewhere() {
        let images = [capture(None)];
        let on = |node: &str, shared: bool| {
            select(&images, "lab", "deskvirt-images", node, shared)
                .targets
                .into_iter()
                .next()
                .unwrap_or_else(|| panic!("no target on {node}"))
        };
        // A tenant's capture counts (no URL), and its host makes it before its sum is known.
        let maker = on("h1", false);
        assert_eq!(
            maker.capture.map(|c| c.desktop_uid),
            Some("t-uid".to_string())
        );
        assert_eq!((maker.refused, maker.sha256.as_str()), (None, ""));
        let sharer = on("h2", true);
        assert_eq!(
            (sharer.capture, sharer.written_by.as_deref()),
            (None, Some("h1"))
        );
        let apart = on("h2", false);
        assert!(
            apart
                .unavailable
                .is_some_and(|m| m.contains("captured on host h1")),
        );
        // Once made, every target checks the sum.
        let sum = "c".repeat(64);
        let images = [capture(Some(&sum))];
        let known = select(&images, "lab", "deskvirt-images", "h2", true);
        assert_eq!(known.targets[0].sha256, sum);
    }
}
