//! Property tests of the domain XML converter: arbitrary Unicode (including `<`, `>`, `&`,
//! quotes, `]]>` and control characters) in namespace, name, user, pool and kernel command
//! line always gives well-formed XML whose identity and command line read back unchanged, or,
//! for a command line XML cannot carry, a clean `InvalidText` error.

mod common;

use common::{UID, binding, desktop, host};
use deskvirt_node_agent::domain::names::MAX_DESKTOP_DOMAIN_NAME;
use deskvirt_node_agent::domain::text::is_xml_char;
use deskvirt_node_agent::domain::{BuildError, DomainInputs, domain_xml, parse_identity};
use proptest::prelude::*;
use quick_xml::escape::resolve_predefined_entity;
use quick_xml::events::Event;
use quick_xml::reader::Reader;

/// Strings that stress XML: anything, XML specials, and CDATA terminators.
fn text() -> impl Strategy<Value = String> {
    let specials = "[<>&\"' \\]%a-z0-9\t\r\n\u{0}\u{1b}\u{e9}\u{fffe}\u{1F600}-]{0,24}";
    prop_oneof![
        any::<String>(),
        specials,
        (specials, specials).prop_map(|(a, b)| format!("{a}]]>{b}")),
    ]
}

/// Checks the document is well-formed with one root, and returns the text of `os/cmdline`.
fn well_formed(xml: &str) -> Result<Option<String>, TestCaseError> {
    let mut reader = Reader::from_str(xml);
    let (mut path, mut roots, mut cmdline): (Vec<String>, usize, Option<String>) =
        (Vec::new(), 0, None);
    loop {
        let event = reader
            .read_event()
            .map_err(|e| TestCaseError::fail(format!("not well-formed: {e}\n{xml}")))?;
        let in_cmdline = path.len() == 3 && path[1] == "os" && path[2] == "cmdline";
        match event {
            Event::Start(start) => {
                roots += usize::from(path.is_empty());
                path.push(start.local_name().as_ref().to_string());
                if path.len() == 3 && path[2] == "cmdline" {
                    cmdline = Some(String::new());
                }
            }
            Event::Empty(_) => roots += usize::from(path.is_empty()),
            Event::End(_) => {
                path.pop();
            }
            Event::Text(t) if in_cmdline => {
                cmdline.get_or_insert_default().push_str(&t.xml10_content())
            }
            Event::GeneralRef(r) if in_cmdline => {
                let resolved = match r.resolve_char_ref() {
                    Ok(Some(c)) => c.to_string(),
                    _ => resolve_predefined_entity(&r.xml10_content())
                        .unwrap_or_default()
                        .to_string(),
                };
                cmdline.get_or_insert_default().push_str(&resolved);
            }
            Event::Eof => break,
            _ => {}
        }
    }
    prop_assert_eq!(roots, 1);
    prop_assert!(path.is_empty());
    Ok(cmdline)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_strings_give_well_formed_xml(
        namespace in text(),
        name in text(),
        user in proptest::option::of(text()),
        pool in text(),
        cmdline in text(),
    ) {
        let spec = serde_json::json!({
            "pool": pool,
            "user": user,
            "disk": { "image": "base.qcow2" },
            "boot": { "kernel": "vmlinuz", "cmdline": cmdline },
        });
        let desktop = desktop(&namespace, &name, UID, spec);
        let carriable = cmdline.chars().all(is_xml_char);
        match DomainInputs::from_desktop(&desktop, &common::valid(&desktop), &binding(), &host()) {
            Err(BuildError::InvalidText { field }) => {
                prop_assert!(!carriable, "rejected a command line XML can carry");
                prop_assert_eq!(field, "spec.boot.cmdline");
            }
            Err(e) => prop_assert!(false, "unexpected error: {e}"),
            Ok(inputs) => {
                prop_assert!(carriable, "accepted a command line XML cannot carry");
                let xml = domain_xml(&inputs).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let read_cmdline = well_formed(&xml)?;
                prop_assert_eq!(read_cmdline.unwrap_or_default(), cmdline);
                prop_assert_eq!(parse_identity(&xml), Some(inputs.identity.clone()));
                prop_assert_eq!(inputs.identity.user.clone(), user);
                let domain = inputs.domain_name();
                prop_assert!(domain.len() <= MAX_DESKTOP_DOMAIN_NAME && !domain.is_empty());
                prop_assert!(domain.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)), "{}", domain);
            }
        }
    }
}
