//! Label keys, values and label selectors: Kubernetes' own syntax rules for the keys of a
//! pool's `nodeSelector` and `namespaceSelector`, and how a selector matches a set of labels.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::Errors;

/// A label selector that cannot be evaluated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("operator {0:?} is not In, NotIn, Exists or DoesNotExist")]
    Operator(String),
    #[error("operator {operator} needs at least one value")]
    NoValues { operator: String },
    #[error("operator {operator} takes no values")]
    Values { operator: String },
}

/// A name part: 1..=63 of `[A-Za-z0-9._-]`, alphanumeric at both ends.
fn is_name(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=63).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// A DNS-1123 subdomain of at most 253 characters.
fn is_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|l| {
            let b = l.as_bytes();
            !b.is_empty()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b.first().is_some_and(u8::is_ascii_alphanumeric)
                && b.last().is_some_and(u8::is_ascii_alphanumeric)
        })
}

/// Why `key` is not a label key, if it is not.
pub fn key_problem(key: &str) -> Option<String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if prefix.is_some_and(|p| !is_subdomain(p)) {
        return Some(format!(
            "label key {key:?} has a prefix that is not a DNS subdomain"
        ));
    }
    (!is_name(name)).then(|| {
        format!(
            "label key {key:?} must be 1 to 63 letters, digits, `-`, `_` or `.`, \
             starting and ending with a letter or digit"
        )
    })
}

/// Why `value` is not a label value, if it is not.
pub fn value_problem(value: &str) -> Option<String> {
    (!value.is_empty() && !is_name(value)).then(|| {
        format!(
            "label value {value:?} must be empty or 1 to 63 letters, digits, `-`, `_` or `.`, \
             starting and ending with a letter or digit"
        )
    })
}

/// Checks a map of labels (a selector's `matchLabels`, a pool's `nodeSelector`).
pub(super) fn check_map(errors: &mut Errors, path: &str, labels: &BTreeMap<String, String>) {
    for (k, v) in labels {
        if let Some(p) = key_problem(k).or_else(|| value_problem(v)) {
            errors.add(path, p);
        }
    }
}

/// Checks a label selector's keys, operators and values.
pub(super) fn check_selector(errors: &mut Errors, path: &str, selector: &LabelSelector) {
    if let Some(labels) = &selector.match_labels {
        check_map(errors, &format!("{path}.matchLabels"), labels);
    }
    for (i, e) in selector.match_expressions.iter().flatten().enumerate() {
        let at = format!("{path}.matchExpressions[{i}]");
        if let Some(p) = key_problem(&e.key) {
            errors.add(format!("{at}.key"), p);
        }
        match expression_problem(&e.operator, e.values.as_deref().unwrap_or_default()) {
            Some(SelectorError::Operator(o)) => errors.add(
                format!("{at}.operator"),
                SelectorError::Operator(o).to_string(),
            ),
            Some(other) => errors.add(format!("{at}.values"), other.to_string()),
            None => {}
        }
        for v in e.values.iter().flatten() {
            if let Some(p) = value_problem(v) {
                errors.add(format!("{at}.values"), p);
            }
        }
    }
}

fn expression_problem(operator: &str, values: &[String]) -> Option<SelectorError> {
    match operator {
        "In" | "NotIn" if values.is_empty() => Some(SelectorError::NoValues {
            operator: operator.into(),
        }),
        "Exists" | "DoesNotExist" if !values.is_empty() => Some(SelectorError::Values {
            operator: operator.into(),
        }),
        "In" | "NotIn" | "Exists" | "DoesNotExist" => None,
        other => Some(SelectorError::Operator(other.into())),
    }
}

/// Whether `selector` matches `labels`. An empty selector matches everything.
pub fn matches(
    selector: &LabelSelector,
    labels: &BTreeMap<String, String>,
) -> Result<bool, SelectorError> {
    let by_labels = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let mut by_expressions = true;
    for e in selector.match_expressions.iter().flatten() {
        let values = e.values.as_deref().unwrap_or_default();
        if let Some(problem) = expression_problem(&e.operator, values) {
            return Err(problem);
        }
        let have = labels.get(&e.key);
        let ok = match e.operator.as_str() {
            "In" => have.is_some_and(|h| values.contains(h)),
            "NotIn" => have.is_none_or(|h| !values.contains(h)),
            "Exists" => have.is_some(),
            _ => have.is_none(),
        };
        by_expressions &= ok;
    }
    Ok(by_labels && by_expressions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn keys_and_values() {
        assert_eq!(key_problem("deskvirt.io/tenant"), None);
        assert_eq!(key_problem("team"), None);
        assert!(key_problem("Bad_Prefix/x").is_some());
        assert!(key_problem("-x").is_some());
        assert!(key_problem("").is_some());
        assert_eq!(value_problem(""), None);
        assert!(value_problem("a b").is_some());
        assert!(value_problem(&"a".repeat(64)).is_some());
    }

    #[test]
    fn selectors_match_like_kubernetes() {
        let sel = LabelSelector {
            match_labels: Some(labels(&[("tier", "lab")])),
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "blocked".into(),
                operator: "DoesNotExist".into(),
                values: None,
            }]),
        };
        assert_eq!(matches(&sel, &labels(&[("tier", "lab")])), Ok(true));
        assert_eq!(
            matches(&sel, &labels(&[("tier", "lab"), ("blocked", "")])),
            Ok(false)
        );
        assert_eq!(matches(&sel, &labels(&[])), Ok(false));
        assert_eq!(matches(&LabelSelector::default(), &labels(&[])), Ok(true));
        let bad = LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "a".into(),
                operator: "In".into(),
                values: None,
            }]),
            ..Default::default()
        };
        assert!(matches(&bad, &labels(&[])).is_err());
    }
}
