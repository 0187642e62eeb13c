//! USB redirection policies: a filter naming a product names its vendor too, and a Desktop may
//! only narrow its pool's `defaults.usb`, never loosen it: no redirection when the pool forbids
//! it, no more channels, every pool deny filter kept, and (when the pool allows only some
//! devices) only allow filters at least as narrow as one of the pool's.

use super::Errors;
use crate::desktop::{UsbFilter, UsbPolicy};

/// A product id means nothing without its vendor.
pub(super) fn filters(errors: &mut Errors, at: &str, policy: &UsbPolicy) {
    for (list, name) in [(&policy.allow, "allow"), (&policy.deny, "deny")] {
        for (i, f) in list.iter().enumerate() {
            if f.product.is_some() && f.vendor.is_none() {
                errors.add(
                    format!("{at}.{name}[{i}].product"),
                    "names a product without its vendor; set vendor too",
                );
            }
        }
    }
}

/// Whether `narrow` matches only devices `wide` matches: every field `wide` sets, `narrow`
/// sets to the same value (hex compared without case).
fn within(narrow: &UsbFilter, wide: &UsbFilter) -> bool {
    let same = |w: &Option<String>, n: &Option<String>| match w {
        None => true,
        Some(w) => n.as_ref().is_some_and(|n| n.eq_ignore_ascii_case(w)),
    };
    same(&wide.class, &narrow.class)
        && same(&wide.vendor, &narrow.vendor)
        && same(&wide.product, &narrow.product)
}

/// The field of `narrow` that makes it wider than the first of `wide`: one `wide` sets that
/// `narrow` leaves out or sets to another value.
fn widening_field(narrow: &UsbFilter, wide: &[UsbFilter]) -> &'static str {
    let differs = |w: &Option<String>, n: &Option<String>| {
        w.as_ref()
            .is_some_and(|w| !n.as_ref().is_some_and(|n| n.eq_ignore_ascii_case(w)))
    };
    match wide.first() {
        Some(w) if differs(&w.class, &narrow.class) => "class",
        Some(w) if differs(&w.vendor, &narrow.vendor) => "vendor",
        Some(_) => "product",
        None => "class",
    }
}

fn show(f: &UsbFilter) -> String {
    let parts: Vec<String> = [
        ("class", &f.class),
        ("vendor", &f.vendor),
        ("product", &f.product),
    ]
    .iter()
    .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k} {v}")))
    .collect();
    if parts.is_empty() {
        "any device".into()
    } else {
        parts.join(", ")
    }
}

/// A desktop policy (`spec.display.usb`) that loosens the pool's.
pub(super) fn narrows(errors: &mut Errors, desktop: &UsbPolicy, pool: &UsbPolicy) {
    let at = "spec.display.usb";
    if desktop.redirect && !pool.redirect {
        errors.add(
            format!("{at}.redirect"),
            "the pool forbids USB redirection (spec.defaults.usb.redirect is false)",
        );
    }
    if desktop.channels > pool.channels {
        errors.add(
            format!("{at}.channels"),
            format!(
                "{} is more than the pool's {} (spec.defaults.usb.channels)",
                desktop.channels, pool.channels
            ),
        );
    }
    for denied in &pool.deny {
        if !desktop.deny.iter().any(|d| within(denied, d)) {
            errors.add(
                format!("{at}.deny"),
                format!(
                    "drops the pool's deny filter ({}); a desktop may add deny filters, not remove them",
                    show(denied)
                ),
            );
        }
    }
    if !pool.allow.is_empty() {
        if desktop.allow.is_empty() {
            errors.add(
                format!("{at}.allow"),
                "is empty, which allows every device, but the pool allows only some",
            );
        }
        for (i, a) in desktop.allow.iter().enumerate() {
            if !pool.allow.iter().any(|p| within(a, p)) {
                errors.add(
                    format!("{at}.allow[{i}].{}", widening_field(a, &pool.allow)),
                    format!("allows {}, which the pool's allow list does not", show(a)),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(v: serde_json::Value) -> UsbPolicy {
        serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"))
    }

    fn paths(desktop: serde_json::Value, pool: serde_json::Value) -> Vec<String> {
        let mut e = Errors::default();
        narrows(&mut e, &policy(desktop), &policy(pool));
        e.0.into_iter().map(|e| e.path).collect()
    }

    #[test]
    fn narrowing_is_allowed() {
        let pool = serde_json::json!({ "channels": 4, "deny": [{ "class": "0x08" }],
            "allow": [{ "vendor": "0x046d" }] });
        let desk = serde_json::json!({ "channels": 1, "allow": [{ "vendor": "0x046D", "product": "0xc52b" }],
            "deny": [{ "class": "0x08" }, { "class": "0x03" }] });
        assert_eq!(paths(desk, pool), Vec::<String>::new());
        let off = serde_json::json!({ "redirect": false });
        assert_eq!(paths(off, serde_json::json!({})), Vec::<String>::new());
    }

    #[test]
    fn loosening_is_named() {
        let pool = serde_json::json!({ "redirect": false, "channels": 1,
            "deny": [{ "class": "0x08" }], "allow": [{ "vendor": "0x046d" }] });
        let desk = serde_json::json!({ "redirect": true, "channels": 2,
            "allow": [{ "class": "0x08" }] });
        assert_eq!(
            paths(desk, pool),
            [
                "spec.display.usb.redirect",
                "spec.display.usb.channels",
                "spec.display.usb.deny",
                "spec.display.usb.allow[0].vendor",
            ]
        );
    }
}
