//! Decides what can go wrong turning a Desktop into domain or network XML, and how the agent
//! should treat each failure (category for metrics and Events, transient or not).

use deskvirt_crds::quantity::QuantityError;

/// Why a Desktop could not be turned into [`super::DomainInputs`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// The Desktop lacks a metadata field the domain needs (namespace, name, uid).
    #[error("desktop has no {field}")]
    MissingMetadata {
        /// The missing field.
        field: &'static str,
    },
    /// The operator has not bound the desktop yet (node, SPICE port or MAC missing).
    #[error("desktop is not bound yet: {field} is unset")]
    MissingBinding {
        /// The missing status field.
        field: &'static str,
    },
    /// The desktop is bound to another host.
    #[error("desktop is bound to node {bound:?}, not {this:?}")]
    BoundElsewhere {
        /// Node in the binding.
        bound: String,
        /// This agent's node.
        this: String,
    },
    /// The UID is not a UUID (libvirt needs one).
    #[error("uid {uid:?} is not a UUID")]
    BadUid {
        /// The UID.
        uid: String,
    },
    /// A quantity could not be read.
    #[error("{field} is not a valid quantity")]
    BadQuantity {
        /// The field.
        field: &'static str,
        /// Why.
        #[source]
        source: QuantityError,
    },
    /// A size or count is outside what a domain can have.
    #[error("{field} must be at least 1")]
    Zero {
        /// The field.
        field: &'static str,
    },
    /// A file name is not a plain name inside the pool's image directory.
    #[error("{field} {value:?} is not a file name inside the image directory")]
    BadFileName {
        /// The field.
        field: &'static str,
        /// The value.
        value: String,
    },
    /// The MAC address is malformed.
    #[error("{mac:?} is not a unicast MAC address")]
    BadMac {
        /// The value.
        mac: String,
    },
    /// Dedicated CPUs were asked for but the agent has not picked enough host CPUs.
    #[error("{wanted} dedicated CPUs needed, {got} pinned")]
    NotEnoughPinnedCpus {
        /// vCPUs of the desktop.
        wanted: u32,
        /// Host CPUs in the binding.
        got: usize,
    },
    /// The pool is in bridge mode without a bridge name.
    #[error("pool network mode is bridge but no bridge is named")]
    MissingBridge,
    /// A feature of the spec is not implemented by this agent.
    #[error("{feature} is not supported yet")]
    Unsupported {
        /// The spec field.
        feature: &'static str,
    },
    /// A value holds characters XML cannot carry (control characters).
    #[error("{field} holds characters that XML cannot carry")]
    InvalidText {
        /// The field.
        field: &'static str,
    },
}

impl BuildError {
    /// Short category for metrics labels and Event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Self::MissingMetadata { .. } | Self::BadUid { .. } => "BadMetadata",
            Self::MissingBinding { .. } | Self::NotEnoughPinnedCpus { .. } => "NotBound",
            Self::BoundElsewhere { .. } => "BoundElsewhere",
            Self::MissingBridge => "BadPool",
            Self::Unsupported { .. } => "Unsupported",
            Self::BadQuantity { .. }
            | Self::Zero { .. }
            | Self::BadFileName { .. }
            | Self::BadMac { .. }
            | Self::InvalidText { .. } => "InvalidSpec",
        }
    }

    /// Whether waiting may fix it (the binding is still being written); otherwise the spec or
    /// the pool must change.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::MissingBinding { .. } | Self::NotEnoughPinnedCpus { .. }
        )
    }
}

/// Why typed XML could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum XmlError {
    /// A value holds characters XML cannot carry.
    #[error("{field} holds characters that XML cannot carry")]
    InvalidText {
        /// The field.
        field: &'static str,
    },
    /// An address or range is malformed.
    #[error("{field} {value:?} is invalid")]
    Invalid {
        /// The field.
        field: &'static str,
        /// The value.
        value: String,
    },
    /// The serializer failed.
    #[error("serializing XML")]
    Serialize(#[from] quick_xml::SeError),
}

impl XmlError {
    /// Short category for metrics labels and Event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Self::InvalidText { .. } | Self::Invalid { .. } => "InvalidSpec",
            Self::Serialize(_) => "XmlSerialize",
        }
    }
}
