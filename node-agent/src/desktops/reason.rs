//! The closed set of reasons the agent writes on a Desktop's `DomainDefined` and `Running`
//! conditions (and names its Events after), with the spelling the operator and humans read,
//! and which of them are warnings.

use deskvirt_crds::constants::running_reason;

use crate::disks::DiskError;
use crate::hypervisor::HypervisorError;

/// Why a condition of the agent says what it says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    // DomainDefined: waiting for an input.
    WaitingForPool,
    WaitingForConsolePassword,
    WaitingForBinding,
    WaitingForSubnet,
    // DomainDefined: needs someone to change something.
    InvalidPool,
    InvalidSpec,
    InvalidNetwork,
    InvalidObject,
    InsufficientDedicatedCpus,
    AddressesExhausted,
    DomainNotOurs,
    DefineFailed,
    Defined,
    // The disk.
    BaseImageMissing,
    DiskPreparationFailed,
    /// `qemu-img` missed its deadline and was killed (retried with backoff).
    DiskToolTimeout,
    DiskIoFailed,
    DiskInUse,
    DiskProtected,
    DiskNotOurs,
    UnsafePath,
    /// The pool's disk directory is not visible to the agent (not mounted into its pod).
    DiskDirMissing,
    /// A managed save image exists but the agent cannot tell whether it is stale.
    SavedMemoryUnreadable,
    // Failures of a whole pass, shown once they are permanent or keep coming back.
    KubeApiFailed,
    LibvirtUnavailable,
    LibvirtFailed,
    // Running.
    Running,
    Paused,
    Shutdown,
    Stopping,
    Stopped,
    StartFailed,
    Reclaiming,
    Suspended,
    IdleShutdown,
    SuspendFailed,
}

impl Reason {
    /// The CamelCase reason written into the condition.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::WaitingForPool => "WaitingForPool",
            Self::WaitingForConsolePassword => "WaitingForConsolePassword",
            Self::WaitingForBinding => "WaitingForBinding",
            Self::WaitingForSubnet => "WaitingForSubnet",
            Self::InvalidPool => "InvalidPool",
            Self::InvalidSpec => "InvalidSpec",
            Self::InvalidNetwork => "InvalidNetwork",
            Self::InvalidObject => "InvalidObject",
            Self::InsufficientDedicatedCpus => "InsufficientDedicatedCpus",
            Self::AddressesExhausted => "AddressesExhausted",
            Self::DomainNotOurs => "DomainNotOurs",
            Self::DefineFailed => "DefineFailed",
            Self::Defined => "Defined",
            Self::BaseImageMissing => "BaseImageMissing",
            Self::DiskPreparationFailed => "DiskPreparationFailed",
            Self::DiskToolTimeout => "DiskToolTimeout",
            Self::DiskIoFailed => "DiskIoFailed",
            Self::DiskInUse => "DiskInUse",
            Self::DiskProtected => "DiskProtected",
            Self::DiskNotOurs => "DiskNotOurs",
            Self::UnsafePath => "UnsafePath",
            Self::DiskDirMissing => "DiskDirMissing",
            Self::SavedMemoryUnreadable => "SavedMemoryUnreadable",
            Self::KubeApiFailed => "KubeApiFailed",
            Self::LibvirtUnavailable => "LibvirtUnavailable",
            Self::LibvirtFailed => "LibvirtFailed",
            Self::Running => running_reason::RUNNING,
            Self::Paused => "Paused",
            Self::Shutdown => "Shutdown",
            Self::Stopping => "Stopping",
            Self::Stopped => "Stopped",
            Self::StartFailed => "StartFailed",
            Self::Reclaiming => running_reason::RECLAIMING,
            Self::Suspended => running_reason::SUSPENDED,
            Self::IdleShutdown => running_reason::IDLE_SHUTDOWN,
            Self::SuspendFailed => super::power::SUSPEND_FAILED,
        }
    }

    /// Whether a change to this reason is a Warning Event (a failure, even while the domain
    /// still runs, as with `SuspendFailed`).
    pub fn is_warning(self) -> bool {
        matches!(
            self,
            Self::InvalidPool
                | Self::InvalidSpec
                | Self::InvalidNetwork
                | Self::InvalidObject
                | Self::InsufficientDedicatedCpus
                | Self::AddressesExhausted
                | Self::DomainNotOurs
                | Self::DefineFailed
                | Self::BaseImageMissing
                | Self::DiskPreparationFailed
                | Self::DiskToolTimeout
                | Self::DiskIoFailed
                | Self::DiskNotOurs
                | Self::DiskDirMissing
                | Self::SavedMemoryUnreadable
                | Self::KubeApiFailed
                | Self::LibvirtUnavailable
                | Self::LibvirtFailed
                | Self::StartFailed
                | Self::SuspendFailed
        )
    }

    /// The reason for a disk that could not be prepared.
    pub fn of_disk(e: &DiskError) -> Self {
        match e {
            DiskError::BaseMissing { .. } => Self::BaseImageMissing,
            DiskError::Timeout { .. } => Self::DiskToolTimeout,
            DiskError::Io { .. } => Self::DiskIoFailed,
            DiskError::InUse { .. } => Self::DiskInUse,
            DiskError::Protected { .. } => Self::DiskProtected,
            DiskError::NotOurs { .. } => Self::DiskNotOurs,
            DiskError::UnsafePath { .. } => Self::UnsafePath,
            // qemu-img refused or failed, or a failure added later.
            #[allow(unreachable_patterns)]
            _ => Self::DiskPreparationFailed,
        }
    }

    /// The reason for a libvirt call that failed.
    pub fn of_hypervisor(e: &HypervisorError) -> Self {
        match e {
            HypervisorError::Disconnected { .. } => Self::LibvirtUnavailable,
            // Refused, failed, or a failure added later (such as a deadline).
            _ => Self::LibvirtFailed,
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
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
