//! Fixtures shared by the node-agent's integration tests: Desktops from inline JSON, a host
//! context, a binding, and golden-file comparison.
#![allow(dead_code)]

use std::path::PathBuf;

use deskvirt_crds::{Desktop, DesktopSpec};
use deskvirt_node_agent::domain::{Binding, DomainType, HostContext, NetworkAttachment, Secret};
use kube::api::ObjectMeta;

/// A UID that is a valid UUID.
pub const UID: &str = "6f1c2b9e-3d4a-4b5c-8d6e-7f8091a2b3c4";

/// A Desktop with the given spec (inline JSON, as a user would write it in YAML).
pub fn desktop(namespace: &str, name: &str, uid: &str, spec: serde_json::Value) -> Desktop {
    let spec: DesktopSpec = match serde_json::from_value(spec) {
        Ok(spec) => spec,
        Err(e) => panic!("fixture spec does not parse: {e}"),
    };
    let mut desktop = Desktop::new(name, spec);
    desktop.metadata = ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(namespace.to_string()),
        uid: Some(uid.to_string()),
        ..ObjectMeta::default()
    };
    desktop
}

/// The smallest spec a user can write.
pub fn minimal_spec() -> serde_json::Value {
    serde_json::json!({ "pool": "default", "disk": { "image": "debian-12.qcow2" } })
}

/// A host in a nat pool named `default`.
pub fn host() -> HostContext {
    HostContext {
        node_name: "node-1".into(),
        domain_type: DomainType::Kvm,
        image_dir: "/var/lib/deskvirt/images".into(),
        disk_dir: "/var/lib/deskvirt/disks".into(),
        network: NetworkAttachment::Network {
            name: "deskvirt-default".into(),
        },
        spice_listen: "10.0.0.11".into(),
        spice_tls: false,
        default_usb: None,
    }
}

/// The operator's binding to `node-1`.
pub fn binding() -> Binding {
    Binding {
        node: "node-1".into(),
        spice_port: 5901,
        mac: "52:54:00:12:34:56".into(),
        spice_password: Secret::new("s3cret-pw"),
        pinned_cpus: Vec::new(),
    }
}

fn golden_path(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(file)
}

/// Compares `actual` with `tests/golden/<file>`; with `UPDATE_GOLDEN=1` rewrites the file.
pub fn assert_golden(file: &str, actual: &str) {
    let path = golden_path(file);
    if std::env::var("UPDATE_GOLDEN").is_ok_and(|v| v == "1") {
        if let Err(e) = std::fs::write(&path, actual) {
            panic!("cannot write {}: {e}", path.display());
        }
        return;
    }
    let expected = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => panic!(
            "cannot read {} ({e}); run with UPDATE_GOLDEN=1 to create it",
            path.display()
        ),
    };
    assert!(
        expected == actual,
        "{} differs from the generated XML (run with UPDATE_GOLDEN=1 to accept):\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}
