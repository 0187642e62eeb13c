//! Helm, the real one: Helm's Go library (the PyPI package `helm-sdkpy`, installed by
//! `scripts/install-deps.sh`) driven through `python3`. Lints, installs, upgrades and uninstalls
//! charts against the cluster under test, with guards that uninstall a release and delete
//! scratch namespaces and chart copies even when a test panics.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::cluster::{kubeconfig_path, repo_root, unique_suffix};
use crate::kubectl::kubectl;

/// The deskvirt chart in this repository.
pub fn chart_dir() -> PathBuf {
    repo_root().join("charts/deskvirt")
}

/// The Python side: one request as JSON on stdin, one answer on a marked stdout line (Helm's Go
/// code may log on stdout too). Helm's own refusals come back as `refused`; anything else that
/// goes wrong in the driver as `driver_error`.
/// What every driver starts with: the request read, and `answer` to reply.
const PRELUDE: &str = r#"
import asyncio, json, sys

def answer(obj):
    sys.stdout.write("\nDESKVIRT-HELM-ANSWER " + json.dumps(obj) + "\n")
    sys.stdout.flush()

req = json.load(sys.stdin)
"#;

/// The helm-sdkpy driver (after [`PRELUDE`]).
const DRIVER: &str = r#"
try:
    import helm_sdkpy
except ImportError as e:
    answer({"driver_error": "cannot import helm_sdkpy (%s): run scripts/install-deps.sh" % e})
    sys.exit(0)

async def run(req):
    cfg = helm_sdkpy.Configuration(namespace=req.get("namespace", "default"),
                                   kubeconfig=req.get("kubeconfig"))
    action = req["action"]
    if action == "lint":
        r = await helm_sdkpy.Lint(cfg).run(req["chart"])
        return {"messages": [{"severity": m.get("Severity", 0), "path": m.get("Path", "")}
                             for m in (r.get("Messages") or [])]}
    if action in ("install", "upgrade"):
        common = dict(values=req.get("values") or None, wait=False, timeout=req.get("timeout", 120),
                      disable_openapi_validation=False)
        if action == "install":
            r = await helm_sdkpy.Install(cfg).run(req["release"], req["chart"], **common)
        else:
            r = await helm_sdkpy.Upgrade(cfg).run(req["release"], req["chart"], **common)
        info = r.get("info") or {}
        return {"status": info.get("status", ""), "notes": info.get("notes", ""),
                "manifest": r.get("manifest", ""), "version": r.get("version", 0)}
    if action == "uninstall":
        await helm_sdkpy.Uninstall(cfg).run(req["release"], wait=True, timeout=req.get("timeout", 120))
        return {}
    raise ValueError("unknown action " + action)

try:
    answer({"result": asyncio.run(run(req))})
except helm_sdkpy.HelmError as e:
    answer({"refused": {"kind": type(e).__name__, "message": str(e)}})
except Exception as e:
    answer({"driver_error": "%s: %s" % (type(e).__name__, e)})
"#;

const MARK: &str = "DESKVIRT-HELM-ANSWER ";

/// Helm refused the action: its error type and message (for example a values schema violation).
#[derive(Debug, Clone, Deserialize)]
pub struct Refused {
    pub kind: String,
    pub message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "helm refused ({}): {}", self.kind, self.message)
    }
}

#[derive(Debug, Deserialize)]
struct Answer {
    result: Option<Value>,
    refused: Option<Refused>,
    driver_error: Option<String>,
}

fn call(request: Value) -> anyhow::Result<Result<Value, Refused>> {
    call_driver(DRIVER, request)
}

/// `helm template`: Helm v4's renderer through its C library (the PyPI package
/// `helm-python-sdk`, installed by `scripts/install-deps.sh`), offline, with the API versions
/// and Kubernetes version given, as `helm template --api-versions --kube-version` does.
/// helm-sdkpy has no client-only render; helm-python-sdk's public `Chart.render` takes neither
/// option, so the driver passes them to its native `helm_render`, which reads both.
const TEMPLATE_DRIVER: &str = r#"
try:
    import helm_python
    from helm_python import _native
