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
        if ns != namespace {
            out.elsewhere.push((image, uid));
            continue;
        }
        let refused = refusal(&uid, version, file, &source.http.sha256);
        let written_by = status
            .writers
            .iter()
            .find(|w| shared && w.pool == pool && w.node != node)
            .map(|w| w.node.clone());
        out.targets.push(Target {
            uid,
            image,
            version,
            url: source.http.url.clone(),
            sha256: source.http.sha256.clone(),
            refused,
            written_by,
        });
    }
    out.targets.sort_by(|a, b| a.uid.cmp(&b.uid));
    out
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
        });
    }
    out.sort_by(|a, b| (&a.uid, a.version).cmp(&(&b.uid, b.version)));
    out
}

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
        return Some("the source's sha256 is not 64 lowercase hex digits".into());
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
}
