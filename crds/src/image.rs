//! `DesktopImage`: a golden image that desktops are cloned from. The spec says where its bytes
//! come from and which pools get a copy; the status is the operator's: the version it cut from
//! the source, and each host's copy as that host reported it in its DomainNode
//! (`status.images`, [`HostImage`]), which is where agents write, never here.

// kube-derive expands each `printcolumn(...)` into attributes clippy sees as duplicates.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use deskvirt_core::images::CopyPhase;

use crate::schema::{DNS_LABEL, DNS_SUBDOMAIN};

/// A lowercase SHA-256 in hex.
pub const SHA256: &str = r"^[0-9a-f]{64}$";
/// An http or https URL.
pub const HTTP_URL: &str = r"^https?://[^\s]+$";

/// A golden image of this namespace, copied onto the hosts of its pools.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "deskvirt.io",
    version = "v1alpha1",
    kind = "DesktopImage",
    plural = "desktopimages",
    shortname = "dimg",
    category = "deskvirt",
    doc = "A golden qcow2 image that Desktops clone from (spec.disk.imageRef), copied onto every host of its pools and checked against its SHA-256. Images with an http source live only in the images namespace (the chart's images.namespace, `<release namespace>-images` by default), which only administrators can write: an import URL a tenant controls could reach inside the cluster. A Desktop may use images of its own namespace and of the images namespace.",
    namespaced,
    status = "DesktopImageStatus",
    printcolumn(
        name = "Version",
        type_ = "integer",
        json_path = ".status.version",
        description = "The version hosts copy"
    ),
    printcolumn(
        name = "Hosts",
        type_ = "string",
        json_path = ".status.hosts",
        description = "Hosts of the target pools holding a verified copy, of all of them"
    ),
    printcolumn(
        name = "Size",
        type_ = "integer",
        json_path = ".status.actualBytes",
        description = "Bytes of the image file"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "True once every Ready host of the target pools holds a verified copy"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        description = "Why it is (not) ready"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DesktopImageSpec {
    /// Where the image's bytes come from.
    pub source: ImageSource,
    /// The ResourcePools whose hosts get a copy. A Desktop of another pool cannot use the image.
    #[schemars(length(min = 1, max = 32), inner(regex(pattern = DNS_LABEL), length(min = 1, max = 63)))]
    pub pools: Vec<String>,
}

/// Where an image's bytes come from: exactly one of `http` and `desktop` (otherwise the image
/// gets `Ready=False InvalidSource`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageSource {
    /// A qcow2 file fetched over HTTP(S) by each host and checked against `sha256`. Only
    /// images of the images namespace may use it (elsewhere `Ready=False SourceNotAllowed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSource>,
    /// A template Desktop of the image's namespace, shut down: its disk, flattened onto its
    /// base into one standalone qcow2 and sealed (per-machine state reset, see the README), on
    /// the host where the desktop is. Tenants may capture their own desktops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desktop: Option<DesktopSource>,
}

/// A template Desktop to capture.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DesktopSource {
    /// Name of the Desktop, in the image's namespace. It must be bound to a host and shut
    /// down (`spec.power: Off`); it does not start while its disk is captured.
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(min = 1, max = 253))]
    pub name: String,
    /// Any text: change it to capture the desktop again, as the next version (desktops cloned
    /// from earlier versions keep them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub revision: Option<String>,
}

impl ImageSource {
    /// The SHA-256 the source names (an http source's); a capture's is known once it is made.
    pub fn named_sha256(&self) -> Option<&str> {
        self.http.as_ref().map(|h| h.sha256.as_str())
    }
}

/// A file at a URL, with the SHA-256 its bytes must have.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpSource {
    /// The http or https URL of a qcow2 file with no backing file.
    #[schemars(regex(pattern = HTTP_URL), length(min = 8, max = 2048))]
    pub url: String,
    /// SHA-256 of the file, 64 lowercase hex digits (`sha256sum`). A copy with another sum is
    /// deleted and the host reports `ChecksumMismatch` naming both sums.
    #[schemars(regex(pattern = SHA256))]
    pub sha256: String,
}

/// What the operator decided and the hosts reported.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DesktopImageStatus {
    /// The version the hosts copy, cut by the operator from the source. A version's file is
    /// never overwritten: a different source is a different file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// The version's file, relative to each pool's `storage.imageDir`
    /// (`managed/<image uid>/v<version>.qcow2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub file: Option<String>,
    /// The source the version was cut from, as it was then: what the hosts fetch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ImageSource>,
    /// SHA-256 of the version's file: the http source's, or the capture's once its host made
    /// it. Every host's copy is checked against it; desktops are pinned to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = SHA256))]
    pub sha256: Option<String>,
    /// Where the version is captured, for a `desktop` source: the Desktop (by UID) and its
    /// host, which makes the file; the pool's other hosts take it from there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<Capture>,
    /// Hosts holding a verified copy, of the hosts of the target pools, such as `3/4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub hosts: Option<String>,
    /// Bytes of the image file, as the first host to verify it counted them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_bytes: Option<u64>,
    /// Size of the disk the image holds (qcow2's virtual size), in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_bytes: Option<u64>,
    /// Each host of the target pools and its copy, by host name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub copies: Vec<ImageCopy>,
    /// For each target pool whose hosts share their image directory (`storage.shared`), the
    /// one host that downloads the copy; the pool's other hosts check the file it put there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["pool"]))]
    #[schemars(length(max = 32))]
    pub writers: Vec<PoolWriter>,
    /// `Ready`: every Ready host of the target pools holds a verified copy. `Deleting`: a
    /// deleted image waits for the desktops pinned to it (`InUse`, naming them).
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    #[schemars(length(max = 8))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` the status was decided on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A capture the operator asked of a host.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Capture {
    /// The template Desktop's name.
    #[schemars(length(max = 253))]
    pub desktop: String,
    /// Its UID: a Desktop made again under the same name is not captured.
    #[schemars(length(max = 64))]
    pub desktop_uid: String,
    /// The host (DomainNode) where its disk is, which captures it.
    #[schemars(length(max = 253))]
    pub node: String,
    /// The pool of that host (the image file lands in its `imageDir`).
    #[schemars(length(max = 63))]
    pub pool: String,
}

