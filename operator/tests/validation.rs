//! The validation table, derived from the CRD schema: every field of a ResourcePool's and a
//! Desktop's spec (each leaf, and each list) has a case here, and a field without one fails
//! [`every_spec_field_has_a_case`] by name. A case is a value the real API server refuses (a
//! server-side dry run, so nothing is stored), a value it accepts but the operator's validation
//! refuses naming that field, or an explicit "any value is valid" with why. Status fields are
//! left out: only the operator and the agent may write them. Then the same refusals through the
//! running operator, as the conditions a user reads.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{Run, Setup, cond, desktop_conditions, node_of, wait_for, wait_refused};
use deskvirt_crds::validation::{self, FieldError};
use deskvirt_crds::{Desktop, DesktopSpec, ResourcePool, ResourcePoolSpec};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    JSONSchemaProps, JSONSchemaPropsOrArray,
};
use kube::Api;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

/// How one field is shown to be checked.
enum Case {
    /// The API server refuses this spec (merged onto a valid one), naming the field.
    Schema(Value),
    /// The API server accepts this spec, and the validation names the field. For a Desktop,
    /// the second value is its pool's spec.
    Condition(Value, Value),
    /// Every value the schema lets through is valid, for this reason.
    Any(&'static str),
}

use Case::{Any, Condition, Schema};

fn cond_(spec: Value) -> Case {
    Condition(spec, json!({}))
}

/// Every case of a ResourcePool's spec, by field path.
fn pool_cases() -> Table {
    let usb = |list: &str, v: Value| json!({"defaults": {"usb": {list: v}}});
    let mut t = owned(vec![
        (
            "spec.nodeSelector",
            vec![cond_(json!({"nodeSelector": {"bad key!": "x"}}))],
        ),
        (
            "spec.namespaceSelector.matchLabels",
            vec![cond_(
                json!({"namespaceSelector": {"matchLabels": {"tier": "not a value"}}}),
            )],
        ),
        (
            "spec.namespaceSelector.matchExpressions",
            vec![Any(
                "a list of requirements, each checked by its own fields; empty selects every namespace",
            )],
        ),
        (
            "spec.namespaceSelector.matchExpressions[].key",
            vec![
                Schema(
                    json!({"namespaceSelector": {"matchExpressions": [{"operator": "Exists"}]}}),
                ),
                cond_(
                    json!({"namespaceSelector": {"matchExpressions": [{"key": "a b", "operator": "Exists"}]}}),
                ),
            ],
        ),
        (
            "spec.namespaceSelector.matchExpressions[].operator",
            vec![cond_(
                json!({"namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}}),
            )],
        ),
        (
            "spec.namespaceSelector.matchExpressions[].values",
            vec![cond_(
                json!({"namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "In", "values": []}]}}),
            )],
        ),
        (
            "spec.storage.imageDir",
            vec![
                Schema(json!({"storage": {"imageDir": "/srv/../etc"}})),
                Schema(json!({"storage": {"imageDir": "relative/images"}})),
            ],
        ),
        (
            "spec.storage.diskDir",
            vec![
                Schema(json!({"storage": {"diskDir": "/srv//disks"}})),
                Schema(json!({"storage": {"diskDir": "/"}})),
                cond_(json!({"storage": {"imageDir": "/srv/vm", "diskDir": "/srv/vm/disks"}})),
                cond_(json!({"storage": {"imageDir": "/srv/vm/images", "diskDir": "/srv/vm"}})),
            ],
        ),
        (
            "spec.backup.dir",
            vec![
                Schema(json!({"backup": {"dir": "relative/backups"}})),
                Schema(json!({"backup": {}})),
                cond_(
                    json!({"storage": {"diskDir": "/srv/vm/disks"}, "backup": {"dir": "/srv/vm/disks/b"}}),
                ),
                cond_(
                    json!({"storage": {"imageDir": "/srv/i", "diskDir": "/srv/d"}, "backup": {"dir": "/srv"}}),
                ),
            ],
        ),
        (
            "spec.backup.schedule",
            vec![
                Schema(json!({"backup": {"dir": "/srv/b", "schedule": ""}})),
                cond_(json!({"backup": {"dir": "/srv/b", "schedule": "61 * * * *"}})),
                cond_(json!({"backup": {"dir": "/srv/b", "schedule": "* * *"}})),
            ],
        ),
        (
            "spec.backup.keep",
            vec![Schema(json!({"backup": {"dir": "/srv/b", "keep": 0}}))],
        ),
        (
            "spec.backup.maxAge",
            vec![
                Schema(json!({"backup": {"dir": "/srv/b", "maxAge": "1w"}})),
                cond_(json!({"backup": {"dir": "/srv/b", "maxAge": "0d"}})),
            ],
        ),
        (
            "spec.backup.maxChain",
            vec![
                Schema(json!({"backup": {"dir": "/srv/b", "maxChain": 0}})),
                Schema(json!({"backup": {"dir": "/srv/b", "maxChain": 1001}})),
            ],
        ),
        (
            "spec.storage.shared",
            vec![Any(
                "either is valid; failover that needs it is checked at spec.failover.restartElsewhere",
            )],
        ),
        (
            "spec.migration.bandwidthMiBPerSecond",
            vec![
                Schema(json!({"migration": {"bandwidthMiBPerSecond": 0}})),
                Schema(json!({"migration": {"bandwidthMiBPerSecond": 100001}})),
            ],
        ),
        (
            "spec.migration.completionTimeout",
            vec![
                Schema(json!({"migration": {"completionTimeout": "5 minutes"}})),
                Schema(json!({"migration": {"completionTimeout": "-1s"}})),
            ],
        ),
        (
            "spec.cpu.model",
            vec![
                Schema(json!({"cpu": {"model": "Sky lake"}})),
                Schema(json!({"cpu": {"model": "x".repeat(65)}})),
                cond_(json!({"cpu": {"model": "host-passthrough"}})),
                cond_(json!({"cpu": {"model": "host-model"}})),
            ],
        ),
        (
            "spec.migration.autoConverge",
            vec![Any(
                "either is valid: QEMU throttles the guest's vCPUs, or not",
            )],
        ),
        (
            "spec.migration.postCopy",
            vec![Any(
                "either is valid: post-copy at the completion timeout, or an abort",
            )],
        ),
        (
            "spec.network.mode",
            vec![Schema(json!({"network": {"mode": "overlay"}}))],
        ),
        (
            "spec.network.bridge",
            vec![
                Schema(json!({"network": {"mode": "bridge", "bridge": "br 0"}})),
                cond_(json!({"network": {"mode": "bridge"}})),
                cond_(json!({"network": {"mode": "bridge", "bridge": ".."}})),
            ],
        ),
        (
            "spec.network.cidr",
            vec![
                Schema(json!({"network": {"cidr": "10.0.0/16"}})),
                cond_(json!({"network": {"cidr": "10.0.0.1/16"}})),
            ],
        ),
        (
            "spec.network.nodePrefixLength",
            vec![
                Schema(json!({"network": {"nodePrefixLength": 31}})),
                cond_(json!({"network": {"cidr": "10.0.0.0/24", "nodePrefixLength": 16}})),
            ],
        ),
        (
            "spec.network.macPrefix",
            vec![Schema(json!({"network": {"macPrefix": "53:54:00"}}))],
        ),
        (
            "spec.display.spicePorts.first",
            vec![Schema(
                json!({"display": {"spicePorts": {"first": 80, "last": 6000}}}),
            )],
        ),
        (
            "spec.display.spicePorts.last",
            vec![
                Schema(json!({"display": {"spicePorts": {"first": 5900, "last": 70000}}})),
                cond_(json!({"display": {"spicePorts": {"first": 6000, "last": 5999}}})),
            ],
        ),
        (
            "spec.display.listen",
            vec![Schema(json!({"display": {"listen": "Everywhere"}}))],
        ),
        ("spec.display.tls", vec![Any("either is valid")]),
        (
            "spec.overcommit.cpu",
            vec![Schema(json!({"overcommit": {"cpu": 0.5}}))],
        ),
        (
            "spec.overcommit.memory",
            vec![Schema(json!({"overcommit": {"memory": 8}}))],
        ),
        (
            "spec.reserved.cpu",
            vec![Schema(json!({"reserved": {"cpu": 5000}}))],
        ),
        (
            "spec.reserved.memory",
            vec![
                Schema(json!({"reserved": {"memory": "1GB"}})),
                cond_(json!({"reserved": {"memory": "99999999Ei"}})),
            ],
        ),
        ("spec.ksm", vec![Any("either is valid")]),
        (
            "spec.placement",
            vec![Schema(json!({"placement": "Random"}))],
        ),
        (
            "spec.referenceSize.cpu",
            vec![Schema(json!({"referenceSize": {"cpu": 0}}))],
        ),
        (
            "spec.referenceSize.memory",
            vec![
                Schema(json!({"referenceSize": {"memory": "4 Gi"}})),
                cond_(json!({"referenceSize": {"memory": "0"}})),
            ],
        ),
        (
            "spec.failover.restartElsewhere",
            vec![cond_(json!({"failover": {"restartElsewhere": true}}))],
        ),
        (
            "spec.failover.after",
            vec![
                Schema(json!({"failover": {"after": "1w"}})),
                cond_(json!({"failover": {"after": "0s"}})),
            ],
        ),
        (
            "spec.orphans.action",
            vec![Schema(json!({"orphans": {"action": "Delete"}}))],
        ),
        (
            "spec.orphans.after",
            vec![
                Schema(json!({"orphans": {"after": "1w"}})),
                cond_(json!({"orphans": {"after": "0s"}})),
            ],
        ),
        (
            "spec.defaults.idle.timeout",
            vec![
                Schema(json!({"defaults": {"idle": {"timeout": "30 minutes"}}})),
                cond_(json!({"defaults": {"idle": {"timeout": "0m"}}})),
            ],
        ),
        (
            "spec.defaults.idle.action",
            vec![Schema(
                json!({"defaults": {"idle": {"timeout": "5m", "action": "Explode"}}}),
            )],
        ),
        (
            "spec.defaults.idle.connectedIsActive",
            vec![Any("either is valid")],
        ),
        (
            "spec.defaults.usb.redirect",
            vec![Any(
                "the pool's own policy; desktops are checked against it at spec.display.usb",
            )],
        ),
        (
            "spec.defaults.usb.channels",
            vec![Schema(json!({"defaults": {"usb": {"channels": 9}}}))],
        ),
    ]);
    for list in ["allow", "deny"] {
        t.extend(filter_cases("spec.defaults.usb", list, |v| usb(list, v)));
    }
    t
}

/// Every case of a Desktop's spec, by field path.
fn desktop_cases() -> Table {
    let usb_pool = |usb: Value| json!({"defaults": {"usb": usb}});
    let usb = |list: &str, v: Value| json!({"display": {"usb": {list: v}}});
    let mut t = owned(vec![
        ("spec.pool", vec![Schema(json!({"pool": "Bad_Pool"}))]),
        (
            "spec.user",
            vec![
                Schema(json!({"user": "u".repeat(254)})),
                Any("free text shown in `kubectl get`; it names no object and reaches no host"),
            ],
        ),
        ("spec.cpu", vec![Schema(json!({"cpu": 0}))]),
        (
            "spec.memory",
            vec![
                Schema(json!({"memory": "2GB"})),
                cond_(json!({"memory": "0"})),
            ],
        ),
        (
            "spec.disk.image",
            vec![
                Schema(json!({"disk": {"image": "../etc/shadow"}})),
                Schema(json!({"disk": {"image": "/var/lib/deskvirt/disks/other.qcow2"}})),
            ],
        ),
        (
            "spec.disk.imageRef.name",
            vec![
                Schema(json!({"disk": {"imageRef": {"name": "../lab"}}})),
                Schema(json!({"disk": {"imageRef": {"name": ""}}})),
            ],
        ),
        (
            "spec.disk.imageRef.namespace",
            vec![Schema(
                json!({"disk": {"imageRef": {"name": "lab", "namespace": "Not_A_Namespace"}}}),
            )],
        ),
        (
            "spec.disk.size",
            vec![
                Schema(json!({"disk": {"image": "b.qcow2", "size": "10 G"}})),
                cond_(json!({"disk": {"image": "b.qcow2", "size": "0"}})),
            ],
        ),
        (
            "spec.disk.clone",
            vec![Schema(
                json!({"disk": {"image": "b.qcow2", "clone": "Shallow"}}),
            )],
        ),
        (
            "spec.disk.restoreFrom.backup",
            vec![
                Schema(json!({"disk": {"image": "base.qcow2", "restoreFrom": {"backup": ""}}})),
                Schema(json!({"disk": {"image": "base.qcow2", "restoreFrom": {"backup": "../b"}}})),
            ],
        ),
        (
            "spec.disk.persistent",
            vec![Any(
                "either is valid; an idle action Delete on a persistent disk falls back to Shutdown",
            )],
        ),
        (
            "spec.boot.kernel",
            vec![
                Schema(json!({"boot": {"kernel": "/boot/vmlinuz"}})),
                Schema(json!({"boot": {}})),
            ],
        ),
        (
            "spec.boot.initrd",
            vec![Schema(
                json!({"boot": {"kernel": "k", "initrd": ".hidden"}}),
            )],
        ),
        (
            "spec.boot.cmdline",
            vec![
                Schema(json!({"boot": {"kernel": "k", "cmdline": "x".repeat(1025)}})),
                Any(
                    "free text handed to the guest kernel; the domain XML is typed, so it cannot inject",
                ),
            ],
        ),
        ("spec.power", vec![Schema(json!({"power": "Maybe"}))]),
        (
            "spec.display.usb.redirect",
            vec![Condition(
                json!({"display": {"usb": {"redirect": true}}}),
                usb_pool(json!({"redirect": false})),
            )],
        ),
        (
            "spec.display.usb.channels",
            vec![
                Schema(json!({"display": {"usb": {"channels": 0}}})),
                Condition(
                    json!({"display": {"usb": {"channels": 4}}}),
                    usb_pool(json!({"channels": 2})),
                ),
            ],
        ),
        (
            "spec.network.mac",
            vec![
                Schema(json!({"network": {"mac": "01:00:5e:00:00:01"}})),
                Condition(
                    json!({"network": {"mac": "02:00:00:aa:bb:cc"}}),
                    json!({"network": {"macPrefix": "52:54:00"}}),
                ),
            ],
        ),
        (
            "spec.idle.timeout",
            vec![
                Schema(json!({"idle": {"timeout": "1w"}})),
                cond_(json!({"idle": {"timeout": "0s"}})),
            ],
        ),
        (
            "spec.idle.action",
            vec![Schema(
                json!({"idle": {"timeout": "5m", "action": "Hibernate"}}),
            )],
        ),
        ("spec.idle.connectedIsActive", vec![Any("either is valid")]),
        (
            "spec.performance.dedicatedCpus",
            vec![Any(
                "either is valid; the scheduler counts pinned threads apart",
            )],
        ),
        (
            "spec.performance.hugepages",
            vec![Any(
                "either is valid; the scheduler places only on hosts with hugepages free",
            )],
        ),
        (
            "spec.performance.sriov",
            vec![Schema(json!({"performance": {"sriov": [
            {"physicalFunction": "a"}, {"physicalFunction": "b"}, {"physicalFunction": "c"},
            {"physicalFunction": "d"}, {"physicalFunction": "e"}]}}))],
        ),
        (
            "spec.performance.sriov[].physicalFunction",
            vec![
                Schema(
                    json!({"performance": {"sriov": [{"physicalFunction": "name-longer-than-15"}]}}),
                ),
                cond_(json!({"performance": {"sriov": [{"physicalFunction": ".."}]}})),
            ],
        ),
    ]);
    for list in ["allow", "deny"] {
        t.extend(filter_cases("spec.display.usb", list, |v| usb(list, v)));
    }
    // A desktop may only narrow its pool's lists: (field, desktop spec, pool's defaults.usb).
    for (path, desk, pool) in [
        (
            "spec.display.usb.allow",
            json!({"display": {"usb": {"channels": 1}}}),
            json!({"allow": [{"vendor": "0x046d"}]}),
        ),
        (
            "spec.display.usb.allow[].class",
            usb("allow", json!([{"vendor": "0x046d"}])),
            json!({"allow": [{"class": "0x03"}]}),
        ),
        (
            "spec.display.usb.allow[].vendor",
            usb("allow", json!([{"class": "0x08"}])),
            json!({"allow": [{"vendor": "0x046d"}]}),
        ),
        (
            "spec.display.usb.deny",
            usb("deny", json!([{"class": "0x03"}])),
            json!({"deny": [{"class": "0x08"}]}),
        ),
    ] {
        add(&mut t, path, Condition(desk, usb_pool(pool)));
    }
    t
}

/// Field paths and their cases.
type Table = Vec<(String, Vec<Case>)>;

fn owned(t: Vec<(&str, Vec<Case>)>) -> Table {
    t.into_iter().map(|(p, c)| (p.to_string(), c)).collect()
}

/// One more case for `path`.
fn add(t: &mut Table, path: &str, case: Case) {
    match t.iter_mut().find(|(p, _)| p == path) {
        Some((_, cases)) => cases.push(case),
        None => t.push((path.to_string(), vec![case])),
    }
}

/// The cases of a USB filter list `<at>.<list>` and its items' fields; `wrap` makes a spec
/// from the list.
fn filter_cases(at: &str, list: &str, wrap: impl Fn(Value) -> Value) -> Table {
    let p = |field: &str| format!("{at}.{list}{field}");
    vec![
        (p(""), vec![Schema(wrap(many_filters()))]),
        (p("[].class"), vec![Schema(wrap(json!([{"class": "8"}])))]),
        (
            p("[].vendor"),
            vec![Schema(wrap(json!([{"vendor": "046d"}])))],
        ),
        (
            p("[].product"),
            vec![
                Schema(wrap(json!([{"vendor": "0x046d", "product": "0xc52"}]))),
                cond_(wrap(json!([{"product": "0xc52b"}]))),
            ],
        ),
    ]
}

/// 33 filters, one more than a list may hold.
fn many_filters() -> Value {
    Value::Array(
        (0..33)
            .map(|i| json!({"vendor": format!("0x{i:04x}")}))
            .collect(),
    )
}

/// A valid spec of each kind that the cases are merged onto.
fn base_pool() -> Value {
    json!({})
}
fn base_desktop() -> Value {
    json!({"pool": "a", "disk": {"image": "b.qcow2"}})
}

/// `patch` merged into `base`, objects key by key, anything else replaced.
fn merged(base: &Value, patch: &Value) -> Value {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            let mut out = b.clone();
            for (k, v) in p {
                let next = out.get(k).map_or_else(|| v.clone(), |old| merged(old, v));
                out.insert(k.clone(), next);
            }
            Value::Object(out)
        }
        _ => patch.clone(),
    }
}

/// The spec schema of the CRD of `kind`.
fn spec_schema(kind: &str) -> JSONSchemaProps {
    let crd = deskvirt_crds::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD of kind {kind}"));
    crd.spec
        .versions
        .first()
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .and_then(|s| s.properties.as_ref())
        .and_then(|p| p.get("spec"))
        .cloned()
        .unwrap_or_else(|| panic!("{kind} has no spec schema"))
}

/// Every field path below `at`: each leaf (no properties of its own) and each list of
/// objects (`a.list`, then `a.list[].field` for its items' fields).
fn fields(at: &str, schema: &JSONSchemaProps, out: &mut BTreeSet<String>) {
    if let Some(props) = schema.properties.as_ref().filter(|p| !p.is_empty()) {
        for (name, child) in props {
            fields(&format!("{at}.{name}"), child, out);
        }
        return;
    }
    if let Some(JSONSchemaPropsOrArray::Schema(items)) = &schema.items
        && items.properties.as_ref().is_some_and(|p| !p.is_empty())
    {
        out.insert(at.to_string());
        fields(&format!("{at}[]"), items, out);
        return;
    }
    out.insert(at.to_string());
}

fn schema_fields(kind: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    fields("spec", &spec_schema(kind), &mut out);
    out
}

/// A path with list indexes dropped: `a.b[2].c` → `a.b[].c`.
fn generic(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut in_index = false;
    for c in path.chars() {
        match c {
            '[' => {
                in_index = true;
                out.push('[');
            }
            ']' => {
                in_index = false;
                out.push(']');
            }
            c if in_index && c.is_ascii_digit() => {}
            c => out.push(c),
        }
    }
    out
}

/// What the pure validation says of a case's spec.
fn validate(kind: &str, spec: &Value, pool: &Value) -> Vec<FieldError> {
    let pool_spec: ResourcePoolSpec = serde_json::from_value(merged(&base_pool(), pool))
        .unwrap_or_else(|e| panic!("pool spec {pool}: {e}"));
    match kind {
        "ResourcePool" => {
            let spec: ResourcePoolSpec = serde_json::from_value(spec.clone())
                .unwrap_or_else(|e| panic!("pool spec {spec}: {e}"));
            validation::pool(&spec)
        }
        _ => {
            let spec: DesktopSpec = serde_json::from_value(spec.clone())
                .unwrap_or_else(|e| panic!("desktop spec {spec}: {e}"));
            match validation::read_desktop(&spec, Some(&pool_spec)) {
                Ok(valid) => valid.refused,
                Err(errors) => errors,
            }
        }
    }
}

fn table(kind: &str) -> (Value, Table) {
    match kind {
        "ResourcePool" => (base_pool(), pool_cases()),
        _ => (base_desktop(), desktop_cases()),
    }
}

const KINDS: [&str; 2] = ["ResourcePool", "Desktop"];

#[test]
fn every_spec_field_has_a_case() {
    let mut missing = vec![];
    let mut stale = vec![];
    for kind in KINDS {
        let fields = schema_fields(kind);
        let (_, cases) = table(kind);
        let covered: BTreeMap<&str, usize> =
            cases.iter().map(|(p, c)| (p.as_str(), c.len())).collect();
        for f in &fields {
            if covered.get(f.as_str()).is_none_or(|n| *n == 0) {
                missing.push(format!("{kind} {f}"));
            }
        }
        for p in covered.keys() {
            if !fields.contains(*p) {
                stale.push(format!("{kind} {p}"));
            }
        }
        for (p, list) in &cases {
            if list
                .iter()
                .any(|c| matches!(c, Any(why) if why.trim().is_empty()))
            {
                missing.push(format!("{kind} {p} (an Any case must say why)"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "fields of the schema without a validation case (add one to the table):\n{}",
        missing.join("\n")
    );
    assert!(
        stale.is_empty(),
        "cases for fields the schema does not have:\n{}",
        stale.join("\n")
    );
}

#[test]
fn the_validation_names_the_field_of_each_condition_case() {
    let mut wrong = vec![];
    for kind in KINDS {
        let (base, cases) = table(kind);
        assert_eq!(
            validate(kind, &base, &json!({})),
            vec![],
            "{kind} base spec"
        );
        for (path, list) in &cases {
            for case in list {
                let Condition(spec, pool) = case else {
                    continue;
                };
                let errors = validate(kind, &merged(&base, spec), pool);
                if !errors.iter().any(|e| generic(&e.path) == *path) {
                    wrong.push(format!("{kind} {path}: {spec} gave {errors:?}"));
                }
                if let Some(e) = errors.iter().find(|e| e.message.trim().is_empty()) {
                    wrong.push(format!("{kind} {path}: {e:?} says nothing"));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The object of `kind` with `spec`, named for a dry run.
fn object(kind: &str, spec: &Value) -> Value {
    json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": kind,
        "metadata": { "name": "validation-case" },
        "spec": spec,
    })
}

/// The API server's answer to creating `obj` in a dry run: `Ok` or its error message.
async fn dry_run(client: &kube::Client, kind: &str, obj: &Value) -> Result<(), String> {
    let pp = PostParams {
        dry_run: true,
        ..Default::default()
    };
    // Typed decoding would refuse what the server must judge: send it as it is.
    let o: DynamicObject =
        serde_json::from_value(obj.clone()).map_err(|e| format!("decode: {e}"))?;
    let res = match kind {
        "ResourcePool" => {
            let api: Api<DynamicObject> =
                Api::all_with(client.clone(), &ApiResource::erase::<ResourcePool>(&()));
            api.create(&pp, &o).await
        }
        _ => {
            let api: Api<DynamicObject> = Api::namespaced_with(
                client.clone(),
                "default",
                &ApiResource::erase::<Desktop>(&()),
            );
            api.create(&pp, &o).await
        }
    };
    res.map(|_| ()).map_err(|e| match e {
        kube::Error::Api(s) => s.message,
        other => other.to_string(),
    })
}

#[tokio::test]
async fn the_api_server_refuses_schema_cases_and_accepts_condition_cases() {
    let client = deskvirt_tests::cluster::client()
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    deskvirt_tests::cluster::ensure_crds(&client)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let mut wrong = vec![];
    for kind in KINDS {
        let (base, cases) = table(kind);
        if let Err(e) = dry_run(&client, kind, &object(kind, &base)).await {
            panic!("the base {kind} is refused: {e}");
        }
        for (path, list) in &cases {
            for case in list {
                let (spec, refused) = match case {
                    Schema(spec) => (spec, true),
                    Condition(spec, _) => (spec, false),
                    Any(_) => continue,
                };
                let answer = dry_run(&client, kind, &object(kind, &merged(&base, spec))).await;
                match (refused, answer) {
                    // 1.20 names a list item's field without its index: `a.list.field`.
                    (true, Err(msg))
                        if generic(&msg).contains(path)
                            || msg.contains(&path.replace("[]", "")) => {}
                    (true, Err(msg)) => {
                        wrong.push(format!("{kind} {path}: {spec} refused without naming it: {msg}"))
                    }
                    (true, Ok(())) => wrong.push(format!("{kind} {path}: {spec} was accepted")),
                    (false, Err(msg)) => wrong.push(format!(
                        "{kind} {path}: {spec} is refused by the schema already ({msg}); make it a Schema case"
                    )),
                    (false, Ok(())) => {}
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Through the running operator: an invalid pool is not Ready and names its bad fields, and
/// nothing is placed into it; an invalid desktop in a valid pool is not Scheduled and names its
/// bad field; neither gets a port or a MAC. A bound desktop edited into an invalid one stays
/// bound and is not Ready, naming the field.
#[tokio::test]
async fn invalid_pools_and_desktops_get_a_condition_naming_the_field() {
    let t = Setup::new(
        "op-valid",
        json!({"defaults": {"usb": {"channels": 1}}}),
        10,
    )
    .await;
    let run: &Run = &t.run;
    let bad_pool = format!("op-bad-{}", run.id);
    run.pool(
        &bad_pool,
        json!({
            // No host: the run's host stays with the run's valid pool.
            "nodeSelector": { "deskvirt.io/no-host": run.id },
            "network": { "cidr": "10.9.0.0/24", "nodePrefixLength": 16 },
            "storage": { "imageDir": "/srv/vm", "diskDir": "/srv/vm/disks" },
        }),
    )
    .await;
    let pool = wait_for(
        &run.pools(),
        &bad_pool,
        "Ready=False InvalidSpec",
        |p: &ResourcePool| {
            let c = p
                .status
                .as_ref()
                .map(|s| s.conditions.as_slice())
                .unwrap_or_default();
            cond(c, "Ready").is_some_and(|c| c.status == "False" && c.reason == "InvalidSpec")
        },
    )
    .await;
    let ready = pool
        .status
        .as_ref()
        .and_then(|s| cond(&s.conditions, "Ready").cloned());
    let msg = ready.map(|c| c.message).unwrap_or_default();
    assert!(
        msg.contains("spec.network.nodePrefixLength") && msg.contains("spec.storage.diskDir"),
        "{msg}"
    );

    let desks = run.desktops();
    let in_bad = run.desktop("in-bad-pool", &bad_pool, 1, "1Gi");
    let mut bad_mac = run.desktop("bad-mac", &t.host.pool, 1, "1Gi");
    bad_mac.spec.network.mac = Some("02:00:00:aa:bb:cc".into());
    for d in [&in_bad, &bad_mac] {
        desks
            .create(&PostParams::default(), d)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let msg = wait_refused(&desks, "in-bad-pool", "InvalidPool").await;
    assert!(
        msg.contains(&bad_pool) && msg.contains("spec.storage.diskDir"),
        "{msg}"
    );
    let msg = wait_refused(&desks, "bad-mac", "InvalidSpec").await;
    assert!(
        msg.contains("spec.network.mac") && msg.contains("52:54:00"),
        "{msg}"
    );

    // Valid when bound, loosened after: still bound, not Ready, the field named.
    desks
        .create(
            &PostParams::default(),
            &run.desktop("edited", &t.host.pool, 1, "1Gi"),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    wait_for(&desks, "edited", "binding", |d: &Desktop| {
        node_of(d).is_some()
    })
    .await;
    let loosen = json!({ "spec": { "display": { "usb": { "channels": 4 } } } });
    desks
        .patch("edited", &PatchParams::default(), &Patch::Merge(&loosen))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let d = wait_for(
        &desks,
        "edited",
        "Ready=False InvalidSpec",
        |d: &Desktop| {
            let c = desktop_conditions(d);
            cond(c, "Ready").is_some_and(|c| c.reason == "InvalidSpec" && c.status == "False")
        },
    )
    .await;
    let st = d.status.unwrap_or_default();
    let msg = cond(&st.conditions, "Ready")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(msg.contains("spec.display.usb.channels"), "{msg}");
    assert!(st.node.is_some(), "a bound desktop stays bound: {st:?}");
}
