//! Decides how a desktop's identity is stored in its domain's `<metadata>` (under deskvirt's
//! own XML namespace) and how it is read back from libvirt's XML, which is how the agent adopts
//! its domains after a restart.

use quick_xml::NsReader;
use quick_xml::escape::resolve_predefined_entity;
use quick_xml::events::Event;
use quick_xml::name::{Namespace, ResolveResult};

use super::text::{escape_value, unescape_value};
use super::xml::{Metadata, MetadataDesktop};

/// XML namespace of deskvirt's domain metadata.
pub const METADATA_NS: &str = "https://deskvirt.io/xmlns/domain/v1alpha1";

/// Which Desktop a domain belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DesktopIdentity {
    /// Namespace of the Desktop.
    pub namespace: String,
    /// Name of the Desktop.
    pub name: String,
    /// UID of the Desktop (also the domain's `<uuid>`).
    pub uid: String,
    /// The desktop's user, when set.
    pub user: Option<String>,
    /// ResourcePool of the Desktop.
    pub pool: String,
}

/// The `<metadata>` element for an identity. Values are escaped with
/// [`super::text::escape_value`] so that any string survives libvirt.
pub fn metadata(identity: &DesktopIdentity) -> Metadata {
    Metadata {
        desktop: MetadataDesktop {
            xmlns: METADATA_NS,
            namespace: escape_value(&identity.namespace),
            name: escape_value(&identity.name),
            uid: escape_value(&identity.uid),
            user: identity.user.as_deref().map(escape_value),
            pool: escape_value(&identity.pool),
        },
    }
}

#[derive(Default)]
struct Fields {
    namespace: Option<String>,
    name: Option<String>,
    uid: Option<String>,
    user: Option<String>,
    pool: Option<String>,
}

impl Fields {
    fn slot(&mut self, local: &str) -> Option<&mut Option<String>> {
        match local {
            "namespace" => Some(&mut self.namespace),
            "name" => Some(&mut self.name),
            "uid" => Some(&mut self.uid),
            "user" => Some(&mut self.user),
            "pool" => Some(&mut self.pool),
            _ => None,
        }
    }

    fn into_identity(self) -> Option<DesktopIdentity> {
        let decode = |v: Option<String>| v.and_then(|v| unescape_value(&v));
        let user = match self.user {
            Some(u) => Some(unescape_value(&u)?),
            None => None,
        };
        Some(DesktopIdentity {
            namespace: decode(self.namespace)?,
            name: decode(self.name)?,
            uid: decode(self.uid)?,
            user,
            pool: decode(self.pool)?,
        })
    }
}

/// Reads the desktop identity from a domain XML as libvirt returns it (any prefix bound to
/// [`METADATA_NS`], attributes reordered, elements added). `None` when the domain carries no
/// complete deskvirt identity or the XML is malformed.
pub fn parse_identity(xml: &str) -> Option<DesktopIdentity> {
    parse(xml, false)
}

/// Reads the identity from what `virDomainGetMetadata` returns for [`METADATA_NS`]: the
/// `<desktop>` element alone, with libvirt having stripped its namespace. Namespaced input is
/// accepted too.
pub fn parse_identity_element(xml: &str) -> Option<DesktopIdentity> {
    parse(xml, true)
}

