//! A Desktop's spec as both binaries decide with it, read once at the edge against its pool
//! (`deskvirt_crds::validation::read_desktop`): sizes parsed, the idle and USB policies in force
//! chosen, and what only the pool forbids kept apart. Also the field error every reading names.

use std::fmt;

use crate::idle;
use crate::scheduler::{Request, RequestError};
use crate::usb::UsbPolicy;

/// One invalid field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field from the object's root, such as `spec.storage.diskDir` or
    /// `spec.display.usb.allow[1].product`.
    pub path: String,
    /// What is wrong, in plain words.
    pub message: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// A Desktop's spec, read and checked once against its pool.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidDesktop {
    /// The size the spec asks for: vCPUs, memory in bytes, dedicated CPUs, hugepages.
    pub asked: Request,
    /// The disk's virtual size in bytes; `None` keeps the image's.
    pub disk_size: Option<u64>,
    /// The idle policy in force: the desktop's `spec.idle`, else its pool's
    /// `spec.defaults.idle` (`None` when neither is set, or the pool's does not parse: the
    /// pool is then refused as a whole).
    pub idle: Option<idle::Policy>,
    /// Whether a connected SPICE client keeps the desktop active (from the same policy; true
    /// when none is set).
    pub connected_is_active: bool,
    /// The USB redirection policy in force: the desktop's own, unless it is looser than the
    /// pool's `defaults.usb`; else the pool's; else redirection on with two channels.
    pub usb: UsbPolicy,
    /// What the pool forbids in this spec. The operator refuses the desktop on them; a host
    /// never applies them (the value holds the pool's bound instead).
    pub refused: Vec<FieldError>,
    /// The CPU model the pool pins (`spec.cpu.model` of the pool); `None` for the hypervisor's
    /// default.
    pub cpu_model: Option<String>,
}

impl ValidDesktop {
    /// The size a desktop's host gives its domain and the operator charges it for: the vCPUs
    /// and memory the operator admitted (`status.allocation`, when recorded), else what the spec
    /// asks; dedicated CPUs and hugepages are always the spec's.
    pub fn admitted(&self, allocation: Option<(u32, &str)>) -> Result<Request, RequestError> {
        self.asked.admitted_as(allocation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_size_admitted_is_the_recorded_one_with_the_specs_pinning() {
        let v = ValidDesktop {
            asked: Request::new(8, 8 << 30).dedicated(),
            disk_size: None,
            idle: None,
            connected_is_active: true,
            usb: UsbPolicy::default(),
            refused: vec![],
            cpu_model: None,
        };
        assert_eq!(v.admitted(None), Ok(v.asked));
        assert_eq!(
            v.admitted(Some((2, "2Gi"))),
            Ok(Request::new(2, 2 << 30).dedicated())
        );
        assert!(v.admitted(Some((2, "2GB!"))).is_err());
    }
}
