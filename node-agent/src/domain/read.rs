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

/// `xml` with the first element at `path` (local names from the root, inclusive) replaced by
/// `with`, byte for byte around it; `None` when there is no such element.
pub fn replace_element(
    xml: &str,
    path: &[&str],
    with: &str,
) -> Result<Option<String>, quick_xml::Error> {
    let mut reader = Reader::from_str(xml);
    let mut at: Vec<String> = Vec::new();
    let mut start = None;
    let position = |r: &Reader<&[u8]>| usize::try_from(r.buffer_position()).unwrap_or(usize::MAX);
    loop {
        let before = position(&reader);
        let event = reader.read_event()?;
        let here =
            |at: &[String]| at.len() == path.len() && at.iter().zip(path).all(|(a, p)| a == p);
        match event {
            Event::Start(e) => {
                at.push(e.local_name().as_ref().to_string());
                if start.is_none() && here(&at) {
                    start = Some((before, at.len()));
                }
            }
            Event::Empty(e) => {
                at.push(e.local_name().as_ref().to_string());
                if start.is_none() && here(&at) {
                    let end = position(&reader);
                    return Ok(splice(xml, before, end, with));
                }
                at.pop();
            }
            Event::End(_) => {
                if let Some((from, depth)) = start
                    && depth == at.len()
                {
                    return Ok(splice(xml, from, position(&reader), with));
                }
                at.pop();
            }
            Event::Eof => return Ok(None),
            _ => {}
        }
    }
}

fn splice(xml: &str, from: usize, to: usize, with: &str) -> Option<String> {
    Some(format!("{}{with}{}", xml.get(..from)?, xml.get(to..)?))
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
    fn an_element_is_replaced_and_nothing_around_it_changes() {
        let xml = "<domain><devices><input type='tablet'><address type='usb' bus='0'/></input>\n  \
                   <graphics type='spice' port='5900'><listen type='address' address='a'/></graphics>\n  \
                   <video/></devices></domain>";
        let new = "<graphics type='spice' port='6000'/>";
        let out = replace_element(xml, &["domain", "devices", "graphics"], new);
        assert_eq!(
            out.ok().flatten().as_deref(),
            Some(
                "<domain><devices><input type='tablet'><address type='usb' bus='0'/></input>\n  \
                 <graphics type='spice' port='6000'/>\n  <video/></devices></domain>"
            )
        );
        let empty = "<domain><devices><graphics type='vnc'/></devices></domain>";
        let out = replace_element(empty, &["domain", "devices", "graphics"], new);
        assert_eq!(
            out.ok().flatten().as_deref(),
            Some("<domain><devices><graphics type='spice' port='6000'/></devices></domain>")
        );
        let none = replace_element("<domain/>", &["domain", "devices", "graphics"], new);
        assert_eq!(none.ok().flatten(), None);
    }

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
