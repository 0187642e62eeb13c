//! The console Secret a user reads, `<desktop>-console` in the desktop's namespace: the
//! password and a ready-to-use `remote-viewer` file, owned by the Desktop so it goes with it.
//! The operator applies it from the mirror on every pass and never reads it. Pure.

use std::collections::BTreeMap;

use deskvirt_crds::constants::{
    LABEL_DESKTOP, LABEL_MANAGED_BY, MANAGER_OPERATOR, SECRET_KEY_PASSWORD, SECRET_KEY_VV,
};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use super::vv_file;

/// Suffix of a console Secret's name.
const SUFFIX: &str = "-console";

/// Name of the console Secret of desktop `desktop`: `<desktop>-console`, or, when that passes
/// the 253 characters of an object name, a prefix of the name, a hash of all of it and the
/// suffix (deterministic, distinct for distinct names).
pub fn secret_name(desktop: &str) -> String {
    const MAX: usize = 253;
    if desktop.len() + SUFFIX.len() <= MAX {
        return format!("{desktop}{SUFFIX}");
    }
    let hash = format!("{:016x}", deskvirt_crds::names::fnv1a64(desktop.as_bytes()));
    let prefix: String = desktop
        .chars()
        .take(MAX - SUFFIX.len() - hash.len() - 1)
        .collect();
    let prefix = prefix.trim_end_matches(['.', '-']);
    format!("{prefix}-{hash}{SUFFIX}")
}

/// What the user's console Secret should hold besides the password.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Console<'a> {
    pub namespace: &'a str,
    pub desktop: &'a str,
    pub desktop_uid: &'a str,
    /// Address a client connects to, when known.
    pub host: Option<&'a str>,
    /// The desktop's SPICE port, when bound.
    pub port: Option<u16>,
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
                (
                    LABEL_DESKTOP.to_string(),
                    deskvirt_crds::names::label_value(c.desktop),
                ),
                (LABEL_MANAGED_BY.to_string(), MANAGER_OPERATOR.to_string()),
            ])),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_desktop_names_give_valid_distinct_secret_names() {
        assert_eq!(secret_name("alice"), "alice-console");
        let a = secret_name(&"a".repeat(253));
        let b = secret_name(&format!("{}b", "a".repeat(252)));
        assert!(a.len() <= 253 && b.len() <= 253, "{} {}", a.len(), b.len());
        assert_ne!(a, b);
        assert!(a.ends_with("-console"));
    }

    #[test]
    fn owned_by_the_desktop_with_password_and_viewer_file() {
        let c = Console {
            namespace: "ns",
            desktop: "d",
            desktop_uid: "u",
            host: Some("10.0.0.1"),
            port: Some(5900),
        };
        let s = secret(&c, &"ab".repeat(20));
        assert_eq!(s.metadata.name.as_deref(), Some("d-console"));
        let owner = s.metadata.owner_references.clone().unwrap_or_default();
        assert_eq!(owner.len(), 1);
        assert_eq!(owner[0].uid, "u");
        let data = s.data.unwrap_or_default();
        assert_eq!(
            data.get(SECRET_KEY_PASSWORD).map(|b| b.0.clone()),
            Some("ab".repeat(20).into_bytes())
        );
        let vv = data
            .get(SECRET_KEY_VV)
            .map(|b| String::from_utf8_lossy(&b.0).to_string())
            .unwrap_or_default();
        assert!(vv.contains("host=10.0.0.1\nport=5900\n"), "{vv}");
        assert!(
            vv.contains(&format!("password={}\n", "ab".repeat(20))),
            "{vv}"
        );
        assert!(vv.contains("title=ns/d\n"), "{vv}");
    }
}
