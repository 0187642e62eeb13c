//! Decides whether a host can give a desktop its pool's pinned CPU model: the host must list
//! the model among those its hypervisor can run. A host that reports no list (an older agent)
//! is trusted; its agent then refuses the domain with a reason if the model is missing.

use std::fmt;

/// The longest model name the API accepts.
pub const MAX_LEN: usize = 64;

/// A pool's pinned CPU model, such as `Westmere`: a short name kept inline, so a policy that
/// holds one stays a plain value.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CpuModel {
    len: u8,
    bytes: [u8; MAX_LEN],
}

impl CpuModel {
    /// `name` as a model; `None` when it is empty or longer than [`MAX_LEN`] bytes.
    pub fn new(name: &str) -> Option<Self> {
        let raw = name.as_bytes();
        if raw.is_empty() || raw.len() > MAX_LEN {
            return None;
        }
        let mut bytes = [0; MAX_LEN];
        bytes[..raw.len()].copy_from_slice(raw);
        Some(Self {
            len: u8::try_from(raw.len()).ok()?,
            bytes,
        })
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }

    /// Whether a host reporting `usable` models can run this one (exact name, as libvirt
    /// matches it). `None`: the host did not say, and is trusted.
    pub fn runs_on(&self, usable: Option<&[String]>) -> bool {
        usable.is_none_or(|list| list.iter().any(|m| m == self.as_str()))
    }
}

impl fmt::Debug for CpuModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CpuModel({:?})", self.as_str())
    }
}

impl fmt::Display for CpuModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_is_kept_by_name_and_bounded() {
        let m = CpuModel::new("Skylake-Client-IBRS").unwrap_or_else(|| panic!("model"));
        assert_eq!(m.as_str(), "Skylake-Client-IBRS");
        assert_eq!(m.to_string(), "Skylake-Client-IBRS");
        assert_eq!(CpuModel::new(""), None);
        assert!(CpuModel::new(&"x".repeat(MAX_LEN)).is_some());
        assert_eq!(CpuModel::new(&"x".repeat(MAX_LEN + 1)), None);
    }

    #[test]
    fn a_host_runs_a_model_it_lists_or_when_it_lists_nothing() {
        let m = CpuModel::new("Westmere").unwrap_or_else(|| panic!("model"));
        let list = vec!["qemu64".to_string(), "Westmere".to_string()];
        assert!(m.runs_on(Some(&list)));
        assert!(!m.runs_on(Some(&list[..1])));
        assert!(!m.runs_on(Some(&[])));
        assert!(m.runs_on(None));
        let other_case = vec!["westmere".to_string()];
        assert!(
            !m.runs_on(Some(&other_case)),
            "libvirt matches names exactly"
        );
    }
}
