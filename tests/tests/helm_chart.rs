//! The deskvirt Helm chart through Helm's own library (helm-sdkpy) and the real apiserver:
//! lint, the values schema, install / upgrade / uninstall in a fresh namespace next to another
//! release, and the RBAC it grants, checked with SubjectAccessReviews and with requests made
//! with the chart's own ServiceAccount tokens. The console password mirrors live in a namespace
//! of their own (`<release namespace>-consoles` by default), the only one whose Secrets either
//! component can read.

use std::time::Duration;

use anyhow::{Context, bail};
use deskvirt_crds::DomainNode;
use deskvirt_tests::cluster::{client, ensure_crds, kubeconfig_path, repo_root, unique_suffix};
use deskvirt_tests::confined::{Volume, agent_volumes};
use deskvirt_tests::helm::{self, ChartCopy, Release, ScratchNamespace, Severity, chart_dir};
use deskvirt_tests::kubectl::kubectl;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Container, Namespace, Node, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, ResourceExt};
use serde_json::{Value, json};

/// A release name unique to this run (Helm: at most 53 characters, DNS-1123).
fn release_name(prefix: &str) -> String {
    format!("t{prefix}-{}", unique_suffix())
}

/// `<release>-deskvirt`: the prefix of every object the chart names.
fn fullname(release: &str) -> String {
    format!("{release}-deskvirt")
}

/// The default console namespace of a release installed into `release_ns`.
fn consoles(release_ns: &str) -> String {
    format!("{release_ns}-consoles")
}

/// The apiserver's minor version (1.x).
async fn minor_version(c: &Client) -> anyhow::Result<u32> {
    let version = c.apiserver_version().await?;
    if version.major != "1" {
        bail!("apiserver {}.{}", version.major, version.minor);
    }
    Ok(version.minor.trim_end_matches('+').parse().unwrap_or(0))
}

/// Waits until the namespace `name` is gone (the namespace controller empties it first).
async fn wait_namespace_gone(c: &Client, name: &str) -> anyhow::Result<()> {
    let api = Api::<Namespace>::all(c.clone());
    for _ in 0..240 {
        if api.get_opt(name).await?.is_none() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!("namespace {name} still exists 60s after helm uninstall")
}

/// Whether the Role `name` in `namespace` has a rule on core Secrets.
async fn role_grants_secrets(c: &Client, namespace: &str, name: &str) -> anyhow::Result<bool> {
    let role = Api::<Role>::namespaced(c.clone(), namespace)
        .get(name)
        .await?;
    Ok(role.rules.unwrap_or_default().iter().any(|r| {
        r.api_groups
            .as_ref()
            .is_some_and(|g| g.iter().any(|g| g.is_empty()))
            && r.resources
                .as_ref()
                .is_some_and(|res| res.iter().any(|x| x == "secrets"))
    }))
}

fn env_of<'a>(c: &'a Container, name: &str) -> Option<&'a k8s_openapi::api::core::v1::EnvVar> {
    c.env.as_ref()?.iter().find(|e| e.name == name)
}

fn field_ref(c: &Container, name: &str) -> Option<String> {
    env_of(c, name)?
        .value_from
        .as_ref()?
        .field_ref
        .as_ref()
        .map(|f| f.field_path.clone())
}

fn value(c: &Container, name: &str) -> Option<String> {
    env_of(c, name)?.value.clone()
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_not_found())
}

fn is_forbidden(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_forbidden())
}

#[test]
fn agent_sees_the_paths_it_uses_and_dates_saved_memory_read_only() -> anyhow::Result<()> {
    // What deskvirt_tests::confined gives a confined agent: every directory the agent reads or
    // writes, at the same path; the managed save directory read-only (it only dates images).
    let volumes = agent_volumes(json!({ "managedSaveDir": "/srv/save" }))?;
    let host = |at: &str| {
        volumes.iter().find_map(|v| match v {
            Volume::Host {
                path, read_only, ..
            } if path == at => Some(*read_only),
            _ => None,
        })
    };
    assert_eq!(host("/srv/save"), Some(true), "{volumes:?}");
    for rw in [
        "/run/libvirt",
        "/var/lib/deskvirt/images",
        "/var/lib/deskvirt/disks",
        "/var/log/libvirt/qemu",
    ] {
        assert_eq!(host(rw), Some(false), "{rw}: {volumes:?}");
    }
    assert!(volumes.contains(&Volume::Scratch { at: "/tmp".into() }));
    Ok(())
}

#[test]
fn chart_lints_clean_as_with_strict() -> anyhow::Result<()> {
    // `helm lint --strict` fails on warnings; helm-sdkpy has no strict flag, so the same rule is
    // applied here to the default values and to every optional feature switched on. Lint renders
    // with `fail` turned into a log line (offline capabilities list no kinds, so the admission
    // policy's guard would fail), so the policy's YAML is still rendered and checked.
    let report = helm::lint(&chart_dir())?;
    let findings = report.at_least(Severity::Warning);
    assert!(findings.is_empty(), "helm lint: {findings:?}");

    let everything_on = json!({
        "commonLabels": {"team": "vdi"},
        "imagePullSecrets": ["regcred"],
        "operator": {"replicas": 2, "image": {"digest": format!("sha256:{}", "ab".repeat(32))}},
        "nodeAgent": {"hypervisor": "auto", "heartbeatInterval": "500ms", "maxUnavailable": "25%"},
        "serviceAccountTokens": {"enabled": true},
        "metrics": {
            "serviceMonitor": {"enabled": true, "labels": {"release": "prometheus"}},
            "prometheusRule": {"enabled": true, "labels": {"release": "prometheus"}},
        },
    });
    let everything_off = json!({
        "rbac": {"aggregateToDefaultRoles": false},
        "metrics": {"service": {"enabled": false}},
        "operator": {"nodeSelector": {}, "tolerations": [], "resources": {}},
        "nodeAgent": {"nodeSelector": {}, "tolerations": [], "resources": {}},
    });
    let admission_policy = json!({
        "nodeAgent": {"admissionPolicy": {"enabled": true}},
        "operator": {"admissionPolicy": {"enabled": true}},
        "consoles": {"userNamespaces": ["team-a", "team-b"]},
    });
    for (what, values) in [
        ("everything on", everything_on),
        ("the admission policy", admission_policy),
        ("everything off", everything_off),
    ] {
        let copy = ChartCopy::with_values(&chart_dir(), &values)?;
        let report = helm::lint(&copy.dir)?;
        let findings = report.at_least(Severity::Warning);
        assert!(findings.is_empty(), "helm lint with {what}: {findings:?}");
    }
    Ok(())
}

#[test]
fn every_rbac_rule_says_why_it_is_there() -> anyhow::Result<()> {
    let dir = chart_dir().join("templates");
    let mut rules = 0;
    let mut bare = vec![];
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if !name.ends_with("rbac.yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.trim_start().starts_with("- apiGroups:") {
                rules += 1;
                let previous = i
                    .checked_sub(1)
                    .map(|j| lines[j].trim_start())
                    .unwrap_or("");
                if !previous.starts_with('#') {
                    bare.push(format!("{name}:{}: {}", i + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        rules >= 20,
        "only {rules} RBAC rules found in {}",
        dir.display()
    );
    assert!(
        bare.is_empty(),
        "RBAC rules without a comment saying why:\n{}",
        bare.join("\n")
    );
    Ok(())
}

/// The `env = "NAME"` fallbacks of a binary's clap configuration.
fn config_env_names(config: &str) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(repo_root().join(config))?;
    Ok(text
        .split("env = \"")
        .skip(1)
        .filter_map(|rest| rest.split_once('"').map(|(name, _)| name.to_string()))
        .collect())
}

/// The `- name: NAME` entries (upper case: environment variables) of a template.
fn template_env_names(template: &str) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(chart_dir().join("templates").join(template))?;
    Ok(text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- name: "))
        .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .map(str::to_string)
        .collect())
}

#[test]
fn chart_sets_the_environment_the_binaries_read() -> anyhow::Result<()> {
    // Read by tracing's filter and by glibc's malloc, not by clap.
    const NOT_CLAP: &[&str] = &["RUST_LOG", "MALLOC_ARENA_MAX"];
    // Flags whose default is right in a pod, so the chart leaves them out on purpose.
    // The test-only bind delay must stay off in a pod.
    const DEFAULT_IS_RIGHT: &[&str] = &["DESKVIRT_QEMU_IMG", "DESKVIRT_TEST_BIND_DELAY"];
    for (template, config) in [
        ("operator-deployment.yaml", "operator/src/config.rs"),
        ("node-agent-daemonset.yaml", "node-agent/src/config.rs"),
    ] {
        let read = config_env_names(config)?;
        let set = template_env_names(template)?;
        assert!(!read.is_empty() && !set.is_empty(), "{config} / {template}");
        let unknown: Vec<_> = set
            .iter()
            .filter(|n| !read.contains(n) && !NOT_CLAP.contains(&n.as_str()))
            .collect();
        assert!(
            unknown.is_empty(),
            "{template} sets {unknown:?}, which {config} does not read"
        );
        let unset: Vec<_> = read
            .iter()
            .filter(|n| !set.contains(n) && !DEFAULT_IS_RIGHT.contains(&n.as_str()))
            .collect();
        assert!(
            unset.is_empty(),
            "{config} reads {unset:?}, which {template} does not set: add a value to the chart \
             (or, when the binary's default is right in a pod, to DEFAULT_IS_RIGHT here)"
        );
    }
    Ok(())
}

/// The schema node of the value at `path`, following `properties`.
fn schema_at<'a>(schema: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter()
        .try_fold(schema, |node, key| node.get("properties")?.get(key))
}

