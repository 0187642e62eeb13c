//! Decides which libvirt domain on this host is a Desktop's, by the owner recorded in it (the
//! domain's `<uuid>` and deskvirt metadata carry the Desktop UID), never by its name alone. A
//! domain an earlier release defined under another name is found by its `<uuid>` and adopted
//! under the name it has; a name held by another Desktop's domain is never touched.

use crate::domain::DesktopIdentity;
use crate::hypervisor::{DomainSummary, Hypervisor, HypervisorError};

/// Where a Desktop's domain is on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// The Desktop's own domain exists under `name` (this release's name, or the name an
    /// earlier release gave it).
    Ours { name: String },
    /// The Desktop has no domain here; `name` is free for it.
    Free { name: String },
    /// A domain that is not this Desktop's holds `name` (or this Desktop's UUID); nothing may
    /// be done to it. `owner` says whose it is, for a human.
    Taken { name: String, owner: String },
}

impl Place {
    /// The domain name to use, when the Desktop may use one.
    pub fn usable(&self) -> Option<&str> {
        match self {
            Self::Ours { name } | Self::Free { name } => Some(name),
            Self::Taken { .. } => None,
        }
    }
}

/// Who owns a domain, in words.
fn owner(identity: Option<&DesktopIdentity>, uuid: &str) -> String {
    match identity {
        Some(i) => format!("Desktop {}/{} (UID {})", i.namespace, i.name, i.uid),
        None => format!("a domain deskvirt did not define (UUID {uuid})"),
    }
}

/// Decides from the domain holding the Desktop's UID as `<uuid>` and the one holding the name
/// this release gives it (`wanted`).
pub fn judge(
    uid: &str,
    wanted: &str,
    by_uuid: Option<&DomainSummary>,
    by_name: Option<&DomainSummary>,
) -> Place {
    if let Some(d) = by_uuid {
        let ours = d
            .identity
            .as_ref()
            .is_some_and(|i| i.uid.eq_ignore_ascii_case(uid));
        return if ours {
            Place::Ours {
                name: d.name.clone(),
            }
        } else {
            Place::Taken {
                name: d.name.clone(),
                owner: owner(d.identity.as_ref(), &d.uuid),
            }
        };
    }
    match by_name {
        Some(d) => Place::Taken {
            name: d.name.clone(),
            owner: owner(d.identity.as_ref(), &d.uuid),
        },
        None => Place::Free {
            name: wanted.to_string(),
        },
    }
}

/// Looks the Desktop's domain up on the host: by its UID first, then by the name it would get.
pub async fn locate<H: Hypervisor>(
    hv: &H,
    uid: &str,
    wanted: &str,
) -> Result<Place, HypervisorError> {
    let by_uuid = hv.domain_by_uuid(uid).await?;
    let by_name = match &by_uuid {
        Some(_) => None,
        None => hv.domain_by_name(wanted).await?,
    };
    Ok(judge(uid, wanted, by_uuid.as_ref(), by_name.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::DomainState;

    const UID: &str = "0b7e9a4c-1111-4222-8333-444455556666";
    const OTHER: &str = "9f2c1d3e-aaaa-4bbb-8ccc-ddddeeeeffff";

    fn domain(name: &str, uuid: &str, owner_uid: Option<&str>) -> DomainSummary {
        DomainSummary {
            name: name.into(),
            uuid: uuid.into(),
            state: DomainState::Running,
            persistent: true,
            has_managed_save: false,
            identity: owner_uid.map(|u| DesktopIdentity {
                namespace: "team".into(),
                name: "x".into(),
                uid: u.into(),
                user: None,
                pool: "p".into(),
            }),
        }
    }

    #[test]
    fn free_when_nothing_holds_uid_or_name() {
        assert_eq!(
            judge(UID, "w", None, None),
            Place::Free { name: "w".into() }
        );
    }

    #[test]
    fn a_domain_of_an_earlier_release_is_adopted_under_its_name() {
        let legacy = domain("team--a--x", UID, Some(UID));
        assert_eq!(
            judge(UID, "w", Some(&legacy), None),
            Place::Ours {
                name: "team--a--x".into()
            }
        );
        let upper = domain("w", &UID.to_uppercase(), Some(&UID.to_uppercase()));
        assert!(matches!(
            judge(UID, "w", Some(&upper), None),
            Place::Ours { .. }
        ));
    }

    #[test]
    fn another_desktops_domain_is_taken_and_named() {
        let theirs = domain("w", OTHER, Some(OTHER));
        let got = judge(UID, "w", None, Some(&theirs));
        assert!(
            matches!(&got, Place::Taken { name, owner } if name == "w" && owner.contains(OTHER) && owner.contains("team/x")),
            "{got:?}"
        );
        assert_eq!(got.usable(), None);
        let foreign = domain("w", OTHER, None);
        let got = judge(UID, "w", None, Some(&foreign));
        assert!(matches!(&got, Place::Taken { owner, .. } if owner.contains("did not define")));
    }

    #[test]
    fn our_uuid_with_another_identity_is_not_ours() {
        let forged = domain("w", UID, Some(OTHER));
        assert!(matches!(
            judge(UID, "w", Some(&forged), None),
            Place::Taken { .. }
        ));
        let bare = domain("w", UID, None);
        assert!(matches!(
            judge(UID, "w", Some(&bare), None),
            Place::Taken { .. }
        ));
    }
}
