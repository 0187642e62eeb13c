//! A desktop's console Secret: a random SPICE password and a ready-to-use `remote-viewer` file,
//! kept stable until the user asks for a rotation.

use std::collections::BTreeMap;

use deskvirt_crds::constants::{
    ANNOTATION_ROTATE_PASSWORD, LABEL_DESKTOP, LABEL_MANAGED_BY, MANAGER_OPERATOR,
    SECRET_KEY_PASSWORD, SECRET_KEY_VV,
};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

/// Bytes of randomness in a password: 160 bits, above the 128-bit floor.
const PASSWORD_BYTES: usize = 20;

/// Name of the console Secret of desktop `desktop`.
pub fn secret_name(desktop: &str) -> String {
    format!("{desktop}-console")
}

/// A fresh password: 160 bits from the operating system's CSPRNG, hex-encoded (40 characters,
/// within SPICE's ticket limit and safe in an ini file).
///
/// `getrandom` (rust-random project) is the crate `rand` itself sits on: it reads the kernel's
/// CSPRNG directly with no user-space generator to seed or get wrong, and is already in our lock
/// file.
pub fn new_password() -> Result<String, getrandom::Error> {
    let mut buf = [0u8; PASSWORD_BYTES];
    getrandom::fill(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// The `remote-viewer` file. Fields not yet known (host, port) are left out.
pub fn vv_file(title: &str, host: Option<&str>, port: Option<u16>, password: &str) -> String {
    let mut s = String::from("[virt-viewer]\ntype=spice\n");
    if let Some(h) = host.filter(|h| !h.is_empty()) {
        s.push_str(&format!("host={h}\n"));
    }
    if let Some(p) = port {
        s.push_str(&format!("port={p}\n"));
    }
    s.push_str(&format!(
        "password={password}\ntitle={title}\ndelete-this-file=0\n"
    ));
    s
}

/// What the console Secret should hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Console<'a> {
    pub namespace: &'a str,
    pub desktop: &'a str,
    pub desktop_uid: &'a str,
    pub host: Option<&'a str>,
    pub port: Option<u16>,
    /// The `deskvirt.io/rotate-password` annotation of the Desktop ("" when unset).
    pub rotation: &'a str,
}

/// The password to keep from `existing`, or `None` when a new one is needed (no Secret, no
/// password, or a rotation was asked for since).
pub fn kept_password(existing: Option<&Secret>, rotation: &str) -> Option<String> {
    let s = existing?;
    let seen = s
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_ROTATE_PASSWORD))
        .map(String::as_str)
        .unwrap_or("");
    if seen != rotation {
        return None;
    }
    let pw = s.data.as_ref()?.get(SECRET_KEY_PASSWORD)?;
    let pw = String::from_utf8(pw.0.clone()).ok()?;
    (pw.len() >= 2 * 16).then_some(pw)
}

/// The Secret to apply.
pub fn secret(c: &Console<'_>, password: &str) -> Secret {
    let title = format!("{}/{}", c.namespace, c.desktop);
    let data = BTreeMap::from([
        (
            SECRET_KEY_PASSWORD.to_string(),
            ByteString(password.as_bytes().to_vec()),
        ),
        (
            SECRET_KEY_VV.to_string(),
            ByteString(vv_file(&title, c.host, c.port, password).into_bytes()),
        ),
    ]);
    Secret {
        metadata: ObjectMeta {
            name: Some(secret_name(c.desktop)),
            namespace: Some(c.namespace.to_string()),
            labels: Some(BTreeMap::from([
                (LABEL_DESKTOP.to_string(), c.desktop.to_string()),
                (LABEL_MANAGED_BY.to_string(), MANAGER_OPERATOR.to_string()),
            ])),
            annotations: Some(BTreeMap::from([(
                ANNOTATION_ROTATE_PASSWORD.to_string(),
                c.rotation.to_string(),
            )])),
            owner_references: Some(vec![OwnerReference {
                api_version: "deskvirt.io/v1alpha1".into(),
                kind: "Desktop".into(),
                name: c.desktop.to_string(),
                uid: c.desktop_uid.to_string(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..Default::default()
        },
        data: Some(data),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

/// Whether `existing` already holds what `wanted` would write.
pub fn up_to_date(existing: Option<&Secret>, wanted: &Secret) -> bool {
    existing.is_some_and(|e| {
        e.data == wanted.data
            && e.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_ROTATE_PASSWORD))
                == wanted
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(ANNOTATION_ROTATE_PASSWORD))
            && e.metadata.owner_references == wanted.metadata.owner_references
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_long_and_distinct() {
        let a = new_password().unwrap_or_else(|e| panic!("{e}"));
        let b = new_password().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.len(), 40);
        assert_ne!(a, b);
    }

    #[test]
    fn password_kept_until_rotation() {
        let c = Console {
            namespace: "ns",
            desktop: "d",
            desktop_uid: "u",
            host: Some("10.0.0.1"),
            port: Some(5900),
            rotation: "",
        };
        let s = secret(&c, &"ab".repeat(20));
        assert_eq!(kept_password(Some(&s), ""), Some("ab".repeat(20)));
        assert_eq!(kept_password(Some(&s), "2024-01-01"), None);
        assert_eq!(kept_password(None, ""), None);
        assert!(up_to_date(Some(&s), &s));
        let vv = vv_file("ns/d", Some("h"), Some(5901), "pw");
        assert!(vv.starts_with("[virt-viewer]\ntype=spice\nhost=h\nport=5901\npassword=pw\n"));
    }
}
