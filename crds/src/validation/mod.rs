//! What a schema cannot check, checked by pure functions: each takes a spec (and the pool a
//! Desktop names) and returns every field error, each naming the field's path
//! (`spec.network.nodePrefixLength`) and saying in plain words what is wrong. The operator
//! turns them into an `InvalidSpec` condition; no kube client, no I/O.

mod desktop;
mod labels;
mod pool;
mod usb;

use std::fmt;

pub use desktop::{ValidDesktop, read_desktop};
pub use deskvirt_core::valid::FieldError;
pub use labels::{SelectorError, matches as selector_matches};
pub use pool::pool;

/// How a desktop's USB policy loosens its pool's `defaults.usb` (empty when it only narrows
/// it); the node-agent uses it to never apply a looser policy than the pool's.
pub fn usb_loosening(
    desktop: &crate::desktop::UsbPolicy,
    pool: &crate::desktop::UsbPolicy,
) -> Vec<FieldError> {
    let mut e = Errors::default();
    usb::narrows(&mut e, desktop, pool);
    e.0
}

/// Every error in one line for a condition message: `path: what; path: what`.
pub fn summary(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Collects field errors under a path prefix.
#[derive(Debug, Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError::new(path, message));
    }

    /// Records `Err` of `result` at `path`.
    fn check<E: fmt::Display>(&mut self, path: &str, result: Result<impl Sized, E>) {
        if let Err(e) = result {
            self.add(path, e.to_string());
        }
    }
}

/// A quantity that must parse to a positive number of bytes: the bytes, or `None` with the
/// error recorded.
fn positive_bytes(errors: &mut Errors, path: &str, q: &str) -> Option<u64> {
    match crate::quantity::parse_bytes(q) {
        Ok(0) => errors.add(path, format!("{q:?} is zero; it must be more")),
        Ok(b) => return Some(b),
        Err(e) => errors.add(path, e.to_string()),
    }
    None
}

/// A quantity that must parse (zero allowed).
fn bytes(errors: &mut Errors, path: &str, q: &str) {
    errors.check(path, crate::quantity::parse_bytes(q));
}

/// A duration that must be longer than zero: the duration, or `None` with the error recorded.
fn positive_duration(errors: &mut Errors, path: &str, d: &str) -> Option<std::time::Duration> {
    match crate::quantity::parse_duration(d) {
        Ok(t) if t.is_zero() => errors.add(path, format!("{d:?} is zero; it must be longer")),
        Ok(t) => return Some(t),
        Err(e) => errors.add(path, e.to_string()),
    }
    None
}

/// A network interface name the schema's pattern lets through: refuse `.` and `..`.
fn interface(errors: &mut Errors, path: &str, name: &str) {
    if name == "." || name == ".." {
        errors.add(path, format!("{name:?} is not an interface name"));
    }
}

/// The idle policy's fields (a Desktop's own or a pool's default): the policy as the core
/// decides with it, or `None` with the errors recorded.
fn idle(
    errors: &mut Errors,
    at: &str,
    policy: &crate::desktop::IdlePolicy,
) -> Option<deskvirt_core::idle::Policy> {
    let timeout = positive_duration(errors, &format!("{at}.timeout"), &policy.timeout)?;
    Some(deskvirt_core::idle::Policy {
        timeout,
        action: policy.action,
    })
}

#[cfg(test)]
mod tests {
    use crate::{Desktop, ResourcePool};

    fn example<T: serde::de::DeserializeOwned>(name: &str) -> T {
        let path = format!("{}/../examples/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// What users copy must pass: the example pool, and each example desktop in it.
    #[test]
    fn the_examples_are_valid() {
        let pool: ResourcePool = example("pool.yaml");
        assert_eq!(super::pool(&pool.spec), vec![]);
        for name in ["desktop.yaml", "desktop-full.yaml"] {
            let d: Desktop = example(name);
            let valid = super::read_desktop(&d.spec, Some(&pool.spec));
            assert_eq!(valid.map(|v| v.refused), Ok(vec![]), "{name}");
        }
    }
}