/// Every property path of the schema (`operator.image.tag`, ...).
fn schema_paths(schema: &Value, prefix: &mut Vec<String>, out: &mut Vec<String>) {
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (key, node) in props {
            prefix.push(key.clone());
            out.push(prefix.join("."));
            schema_paths(node, prefix, out);
            prefix.pop();
        }
    }
}

#[test]
fn every_value_is_documented_and_in_the_schema() -> anyhow::Result<()> {
    let text = std::fs::read_to_string(chart_dir().join("values.yaml"))?;
    let values: Value = serde_yaml::from_str(&text)?;
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(
        chart_dir().join("values.schema.json"),
    )?)?;
    assert_eq!(
        schema.get("$schema").and_then(Value::as_str),
        Some("http://json-schema.org/draft-07/schema#")
    );

    // Everything the schema declares has a default in values.yaml (Helm's `global` aside);
    // the reverse is the schema's additionalProperties: false, which lint checks.
    let mut paths = vec![];
    schema_paths(&schema, &mut vec![], &mut paths);
    let missing: Vec<&String> = paths
        .iter()
        .filter(|p| p.as_str() != "global")
        .filter(|p| p.split('.').try_fold(&values, |v, k| v.get(k)).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "declared in the schema, absent from values.yaml: {missing:?}"
    );

    // Every value the schema describes carries a comment on the line above it.
    let mut stack: Vec<(usize, String)> = vec![];
    let mut undocumented = vec![];
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let Some((key, _)) = trimmed.split_once(':') else {
            continue;
        };
        if trimmed.starts_with('#')
            || trimmed.starts_with('-')
            || !key.chars().all(|c| c.is_ascii_alphanumeric())
        {
            continue;
        }
        while stack.last().is_some_and(|(n, _)| *n >= indent) {
            stack.pop();
        }
        stack.push((indent, key.to_string()));
        let path: Vec<String> = stack.iter().map(|(_, k)| k.clone()).collect();
        // Values the schema describes; not the structure inside one (resources.limits).
        if schema_at(&schema, &path)
            .and_then(|n| n.get("description"))
            .is_none()
        {
            continue;
        }
        let above = lines[..i]
            .iter()
            .rev()
            .map(|l| l.trim())
            .find(|l| !l.is_empty())
            .unwrap_or("");
        if !above.starts_with('#') {
            undocumented.push(format!("line {}: {}", i + 1, path.join(".")));
        }
    }
    assert!(
        undocumented.is_empty(),
        "values without a comment:\n{}",
        undocumented.join("\n")
    );
    Ok(())
}

/// A values override the schema must reject, and the JSON pointer Helm's error must name.
struct BadValues {
    what: &'static str,
    values: Value,
    at: &'static str,
}

fn bad_values() -> Vec<BadValues> {
    let b = |what, values, at| BadValues { what, values, at };
    vec![
        b(
            "no operator replica",
            json!({"operator": {"replicas": 0}}),
            "/operator/replicas",
        ),
        b(
            "replicas as a word",
            json!({"operator": {"replicas": "two"}}),
            "/operator/replicas",
        ),
        b(
            "unknown top-level key",
            json!({"operatr": {"replicas": 2}}),
            "operatr",
        ),
        b(
            "unknown nested key",
            json!({"nodeAgent": {"hypervisr": "kvm"}}),
            "hypervisr",
        ),
        b(
            "unknown hypervisor",
            json!({"nodeAgent": {"hypervisor": "xen"}}),
            "/nodeAgent/hypervisor",
        ),
        b(
            "console user namespace not a DNS label",
            json!({"consoles": {"userNamespaces": ["Team_A"]}}),
            "/consoles/userNamespaces/0",
        ),
        b(
            "console user namespaces as one string",
            json!({"consoles": {"userNamespaces": "team-a,team-b"}}),
            "/consoles/userNamespaces",
        ),
        b(
            "duration without unit",
            json!({"operator": {"hostTimeout": "40"}}),
            "/operator/hostTimeout",
        ),
        b(
            "milliseconds the operator cannot parse",
            json!({"operator": {"leaderLeaseDuration": "500ms"}}),
            "/operator/leaderLeaseDuration",
        ),
        b(
            "zero heartbeat",
            json!({"nodeAgent": {"heartbeatInterval": "0s"}}),
            "/nodeAgent/heartbeatInterval",
        ),
        b(
            "duration in days",
            json!({"nodeAgent": {"leaseDuration": "1d"}}),
            "/nodeAgent/leaseDuration",
        ),
        b(
            "privileged port",
            json!({"nodeAgent": {"metricsPort": 80}}),
            "/nodeAgent/metricsPort",
        ),
        b(
            "port above 65535",
            json!({"operator": {"metricsPort": 70000}}),
            "/operator/metricsPort",
        ),
        b(
            "port as a string",
            json!({"operator": {"metricsPort": "8080"}}),
            "/operator/metricsPort",
        ),
        b(
            "relative image dir",
            json!({"nodeAgent": {"imageDir": "images"}}),
            "/nodeAgent/imageDir",
        ),
        b(
            "unknown pull policy",
            json!({"operator": {"image": {"pullPolicy": "Sometimes"}}}),
            "/operator/image/pullPolicy",
        ),
        b(
            "bad digest",
            json!({"nodeAgent": {"image": {"digest": "latest"}}}),
            "/nodeAgent/image/digest",
        ),
        b(
            "flag as a string",
            json!({"serviceAccountTokens": {"enabled": "yes"}}),
            "/serviceAccountTokens/enabled",
        ),
        b(
            "unknown log format",
            json!({"logFormat": "xml"}),
            "/logFormat",
        ),
        b(
            "console namespace that is no DNS label",
            json!({"consoles": {"namespace": "Desk_Consoles"}}),
            "/consoles/namespace",
        ),
        b(
            "createNamespace as a string",
            json!({"consoles": {"createNamespace": "yes"}}),
            "/consoles/createNamespace",
        ),
        b(
            "sweep interval the operator cannot parse",
            json!({"operator": {"mirrorSweepInterval": "500ms"}}),
            "/operator/mirrorSweepInterval",
        ),
        b(
            "threshold above 100%",
            json!({"metrics": {"prometheusRule": {"poolCapacityThreshold": 1.5}}}),
            "/metrics/prometheusRule/poolCapacityThreshold",
        ),
        b(
            "bad alert duration",
            json!({"metrics": {"prometheusRule": {"hostNotReadyFor": "five minutes"}}}),
            "/metrics/prometheusRule/hostNotReadyFor",
        ),
    ]
}

