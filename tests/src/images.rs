//! DesktopImages for the tests: the SHA-256 of a file, and an image of the run (labelled so the
//! run's operator sees it) importing a URL into the run's pool.

use std::path::Path;
use std::process::Command;

use anyhow::Context;
use deskvirt_crds::image::DesktopImage;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

use std::time::Duration;

use deskvirt_crds::conditions::find;

use crate::host::eventually;
use crate::world::{RUN_LABEL, World};

/// The SHA-256 of `path`, by `sha256sum`.
pub fn sha256(path: &Path) -> anyhow::Result<String> {
    let out = Command::new("sha256sum").arg(path).output()?;
    anyhow::ensure!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8(out.stdout)?
        .split_whitespace()
        .next()
        .map(str::to_string)
        .context("no sum")
}

/// Creates DesktopImage `ns/name` of the run, importing `url` (whose SHA-256 is `sum`) into the
/// run's pool.
pub async fn create_image(
    w: &World,
    ns: &str,
    name: &str,
    url: &str,
    sum: &str,
) -> anyhow::Result<DesktopImage> {
    let image: DesktopImage = serde_json::from_value(json!({
        "apiVersion": "deskvirt.io/v1alpha1",
        "kind": "DesktopImage",
        "metadata": { "name": name, "namespace": ns, "labels": { RUN_LABEL: w.run } },
        "spec": { "source": { "http": { "url": url, "sha256": sum } }, "pools": [w.pool] },
    }))?;
    let api: Api<DesktopImage> = Api::namespaced(w.client.clone(), ns);
    Ok(api.create(&PostParams::default(), &image).await?)
}

/// Waits until image `ns/name` satisfies `f`; the last status in the error.
pub async fn wait_image(
    w: &World,
    ns: &str,
    name: &str,
    what: &str,
    f: impl Fn(&DesktopImage) -> bool,
) -> anyhow::Result<DesktopImage> {
    let api: Api<DesktopImage> = Api::namespaced(w.client.clone(), ns);
    let last = std::sync::Mutex::new(None);
    let found = eventually(Duration::from_secs(120), what, || async {
        let i = api.get(name).await?;
        let done = f(&i);
        if let Ok(mut l) = last.lock() {
            *l = i.status.clone();
        }
        Ok(done.then_some(i))
    })
    .await;
    found.with_context(|| {
        format!(
            "last status of {ns}/{name}: {:#?}",
            last.lock().ok().map(|l| l.clone())
        )
    })
}

/// The status and reason of the image's `Ready` condition.
pub fn ready(i: &DesktopImage) -> Option<(String, String)> {
    let c = find(&i.status.as_ref()?.conditions, "Ready")?;
    Some((c.status.clone(), c.reason.clone()))
}