except ImportError as e:
    answer({"driver_error": "cannot import helm_python (%s): run scripts/install-deps.sh" % e})
    sys.exit(0)
try:
    chart = helm_python.Chart.load(req["chart"])
    opts = {"name": req["release"], "namespace": req["namespace"], "is_install": True,
            "api_versions": req["api_versions"], "kube_version": req["kube_version"]}
    out = _native.call_string("helm_render", chart._raw(), json.dumps(req["values"]), json.dumps(opts))
    answer({"result": json.loads(out)})
except helm_python.HelmError as e:
    answer({"refused": {"kind": type(e).__name__, "message": str(e)}})
except Exception as e:
    answer({"driver_error": "%s: %s" % (type(e).__name__, e)})
"#;

/// The templates of `chart` rendered offline for release `release` in `namespace` with
/// `values`, as on a cluster that serves `api_versions` (`group/version/Kind` too) and is
/// Kubernetes `kube_version`: template path → manifest.
pub fn template(
    chart: &Path,
    release: &str,
    namespace: &str,
    values: &Value,
    api_versions: &[&str],
    kube_version: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let request = json!({
        "chart": path_str(chart)?,
        "release": release,
        "namespace": namespace,
        "values": values,
        "api_versions": api_versions,
        "kube_version": kube_version,
    });
    let rendered = call_driver(TEMPLATE_DRIVER, request)?.map_err(|r| anyhow::anyhow!("{r}"))?;
    Ok(serde_json::from_value(rendered)?)
}

