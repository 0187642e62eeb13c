//! The closed set of reasons the agent writes on a Desktop's `DomainDefined` and `Running`
//! conditions (and names its Events after), with the spelling the operator and humans read,
//! and which of them are warnings.

use crate::disks::DiskError;
use crate::hypervisor::HypervisorError;

/// Why a condition of the agent says what it says: the closed set shared with the operator.
pub use deskvirt_core::reasons::AgentReason as Reason;

/// The reason an agent error gives.
pub trait ReasonOf {
    /// The reason for a disk that could not be prepared.
    fn of_disk(e: &DiskError) -> Self;

    /// The reason for a libvirt call that failed.
    fn of_hypervisor(e: &HypervisorError) -> Self;
}

impl ReasonOf for Reason {
    fn of_disk(e: &DiskError) -> Self {
        match e {
            DiskError::BaseMissing { .. } | DiskError::BaseUnverified { .. } => {
                Self::BaseImageMissing
            }
            DiskError::Timeout { .. } => Self::DiskToolTimeout,
            DiskError::Io { .. } => Self::DiskIoFailed,
            DiskError::InUse { .. } => Self::DiskInUse,
            DiskError::DirMissing { .. } => Self::DiskDirMissing,
            DiskError::Protected { .. } => Self::DiskProtected,
            DiskError::NotOurs { .. } => Self::DiskNotOurs,
            DiskError::UnsafePath { .. } => Self::UnsafePath,
            DiskError::RestoreRefused { .. } => Self::RestoreRefused,
            // qemu-img refused or failed, or a failure added later.
            #[allow(unreachable_patterns)]
            _ => Self::DiskPreparationFailed,
        }
    }

    fn of_hypervisor(e: &HypervisorError) -> Self {
        match e {
            HypervisorError::Disconnected { .. } => Self::LibvirtUnavailable,
            // Refused, failed, or a failure added later (such as a deadline).
            _ => Self::LibvirtFailed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_reasons_keep_the_names_disk_errors_had() {
        let e = DiskError::BaseMissing { path: "/x".into() };
        assert_eq!(Reason::of_disk(&e).as_str(), e.reason());
        let e = DiskError::Tool {
            op: "create",
            path: "/x".into(),
            message: "m".into(),
        };
        assert_eq!(Reason::of_disk(&e).as_str(), e.reason());
        let e = DiskError::InUse { path: "/x".into() };
        assert_eq!(Reason::of_disk(&e).as_str(), e.reason());
        let e = DiskError::Timeout {
            op: "create",
            path: "/x".into(),
            after: std::time::Duration::from_secs(5),
        };
        assert_eq!(Reason::of_disk(&e).as_str(), e.reason());
    }

    #[test]
    fn failures_are_warnings_and_progress_is_not() {
        assert!(Reason::DefineFailed.is_warning());
        assert!(Reason::SavedMemoryUnreadable.is_warning());
        assert!(!Reason::Defined.is_warning());
        assert!(!Reason::Running.is_warning());
        assert!(!Reason::WaitingForPool.is_warning());
    }
}
