//! The console password mirror of a desktop, `console-<uid>` in the console namespace: what
//! it holds (the password, the host the desktop is bound to, the last rotation request seen) and
//! whether the password is kept, drawn for the first time, or rotated. Pure.

use std::collections::BTreeMap;

use deskvirt_crds::constants::{
    ANNOTATION_CONSOLE_SECRET_UID, ANNOTATION_DESKTOP, ANNOTATION_ROTATE_PASSWORD,
    LABEL_DESKTOP_UID, LABEL_MANAGED_BY, LABEL_NODE, MANAGER_OPERATOR, SECRET_KEY_PASSWORD,
    console_mirror_name,
};
use deskvirt_crds::names::label_value;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Shortest stored password that is trusted: 128 bits, hex-encoded.
const MIN_PASSWORD_LEN: usize = 32;

/// What the mirror of one desktop should say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mirror<'a> {
    /// The console namespace, where every mirror lives.
    pub namespace: &'a str,
    /// Namespace of the desktop.
    pub desktop_namespace: &'a str,
    /// Name of the desktop.
    pub desktop: &'a str,
    /// UID of the desktop; the mirror is named after it.
    pub desktop_uid: &'a str,
    /// The host the desktop is bound to (or being bound to).
    pub node: &'a str,
    /// The desktop's `deskvirt.io/rotate-password` annotation ("" when unset).
    pub rotation: &'a str,
}

/// Label selector matching every mirror (and nothing else the operator writes).
pub fn selector() -> String {
    format!("{LABEL_MANAGED_BY}={MANAGER_OPERATOR},{LABEL_DESKTOP_UID}")
}

/// Where the password comes from on this pass.
#[derive(Clone, PartialEq, Eq)]
pub enum Password {
    /// The mirror holds a good password and no rotation was asked for since.
    Keep(String),
    /// No mirror, or none with a usable password: draw the first one.
    New,
    /// The user asked for a rotation since the mirror was written.
    Rotate,
}

impl std::fmt::Debug for Password {
    // Never prints the password itself.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Password::Keep(_) => "Keep(<redacted>)",
            Password::New => "New",
            Password::Rotate => "Rotate",
        })
    }
}

/// Decides the password from the current mirror and the desktop's rotation annotation.
pub fn decide(existing: Option<&Secret>, rotation: &str) -> Password {
    let Some(password) = existing.and_then(password_of) else {
        return Password::New;
    };
    if existing.is_some_and(|s| rotation_of(s) != rotation) {
        return Password::Rotate;
    }
    Password::Keep(password)
}

fn annotation<'a>(s: &'a Secret, key: &str) -> Option<&'a str> {
    s.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// The mirror's password, when it holds a usable one.
pub fn password_of(s: &Secret) -> Option<String> {
    let bytes = s.data.as_ref()?.get(SECRET_KEY_PASSWORD)?;
    let pw = String::from_utf8(bytes.0.clone()).ok()?;
    (pw.len() >= MIN_PASSWORD_LEN).then_some(pw)
}

/// The rotation request the mirror's password answers ("" for none).
pub fn rotation_of(s: &Secret) -> &str {
    annotation(s, ANNOTATION_ROTATE_PASSWORD).unwrap_or("")
}

/// UID of the user's console Secret the operator created, as recorded in the mirror.
pub fn user_secret_uid(s: &Secret) -> Option<&str> {
    annotation(s, ANNOTATION_CONSOLE_SECRET_UID).filter(|u| !u.is_empty())
}

/// UID of the mirror's desktop.
pub fn uid_of(s: &Secret) -> Option<&str> {
    s.metadata
        .labels
        .as_ref()?
        .get(LABEL_DESKTOP_UID)
        .map(String::as_str)
        .filter(|u| !u.is_empty())
}

/// Namespace and name of the mirror's desktop, from its annotation.
pub fn desktop_of(s: &Secret) -> Option<(&str, &str)> {
    annotation(s, ANNOTATION_DESKTOP)?
        .split_once('/')
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
}

/// The mirror to write, holding `password`.
pub fn secret(m: &Mirror<'_>, password: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(console_mirror_name(m.desktop_uid)),
            namespace: Some(m.namespace.to_string()),
            labels: Some(BTreeMap::from([
                (LABEL_NODE.to_string(), label_value(m.node)),
                (LABEL_DESKTOP_UID.to_string(), m.desktop_uid.to_string()),
                (LABEL_MANAGED_BY.to_string(), MANAGER_OPERATOR.to_string()),
            ])),
            annotations: Some(BTreeMap::from([
                (
                    ANNOTATION_DESKTOP.to_string(),
                    format!("{}/{}", m.desktop_namespace, m.desktop),
                ),
                (
                    ANNOTATION_ROTATE_PASSWORD.to_string(),
                    m.rotation.to_string(),
                ),
            ])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            SECRET_KEY_PASSWORD.to_string(),
            ByteString(password.as_bytes().to_vec()),
        )])),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