/// The host that downloads a shared pool's copy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolWriter {
    /// The ResourcePool.
    #[schemars(regex(pattern = DNS_LABEL), length(min = 1, max = 63))]
    pub pool: String,
    /// Its host (DomainNode) that downloads the copy.
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(min = 1, max = 253))]
    pub node: String,
}

/// One host's copy of the image, as the operator read it from that host's DomainNode.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageCopy {
    /// The host (DomainNode).
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(min = 1, max = 253))]
    pub node: String,
    /// Its pool.
    #[schemars(length(max = 63))]
    pub pool: String,
    /// Pending (not started or not reported), Copying, Ready or Failed.
    pub phase: CopyPhase,
    /// Percent copied, while Copying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u8>,
    /// Why it failed, while Failed (`ChecksumMismatch`, `FetchFailed`, `NotAnImage`,
    /// `HasBackingFile`, `NoSpace`, `TooLarge`, `WriteFailed`, `CheckFailed`, `BadFile`,
    /// `Damaged`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub reason: Option<String>,
    /// What the host said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub message: Option<String>,
}

/// A host's copy of one image version, as the host's agent reports it in its DomainNode
/// (`status.images`). The operator copies it into the image's status.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostImage {
    /// UID of the DesktopImage.
    #[schemars(length(max = 64))]
    pub uid: String,
    /// `<namespace>/<name>` of the DesktopImage, for people reading the host.
    #[schemars(length(max = 317))]
    pub image: String,
    /// The version.
    pub version: u32,
    /// Copying, Ready or Failed.
    pub phase: CopyPhase,
    /// Percent copied, while Copying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u8>,
    /// SHA-256 this host computed over its copy, once Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub sha256: Option<String>,
    /// Bytes of the file, once Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// The disk size the image holds, once Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_bytes: Option<u64>,
    /// Why it failed, while Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub reason: Option<String>,
    /// What went wrong, or how far it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub message: Option<String>,
    /// When the phase last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
}

impl HostImage {
    /// The entry for version `version` of the image `image` (`<namespace>/<name>`) with UID
    /// `uid` in `phase`, nothing else known yet.
    pub fn new(uid: &str, image: &str, version: u32, phase: CopyPhase) -> Self {
        Self {
            uid: uid.into(),
            image: image.into(),
            version,
            phase,
            percent: None,
            sha256: None,
            bytes: None,
            virtual_bytes: None,
            reason: None,
            message: None,
            since: None,
        }
    }
}

/// Names a DesktopImage from a Desktop (`spec.disk.imageRef`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageRef {
    /// Name of the DesktopImage.
    #[schemars(regex(pattern = DNS_SUBDOMAIN), length(min = 1, max = 253))]
    pub name: String,
    /// Its namespace: unset for the Desktop's own, or the images namespace (the chart's
    /// `images.namespace`, `<release namespace>-images` by default). Any other is refused (`Scheduled=False ImageNotAllowed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DNS_LABEL), length(min = 1, max = 63))]
    pub namespace: Option<String>,
}

/// The image version a Desktop's disk is cloned from, pinned by the operator when it binds the
/// desktop (`status.image`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImagePin {
    /// `<namespace>/<name>` of the DesktopImage.
    #[schemars(length(max = 317))]
    pub image: String,
    /// Its UID.
    #[schemars(length(max = 64))]
    pub uid: String,
    /// The version.
    pub version: u32,
    /// The version's file, relative to the pool's `storage.imageDir`.
    #[schemars(length(max = 255))]
    pub file: String,
    /// The SHA-256 the host's copy must have.
    #[schemars(regex(pattern = SHA256))]
    pub sha256: String,
}

/// The file name of an image version, relative to a pool's `imageDir`: the image's UID keeps
/// it unique whatever tenants name things.
pub fn image_file(uid: &str, version: u32) -> String {
    format!("managed/{uid}/v{version}.qcow2")
}

/// Whether `file` is a managed image file as [`image_file`] names it (a UID of hex digits and
/// dashes, a version number): the only relative path with a `/` a host joins onto its
/// `imageDir`.
pub fn is_managed_file(file: &str) -> bool {
    managed_file(file).is_some()
}

/// The image UID and version a managed image file ([`image_file`]) names.
pub fn managed_file(file: &str) -> Option<(&str, u32)> {
    let (uid, name) = file.strip_prefix("managed/")?.split_once('/')?;
    let version = name
        .strip_prefix('v')?
        .strip_suffix(".qcow2")?
        .parse::<u32>()
        .ok()?;
    let uid_ok = !uid.is_empty()
        && uid.len() <= 64
        && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    (uid_ok && image_file(uid, version) == file).then_some((uid, version))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_image_file_names_is_a_managed_file() {
        assert!(is_managed_file(&image_file("0a1b-2c", 3)));
        for bad in [
            "managed/../etc/v1.qcow2",
            "managed/u/v1.qcow2/x",
            "managed//v1.qcow2",
            "managed/0a/v01.qcow2",
            "managed/0a/v1.raw",
            "base.qcow2",
            "/managed/0a/v1.qcow2",
        ] {
            assert!(!is_managed_file(bad), "{bad}");
        }
    }
}
