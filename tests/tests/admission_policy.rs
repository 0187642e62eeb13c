//! The chart's ValidatingAdmissionPolicies (Kubernetes >= 1.30), which the 1.20 control plane
//! here cannot run: rendered with `helm template` (as for a 1.30 cluster that serves the API)
//! and their CEL evaluated on sample admission requests with the `cel-interpreter` crate, the
//! way the apiserver does: `matchConstraints` (resource rules, in Rust), then `matchConditions`,
//! `variables` in order (as `variables.<name>`), then every `validations` expression; a false
//! validation denies, an error denies too (`failurePolicy: Fail`).
//!
//! What the CEL library does not cover: Kubernetes' CEL extensions (`authorizer`, `quantity`,
//! the `url`, `ip`, `cidr` and `format` libraries, optional types) are missing, and the policies
//! use none of them; the apiserver's type-check against the OpenAPI schema and its cost limits
//! are not applied. `has()`, `in` on maps and lists, `request.userInfo.extra` (a map of string
//! lists), ternaries and null `oldObject` behave as in Kubernetes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use anyhow::{Context as _, bail};
use cel_interpreter::{Context, Program, Value};
use deskvirt_tests::helm::{chart_dir, template};
use serde_json::{Value as Json, json};

const RELEASE: &str = "rel";
const NAMESPACE: &str = "deskvirt-system";
const AGENT: &str = "system:serviceaccount:deskvirt-system:rel-deskvirt-node-agent";
const OPERATOR: &str = "system:serviceaccount:deskvirt-system:rel-deskvirt-operator";
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";

/// The chart's policies by name, rendered for a 1.30 cluster with both switched on.
fn policies() -> anyhow::Result<BTreeMap<String, Json>> {
    let values = json!({
        "nodeAgent": {"admissionPolicy": {"enabled": true}},
        "operator": {"admissionPolicy": {"enabled": true}},
    });
    let rendered = template(
        &chart_dir(),
        RELEASE,
        NAMESPACE,
        &values,
        &["admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy"],
        "v1.30.0",
    )?;
    let mut out = BTreeMap::new();
    for manifest in rendered.values() {
        for doc in manifest.split("\n---") {
            let Ok(obj) = serde_yaml::from_str::<Json>(doc) else {
                continue;
            };
            if obj["kind"] == "ValidatingAdmissionPolicy" {
                let name = obj["metadata"]["name"].as_str().unwrap_or_default();
                out.insert(name.to_string(), obj);
            }
        }
    }
    Ok(out)
}

/// One write, as the apiserver hands it to admission.
struct Request {
    user: &'static str,
    /// `extra` of the user info (a pod-bound token carries the node name there).
    extra: Json,
    operation: &'static str,
    group: &'static str,
    resource: &'static str,
    sub_resource: &'static str,
    object: Json,
    old_object: Json,
}

#[derive(Debug, PartialEq)]
enum Verdict {
    /// The policy does not judge this request.
    NotMatched,
    Allowed,
    Denied(String),
}

fn cel(v: &Json) -> anyhow::Result<Value> {
    cel_interpreter::to_value(v).map_err(|e| anyhow::anyhow!("to CEL: {e}"))
}

fn eval(expr: &str, ctx: &Context<'_>) -> anyhow::Result<Value> {
    let program = Program::compile(expr).map_err(|e| anyhow::anyhow!("compiling {expr:?}: {e}"))?;
    program
        .execute(ctx)
        .map_err(|e| anyhow::anyhow!("evaluating {expr:?}: {e}"))
}

/// Whether one of the policy's resource rules covers the request.
fn rule_matches(policy: &Json, r: &Request) -> bool {
    let resource = if r.sub_resource.is_empty() {
        r.resource.to_string()
    } else {
        format!("{}/{}", r.resource, r.sub_resource)
    };
    let has = |list: &Json, want: &str| {
        list.as_array()
            .is_some_and(|l| l.iter().any(|v| v == want || v == "*"))
    };
    policy["spec"]["matchConstraints"]["resourceRules"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|rule| {
            has(&rule["apiGroups"], r.group)
                && has(&rule["operations"], r.operation)
                && has(&rule["resources"], &resource)
        })
}

