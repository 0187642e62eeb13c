//! Decides which strings XML can carry: the XML 1.0 character set, and the reversible escaping
//! of identity values so that any Unicode string survives a trip through libvirt unchanged.

/// Whether `c` is allowed in an XML 1.0 document (the `Char` production).
pub fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// Whether every character of `s` is allowed in XML 1.0.
pub fn is_xml_text(s: &str) -> bool {
    s.chars().all(is_xml_char)
}

/// Whether `c` at `index` of a value with `last` as its last index must be percent-escaped:
/// `%` itself, characters XML cannot carry, tabs and line breaks (normalized by XML parsers) and
/// spaces at either end (dropped by parsers that ignore blank text).
fn needs_escape(c: char, index: usize, last: usize) -> bool {
    c == '%'
        || !is_xml_char(c)
        || matches!(c, '\t' | '\n' | '\r')
        || (c == ' ' && (index == 0 || index == last))
}

/// Escapes an identity value for the domain metadata: the characters picked by
/// [`needs_escape`] become `%XX` (one per UTF-8 byte); everything else stays readable.
pub fn escape_value(value: &str) -> String {
    let last = value.chars().count().saturating_sub(1);
    let mut out = String::with_capacity(value.len());
    for (index, c) in value.chars().enumerate() {
        if needs_escape(c, index, last) {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Reverses [`escape_value`]; `None` when the text is not a valid escaping.
pub fn unescape_value(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readable_values_stay_readable() {
        assert_eq!(
            escape_value("Jane Doe <jane@example.com>"),
            "Jane Doe <jane@example.com>"
        );
        assert_eq!(escape_value("Zoë ✓"), "Zoë ✓");
    }

    #[test]
    fn troublesome_characters_are_escaped_and_restored() {
        for value in [
            "",
            " ",
            "  a  ",
            "100%",
            "a\tb\r\nc",
            "\u{0}\u{1b}x",
            "%%41",
            "\u{FFFF}",
        ] {
            let escaped = escape_value(value);
            assert!(is_xml_text(&escaped));
            assert!(!escaped.starts_with(' ') && !escaped.ends_with(' '));
            assert_eq!(
                unescape_value(&escaped).as_deref(),
                Some(value),
                "{escaped}"
            );
        }
    }

    #[test]
    fn broken_escapes_are_rejected() {
        assert_eq!(unescape_value("%4"), None);
        assert_eq!(unescape_value("%zz"), None);
        assert_eq!(unescape_value("%FF"), None);
        assert_eq!(unescape_value("%+1"), None);
    }

    #[test]
    fn control_characters_are_not_xml() {
        assert!(!is_xml_text("a\u{1}b"));
        assert!(is_xml_text("a\tb\n"));
    }
}
