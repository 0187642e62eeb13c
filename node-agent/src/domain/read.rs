//! Tolerant reading of the XML libvirt hands back: walks elements by their path and attributes,
//! ignoring everything libvirt added, reordered or reformatted.

use quick_xml::XmlVersion;
use quick_xml::events::{BytesStart, Event};
use quick_xml::reader::Reader;

/// Attributes of one element as (local name, value) pairs.
pub type Attributes = Vec<(String, String)>;

fn attributes(start: &BytesStart<'_>) -> Result<Attributes, quick_xml::Error> {
    let mut out = Vec::new();
    for attr in start.attributes() {
        let attr = attr.map_err(quick_xml::Error::from)?;
        let key = attr.key.local_name().as_ref().to_string();
        let value = attr.normalized_value(XmlVersion::Implicit1_0)?.into_owned();
        out.push((key, value));
    }
    Ok(out)
}

/// Calls `visit` with the path of local element names from the root (inclusive) and the
/// attributes of every element of the document, in document order.
pub fn walk(
    xml: &str,
    mut visit: impl FnMut(&[String], &Attributes),
) -> Result<(), quick_xml::Error> {
    let mut reader = Reader::from_str(xml);
    let mut path: Vec<String> = Vec::new();
    loop {
        match reader.read_event()? {
            Event::Start(start) => {
                path.push(start.local_name().as_ref().to_string());
                visit(&path, &attributes(&start)?);
            }
            Event::Empty(start) => {
                path.push(start.local_name().as_ref().to_string());
                visit(&path, &attributes(&start)?);
                path.pop();
            }
            Event::End(_) => {
                path.pop();
            }
            Event::Eof => return Ok(()),
            _ => {}
        }
    }
}

/// The value of attribute `key` in `attrs`.
pub fn attribute<'a>(attrs: &'a Attributes, key: &str) -> Option<&'a str> {
    attrs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_paths_and_unescapes_attributes() {
        let xml = "<a><b x='1 &amp; 2'/><b><c y=\"z\"></c></b></a>";
        let mut seen = Vec::new();
        let walked = walk(xml, |path, attrs| {
            seen.push((path.join("/"), attrs.clone()))
        });
        assert!(walked.is_ok());
        assert_eq!(seen.len(), 4);
        assert_eq!(seen[1].0, "a/b");
        assert_eq!(attribute(&seen[1].1, "x"), Some("1 & 2"));
        assert_eq!(seen[3].0, "a/b/c");
    }

    #[test]
    fn malformed_xml_is_an_error() {
        assert!(walk("<a><b></a>", |_, _| {}).is_err());
    }
}