/// The policy's verdict on `r`.
fn judge(policy: &Json, r: &Request) -> anyhow::Result<Verdict> {
    if !rule_matches(policy, r) {
        return Ok(Verdict::NotMatched);
    }
    let request = json!({
        "operation": r.operation,
        "userInfo": {"username": r.user, "extra": r.extra},
        "resource": {"group": r.group, "version": "v1", "resource": r.resource},
        "subResource": r.sub_resource,
        "namespace": r.object["metadata"]["namespace"],
        "name": r.object["metadata"]["name"],
    });
    let mut ctx = Context::default();
    ctx.add_variable_from_value("request", cel(&request)?);
    ctx.add_variable_from_value("object", cel(&r.object)?);
    ctx.add_variable_from_value("oldObject", cel(&r.old_object)?);
    let spec = &policy["spec"];
    for c in spec["matchConditions"].as_array().into_iter().flatten() {
        let expr = c["expression"]
            .as_str()
            .context("matchCondition expression")?;
        if eval(expr, &ctx)? != Value::Bool(true) {
            return Ok(Verdict::NotMatched);
        }
    }
    let mut variables: HashMap<String, Value> = HashMap::new();
    for v in spec["variables"].as_array().into_iter().flatten() {
        let name = v["name"].as_str().context("variable name")?;
        let expr = v["expression"].as_str().context("variable expression")?;
        let value = eval(expr, &ctx)?;
        variables.insert(name.to_string(), value);
        ctx.add_variable_from_value("variables", variables.clone());
    }
    for v in spec["validations"].as_array().into_iter().flatten() {
        let expr = v["expression"].as_str().context("validation expression")?;
        // failurePolicy: Fail — an error denies as a false does.
        let ok = matches!(eval(expr, &ctx), Ok(Value::Bool(true)));
        if !ok {
            let message = match v["messageExpression"].as_str() {
                Some(m) => match eval(m, &ctx)? {
                    Value::String(s) => Arc::unwrap_or_clone(s),
                    other => bail!("messageExpression gave {other:?}"),
                },
                None => v["message"].as_str().unwrap_or_default().to_string(),
            };
            return Ok(Verdict::Denied(message));
        }
    }
    Ok(Verdict::Allowed)
}

fn node_token(node: &str) -> Json {
    json!({ NODE_NAME: [node], "authentication.kubernetes.io/pod-name": ["agent-x"] })
}

fn desktop(label: Option<&str>, bound: Option<&str>) -> Json {
    let mut d = json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "Desktop",
        "metadata": {"name": "d", "namespace": "team", "labels": {"deskvirt.io/pool": "lab"}},
        "spec": {"pool": "lab"},
    });
    if let Some(l) = label {
        d["metadata"]["labels"]["deskvirt.io/node"] = json!(l);
    }
    if let Some(n) = bound {
        d["status"] = json!({"node": n, "phase": "Running"});
    }
    d
}

/// A desktop bound to `node`, with the operator's fields `fields` merged into its status.
fn bound_with(node: &str, fields: Json) -> Json {
    let mut d = desktop(Some(node), Some(node));
    if let (Some(status), Some(fields)) = (d["status"].as_object_mut(), fields.as_object()) {
        status.extend(fields.clone());
    }
    d
}

/// The operator's part of a bound desktop's status.
fn operator_fields() -> Json {
    json!({
        "allocation": {"pool": "lab", "cpu": 2, "memory": "4Gi"},
        "mac": "52:54:00:aa:bb:cc",
        "spice": {"port": 5901, "passwordSecret": "d-console"},
        "reclaimed": {"action": "Suspend", "at": "2026-12-03T10:00:00Z"},
    })
}