fn call_driver(driver: &str, request: Value) -> anyhow::Result<Result<Value, Refused>> {
    let mut child = Command::new("python3")
        .args(["-c", &format!("{PRELUDE}{driver}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning python3 for helm-sdkpy")?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        stdin.write_all(request.to_string().as_bytes())?;
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some(line) = stdout.lines().rev().find_map(|l| l.strip_prefix(MARK)) else {
        bail!(
            "the helm driver gave no answer (exit {}):\n{}\n{}",
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    };
    let answer: Answer = serde_json::from_str(line).context("parsing the helm driver's answer")?;
    if let Some(e) = answer.driver_error {
        bail!("the helm driver failed: {e}");
    }
    match (answer.result, answer.refused) {
        (_, Some(refused)) => Ok(Err(refused)),
        (Some(result), None) => Ok(Ok(result)),
        (None, None) => bail!("the helm driver answered neither a result nor a refusal"),
    }
}

fn path_str(p: &Path) -> anyhow::Result<String> {
    p.to_str()
        .map(str::to_string)
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

/// Severity of a lint message, as Helm's `support.Severity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Unknown,
    Info,
    Warning,
    Error,
}

impl From<u8> for Severity {
    fn from(n: u8) -> Self {
        match n {
            1 => Self::Info,
            2 => Self::Warning,
            3 => Self::Error,
            _ => Self::Unknown,
        }
    }
}

/// One lint finding. helm-sdkpy 0.1.32 passes Helm's severity and file but loses the message
/// text (the Go error serializes as `{}`).
#[derive(Debug, Clone)]
pub struct LintMessage {
    pub severity: Severity,
    pub path: String,
}

/// The outcome of `helm lint`.
#[derive(Debug, Clone)]
pub struct LintReport {
    pub messages: Vec<LintMessage>,
}

impl LintReport {
    /// Findings of `severity` or worse (`Severity::Warning` is what `helm lint --strict` fails on).
    pub fn at_least(&self, severity: Severity) -> Vec<&LintMessage> {
        self.messages
            .iter()
            .filter(|m| m.severity >= severity)
            .collect()
    }
}

/// `helm lint <chart>`; needs no cluster.
pub fn lint(chart: &Path) -> anyhow::Result<LintReport> {
    #[derive(Deserialize)]
    struct Msg {
        severity: u8,
        path: String,
    }
    #[derive(Deserialize)]
    struct Out {
        messages: Vec<Msg>,
    }
    let result = call(json!({"action": "lint", "chart": path_str(chart)?}))?
        .map_err(|r| anyhow::anyhow!("{r}"))?;
    let out: Out = serde_json::from_value(result)?;
    Ok(LintReport {
        messages: out
            .messages
            .into_iter()
            .map(|m| LintMessage {
                severity: m.severity.into(),
                path: m.path,
            })
            .collect(),
    })
}

/// What an install or upgrade produced.
#[derive(Debug, Clone, Deserialize)]
pub struct Installed {
    pub status: String,
    /// The rendered NOTES.txt.
    pub notes: String,
    /// The rendered templates, as applied.
    pub manifest: String,
    /// The release revision.
    pub version: u32,
}

fn release_action(
    action: &str,
    namespace: &str,
    release: &str,
    chart: &Path,
    values: &Value,
) -> anyhow::Result<Result<Installed, Refused>> {
    let request = json!({
        "action": action,
        "kubeconfig": path_str(&kubeconfig_path()?)?,
        "namespace": namespace,
        "release": release,
        "chart": path_str(chart)?,
        "values": values,
    });
    Ok(match call(request)? {
        Ok(v) => Ok(serde_json::from_value(v)?),
        Err(refused) => Err(refused),
    })
}

/// `helm install` into the cluster under test, without waiting for pods (there is no kubelet)
/// and with OpenAPI validation of every rendered object by the apiserver's schema. The release
/// is not guarded: prefer [`Release::install`] unless Helm is expected to refuse.
pub fn install(
    namespace: &str,
    release: &str,
    chart: &Path,
    values: &Value,
) -> anyhow::Result<Result<Installed, Refused>> {
    release_action("install", namespace, release, chart, values)
}

/// `helm uninstall`, waiting until the release's objects are deleted.
pub fn uninstall(namespace: &str, release: &str) -> anyhow::Result<Result<(), Refused>> {
    let request = json!({
        "action": "uninstall",
        "kubeconfig": path_str(&kubeconfig_path()?)?,
        "namespace": namespace,
        "release": release,
    });
    Ok(call(request)?.map(|_| ()))
}

/// An installed release, uninstalled when dropped (also when the test panics), together with
/// any cluster-scoped object left labelled with its name (its console namespace included).
#[derive(Debug)]
pub struct Release {
    pub name: String,
    pub namespace: String,
    pub chart: PathBuf,
    /// What the last install or upgrade produced.
    pub installed: Installed,
    uninstalled: bool,
}

impl Release {
    /// Installs `chart` as release `name` into the existing `namespace`; Helm refusing is an error.
    pub fn install(
        namespace: &str,
        name: &str,
        chart: &Path,
        values: &Value,
    ) -> anyhow::Result<Self> {
        let installed = install(namespace, name, chart, values)?.map_err(|r| {
            // A failed install may still have created objects: clean them up now.
            let _ = uninstall(namespace, name);
            delete_cluster_leftovers(name);
            anyhow::anyhow!("installing {name} into {namespace}: {r}")
        })?;
        Ok(Self {
            name: name.to_string(),
            namespace: namespace.to_string(),
            chart: chart.to_path_buf(),
            installed,
            uninstalled: false,
        })
    }

    /// `helm upgrade` of this release with new values; Helm refusing is an error.
    pub fn upgrade(&mut self, values: &Value) -> anyhow::Result<&Installed> {
        self.installed =
            release_action("upgrade", &self.namespace, &self.name, &self.chart, values)?
                .map_err(|r| anyhow::anyhow!("upgrading {}: {r}", self.name))?;
        Ok(&self.installed)
    }

    /// `helm uninstall`, now; the guard then has nothing left to do.
    pub fn uninstall(mut self) -> anyhow::Result<()> {
        self.uninstalled = true;
        uninstall(&self.namespace, &self.name)?
            .map_err(|r| anyhow::anyhow!("uninstalling {}: {r}", self.name))
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        if !self.uninstalled {
            let _ = uninstall(&self.namespace, &self.name);
            delete_cluster_leftovers(&self.name);
        }
    }
}

/// Deletes the cluster-scoped objects labelled with `release`: ClusterRoles, their bindings and
/// the console namespace the chart created (never a namespace the chart did not label).
fn delete_cluster_leftovers(release: &str) {
    let selector = format!("app.kubernetes.io/instance={release}");
    let _ = kubectl(
        &[
            "delete",
            "clusterrole,clusterrolebinding,namespace",
            "-l",
            &selector,
            "--ignore-not-found",
            "--wait=false",
        ],
        None,
    );
}

/// A namespace created with kubectl and deleted (without waiting) when dropped. Synchronous, so
/// the deletion happens even when the test's async runtime is already gone.
#[derive(Debug)]
pub struct ScratchNamespace {
    pub name: String,
}

impl ScratchNamespace {
    /// Creates `<prefix>-<random>`, labelled as a test namespace.
    pub fn create(prefix: &str) -> anyhow::Result<Self> {
        Self::named(&format!("{prefix}-{}", unique_suffix()))
    }

    /// Creates the namespace `name`, labelled as a test namespace.
    pub fn named(name: &str) -> anyhow::Result<Self> {
        let name = name.to_string();
        let manifest = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels:\n    deskvirt.io/test: \"true\"\n"
        );
        let run = kubectl(&["create", "-f", "-"], Some(&manifest))?;
        if !run.success {
            bail!("creating namespace {name}: {}", run.stderr.trim());
        }
        Ok(Self { name })
    }
}

impl Drop for ScratchNamespace {
    fn drop(&mut self) {
        let _ = kubectl(
            &[
                "delete",
                "namespace",
                &self.name,
                "--ignore-not-found",
                "--wait=false",
            ],
            None,
        );
    }
}

/// A copy of a chart with some values changed in its values.yaml (what `helm lint` checks, as
/// lint takes no `--set` here); removed when dropped.
#[derive(Debug)]
pub struct ChartCopy {
    pub dir: PathBuf,
}

impl ChartCopy {
    /// Copies `chart` and deep-merges `overrides` into its values.yaml.
    pub fn with_values(chart: &Path, overrides: &Value) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("deskvirt-chart-{}", unique_suffix()));
        let copy = Self { dir };
        copy_dir(chart, &copy.dir)?;
        let path = copy.dir.join("values.yaml");
        let mut values: Value = serde_yaml::from_str(&std::fs::read_to_string(&path)?)
            .with_context(|| format!("reading {}", path.display()))?;
        merge(&mut values, overrides);
        std::fs::write(&path, serde_yaml::to_string(&values)?)?;
        Ok(copy)
    }
}

impl Drop for ChartCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Deep merge of JSON objects, as Helm merges `--set` values: objects merge key by key,
/// anything else (null included) replaces.
pub fn merge(base: &mut Value, overrides: &Value) {
    match (base, overrides) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_is_deep_and_replaces_leaves() {
        let mut base = json!({"a": {"b": 1, "c": [1, 2]}, "d": "x"});
        merge(&mut base, &json!({"a": {"b": 2, "c": [3]}, "e": true}));
        assert_eq!(base, json!({"a": {"b": 2, "c": [3]}, "d": "x", "e": true}));
    }

    #[test]
    fn severities_order_like_helm() {
        assert!(Severity::from(3) > Severity::from(2));
        assert!(Severity::from(2) > Severity::from(1));
        assert_eq!(Severity::from(9), Severity::Unknown);
    }
}