#[tokio::test]
async fn values_schema_rejects_bad_values() -> anyhow::Result<()> {
    // Helm installs crds/ before it validates values; with the CRDs in place that step is a no-op.
    let c = client().await?;
    ensure_crds(&c).await?;
    // A namespace that does not exist: were validation to pass, Helm could create nothing.
    let nowhere = format!("helm-schema-{}", unique_suffix());
    let table = bad_values();
    let mut failures = vec![];
    for case in &table {
        match helm::install(
            &nowhere,
            &release_name("schema"),
            &chart_dir(),
            &case.values,
        )? {
            Ok(_) => failures.push(format!("{}: installed", case.what)),
            Err(refused) => {
                let named = refused.message.contains("schema") && refused.message.contains(case.at);
                if !named {
                    failures.push(format!(
                        "{}: not a schema error naming {}: {refused}",
                        case.what, case.at
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        table.len(),
        failures.join("\n")
    );

    // helm lint reads values.yaml, and fails on the same schema.
    let copy = ChartCopy::with_values(&chart_dir(), &json!({"operator": {"replicas": 0}}))?;
    let report = helm::lint(&copy.dir)?;
    assert!(
        report
            .at_least(Severity::Error)
            .iter()
            .any(|m| m.path == "values.yaml"),
        "lint accepted replicas: 0: {report:?}"
    );
    Ok(())
}

#[tokio::test]
async fn admission_policy_fails_the_install_where_the_api_is_missing() -> anyhow::Result<()> {
    let c = client().await?;
    ensure_crds(&c).await?;
    let minor = minor_version(&c).await?;
    if minor >= 30 {
        eprintln!("apiserver 1.{minor} serves ValidatingAdmissionPolicy; nothing to refuse");
        return Ok(());
    }
    let nowhere = format!("helm-vap-{}", unique_suffix());
    for component in ["nodeAgent", "operator"] {
        let values = json!({component: {"admissionPolicy": {"enabled": true}}});
        match helm::install(&nowhere, &release_name("vap"), &chart_dir(), &values)? {
            Ok(_) => {
                bail!("the {component} policy was installed on 1.{minor}, which cannot enforce it")
            }
            Err(refused) => assert!(
                refused
                    .message
                    .contains(&format!("{component}.admissionPolicy"))
                    && refused.message.contains("1.30"),
                "{refused}"
            ),
        }
    }
    Ok(())
}

#[tokio::test]
async fn console_namespace_is_never_one_holding_service_accounts() -> anyhow::Result<()> {
    // The agents can read every Secret of the console namespace: the chart refuses namespaces
    // that hold ServiceAccounts (and so, before 1.24, their token Secrets). Rendering fails
    // before anything is created, so the release namespace need not exist.
    let c = client().await?;
    ensure_crds(&c).await?;
    let nowhere = format!("helm-cns-{}", unique_suffix());
    let long = format!("helm-cns-{}", "x".repeat(50));
    for (release_ns, console_ns, says) in [
        (
            nowhere.as_str(),
            nowhere.as_str(),
            "must not be the release namespace",
        ),
        (
            nowhere.as_str(),
            "kube-system",
            "must not be \"kube-system\"",
        ),
        (nowhere.as_str(), "default", "must not be \"default\""),
        (long.as_str(), "", "longer than 63 characters"),
    ] {
        let values = json!({"consoles": {"namespace": console_ns}});
        match helm::install(release_ns, &release_name("cns"), &chart_dir(), &values)? {
            Ok(_) => bail!("installed with the console namespace {console_ns:?} in {release_ns}"),
            Err(refused) => assert!(
                refused.message.contains(says),
                "console namespace {console_ns:?}: {refused}"
            ),
        }
    }
    Ok(())
}

#[tokio::test]
async fn console_user_namespaces_never_reach_deskvirt_or_kubernetes_secrets() -> anyhow::Result<()>
{
    // The operator gets create, patch and delete on every Secret of a listed namespace: the
    // chart refuses the release namespace (ServiceAccount tokens), the console namespace
    // (mirrors, which the agents read) and kube-* namespaces. Rendering fails first, so the
    // namespaces need not exist.
    let c = client().await?;
    ensure_crds(&c).await?;
    let nowhere = format!("helm-uns-{}", unique_suffix());
    for listed in [
        nowhere.clone(),
        consoles(&nowhere),
        "kube-system".to_string(),
        "kube-public".to_string(),
    ] {
        let values = json!({"consoles": {"userNamespaces": ["team-a", listed]}});
        match helm::install(&nowhere, &release_name("uns"), &chart_dir(), &values)? {
            Ok(_) => bail!("installed with {listed} among consoles.userNamespaces"),
            Err(refused) => assert!(
                refused.message.contains(&format!("must not list {listed}")),
                "{listed}: {refused}"
            ),
        }
    }
    Ok(())
}

/// The YAML between `kubectl apply -f - <<'EOF'` and `EOF` in the notes, unindented.
fn notes_example(notes: &str) -> Option<String> {
    let start = notes.find("<<'EOF'\n")? + "<<'EOF'\n".len();
    let body = &notes[start..];
    let end = body.find("\n     EOF")?;
    Some(
        body[..end]
            .lines()
            .map(|l| l.strip_prefix("     ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

#[tokio::test]
async fn install_upgrade_and_uninstall_in_a_fresh_namespace() -> anyhow::Result<()> {
    let c = client().await?;
    ensure_crds(&c).await?;
    let ns = ScratchNamespace::create("helm-install")?;
    let name = release_name("inst");
    let full = fullname(&name);
    let mut release = Release::install(&ns.name, &name, &chart_dir(), &json!({}))?;
    assert_eq!(release.installed.status, "deployed");

    // The operator Deployment: downward API, probes on the metrics port, locked-down container.
    let deploy = Api::<Deployment>::namespaced(c.clone(), &ns.name)
        .get(&format!("{full}-operator"))
        .await?;
    let spec = deploy.spec.clone().context("deployment spec")?;
    assert_eq!(spec.replicas, Some(1));
    let pod = spec.template.spec.context("pod spec")?;
    assert_eq!(
        pod.service_account_name.as_deref(),
        Some(format!("{full}-operator").as_str())
    );
    let op = &pod.containers[0];
    assert_eq!(field_ref(op, "POD_NAME").as_deref(), Some("metadata.name"));
    assert_eq!(
        field_ref(op, "POD_NAMESPACE").as_deref(),
        Some("metadata.namespace")
    );
    assert_eq!(
        value(op, "DESKVIRT_METRICS_ADDR").as_deref(),
        Some("0.0.0.0:8080")
    );
    let console_ns = consoles(&ns.name);
    assert_eq!(
        value(op, "DESKVIRT_CONSOLE_NAMESPACE").as_deref(),
        Some(console_ns.as_str())
    );
    assert_eq!(
        value(op, "DESKVIRT_MIRROR_SWEEP_INTERVAL").as_deref(),
        Some("10m")
    );
    assert_eq!(op.ports.as_ref().map(|p| p[0].container_port), Some(8080));
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
    };
    assert_eq!(probe_path(&op.liveness_probe).as_deref(), Some("/healthz"));
    assert_eq!(probe_path(&op.readiness_probe).as_deref(), Some("/readyz"));
    let sc = op
        .security_context
        .as_ref()
        .context("operator securityContext")?;
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let dropped = sc
        .capabilities
        .as_ref()
        .and_then(|c| c.drop.clone())
        .unwrap_or_default();
    assert_eq!(dropped, vec!["ALL".to_string()]);
    let pod_sc = pod
        .security_context
        .as_ref()
        .context("operator pod securityContext")?;
    assert_eq!(pod_sc.run_as_non_root, Some(true));
    assert!(
        op.resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .is_some(),
        "operator without limits"
    );

    // The node-agent DaemonSet: host identity from the downward API, libvirt and disk host paths.
    let ds = Api::<DaemonSet>::namespaced(c.clone(), &ns.name)
        .get(&format!("{full}-node-agent"))
        .await?;
    let pod = ds
        .spec
        .context("daemonset spec")?
        .template
        .spec
        .context("pod spec")?;
    let agent = &pod.containers[0];
    assert_eq!(
        field_ref(agent, "NODE_NAME").as_deref(),
        Some("spec.nodeName")
    );
    assert_eq!(
        field_ref(agent, "NODE_ADDRESS").as_deref(),
        Some("status.hostIP")
    );
    assert_eq!(
        value(agent, "DESKVIRT_LEASE_NAMESPACE").as_deref(),
        Some(ns.name.as_str())
    );
    assert_eq!(
        value(agent, "DESKVIRT_CONSOLE_NAMESPACE").as_deref(),
        Some(console_ns.as_str())
    );
    assert_eq!(value(agent, "DESKVIRT_HYPERVISOR").as_deref(), Some("kvm"));
    assert_eq!(
        value(agent, "DESKVIRT_METRICS_ADDR").as_deref(),
        Some("0.0.0.0:8081")
    );
    let host_paths: Vec<String> = pod
        .volumes
        .unwrap_or_default()
        .into_iter()
        .filter_map(|v| v.host_path.map(|h| h.path))
        .collect();
    for path in [
        "/run/libvirt",
        "/var/lib/deskvirt/images",
        "/var/lib/deskvirt/disks",
        "/var/lib/libvirt/qemu/save",
    ] {
        assert!(
            host_paths.iter().any(|p| p == path),
            "no hostPath {path}: {host_paths:?}"
        );
    }
    let mounts: Vec<String> = agent
        .volume_mounts
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|m| m.mount_path)
        .collect();
    for path in [
        "/run/libvirt",
        "/var/lib/deskvirt/images",
        "/var/lib/deskvirt/disks",
        "/var/lib/libvirt/qemu/save",
    ] {
        assert!(
            mounts.iter().any(|m| m == path),
            "{path} not mounted at the same path: {mounts:?}"
        );
    }
    assert_eq!(
        pod.node_selector
            .unwrap_or_default()
            .get("deskvirt.io/kvm-host")
            .map(String::as_str),
        Some("true")
    );
    assert!(pod.tolerations.is_some_and(|t| !t.is_empty()));

    // The console namespace: created with the release, labelled as its own, holding the Roles
    // that grant both components their only Secret access.
    let console = Api::<Namespace>::all(c.clone()).get(&console_ns).await?;
    let labels = console.metadata.labels.unwrap_or_default();
    for (key, want) in [
        ("app.kubernetes.io/instance", name.as_str()),
        ("app.kubernetes.io/managed-by", "Helm"),
        ("app.kubernetes.io/part-of", "deskvirt"),
        ("app.kubernetes.io/component", "consoles"),
    ] {
        assert_eq!(
            labels.get(key).map(String::as_str),
            Some(want),
            "label {key} of namespace {console_ns}"
        );
    }

    // Identities, RBAC and metrics Services.
    for sa in ["operator", "node-agent"] {
        let n = format!("{full}-{sa}");
        Api::<ServiceAccount>::namespaced(c.clone(), &ns.name)
            .get(&n)
            .await?;
        Api::<Role>::namespaced(c.clone(), &ns.name).get(&n).await?;
        Api::<RoleBinding>::namespaced(c.clone(), &ns.name)
            .get(&n)
            .await?;
        assert!(
            !role_grants_secrets(&c, &ns.name, &n).await?,
            "Role {n} grants Secrets in the release namespace"
        );
        assert!(
            role_grants_secrets(&c, &console_ns, &n).await?,
            "Role {n} in {console_ns} does not grant the console mirrors"
        );
        let binding = Api::<RoleBinding>::namespaced(c.clone(), &console_ns)
            .get(&n)
            .await?;
        let subjects = binding.subjects.unwrap_or_default();
        assert_eq!(
            subjects
                .iter()
                .map(|s| (s.kind.as_str(), s.name.as_str(), s.namespace.as_deref()))
                .collect::<Vec<_>>(),
            vec![("ServiceAccount", n.as_str(), Some(ns.name.as_str()))],
            "RoleBinding {n} in {console_ns}"
        );
        Api::<ClusterRole>::all(c.clone()).get(&n).await?;
        let binding = Api::<ClusterRoleBinding>::all(c.clone()).get(&n).await?;
        let subject = &binding.subjects.unwrap_or_default()[0];
        assert_eq!(
            (subject.name.as_str(), subject.namespace.as_deref()),
            (n.as_str(), Some(ns.name.as_str()))
        );
    }
    for role in ["desktop-editor", "desktop-viewer"] {
        Api::<ClusterRole>::all(c.clone())
            .get(&format!("{full}-{role}"))
            .await?;
    }
    let agent_svc = Api::<Service>::namespaced(c.clone(), &ns.name)
        .get(&format!("{full}-node-agent-metrics"))
        .await?;
    assert_eq!(
        agent_svc.spec.and_then(|s| s.cluster_ip).as_deref(),
        Some("None")
    );
    Api::<Service>::namespaced(c.clone(), &ns.name)
        .get(&format!("{full}-operator-metrics"))
        .await?;
    let token = Api::<Secret>::namespaced(c.clone(), &ns.name)
        .get_opt(&format!("{full}-operator-token"))
        .await?;
    assert!(token.is_none(), "long-lived tokens are on by default");

    // The notes tell how to create a desktop and connect, and their example is accepted.
    let notes = release.installed.notes.clone();
    for needle in [
        "kubectl apply -f",
        "kind: Desktop",
        "pool: lab",
        "-console",
        "console.vv",
        "remote-viewer console.vv",
        console_ns.as_str(),
    ] {
        assert!(notes.contains(needle), "NOTES lack {needle:?}:\n{notes}");
    }
    let example = notes_example(&notes).context("no kubectl apply example in NOTES")?;
    let example = example.replace("namespace: desktops", &format!("namespace: {}", ns.name));
    let run = kubectl(
        &["apply", "--dry-run=server", "--validate=false", "-f", "-"],
        Some(&example),
    )?;
    assert!(
        run.success,
        "the NOTES example is rejected: {}\n{example}",
        run.stderr
    );

    // Upgrade: a standby operator replica; CRDs in crds/ are left alone.
    let upgraded = release.upgrade(&json!({"operator": {"replicas": 2}}))?;
    assert_eq!(
        (upgraded.status.as_str(), upgraded.version),
        ("deployed", 2)
    );
    let deploy = Api::<Deployment>::namespaced(c.clone(), &ns.name)
        .get(&format!("{full}-operator"))
        .await?;
    assert_eq!(deploy.spec.and_then(|s| s.replicas), Some(2));

    // A console password mirror, as the operator writes them: uninstall takes it along.
    let mirror: Secret = serde_json::from_value(json!({
        "metadata": {"name": format!("console-{}", unique_suffix())},
        "stringData": {"password": "not-a-real-password"},
    }))?;
    Api::<Secret>::namespaced(c.clone(), &console_ns)
        .create(&PostParams::default(), &mirror)
        .await?;

    // Uninstall removes everything it created, cluster-scoped objects and the console namespace
    // (mirrors included) too, and keeps the CRDs (and with them every Desktop in the cluster).
    release.uninstall()?;
    wait_namespace_gone(&c, &console_ns).await?;
    let gone = |r: Result<_, kube::Error>, what: &str| -> anyhow::Result<()> {
        match r {
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(e.into()),
            Ok(_) => bail!("{what} survived helm uninstall"),
        }
    };
    gone(
        Api::<Deployment>::namespaced(c.clone(), &ns.name)
            .get(&format!("{full}-operator"))
            .await
            .map(|_| ()),
        "Deployment",
    )?;
    gone(
        Api::<DaemonSet>::namespaced(c.clone(), &ns.name)
            .get(&format!("{full}-node-agent"))
            .await
            .map(|_| ()),
        "DaemonSet",
    )?;
    for sa in ["operator", "node-agent"] {
        let n = format!("{full}-{sa}");
        gone(
            Api::<ServiceAccount>::namespaced(c.clone(), &ns.name)
                .get(&n)
                .await
                .map(|_| ()),
            "ServiceAccount",
        )?;
        gone(
            Api::<Role>::namespaced(c.clone(), &ns.name)
                .get(&n)
                .await
                .map(|_| ()),
            "Role",
        )?;
        gone(
            Api::<ClusterRole>::all(c.clone()).get(&n).await.map(|_| ()),
            "ClusterRole",
        )?;
        gone(
            Api::<ClusterRoleBinding>::all(c.clone())
                .get(&n)
                .await
                .map(|_| ()),
            "ClusterRoleBinding",
        )?;
    }
    let left: Vec<String> = Api::<ClusterRole>::all(c.clone())
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={name}")))
        .await?
        .items
        .into_iter()
        .filter_map(|r| r.metadata.name)
        .collect();
    assert!(left.is_empty(), "cluster roles left behind: {left:?}");
    let crds = Api::<CustomResourceDefinition>::all(c.clone());
    for crd in [
        "desktops.deskvirt.io",
        "desktopmigrations.deskvirt.io",
        "desktopbackups.deskvirt.io",
        "desktoprestores.deskvirt.io",
        "domainnodes.deskvirt.io",
        "resourcepools.deskvirt.io",
    ] {
        crds.get(crd)
            .await
            .with_context(|| format!("{crd} was removed by helm uninstall"))?;
    }
    Ok(())
}

#[tokio::test]
async fn two_releases_install_side_by_side() -> anyhow::Result<()> {
    let c = client().await?;
    ensure_crds(&c).await?;
    let (ns_a, ns_b) = (
        ScratchNamespace::create("helm-a")?,
        ScratchNamespace::create("helm-b")?,
    );
    // a gets the default console namespace; b brings its own, which the chart must leave alone.
    let own = ScratchNamespace::create("helm-b-own")?;
    let values_b = json!({"consoles": {"namespace": own.name, "createNamespace": false}});
    let (name_a, name_b) = (release_name("a"), release_name("b"));
    // At the same time, as two teams (or two test runs) would.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| Release::install(&ns_a.name, &name_a, &chart_dir(), &json!({})));
        let b = s.spawn(|| Release::install(&ns_b.name, &name_b, &chart_dir(), &values_b));
        (a.join(), b.join())
    });
    let a = a.map_err(|_| anyhow::anyhow!("install thread panicked"))??;
    let b = b.map_err(|_| anyhow::anyhow!("install thread panicked"))??;
    let consoles_a = consoles(&ns_a.name);
    Api::<Namespace>::all(c.clone())
        .get(&consoles_a)
        .await
        .with_context(|| format!("release a's console namespace {consoles_a}"))?;
    let read = |verb| Access {
        who: "",
        verb,
        group: "",
        resource: "secrets",
        namespace: Where::Consoles,
        allowed: true,
    };
    let mut wrong = vec![];
    for (release, ns, mine) in [
        (&a, &ns_a, consoles_a.as_str()),
        (&b, &ns_b, own.name.as_str()),
    ] {
        let n = format!("{}-operator", fullname(&release.name));
        let binding = Api::<ClusterRoleBinding>::all(c.clone()).get(&n).await?;
        let subject = &binding.subjects.unwrap_or_default()[0];
        assert_eq!(
            subject.namespace.as_deref(),
            Some(ns.name.as_str()),
            "{n} binds the wrong namespace"
        );
        // Each release's components read the mirrors of their own console namespace only.
        for who in ["operator", "node-agent"] {
            let user = format!(
                "system:serviceaccount:{}:{}-{who}",
                ns.name,
                fullname(&release.name)
            );
            for target in [consoles_a.as_str(), own.name.as_str()] {
                for verb in ["get", "list"] {
                    let allowed = may(&c, &user, &ns.name, &read(verb), target).await?;
                    if allowed != (target == mine) {
                        wrong.push(format!("{user} {verb} secrets in {target}: {allowed}"));
                    }
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    a.uninstall()?;
    wait_namespace_gone(&c, &consoles_a).await?;
    // The other release is untouched by the first one's uninstall.
    Api::<ClusterRole>::all(c.clone())
        .get(&format!("{}-node-agent", fullname(&b.name)))
        .await?;
    Api::<Role>::namespaced(c.clone(), &own.name)
        .get(&format!("{}-node-agent", fullname(&b.name)))
        .await?;
    b.uninstall()?;
    // A console namespace the chart did not create survives the uninstall; its Roles do not.
    let kept = Api::<Namespace>::all(c.clone()).get(&own.name).await?;
    assert!(
        kept.metadata.deletion_timestamp.is_none(),
        "helm uninstall deleted {}, which it did not create",
        own.name
    );
    let roles = Api::<Role>::namespaced(c.clone(), &own.name)
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={name_b}")))
        .await?;
    assert!(
        roles.items.is_empty(),
        "Roles left in {} after helm uninstall",
        own.name
    );
    Ok(())
}

/// One SubjectAccessReview: may `who` do `verb` on `resource` in `namespace` ("" = cluster)?
struct Access {
    who: &'static str,
    verb: &'static str,
    group: &'static str,
    resource: &'static str,
    namespace: Where,
    allowed: bool,
}

#[derive(Clone, Copy)]
enum Where {
    /// The release namespace: ServiceAccounts, Leases, no mirrors.
    Release,
    /// The console namespace: the console password mirrors.
    Consoles,
    /// A namespace of users' desktops not listed in consoles.userNamespaces.
    User,
    /// A namespace of users' desktops listed in consoles.userNamespaces.
    Tenant,
    /// Cluster-wide ("" namespace).
    Cluster,
}

fn access_table() -> Vec<Access> {
    use Where::*;
    let a = |who, verb, group, resource, namespace, allowed| Access {
        who,
        verb,
        group,
        resource,
        namespace,
        allowed,
    };
    let agent = "node-agent";
    let op = "operator";
    let d = "deskvirt.io";
    let coord = "coordination.k8s.io";
    vec![
        // node-agent: Secrets only in the console namespace, and only read; none of the release
        // namespace (where the ServiceAccounts and their token Secrets are).
        a(agent, "get", "", "secrets", Consoles, true),
        a(agent, "list", "", "secrets", Consoles, true),
        a(agent, "watch", "", "secrets", Consoles, true),
        a(agent, "create", "", "secrets", Consoles, false),
        a(agent, "patch", "", "secrets", Consoles, false),
        a(agent, "update", "", "secrets", Consoles, false),
        a(agent, "delete", "", "secrets", Consoles, false),
        a(agent, "get", "", "secrets", Release, false),
        a(agent, "list", "", "secrets", Release, false),
        a(agent, "watch", "", "secrets", Release, false),
        a(agent, "create", "", "secrets", Release, false),
        a(agent, "get", "", "secrets", User, false),
        a(agent, "list", "", "secrets", User, false),
        a(agent, "list", "", "secrets", Cluster, false),
        a(agent, "watch", "", "secrets", Cluster, false),
        // node-agent: desktops (finalizer) and their status, nothing more.
        a(agent, "watch", d, "desktops", Cluster, true),
        a(agent, "patch", d, "desktops", User, true),
        a(agent, "patch", d, "desktops/status", User, true),
        a(agent, "update", d, "desktops", User, false),
        a(agent, "create", d, "desktops", User, false),
        a(agent, "delete", d, "desktops", User, false),
        // node-agent: registers its DomainNode, never deletes one; reads pools.
        a(agent, "create", d, "domainnodes", Cluster, true),
        a(agent, "patch", d, "domainnodes", Cluster, true),
        a(agent, "patch", d, "domainnodes/status", Cluster, true),
        a(agent, "delete", d, "domainnodes", Cluster, false),
        a(agent, "list", d, "resourcepools", Cluster, true),
        a(agent, "patch", d, "resourcepools", Cluster, false),
        a(agent, "patch", d, "resourcepools/status", Cluster, false),
        // node-agent: DesktopImages read only; it reports its copies in its DomainNode, never in
        // an image (or the status the operator alone decides from).
        a(agent, "watch", d, "desktopimages", Cluster, true),
        a(agent, "patch", d, "desktopimages", User, false),
        a(agent, "patch", d, "desktopimages/status", User, false),
        a(agent, "create", d, "desktopimages", User, false),
        a(agent, "delete", d, "desktopimages", User, false),
        // operator: DesktopImages read, patched for its finalizer, their status written; never
        // created or deleted.
        a(op, "watch", d, "desktopimages", Cluster, true),
        a(op, "patch", d, "desktopimages", User, true),
        a(op, "patch", d, "desktopimages/status", User, true),
        a(op, "create", d, "desktopimages", User, false),
        a(op, "delete", d, "desktopimages", User, false),
        a(op, "update", d, "desktopimages", User, false),
        // node-agent: its Node for the owner reference, read only.
        a(agent, "get", "", "nodes", Cluster, true),
        a(agent, "list", "", "nodes", Cluster, false),
        a(agent, "patch", "", "nodes", Cluster, false),
        // node-agent: heartbeat Lease in the release namespace only; reads no one else's.
        a(agent, "create", coord, "leases", Release, true),
        a(agent, "update", coord, "leases", Release, true),
        a(agent, "patch", coord, "leases", Release, true),
        a(agent, "list", coord, "leases", Release, false),
        a(agent, "delete", coord, "leases", Release, false),
        a(agent, "create", coord, "leases", User, false),
        a(agent, "create", coord, "leases", Consoles, false),
        a(agent, "create", "", "events", User, true),
        a(agent, "create", "events.k8s.io", "events", User, true),
        // operator: no Secret right in a tenant namespace the administrator did not list.
        a(op, "create", "", "secrets", User, false),
        a(op, "patch", "", "secrets", User, false),
        a(op, "delete", "", "secrets", User, false),
        a(op, "get", "", "secrets", User, false),
        a(op, "list", "", "secrets", User, false),
        a(op, "watch", "", "secrets", User, false),
        a(op, "update", "", "secrets", User, false),
        a(op, "list", "", "secrets", Cluster, false),
        a(op, "watch", "", "secrets", Cluster, false),
        a(op, "create", "", "secrets", Cluster, false),
        a(op, "patch", "", "secrets", Cluster, false),
        a(op, "delete", "", "secrets", Cluster, false),
        // operator: in a listed tenant namespace, writes the console Secrets, reads none.
        a(op, "create", "", "secrets", Tenant, true),
        a(op, "patch", "", "secrets", Tenant, true),
        a(op, "delete", "", "secrets", Tenant, true),
        a(op, "get", "", "secrets", Tenant, false),
        a(op, "list", "", "secrets", Tenant, false),
        a(op, "watch", "", "secrets", Tenant, false),
        a(op, "update", "", "secrets", Tenant, false),
        a(agent, "get", "", "secrets", Tenant, false),
        a(agent, "patch", "", "secrets", Tenant, false),
        // operator: the mirrors, read and written in the console namespace.
        a(op, "get", "", "secrets", Consoles, true),
        a(op, "list", "", "secrets", Consoles, true),
        a(op, "watch", "", "secrets", Consoles, true),
        a(op, "create", "", "secrets", Consoles, true),
        a(op, "patch", "", "secrets", Consoles, true),
        a(op, "delete", "", "secrets", Consoles, true),
        // operator: no right at all on the Secrets of the release namespace (the
        // ServiceAccounts' token Secrets).
        a(op, "get", "", "secrets", Release, false),
        a(op, "list", "", "secrets", Release, false),
        a(op, "watch", "", "secrets", Release, false),
        a(op, "create", "", "secrets", Release, false),
        a(op, "patch", "", "secrets", Release, false),
        a(op, "delete", "", "secrets", Release, false),
        a(agent, "patch", "", "secrets", Release, false),
        a(agent, "delete", "", "secrets", Release, false),
        // operator: Leases of the release namespace (its leader Lease, the hosts' heartbeats).
        a(op, "watch", coord, "leases", Release, true),
        a(op, "create", coord, "leases", Release, true),
        a(op, "update", coord, "leases", Release, true),
        a(op, "create", coord, "leases", User, false),
        a(op, "create", coord, "leases", Consoles, false),
        a(op, "list", coord, "leases", Cluster, false),
        // operator: status of every kind, never spec.
        a(op, "patch", d, "desktops", User, true),
        a(op, "patch", d, "desktops/status", User, true),
        a(op, "update", d, "desktops", User, false),
        a(op, "create", d, "desktops", User, false),
        // Only the idle policy's Delete action (non-persistent desktops) deletes a Desktop.
        a(op, "delete", d, "desktops", User, true),
        a(op, "patch", d, "domainnodes/status", Cluster, true),
        a(op, "patch", d, "domainnodes", Cluster, false),
        a(op, "create", d, "domainnodes", Cluster, false),
        a(op, "patch", d, "resourcepools/status", Cluster, true),
        a(op, "patch", d, "resourcepools", Cluster, false),
        // operator: migrations' finalizer and status; tenants create and delete them, and so
        // does a host drain (one per running desktop of the host); never an update.
        a(op, "watch", d, "desktopmigrations", Cluster, true),
        a(op, "patch", d, "desktopmigrations", User, true),
        a(op, "patch", d, "desktopmigrations/status", User, true),
        a(op, "create", d, "desktopmigrations", User, true),
        a(op, "delete", d, "desktopmigrations", User, true),
        a(op, "update", d, "desktopmigrations", User, false),
        a(op, "deletecollection", d, "desktopmigrations", User, false),
        // node-agent: learns of a migration from the Desktop and the mirror only.
        // Backups: the operator decides and writes status, makes the schedule's and deletes
        // what retention lets go, never updates one; the agent watches them for a deleted
        // backup's file and removes its finalizer, never writes status, makes or deletes one.
        a(op, "watch", d, "desktopbackups", Cluster, true),
        a(op, "patch", d, "desktopbackups", User, true),
        a(op, "patch", d, "desktopbackups/status", User, true),
        a(op, "create", d, "desktopbackups", User, true),
        a(op, "delete", d, "desktopbackups", User, true),
        a(op, "update", d, "desktopbackups", User, false),
        a(op, "deletecollection", d, "desktopbackups", User, false),
        a(agent, "watch", d, "desktopbackups", Cluster, true),
        a(agent, "patch", d, "desktopbackups", User, true),
        a(agent, "patch", d, "desktopbackups/status", User, false),
        a(agent, "create", d, "desktopbackups", User, false),
        a(agent, "delete", d, "desktopbackups", User, false),
        // Restores: the operator decides and writes status, never makes, updates or deletes
        // one; the agent learns of a restore from its Desktop only.
        a(op, "watch", d, "desktoprestores", Cluster, true),
        a(op, "get", d, "desktoprestores", User, true),
        a(op, "patch", d, "desktoprestores", User, true),
        a(op, "patch", d, "desktoprestores/status", User, true),
        a(op, "create", d, "desktoprestores", User, false),
        a(op, "delete", d, "desktoprestores", User, false),
        a(op, "update", d, "desktoprestores", User, false),
        a(agent, "list", d, "desktoprestores", Cluster, false),
        a(agent, "patch", d, "desktoprestores/status", User, false),
        a(agent, "list", d, "desktopmigrations", Cluster, false),
        a(agent, "patch", d, "desktopmigrations/status", User, false),
        a(op, "get", "", "nodes", Cluster, false),
        // operator: namespace labels (pool access) and quotas (cpu/memory limits), read only.
        a(op, "watch", "", "namespaces", Cluster, true),
        a(op, "patch", "", "namespaces", Cluster, false),
        a(op, "list", "", "resourcequotas", User, true),
        a(op, "watch", "", "resourcequotas", User, true),
        a(op, "patch", "", "resourcequotas", User, false),
        a(op, "create", "", "events", User, true),
        a(op, "patch", "events.k8s.io", "events", User, true),
        a(op, "get", "", "configmaps", Release, false),
        a(op, "create", "", "pods", Release, false),
        a(op, "create", "", "pods", Consoles, false),
        a(op, "create", "", "serviceaccounts", Consoles, false),
        a(agent, "create", "", "pods", Consoles, false),
    ]
}

async fn may(
    c: &Client,
    user: &str,
    ns: &str,
    access: &Access,
    namespace: &str,
) -> anyhow::Result<bool> {
    let (resource, subresource) = match access.resource.split_once('/') {
        Some((r, s)) => (r, s),
        None => (access.resource, ""),
    };
    let review: SubjectAccessReview = serde_json::from_value(json!({
        "spec": {
            "user": user,
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
            "resourceAttributes": {
                "namespace": namespace,
                "verb": access.verb,
                "group": access.group,
                "resource": resource,
                "subresource": subresource,
            },
        },
    }))?;
    let answer = Api::<SubjectAccessReview>::all(c.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

#[tokio::test]
async fn rbac_grants_each_component_only_what_it_needs() -> anyhow::Result<()> {
    let c = client().await?;
    ensure_crds(&c).await?;
    let ns = ScratchNamespace::create("helm-rbac")?;
    let tenant = ScratchNamespace::create("helm-rbac-tenant")?;
    let name = release_name("rbac");
    let values = json!({"consoles": {"userNamespaces": [tenant.name]}});
    let _release = Release::install(&ns.name, &name, &chart_dir(), &values)?;
    let user_ns = format!("{}-users", ns.name);
    let console_ns = consoles(&ns.name);
    let table = access_table();
    let mut wrong = vec![];
    for access in &table {
        let user = format!(
            "system:serviceaccount:{}:{}-{}",
            ns.name,
            fullname(&name),
            access.who
        );
        let namespace = match access.namespace {
            Where::Release => ns.name.as_str(),
            Where::Consoles => console_ns.as_str(),
            Where::User => user_ns.as_str(),
            Where::Tenant => tenant.name.as_str(),
            Where::Cluster => "",
        };
        let allowed = may(&c, &user, &ns.name, access, namespace).await?;
        if allowed != access.allowed {
            wrong.push(format!(
                "{} {} {}/{} in {:?}: {} (want {})",
                access.who,
                access.verb,
                access.group,
                access.resource,
                namespace,
                if allowed { "allowed" } else { "denied" },
                if access.allowed { "allowed" } else { "denied" },
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} checks wrong:\n{}",
        wrong.len(),
        table.len(),
        wrong.join("\n")
    );

    // The chart binds nothing to the `default` ServiceAccount Kubernetes puts into the console
    // namespace (whose token Secret the agents can read there before 1.24).
    let default_sa = format!("system:serviceaccount:{console_ns}:default");
    for verb in ["get", "list", "patch"] {
        let access = Access {
            who: "default",
            verb,
            group: "",
            resource: "secrets",
            namespace: Where::Consoles,
            allowed: false,
        };
        assert!(
            !may(&c, &default_sa, &console_ns, &access, &console_ns).await?,
            "{default_sa} may {verb} Secrets in {console_ns}"
        );
    }

    // Everything else each ServiceAccount may do, against the golden list.
    check_golden_rbac(&ns.name, &name, &console_ns, &tenant.name, &user_ns)?;
    Ok(())
}

/// `kubectl auth can-i --list` of `user` in `namespace`, normalized: one line per rule with
/// single spaces, `replace` pairs (release-specific names to placeholders) applied, sorted,
/// without duplicates; the header first.
fn can_i_list(
    user: &str,
    namespace: &str,
    replace: &[(&str, &str)],
) -> anyhow::Result<Vec<String>> {
    let run = kubectl(
        &[
            "auth",
            "can-i",
            "--list",
            &format!("--as={user}"),
            "-n",
            namespace,
        ],
        None,
    )?;
    if !run.success {
        bail!(
            "kubectl auth can-i --list as {user} in {namespace}: {}",
            run.stderr.trim()
        );
    }
    let mut lines: Vec<String> = run
        .stdout
        .lines()
        .skip(1)
        .map(|l| {
            let mut l = l.split_whitespace().collect::<Vec<_>>().join(" ");
            for (from, to) in replace {
                l = l.replace(from, to);
            }
            l
        })
        .filter(|l| !l.is_empty())
        .collect();
    lines.sort();
    lines.dedup();
    Ok(lines)
}

/// Compares `actual` with the golden file `name` under tests/golden/rbac; with
/// `DESKVIRT_BLESS=1` writes it instead. A difference names every line that came or went.
fn golden(name: &str, actual: &str) -> anyhow::Result<()> {
    let path = repo_root().join("tests/golden/rbac").join(name);
    if std::env::var("DESKVIRT_BLESS").is_ok_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().context("golden path")?)?;
        std::fs::write(&path, actual)?;
        return Ok(());
    }
    let want =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    if want == actual {
        return Ok(());
    }
    // Each rule with the section it is in: a line may stand in several.
    let keyed = |text: &str| -> Vec<String> {
        let mut section = String::new();
        let mut out = vec![];
        for l in text.lines() {
            match l.strip_prefix("## ") {
                Some(h) => section = h.to_string(),
                None => out.push(format!("[{section}] {l}")),
            }
        }
        out
    };
    let (want_lines, have_lines) = (keyed(&want), keyed(actual));
    let mut diff = vec![];
    for l in &want_lines {
        if !have_lines.contains(l) {
            diff.push(format!("- {l}"));
        }
    }
    for l in &have_lines {
        if !want_lines.contains(l) {
            diff.push(format!("+ {l}"));
        }
    }
    bail!(
        "what a ServiceAccount may do changed ({}; - golden, + now):\n{}\n\nIf the change is \
         intended, review it and regenerate with\n  DESKVIRT_BLESS=1 cargo test -p deskvirt-tests \
         --test helm_chart rbac_grants_each_component_only_what_it_needs",
        path.display(),
        if diff.is_empty() {
            "order".to_string()
        } else {
            diff.join("\n")
        }
    )
}

/// The golden list of what each of the chart's ServiceAccounts may do (`kubectl auth can-i
/// --list`, which impersonates it), in the release, console, a listed tenant, an unlisted
/// tenant (which shows the cluster-wide rules only) and kube-system namespace.
fn check_golden_rbac(
    release_ns: &str,
    release: &str,
    console_ns: &str,
    tenant: &str,
    unlisted: &str,
) -> anyhow::Result<()> {
    let full = fullname(release);
    let replace = [
        (full.as_str(), "<fullname>"),
        (console_ns, "<console-ns>"),
        (tenant, "<tenant-ns>"),
        (release_ns, "<release-ns>"),
    ];
    for who in ["operator", "node-agent"] {
        let user = format!("system:serviceaccount:{release_ns}:{full}-{who}");
        let mut out = format!(
            "# What the chart's {who} ServiceAccount may do: `kubectl auth can-i --list` in each\n\
             # namespace, normalized (sorted, release-specific names replaced). Checked by\n\
             # tests/tests/helm_chart.rs; regenerate with DESKVIRT_BLESS=1 (see there).\n"
        );
        for (label, ns) in [
            (
                "cluster-wide rules only (a tenant namespace not listed)",
                unlisted,
            ),
            ("release namespace <release-ns>", release_ns),
            ("console namespace <console-ns>", console_ns),
            (
                "tenant namespace <tenant-ns> (listed in consoles.userNamespaces)",
                tenant,
            ),
            ("kube-system", "kube-system"),
        ] {
            out.push_str(&format!("\n## {label}\n"));
            for line in can_i_list(&user, ns, &replace)? {
                out.push_str(&line);
                out.push('\n');
            }
        }
        golden(&format!("{who}.txt"), &out)?;
    }
    Ok(())
}

/// Waits until the token controller has filled the token Secret in; returns the token.
async fn service_account_token(c: &Client, ns: &str, secret: &str) -> anyhow::Result<String> {
    let api = Api::<Secret>::namespaced(c.clone(), ns);
    for _ in 0..120 {
        if let Some(s) = api.get_opt(secret).await?
            && let Some(token) = s.data.as_ref().and_then(|d| d.get("token"))
        {
            return Ok(String::from_utf8(token.0.clone())?);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!(
        "Secret {ns}/{secret} got no token within 30s: is kube-controller-manager running with the \
         serviceaccount-token controller (scripts/control-plane.sh)?"
    )
}

/// A client for the cluster under test that authenticates with `token` instead of as admin.
async fn client_with_token(token: &str) -> anyhow::Result<Client> {
    let admin = Kubeconfig::read_from(kubeconfig_path()?)?;
    let cluster = admin
        .clusters
        .first()
        .context("the kubeconfig has no cluster")?;
    let doc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": cluster.name, "user": "sa"}}],
        "current-context": "sa",
    });
    let kc: Kubeconfig = serde_json::from_value(doc)?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

fn expect_forbidden<T>(r: Result<T, kube::Error>, what: &str) -> anyhow::Result<()> {
    match r {
        Err(e) if is_forbidden(&e) => Ok(()),
        Err(e) => bail!("{what}: expected 403, got {e}"),
        Ok(_) => bail!("{what}: allowed, must be forbidden"),
    }
}

/// With the chart's own tokens, read, patch and delete a Secret that is not deskvirt's in a
/// tenant namespace not listed, the release namespace (a ServiceAccount token), kube-system
/// and default: every one is refused (403), and the Secret is unchanged. In a listed tenant
/// namespace RBAC lets the operator patch (the residual risk the chart README names); a write
/// guarded by a UID as the operator's are is refused there by the apiserver, and a create
/// finds the name taken.
async fn foreign_secrets_are_out_of_reach(
    admin: &Client,
    operator: &Client,
    agent: &Client,
    release_ns: &str,
    full: &str,
    unlisted: &str,
    tenant: &str,
) -> anyhow::Result<()> {
    // Someone's Secret in each namespace: the tenant's own, a ServiceAccount token, and
    // whatever kube-system and default hold (the token of their `default` ServiceAccount).
    let own: Secret = serde_json::from_value(json!({
        "metadata": {"name": "own-console"},
        "stringData": {"password": "a tenant's own"},
    }))?;
    let pp = PostParams::default();
    for ns in [unlisted, tenant] {
        Api::<Secret>::namespaced(admin.clone(), ns)
            .create(&pp, &own)
            .await?;
    }
    let first_secret = |ns: &'static str| async move {
        let api = Api::<Secret>::namespaced(admin.clone(), ns);
        for _ in 0..120 {
            if let Some(s) = api.list(&ListParams::default().limit(1)).await?.items.pop() {
                return anyhow::Ok(s.metadata.name.unwrap_or_default());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        bail!("no Secret in {ns} within 30s")
    };
    let targets = [
        (unlisted.to_string(), "own-console".to_string()),
        (release_ns.to_string(), format!("{full}-node-agent-token")),
        (
            "kube-system".to_string(),
            first_secret("kube-system").await?,
        ),
        ("default".to_string(), first_secret("default").await?),
    ];
    let patch = Patch::Merge(json!({"stringData": {"password": "overwritten"}}));
    let dp = kube::api::DeleteParams::default();
    for (ns, secret) in &targets {
        let before = Api::<Secret>::namespaced(admin.clone(), ns)
            .get(secret)
            .await?;
        for (who, client) in [("operator", operator), ("node-agent", agent)] {
            let api = Api::<Secret>::namespaced(client.clone(), ns);
            let what = |verb: &str| format!("{who} {verb} Secret {ns}/{secret}");
            expect_forbidden(api.get(secret).await, &what("reading"))?;
            expect_forbidden(
                api.patch(secret, &PatchParams::default(), &patch).await,
                &what("patching"),
            )?;
            expect_forbidden(api.delete(secret, &dp).await, &what("deleting"))?;
        }
        let after = Api::<Secret>::namespaced(admin.clone(), ns)
            .get(secret)
            .await?;
        assert_eq!(
            (before.resource_version(), before.data),
            (after.resource_version(), after.data),
            "{ns}/{secret} changed"
        );
    }

    // A listed tenant namespace: no read, and the operator's guarded writes leave a tenant's
    // Secret alone.
    let api = Api::<Secret>::namespaced(operator.clone(), tenant);
    expect_forbidden(
        api.get("own-console").await,
        "operator reading a tenant's Secret",
    )?;
    match api.create(&pp, &own).await {
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        other => bail!("operator creating over a tenant's Secret: want 409, got {other:?}"),
    }
    let guarded = Patch::Merge(json!({
        "metadata": {"uid": "00000000-0000-0000-0000-000000000000"},
        "stringData": {"password": "overwritten"},
    }));
    match api
        .patch("own-console", &PatchParams::default(), &guarded)
        .await
    {
        Err(kube::Error::Api(s)) if s.code == 422 => {}
        other => bail!("a UID-guarded patch of a tenant's Secret: want 422, got {other:?}"),
    }
    let guarded_delete = kube::api::DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: Some("00000000-0000-0000-0000-000000000000".into()),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete("own-console", &guarded_delete).await {
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        other => bail!("a UID-guarded delete of a tenant's Secret: want 409, got {other:?}"),
    }
    let left = Api::<Secret>::namespaced(admin.clone(), tenant)
        .get("own-console")
        .await?;
    let password = left
        .data
        .as_ref()
        .and_then(|d| d.get("password"))
        .map(|b| b.0.clone());
    assert_eq!(password, Some(b"a tenant's own".to_vec()));
    Ok(())
}

#[tokio::test]
async fn service_account_tokens_carry_exactly_the_chart_rbac() -> anyhow::Result<()> {
    let c = client().await?;
    ensure_crds(&c).await?;
    let ns = ScratchNamespace::create("helm-token")?;
    let users = ScratchNamespace::create("helm-token-users")?;
    let tenant = ScratchNamespace::create("helm-token-tenant")?;
    let name = release_name("tok");
    let full = fullname(&name);
    let _release = Release::install(
        &ns.name,
        &name,
        &chart_dir(),
        &json!({
            "serviceAccountTokens": {"enabled": true},
            "consoles": {"userNamespaces": [tenant.name]},
        }),
    )?;
    let agent = client_with_token(
        &service_account_token(&c, &ns.name, &format!("{full}-node-agent-token")).await?,
    )
    .await?;
    let operator = client_with_token(
        &service_account_token(&c, &ns.name, &format!("{full}-operator-token")).await?,
    )
    .await?;

    // A console password mirror in the console namespace and a user's Secret elsewhere.
    let console_ns = consoles(&ns.name);
    let secret = |name: &str, labels: Value| -> anyhow::Result<Secret> {
        Ok(serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "stringData": {"password": "not-a-real-password"},
        }))?)
    };
    let mirror = format!("console-{}", unique_suffix());
    Api::<Secret>::namespaced(c.clone(), &console_ns)
        .create(
            &PostParams::default(),
            &secret(&mirror, json!({"deskvirt.io/node": "host-1"}))?,
        )
        .await?;
    Api::<Secret>::namespaced(c.clone(), &users.name)
        .create(&PostParams::default(), &secret("private", json!({}))?)
        .await?;
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let lease = |name: &str| -> anyhow::Result<Lease> {
        Ok(serde_json::from_value(
            json!({"metadata": {"name": name}, "spec": {"holderIdentity": name}}),
        )?)
    };

    // node-agent: reads the mirrors of its host, nothing else; heartbeats; registers its host.
    let mirrors = Api::<Secret>::namespaced(agent.clone(), &console_ns);
    mirrors
        .get(&mirror)
        .await
        .context("agent reading a console mirror")?;
    let listed = mirrors
        .list(&ListParams::default().labels("deskvirt.io/node=host-1"))
        .await?;
    assert_eq!(listed.items.len(), 1);
    expect_forbidden(
        Api::<Secret>::namespaced(agent.clone(), &users.name)
            .get("private")
            .await,
        "agent reading a user's Secret",
    )?;
    // The release namespace holds the ServiceAccounts' token Secrets: none is in reach.
    expect_forbidden(
        Api::<Secret>::namespaced(agent.clone(), &ns.name)
            .get(&format!("{full}-operator-token"))
            .await,
        "agent reading the operator's token",
    )?;
    expect_forbidden(
        Api::<Secret>::namespaced(agent.clone(), &ns.name)
            .list(&ListParams::default())
            .await,
        "agent listing the release namespace's Secrets",
    )?;
    expect_forbidden(
        Api::<Secret>::all(agent.clone())
            .list(&ListParams::default())
            .await,
        "agent listing Secrets cluster-wide",
    )?;
    Api::<Lease>::namespaced(agent.clone(), &ns.name)
        .create(&dry, &lease("host-1")?)
        .await
        .context("agent creating its heartbeat Lease")?;
    expect_forbidden(
        Api::<Lease>::namespaced(agent.clone(), &users.name)
            .create(&dry, &lease("host-1")?)
            .await,
        "agent creating a Lease elsewhere",
    )?;
    let node: DomainNode = serde_json::from_value(json!({
        "apiVersion": "deskvirt.io/v1alpha1",
        "kind": "DomainNode",
        "metadata": {"name": format!("helm-token-{}", unique_suffix())},
        "spec": {},
    }))?;
    Api::<DomainNode>::all(agent.clone())
        .create(&dry, &node)
        .await
        .context("agent registering a DomainNode")?;
    expect_forbidden(
        Api::<Node>::all(agent.clone())
            .list(&ListParams::default())
            .await,
        "agent listing Nodes",
    )?;

    // operator: writes a console Secret into a listed tenant namespace, cannot read it back or
    // any other Secret there; reads the mirrors; takes its leader Lease.
    let console: Secret = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "alice-console"},
        "stringData": {"console.vv": "[virt-viewer]\n"},
    }))?;
    let apply = PatchParams {
        dry_run: true,
        ..PatchParams::apply("deskvirt-operator").force()
    };
    Api::<Secret>::namespaced(operator.clone(), &tenant.name)
        .create(&dry, &console)
        .await
        .context("operator creating a console Secret in a listed tenant namespace")?;
    expect_forbidden(
        Api::<Secret>::namespaced(operator.clone(), &users.name)
            .create(&dry, &console)
            .await,
        "operator creating a console Secret in a tenant namespace not listed",
    )?;
    expect_forbidden(
        Api::<Secret>::namespaced(operator.clone(), &users.name)
            .get("private")
            .await,
        "operator reading a user's Secret",
    )?;
    expect_forbidden(
        Api::<Secret>::namespaced(operator.clone(), &users.name)
            .list(&ListParams::default())
            .await,
        "operator listing a user namespace's Secrets",
    )?;
    Api::<Secret>::namespaced(operator.clone(), &console_ns)
        .get(&mirror)
        .await
        .context("operator reading a console mirror")?;
    let new_mirror: Secret = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "console-new", "labels": {"deskvirt.io/node": "host-1"}},
        "stringData": {"password": "not-a-real-password"},
    }))?;
    Api::<Secret>::namespaced(operator.clone(), &console_ns)
        .patch("console-new", &apply, &Patch::Apply(&new_mirror))
        .await
        .context("operator applying a console mirror")?;
    expect_forbidden(
        Api::<Secret>::namespaced(operator.clone(), &ns.name)
            .get(&format!("{full}-node-agent-token"))
            .await,
        "operator reading the agent's token",
    )?;
    expect_forbidden(
        Api::<Secret>::namespaced(operator.clone(), &ns.name)
            .list(&ListParams::default())
            .await,
        "operator listing the release namespace's Secrets",
    )?;
    foreign_secrets_are_out_of_reach(
        &c,
        &operator,
        &agent,
        &ns.name,
        &full,
        &users.name,
        &tenant.name,
    )
    .await?;
    Api::<Lease>::namespaced(operator.clone(), &ns.name)
        .create(&dry, &lease("deskvirt-operator-leader")?)
        .await
        .context("operator creating its leader Lease")?;
    Api::<deskvirt_crds::Desktop>::all(operator.clone())
        .list(&ListParams::default().limit(1))
        .await
        .context("operator listing Desktops")?;

    // What else an agent can read in the console namespace: nothing but the mirror and, before
    // 1.24, the token Secret of the `default` ServiceAccount Kubernetes puts into every
    // namespace. That token carries no permission: not even the mirrors are readable with it.
    let minor = minor_version(&c).await?;
    let mut tokens = vec![];
    for _ in 0..120 {
        tokens = Api::<Secret>::namespaced(agent.clone(), &console_ns)
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|s| s.metadata.name.as_deref() != Some(mirror.as_str()))
            .collect();
        if minor >= 24 || !tokens.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if minor < 24 {
        assert!(
            !tokens.is_empty(),
            "no token Secret of the default ServiceAccount in {console_ns} on 1.{minor}"
        );
    }
    for s in &tokens {
        let what = s.metadata.name.clone().unwrap_or_default();
        assert_eq!(
            s.type_.as_deref(),
            Some("kubernetes.io/service-account-token"),
            "{console_ns} holds {what}, which is neither a mirror nor a token"
        );
        let owner = s
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("kubernetes.io/service-account.name"))
            .map(String::as_str);
        assert_eq!(owner, Some("default"), "{console_ns}/{what}");
        let token = s
            .data
            .as_ref()
            .and_then(|d| d.get("token"))
            .with_context(|| format!("{console_ns}/{what} has no token yet"))?;
        let stolen = client_with_token(&String::from_utf8(token.0.clone())?).await?;
        expect_forbidden(
            Api::<Secret>::namespaced(stolen.clone(), &console_ns)
                .get(&mirror)
                .await,
            "the default ServiceAccount's token reading a mirror",
        )?;
        expect_forbidden(
            Api::<Secret>::all(stolen)
                .list(&ListParams::default())
                .await,
            "the default ServiceAccount's token listing Secrets",
        )?;
    }
    Ok(())
}