fn named(kind: &str, name: &str) -> Json {
    json!({"kind": kind, "metadata": {"name": name, "namespace": NAMESPACE}})
}

/// An agent's write of `resource` with `object` over `old` (Null for a create).
fn agent(
    node: &str,
    resource: &'static str,
    sub: &'static str,
    object: Json,
    old: Json,
) -> Request {
    let group = if resource == "leases" {
        "coordination.k8s.io"
    } else {
        "deskvirt.io"
    };
    Request {
        user: AGENT,
        extra: node_token(node),
        operation: if old.is_null() { "CREATE" } else { "UPDATE" },
        group,
        resource,
        sub_resource: sub,
        object,
        old_object: old,
    }
}

#[test]
fn an_agent_writes_only_its_own_hosts_objects_and_desktops_the_operator_bound_there()
-> anyhow::Result<()> {
    let all = policies()?;
    let policy = all
        .get("rel-deskvirt-node-agent-own-host")
        .with_context(|| format!("no node-agent policy among {:?}", all.keys()))?;
    let null = Json::Null;
    let allowed = [
        (
            "register its DomainNode",
            agent(
                "a",
                "domainnodes",
                "",
                named("DomainNode", "a"),
                null.clone(),
            ),
        ),
        (
            "report its DomainNode's status",
            agent(
                "a",
                "domainnodes",
                "status",
                named("DomainNode", "a"),
                named("DomainNode", "a"),
            ),
        ),
        (
            "renew its heartbeat Lease",
            agent("a", "leases", "", named("Lease", "a"), named("Lease", "a")),
        ),
        (
            "report a desktop bound to it",
            agent(
                "a",
                "desktops",
                "status",
                desktop(Some("a"), Some("a")),
                desktop(Some("a"), Some("a")),
            ),
        ),
        (
            "report its own fields beside the operator's, leaving those as they were",
            agent(
                "a",
                "desktops",
                "status",
                {
                    let mut d = bound_with("a", operator_fields());
                    d["status"]["runningSize"] = json!({"cpu": 2, "memory": "4Gi"});
                    d["status"]["spice"]["host"] = json!("192.0.2.10");
                    d["status"]["ip"] = json!("10.200.0.5");
                    d
                },
                bound_with("a", operator_fields()),
            ),
        ),
        (
            "add its finalizer to a desktop bound to it (label hashed or missing)",
            agent(
                "a",
                "desktops",
                "",
                desktop(Some("h-1f2e3d"), Some("a")),
                desktop(None, Some("a")),
            ),
        ),
    ];
    let denied = [
        (
            "write another host's DomainNode",
            agent(
                "a",
                "domainnodes",
                "status",
                named("DomainNode", "b"),
                named("DomainNode", "b"),
            ),
            "own node a, not b",
        ),
        (
            "create another host's Lease",
            agent("a", "leases", "", named("Lease", "b"), null.clone()),
            "own node a, not b",
        ),
        (
            "write a desktop bound to another host",
            agent(
                "a",
                "desktops",
                "status",
                desktop(Some("b"), Some("b")),
                desktop(Some("b"), Some("b")),
            ),
            "bound to its own node a",
        ),
        (
            "write a desktop whose label a tenant forged",
            agent(
                "a",
                "desktops",
                "",
                desktop(Some("a"), Some("b")),
                desktop(Some("a"), Some("b")),
            ),
            "bound to its own node a",
        ),
        (
            "write an unbound desktop labelled for it",
            agent(
                "a",
                "desktops",
                "",
                desktop(Some("a"), None),
                desktop(Some("a"), None),
            ),
            "bound to its own node a",
        ),
        (
            "rebind a desktop to another host",
            agent(
                "a",
                "desktops",
                "status",
                desktop(Some("a"), Some("b")),
                desktop(Some("a"), Some("a")),
            ),
            "bound to its own node a",
        ),
    ];
    for (what, r) in allowed {
        assert_eq!(judge(policy, &r)?, Verdict::Allowed, "an agent may {what}");
    }

    // The operator's fields of a desktop bound to the agent's own host: changed, dropped or
    // added, each is refused and named.
    let forged: [(&str, Json); 11] = [
        (
            "allocation",
            json!({"pool": "lab", "cpu": 1, "memory": "1Gi"}),
        ),
        ("mac", json!("52:54:00:00:00:01")),
        ("spice.port", json!(5902)),
        ("spice.passwordSecret", json!("other-console")),
        ("reclaimed", Json::Null),
        ("wake", json!({"token": "x", "at": "2026-12-03T10:00:00Z"})),
        (
            "lastMove",
            json!({"from": "b", "to": "a", "at": "2026-12-03T10:00:00Z"}),
        ),
        (
            "backup",
            json!({"name": "b", "uid": "u", "type": "Full",
                   "location": "/srv/backups/ns/d/u.qcow2", "at": "2026-12-03T10:00:00Z"}),
        ),
        (
            "restore",
            json!({"backup": "b", "uid": "u", "layers": [{"name": "b",
                   "location": "/srv/backups/other/d/u.qcow2", "checksum": "sha256:00"}]}),
        ),
        // A host that forged a restore could replace a desktop's disk with any file.
        (
            "restoreOver",
            json!({"name": "r", "uid": "r1", "at": "2026-12-03T10:00:00Z",
                   "chain": {"backup": "b", "uid": "u", "layers": [{"name": "b",
                   "location": "/srv/backups/other/d/u.qcow2", "checksum": "sha256:00"}]}}),
        ),
        // A host that forged the pin could clone the disk from another image's file.
        (
            "image",
            json!({"image": "deskvirt-images/other", "uid": "0f", "version": 1,
                   "file": "managed/0f/v1.qcow2", "sha256": "0".repeat(64)}),
        ),
    ];
    for (path, value) in forged {
        let mut after = bound_with("a", operator_fields());
        let (parent, field) = match path.split_once('.') {
            Some((p, f)) => (&mut after["status"][p], f),
            None => (&mut after["status"], path),
        };
        match (parent.as_object_mut(), value.is_null()) {
            (Some(p), true) => {
                p.remove(field);
            }
            (Some(p), false) => {
                p.insert(field.to_string(), value);
            }
            (None, _) => panic!("no parent for {path}"),
        }
        let r = agent(
            "a",
            "desktops",
            "status",
            after,
            bound_with("a", operator_fields()),
        );
        match judge(policy, &r)? {
            Verdict::Denied(m) => assert!(
                m.contains(&format!("status.{path}")) && m.contains("only the operator"),
                "{path}: {m}"
            ),
            other => panic!("an agent may not change status.{path}: {other:?}"),
        }
    }
    // Nor may it set one the operator has not (an allocation on a desktop without one).
    let r = agent(
        "a",
        "desktops",
        "status",
        bound_with(
            "a",
            json!({"allocation": {"pool": "lab", "cpu": 1, "memory": "1Gi"}}),
        ),
        bound_with("a", json!({})),
    );
    assert!(
        matches!(judge(policy, &r)?, Verdict::Denied(m) if m.contains("status.allocation")),
        "an agent may not set an allocation"
    );
    for (what, r, says) in denied {
        match judge(policy, &r)? {
            Verdict::Denied(m) => assert!(m.contains(says), "{what}: {m}"),
            other => panic!("an agent may not {what}: {other:?}"),
        }
    }

    // A host's admin flags and the operator's fields of its DomainNode: the agent registers
    // with the schema's defaults and reports beside them, and changes none of them.
    let node = |spec: Json, status: Json| json!({"kind": "DomainNode", "metadata": {"name": "a"}, "spec": spec, "status": status});
    let defaults = json!({"unschedulable": false, "maintenance": false, "drain": false});
    let drained = json!({"unschedulable": false, "maintenance": false, "drain": true});
    let ours = json!({"pool": "lab", "subnet": "10.200.1.0/24",
        "drain": {"remaining": 2, "migrating": 1, "migrated": 1}});
    let registers = agent(
        "a",
        "domainnodes",
        "",
        node(defaults.clone(), json!({})),
        Json::Null,
    );
    assert_eq!(judge(policy, &registers)?, Verdict::Allowed, "register");
    let reports = agent(
        "a",
        "domainnodes",
        "status",
        node(drained.clone(), {
            let mut st = ours.clone();
            st["hypervisor"] = json!("qemu");
            st
        }),
        node(drained.clone(), ours.clone()),
    );
    assert_eq!(
        judge(policy, &reports)?,
        Verdict::Allowed,
        "report while drained"
    );
    let refused = [
        (
            "drain itself at registration",
            node(drained.clone(), json!({})),
            Json::Null,
            "DomainNode's spec",
        ),
        (
            "clear a drain an admin set",
            node(defaults.clone(), json!({})),
            node(drained.clone(), json!({})),
            "DomainNode's spec",
        ),
        (
            "report itself drained",
            node(drained.clone(), {
                let mut st = ours.clone();
                st["drain"]["remaining"] = json!(0);
                st
            }),
            node(drained.clone(), ours.clone()),
            "status.drain",
        ),
        (
            "move itself to another pool",
            node(defaults.clone(), json!({"pool": "other"})),
            node(defaults.clone(), json!({"pool": "lab"})),
            "status.pool",
        ),
        (
            "ask itself for a disk under another desktop's name",
            node(defaults.clone(), {
                let mut st = ours.clone();
                st["incoming"] = json!([{"migration": "m1", "desktop": "team/other",
                    "desktopUid": "u2", "file": "other.qcow2", "image": "base.qcow2",
                    "clone": "Linked"}]);
                st
            }),
            node(defaults.clone(), ours.clone()),
            "status.incoming",
        ),
    ];
    // The operator's conditions of the host stay as they were; its own is the agent's.
    let cond = |t: &str, status: &str| {
        json!({"type": t, "status": status, "reason": "R", "message": "m",
               "lastTransitionTime": "2026-12-07T00:00:00Z"})
    };
    let with_conditions = |list: Vec<Json>| {
        let mut st = ours.clone();
        st["conditions"] = json!(list);
        node(drained.clone(), st)
    };
    let before = with_conditions(vec![
        cond("LibvirtConnected", "True"),
        cond("Ready", "True"),
        cond("Drained", "False"),
    ]);
    let own = agent(
        "a",
        "domainnodes",
        "status",
        with_conditions(vec![
            cond("LibvirtConnected", "False"),
            cond("Ready", "True"),
            cond("Drained", "False"),
        ]),
        before.clone(),
    );
    assert_eq!(
        judge(policy, &own)?,
        Verdict::Allowed,
        "report its own condition"
    );
    for (what, forged) in [
        (
            "report itself Drained",
            vec![
                cond("LibvirtConnected", "True"),
                cond("Ready", "True"),
                cond("Drained", "True"),
            ],
        ),
        (
            "drop its Ready condition",
            vec![cond("LibvirtConnected", "True"), cond("Drained", "False")],
        ),
    ] {
        let r = agent(
            "a",
            "domainnodes",
            "status",
            with_conditions(forged),
            before.clone(),
        );
        match judge(policy, &r)? {
            Verdict::Denied(m) => assert!(m.contains("Drained condition"), "{what}: {m}"),
            other => panic!("an agent may not {what}: {other:?}"),
        }
    }
    // Its own answers to the disks asked of it are the agent's to write.
    let asked = {
        let mut st = ours.clone();
        st["incoming"] = json!([{"migration": "m1", "desktop": "team/d", "desktopUid": "u1",
            "file": "d.qcow2", "image": "base.qcow2", "clone": "Linked"}]);
        st
    };
    let answers = agent(
        "a",
        "domainnodes",
        "status",
        node(defaults.clone(), {
            let mut st = asked.clone();
            st["prepared"] = json!([{"migration": "m1", "ready": true}]);
            st
        }),
        node(defaults.clone(), asked.clone()),
    );
    assert_eq!(
        judge(policy, &answers)?,
        Verdict::Allowed,
        "answer the disks asked of it"
    );
    for (what, object, old, says) in refused {
        let r = agent("a", "domainnodes", "", object, old);
        match judge(policy, &r)? {
            Verdict::Denied(m) => assert!(m.contains(says), "{what}: {m}"),
            other => panic!("an agent may not {what}: {other:?}"),
        }
    }

    // A deleted backup's file finalizer: only the host that wrote it, only that finalizer.
    let backup = |node: &str, deleting: bool, fins: &[&str]| {
        let mut b = json!({
            "apiVersion": "deskvirt.io/v1alpha1", "kind": "DesktopBackup",
            "metadata": {"name": "b", "namespace": "team", "finalizers": fins},
            "spec": {"desktop": "d"},
            "status": {"node": node, "phase": "Succeeded"},
        });
        if deleting {
            b["metadata"]["deletionTimestamp"] = json!("2026-12-07T00:00:00Z");
        }
        b
    };
    let file = "deskvirt.io/backup-file";
    let r = agent(
        "a",
        "desktopbackups",
        "",
        backup("a", true, &[]),
        backup("a", true, &[file]),
    );
    assert_eq!(
        judge(policy, &r)?,
        Verdict::Allowed,
        "remove its own file finalizer"
    );
    let mut respec = backup("a", true, &[]);
    respec["spec"]["desktop"] = json!("other");
    for (what, object, old) in [
        (
            "remove another host's backup's finalizer",
            backup("b", true, &[]),
            backup("b", true, &[file]),
        ),
        (
            "remove the finalizer of a backup not deleted",
            backup("a", false, &[]),
            backup("a", false, &[file]),
        ),
        (
            "remove the operator's finalizer",
            backup("a", true, &[file]),
            backup("a", true, &["deskvirt.io/operator", file]),
        ),
        (
            "remove its finalizer before the operator let go",
            backup("a", true, &["deskvirt.io/operator"]),
            backup("a", true, &["deskvirt.io/operator", file]),
        ),
        ("change a backup's spec", respec, backup("a", true, &[file])),
        ("create a backup", backup("a", false, &[]), Json::Null),
    ] {
        match judge(policy, &agent("a", "desktopbackups", "", object, old))? {
            Verdict::Denied(m) => assert!(m.contains("backup-file"), "{what}: {m}"),
            other => panic!("an agent may not {what}: {other:?}"),
        }
    }

    // A long-lived token names no node: every write is refused.
    let mut r = agent("a", "leases", "", named("Lease", "a"), named("Lease", "a"));
    r.extra = json!({});
    match judge(policy, &r)? {
        Verdict::Denied(m) => assert!(m.contains("names no node"), "{m}"),
        other => panic!("a token without a node name: {other:?}"),
    }

    // The operator, admins and tenants are not judged by it; nor are Events.
    for user in [OPERATOR, "admin", "system:serviceaccount:team:default"] {
        let mut r = agent(
            "a",
            "desktops",
            "status",
            desktop(None, Some("b")),
            desktop(None, Some("a")),
        );
        r.user = user;
        r.extra = json!({});
        assert_eq!(judge(policy, &r)?, Verdict::NotMatched, "{user}");
    }
    let mut r = agent("a", "events", "", named("Event", "x"), Json::Null);
    r.group = "";
    assert_eq!(judge(policy, &r)?, Verdict::NotMatched, "events");
    Ok(())
}

