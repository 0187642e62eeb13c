//! Moving a running desktop to another host of its pool, as pure decisions: whether a
//! migration may start ([`admit`]), which host it goes to ([`target`]), how many run at once ([`limits`]), how long a
//! reserved target waits ([`held`]), and which phase
//! changes a migration may make ([`phase`]). The controllers read the API into these values and
//! act on the answers; nothing here calls a host or the API.

pub mod admit;
pub mod held;
pub mod limits;
pub mod phase;
pub mod target;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use admit::{Facts, admit};
pub use held::Held;
pub use limits::{Active, Limits, Slots};
pub use phase::allowed;
pub use target::{Refusal, choose_target};

/// How a desktop moves.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum MigrationMode {
    /// The domain keeps running while its memory is copied; the user sees a pause of the
    /// downtime only. Needs storage every host of the pool reaches.
    #[default]
    Live,
    /// The domain is shut down, its binding moves, and it boots on the target.
    Cold,
}

/// What the source host reports of a migration it acts on.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum MigrationState {
    /// The source host started moving the domain.
    Started,
    /// The domain runs on the target, and the source host let go of it.
    Completed,
    /// The move failed; the domain runs on the source as before.
    Failed,
}

/// Where a migration is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum MigrationPhase {
    /// Accepted; waiting for its desktop to be movable, or for a free slot.
    #[default]
    Pending,
    /// A target is chosen and holds a port and the desktop's size; no host acted yet.
    Scheduling,
    /// The source host is moving the domain.
    Running,
    /// The desktop runs on the target; the source let go of it.
    Succeeded,
    /// Ended without moving; the desktop runs where it ran (see the conditions).
    Failed,
}

impl MigrationPhase {
    /// The phase as the API writes it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Scheduling => "Scheduling",
            Self::Running => "Running",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
        }
    }

    /// Whether the migration has ended (nothing changes it any more).
    pub const fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }

    /// Whether the migration holds a target (a port and the desktop's size on it).
    pub const fn holds_target(self) -> bool {
        matches!(self, Self::Scheduling | Self::Running)
    }
}