/// The parser behind both entry points. With `fragment`, the root `<desktop>` and its children
/// may be unqualified.
fn parse(xml: &str, fragment: bool) -> Option<DesktopIdentity> {
    let mut reader = NsReader::from_str(xml);
    let mut depth = 0usize;
    let mut desktop_depth: Option<usize> = None;
    let mut field: Option<String> = None;
    let mut text = String::new();
    let mut fields = Fields::default();
    loop {
        let (ns, event) = reader.read_resolved_event().ok()?;
        let ours = match ns {
            ResolveResult::Bound(Namespace(n)) => n == METADATA_NS,
            ResolveResult::Unbound => fragment,
            ResolveResult::Unknown(_) => false,
        };
        let child_level = desktop_depth.is_some_and(|d| depth == d);
        let in_field = field.is_some() && desktop_depth.is_some_and(|d| depth == d + 1);
        match event {
            Event::Start(start) => {
                let may_open = desktop_depth.is_none() && (!fragment || depth == 0);
                if may_open && ours && start.local_name().as_ref() == "desktop" {
                    desktop_depth = Some(depth + 1);
                } else if child_level && ours {
                    field = Some(start.local_name().as_ref().to_string());
                    text.clear();
                }
                depth += 1;
            }
            Event::Empty(start) if child_level && ours => {
                if let Some(slot) = fields.slot(start.local_name().as_ref()) {
                    *slot = Some(String::new());
                }
            }
            Event::Text(t) if in_field => text.push_str(&t.xml10_content()),
            Event::CData(c) if in_field => text.push_str(&c.xml10_content()),
            Event::GeneralRef(r) if in_field => match r.resolve_char_ref().ok()? {
                Some(c) => text.push(c),
                None => text.push_str(resolve_predefined_entity(&r.xml10_content())?),
            },
            Event::End(_) => {
                depth = depth.saturating_sub(1);
                if desktop_depth == Some(depth + 1) {
                    return fields.into_identity();
                }
                if desktop_depth.is_some_and(|d| depth == d)
                    && let Some(name) = field.take()
                    && let Some(slot) = fields.slot(&name)
                {
                    *slot = Some(std::mem::take(&mut text));
                }
            }
            Event::Eof => return None,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> DesktopIdentity {
        DesktopIdentity {
            namespace: "team-a".into(),
            name: "alice".into(),
            uid: "0b7e9a4c-1111-4222-8333-444455556666".into(),
            user: Some("Alice <alice@example.com>".into()),
            pool: "default".into(),
        }
    }

    #[test]
    fn reads_libvirt_style_output_with_another_prefix() {
        let xml = r#"<domain type="kvm" id="3">
  <name>team-a--alice</name>
  <metadata>
    <other:thing xmlns:other="urn:x"><other:name>nope</other:name></other:thing>
    <dv:desktop xmlns:dv="https://deskvirt.io/xmlns/domain/v1alpha1">
      <dv:pool>default</dv:pool>
      <dv:extra><dv:name>ignored</dv:name></dv:extra>
      <dv:name>alice</dv:name>
      <dv:namespace>team-a</dv:namespace>
      <dv:uid>0b7e9a4c-1111-4222-8333-444455556666</dv:uid>
      <dv:user>Alice &lt;alice@example.com&#62;</dv:user>
    </dv:desktop>
  </metadata>
</domain>"#;
        assert_eq!(parse_identity(xml), Some(identity()));
    }

    #[test]
    fn missing_or_foreign_metadata_gives_none() {
        assert_eq!(parse_identity("<domain><name>x</name></domain>"), None);
        let foreign = r#"<domain><metadata><desktop xmlns="urn:other"><name>a</name><namespace>b</namespace><uid>c</uid><pool>d</pool></desktop></metadata></domain>"#;
        assert_eq!(parse_identity(foreign), None);
        assert_eq!(parse_identity("<domain><metadata>"), None);
    }

    #[test]
    fn reads_the_metadata_api_element_without_namespace() {
        let xml = "<desktop>\n  <namespace>team-a</namespace>\n  <name>alice</name>\n  <uid>0b7e9a4c-1111-4222-8333-444455556666</uid>\n  <user>Alice &lt;alice@example.com&gt;</user>\n  <pool>default</pool>\n</desktop>";
        assert_eq!(parse_identity_element(xml), Some(identity()));
        assert_eq!(
            parse_identity(xml),
            None,
            "a whole domain XML must use our namespace"
        );
        let nested = format!("<domain>{xml}</domain>");
        assert_eq!(
            parse_identity_element(&nested),
            None,
            "only a root <desktop> is unqualified"
        );
    }

    #[test]
    fn empty_user_element_is_an_empty_user() {
        let xml = r#"<m><d:desktop xmlns:d="https://deskvirt.io/xmlns/domain/v1alpha1"><d:namespace>n</d:namespace><d:name>a</d:name><d:uid>u</d:uid><d:user/><d:pool>p</d:pool></d:desktop></m>"#;
        let parsed = parse_identity(xml);
        assert_eq!(parsed.and_then(|i| i.user), Some(String::new()));
    }
}