/// Whether `existing` already says everything `wanted` says (labels and annotations of others
/// are left alone).
pub fn up_to_date(existing: &Secret, wanted: &Secret) -> bool {
    fn contains(
        have: Option<&BTreeMap<String, String>>,
        want: Option<&BTreeMap<String, String>>,
    ) -> bool {
        want.into_iter()
            .flatten()
            .all(|(k, v)| have.and_then(|h| h.get(k)) == Some(v))
    }
    existing.data == wanted.data
        && contains(
            existing.metadata.labels.as_ref(),
            wanted.metadata.labels.as_ref(),
        )
        && contains(
            existing.metadata.annotations.as_ref(),
            wanted.metadata.annotations.as_ref(),
        )
}

/// What a mirror says, hashed: its data, labels and annotations (not its version, its field
/// managers, or the copy `kubectl apply` keeps). A watch event of a mirror whose fingerprint is
/// what the operator last wrote brings nothing new.
pub fn fingerprint(s: &Secret) -> u64 {
    let mut annotations = s.metadata.annotations.clone().unwrap_or_default();
    annotations.remove(deskvirt_runtime::cache::LAST_APPLIED);
    let text =
        serde_json::to_string(&(&s.data, &s.metadata.labels, &annotations)).unwrap_or_default();
    deskvirt_crds::names::fnv1a64(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec<'a>(node: &'a str, rotation: &'a str) -> Mirror<'a> {
        Mirror {
            namespace: "deskvirt-system",
            desktop_namespace: "team",
            desktop: "d",
            desktop_uid: "u-1",
            node,
            rotation,
        }
    }

    #[test]
    fn a_fingerprint_changes_with_what_the_mirror_says_only() {
        let written = secret(&spec("h1", ""), "pw");
        let mut seen = written.clone();
        seen.metadata.resource_version = Some("42".into());
        seen.metadata.managed_fields = Some(vec![Default::default()]);
        assert_eq!(fingerprint(&seen), fingerprint(&written));
        assert_ne!(
            fingerprint(&secret(&spec("h1", ""), "other")),
            fingerprint(&written),
            "another password"
        );
        assert_ne!(
            fingerprint(&secret(&spec("h2", ""), "pw")),
            fingerprint(&written),
            "another host"
        );
        let mut tagged = written.clone();
        tagged
            .metadata
            .annotations
            .get_or_insert_default()
            .insert("someone".into(), "else".into());
        assert_ne!(fingerprint(&tagged), fingerprint(&written), "an annotation");
    }

    #[test]
    fn names_labels_and_reads_back() {
        let s = secret(&spec("h1", ""), &"ab".repeat(20));
        assert_eq!(s.metadata.name.as_deref(), Some("console-u-1"));
        assert_eq!(s.metadata.namespace.as_deref(), Some("deskvirt-system"));
        let labels = s.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels.get(LABEL_NODE).map(String::as_str), Some("h1"));
        assert_eq!(
            labels.get(LABEL_MANAGED_BY).map(String::as_str),
            Some(MANAGER_OPERATOR)
        );
        assert_eq!(uid_of(&s), Some("u-1"));
        assert_eq!(desktop_of(&s), Some(("team", "d")));
        assert_eq!(password_of(&s), Some("ab".repeat(20)));
        assert_eq!(user_secret_uid(&s), None, "no user Secret recorded yet");
        assert!(
            s.metadata.owner_references.is_none(),
            "no cross-namespace owner"
        );
        assert_eq!(
            selector(),
            format!("{LABEL_MANAGED_BY}={MANAGER_OPERATOR},{LABEL_DESKTOP_UID}")
        );
    }

    #[test]
    fn keeps_until_rotation_and_draws_when_missing_or_short() {
        let s = secret(&spec("h1", ""), &"ab".repeat(20));
        assert_eq!(decide(Some(&s), ""), Password::Keep("ab".repeat(20)));
        assert_eq!(decide(Some(&s), "2024-01-01"), Password::Rotate);
        assert_eq!(decide(None, "2024-01-01"), Password::New);
        let short = secret(&spec("h1", ""), "abc");
        assert_eq!(decide(Some(&short), ""), Password::New);
        let rotated = secret(&spec("h1", "2024-01-01"), &"cd".repeat(20));
        assert_eq!(
            decide(Some(&rotated), "2024-01-01"),
            Password::Keep("cd".repeat(20))
        );
        assert_eq!(
            format!("{:?}", decide(Some(&rotated), "2024-01-01")),
            "Keep(<redacted>)"
        );
    }

    #[test]
    fn a_new_host_or_rotation_is_not_up_to_date() {
        let pw = "ab".repeat(20);
        let mut s = secret(&spec("h1", ""), &pw);
        s.metadata
            .labels
            .get_or_insert_default()
            .insert("other".into(), "kept".into());
        assert!(up_to_date(&s, &secret(&spec("h1", ""), &pw)));
        assert!(!up_to_date(&s, &secret(&spec("h2", ""), &pw)));
        assert!(!up_to_date(&s, &secret(&spec("h1", "x"), &pw)));
        assert!(!up_to_date(&s, &secret(&spec("h1", ""), &"cd".repeat(20))));
    }
}