fn secret(name: &str, managed_by: Option<&str>) -> Json {
    let mut s = json!({"kind": "Secret", "metadata": {"name": name, "namespace": "team"}});
    if let Some(m) = managed_by {
        s["metadata"]["labels"] = json!({"app.kubernetes.io/managed-by": m});
    }
    s
}

fn secret_write(user: &'static str, operation: &'static str, object: Json, old: Json) -> Request {
    Request {
        user,
        extra: json!({}),
        operation,
        group: "",
        resource: "secrets",
        sub_resource: "",
        object,
        old_object: old,
    }
}

#[test]
fn the_operator_writes_only_secrets_labelled_as_deskvirts() -> anyhow::Result<()> {
    let all = policies()?;
    let policy = all
        .get("rel-deskvirt-operator-own-secrets")
        .with_context(|| format!("no operator policy among {:?}", all.keys()))?;
    let ours = || secret("d-console", Some("deskvirt-operator"));
    let theirs = || secret("d-console", None);
    let null = Json::Null;
    let allowed = [
        (
            "create a console Secret",
            secret_write(OPERATOR, "CREATE", ours(), null.clone()),
        ),
        (
            "rewrite its own",
            secret_write(OPERATOR, "UPDATE", ours(), ours()),
        ),
        (
            "delete its own",
            secret_write(OPERATOR, "DELETE", null.clone(), ours()),
        ),
    ];
    let denied = [
        (
            "create an unlabelled Secret",
            secret_write(OPERATOR, "CREATE", theirs(), null.clone()),
        ),
        // A patch that adds the label still finds the Secret unlabelled before the write.
        (
            "take over a tenant's Secret",
            secret_write(OPERATOR, "UPDATE", ours(), theirs()),
        ),
        (
            "patch a tenant's Secret",
            secret_write(OPERATOR, "UPDATE", theirs(), theirs()),
        ),
        (
            "remove the label from its own",
            secret_write(OPERATOR, "UPDATE", theirs(), ours()),
        ),
        (
            "delete a tenant's Secret",
            secret_write(OPERATOR, "DELETE", null.clone(), theirs()),
        ),
        (
            "patch a Secret labelled by someone else",
            secret_write(
                OPERATOR,
                "UPDATE",
                secret("x", Some("Helm")),
                secret("x", Some("Helm")),
            ),
        ),
    ];
    for (what, r) in allowed {
        assert_eq!(
            judge(policy, &r)?,
            Verdict::Allowed,
            "the operator may {what}"
        );
    }
    for (what, r) in denied {
        match judge(policy, &r)? {
            Verdict::Denied(m) => {
                assert!(m.contains("managed-by=deskvirt-operator"), "{what}: {m}")
            }
            other => panic!("the operator may not {what}: {other:?}"),
        }
    }
    // Everyone else is not judged by it.
    for user in [AGENT, "admin", "system:serviceaccount:team:default"] {
        let r = secret_write(user, "UPDATE", theirs(), theirs());
        assert_eq!(judge(policy, &r)?, Verdict::NotMatched, "{user}");
    }
    Ok(())
}

#[test]
fn the_cel_library_handles_what_the_policies_use() -> anyhow::Result<()> {
    // `in` on a map tests its keys; `has()` a field; a null oldObject short-circuits.
    let mut ctx = Context::default();
    ctx.add_variable_from_value("m", cel(&json!({"a/b": ["x"]}))?);
    ctx.add_variable_from_value("o", cel(&json!({"status": {"node": "n"}}))?);
    ctx.add_variable_from_value("oldObject", Value::Null);
    for (expr, want) in [
        ("'a/b' in m", true),
        ("'x' in m", false),
        ("m['a/b'][0] == 'x'", true),
        ("has(o.status) && has(o.status.node)", true),
        ("has(o.spec)", false),
        ("oldObject != null && has(oldObject.status)", false),
        ("'leases' in ['domainnodes', 'leases']", true),
    ] {
        assert_eq!(eval(expr, &ctx)?, Value::Bool(want), "{expr}");
    }
    Ok(())
}
