//! Decides how hypervisor failures are reported: our own error enum, independent of `virt`,
//! with the libvirt codes that matter folded into NotFound, Disconnected and Rejected, and a
//! missed deadline as Timeout (transient).

/// What a hypervisor object is, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// A libvirt domain.
    Domain,
    /// A libvirt network.
    Network,
}

impl std::fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Domain => "domain",
            Self::Network => "network",
        })
    }
}

/// Why a hypervisor call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HypervisorError {
    /// The domain or network does not exist (libvirt `NoDomain` / `NoNetwork`).
    #[error("{kind} {name:?} not found")]
    NotFound {
        /// Domain or network.
        kind: ObjectKind,
        /// Its name.
        name: String,
    },
    /// libvirt is unreachable; calls fail fast until the backoff allows a reconnect.
    #[error("{op}: libvirt is not connected: {message}")]
    Disconnected {
        /// The operation.
        op: &'static str,
        /// libvirt's message.
        message: String,
    },
    /// libvirt refused the request as invalid (bad XML, wrong state, unsupported); retrying
    /// the same request will not help.
    #[error("{op} {target:?} rejected: {message}")]
    Rejected {
        /// The operation.
        op: &'static str,
        /// Domain or network name (or `-`).
        target: String,
        /// libvirt's message, with its error code.
        message: String,
    },
    /// Any other libvirt failure.
    #[error("{op} {target:?} failed: {message}")]
    Failed {
        /// The operation.
        op: &'static str,
        /// Domain or network name (or `-`).
        target: String,
        /// libvirt's message, with its error code.
        message: String,
    },
    /// libvirt did not answer within the call's deadline. The call may still complete in its
    /// blocking thread (libvirt calls cannot be cancelled); nothing waits for it.
    #[error("{op}: libvirt did not answer within {}s", after.as_secs_f32())]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The deadline it missed.
        after: std::time::Duration,
    },
    /// The blocking task running the call panicked or was cancelled.
    #[error("{op}: blocking task failed: {message}")]
    Task {
        /// The operation.
        op: &'static str,
        /// The join error.
        message: String,
    },
}

impl HypervisorError {
    /// Short category for metrics labels and Event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Self::NotFound { .. } => "NotFound",
            Self::Disconnected { .. } => "LibvirtDisconnected",
            Self::Rejected { .. } => "LibvirtRejected",
            Self::Failed { .. } => "LibvirtFailed",
            Self::Timeout { .. } => "LibvirtTimeout",
            Self::Task { .. } => "TaskFailed",
        }
    }

    /// Whether retrying later may succeed.
    pub fn is_transient(&self) -> bool {
        !matches!(self, Self::Rejected { .. })
    }

    /// Whether this is [`HypervisorError::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::NotFound { .. })
    }
}
