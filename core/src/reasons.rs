//! The reasons conditions give, as closed sets shared by both binaries: a reason is matched by
//! its variant, never by its text.

/// Declares a closed set of condition reasons, each with its CamelCase text.
macro_rules! reasons {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every reason of the set.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The reason as a condition carries it.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => stringify!($variant)),+
                }
            }

            /// The reason a condition's text names, if it is one of the set.
            pub fn parse(text: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|r| r.as_str() == text)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

reasons! {
    /// Reasons of a Desktop's `SizeApplied` condition (operator).
    SizeReason {
        /// The domain runs with (or, stopped, starts with) the size `spec` asks for.
        Applied,
        /// The new size is admitted and applies at the next restart; until then the host is
        /// charged the larger of the old and the new.
        RestartRequired,
        /// The host cannot hold the new size; the old one keeps running and counting.
        InsufficientCapacity,
    }
}

reasons! {
    /// Reasons of a Desktop's `PoolApplied` condition (operator).
    PoolReason {
        /// `spec.pool` is the pool the desktop is bound in.
        Bound,
        /// `spec.pool` was edited after binding; the binding stays in its pool.
        PoolChangeRefused,
    }
}

reasons! {
    /// Reasons of a Desktop's `Idle` condition (operator), decided by [`crate::idle`].
    IdleReason {
        /// Active, or not running (idle time counts only while it runs).
        Active,
        /// Idle, still within the timeout.
        CountingDown,
        /// Idle past the timeout; the action is asked of the host, or done.
        IdleTimeout,
        /// Idle past the timeout, and the policy's action is None: only reported.
        IdleReported,
        /// Woken by the `deskvirt.io/wake` annotation; waiting for room or starting.
        Woken,
    }
}

reasons! {
    /// Reasons of the agent's `DomainDefined` and `Running` conditions on a Desktop (and the
    /// names of its Events). The operator reads them to derive the phase.
    AgentReason {
        /// Waiting for the desktop's pool to reach the host's cache.
        WaitingForPool,
        /// Waiting for the operator's console password mirror.
        WaitingForConsolePassword,
        /// Waiting for the operator's binding to be complete.
        WaitingForBinding,
        /// Waiting for the host's subnet of the pool network.
        WaitingForSubnet,
        /// The pool cannot be used on this host.
        InvalidPool,
        /// A field of the Desktop's spec cannot be applied.
        InvalidSpec,
        /// The pool's network cannot be set up on this host.
        InvalidNetwork,
        /// The Desktop object lacks something every object has.
        InvalidObject,
        /// The host has not enough threads left to pin.
        InsufficientDedicatedCpus,
        /// The host's subnet has no free address.
        AddressesExhausted,
        /// A domain of another Desktop holds the name or UUID.
        DomainNotOurs,
        /// libvirt refused the definition.
        DefineFailed,
        /// The domain is defined.
        Defined,
        /// The base image is missing.
        BaseImageMissing,
        /// The disk could not be prepared.
        DiskPreparationFailed,
        /// `qemu-img` missed its deadline and was killed.
        DiskToolTimeout,
        /// A file-system call on the disk failed.
        DiskIoFailed,
        /// The disk is used by another domain.
        DiskInUse,
        /// The disk is protected from deletion.
        DiskProtected,
        /// The disk belongs to another Desktop.
        DiskNotOurs,
        /// A path escapes the pool's directories.
        UnsafePath,
        /// The backup the disk is to be restored from fails its checks (a changed file, a
        /// chain that does not check clean); nothing is made.
        RestoreRefused,
        /// The pool's disk directory is not visible to the agent.
        DiskDirMissing,
        /// A managed save image exists but cannot be dated.
        SavedMemoryUnreadable,
        /// The agent keeps failing to talk to the API server.
        KubeApiFailed,
        /// libvirt is not reachable.
        LibvirtUnavailable,
        /// libvirt keeps failing.
        LibvirtFailed,
        /// The domain runs.
        Running,
        /// libvirt paused the domain (an I/O error, say).
        Paused,
        /// The guest shut itself down.
        Shutdown,
        /// Shutting the guest down (`spec.power: Off`).
        Stopping,
        /// The domain is off.
        Stopped,
        /// The domain could not be started.
        StartFailed,
        /// The domain could not start because another process on the host listens on its SPICE
        /// port; the operator gives the desktop another port ([`crate::spice`]).
        SpicePortBusy,
        /// Being saved or shut down for the idle policy.
        Reclaiming,
        /// Saved to disk by the idle policy.
        Suspended,
        /// Shut down by the idle policy.
        IdleShutdown,
        /// The idle policy's suspend failed; the domain still runs.
        SuspendFailed,
        /// Shut down and undefined here by a Cold migration: the migration's target boots it.
        MovedCold,
        /// Not started while its disk is captured into a DesktopImage (it is the template).
        Capturing,
    }
}

impl AgentReason {
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
                | Self::DiskInUse
                | Self::DiskNotOurs
                | Self::RestoreRefused
                | Self::DiskDirMissing
                | Self::SavedMemoryUnreadable
                | Self::KubeApiFailed
                | Self::LibvirtUnavailable
                | Self::LibvirtFailed
                | Self::StartFailed
                | Self::SpicePortBusy
                | Self::SuspendFailed
        )
    }
}

reasons! {
    /// Reasons of the operator's summary `Ready` condition of a bound Desktop, derived by
    /// [`crate::phase`].
    ReadyReason {
        /// Not bound to a host yet.
        NotScheduled,
        /// The host stopped heartbeating.
        HostLost,
        /// Bound; the host has not defined the domain yet.
        WaitingForHost,
        /// The host could not define the domain.
        DefineFailed,
        /// The desktop runs.
        Running,
        /// Saved to disk.
        Suspended,
        /// The domain could not be started (or a host operation on it failed).
        StartFailed,
        /// Its SPICE port was taken on the host by another process; it moves to another port.
        SpicePortBusy,
        /// Shut down.
        Stopped,
        /// Starting.
        Starting,
        /// Reclaimed by the idle policy.
        IdleTimeout,
        /// The host is reclaiming it for the idle policy.
        Reclaiming,
        /// libvirt paused the domain (an I/O error, a broken post-copy migration, a user).
        Paused,
    }
}

reasons! {
    /// Reasons of a DesktopMigration's conditions (operator): why it waits, why it ended.
    MigrationReason {
        /// A target holds a port and the desktop's size; the source host may start.
        TargetReserved,
        /// The source host is moving the desktop.
        Moving,
        /// The desktop runs on the target.
        Succeeded,
        /// The Desktop does not exist (yet).
        DesktopNotFound,
        /// The Desktop is not bound to a host yet.
        DesktopNotBound,
        /// The Desktop's domain is not running, so there is nothing to move live.
        DesktopNotRunning,
        /// No other host of the pool can take the desktop now.
        NoTarget,
        /// The pool's concurrency limit is reached; the migration waits its turn.
        Queued,
        /// The Desktop the migration was made for was deleted and made again under the same name.
        DesktopReplaced,
        /// The Desktop is being deleted.
        DesktopDeleted,
        /// Live migration needs storage every host of the pool reaches (`storage.shared`).
        StorageNotShared,
        /// The mode is not supported for this desktop.
        ModeNotSupported,
        /// The target named is the host the desktop runs on.
        TargetIsSource,
        /// The target named is not a host of the desktop's pool.
        TargetNotInPool,
        /// An older migration of the same desktop has not ended.
        AlreadyMigrating,
        /// A backup of the desktop is being written; the move waits for it.
        BackupInProgress,
        /// The desktop is the template of a DesktopImage whose capture is not made yet; the
        /// move waits for it.
        CaptureInProgress,
        /// Desktops with dedicated CPUs or passed-through devices are pinned to their host.
        PinnedToHost,
        /// Deleted by the user before it ended.
        Cancelled,
        /// The source host did not start moving the desktop within the start timeout.
        StartTimeout,
        /// The port reserved on the target is no longer held (the pool's ledger was rebuilt
        /// and another desktop holds it, or the target left the pool).
        TargetLost,
        /// The source host tried and failed; the desktop runs there as before.
        HostFailed,
        /// The target host cannot make the empty disk a Cold move copies into (pools whose
        /// storage the hosts do not share): a file of that name is there, or the base image is
        /// missing.
        TargetNotPrepared,
        /// The pool a move to another pool names does not exist, does not admit the
        /// desktop's namespace, or refuses the desktop's spec.
        PoolNotAllowed,
        /// The desktop is suspended with its memory saved on its host: a move to another pool
        /// reboots it (its MAC changes), which would lose that memory. Wake it or stop it.
        MemorySaved,
    }
}

reasons! {
    /// Why a desktop keeps a draining host from being empty (operator, `DomainNode.status.drain`).
    DrainReason {
        /// A live migration moves it (or waits for a slot of the host's migration limit).
        Migrating,
        /// It is not running; the Desktop pass binds it to another host of the pool.
        Rebinding,
        /// Its vCPUs are pinned to this host's threads, or devices are passed through to it.
        PinnedToHost,
        /// It runs, and the pool's storage is not shared: it cannot move live, and a Cold move
        /// (its disk copied) would reboot it, which is an admin's call.
        StorageNotShared,
        /// Its last migration failed; the drain tries again after a while.
        MigrationFailed,
        /// Its domain neither runs nor is stopped yet (starting, stopping, or failing to start).
        Settling,
    }
}

impl MigrationReason {
    /// Whether the reason ends the migration (Failed) rather than make it wait (Pending): what
    /// cannot change by waiting ends it.
    pub const fn ends(self) -> bool {
        matches!(
            self,
            Self::DesktopReplaced
                | Self::DesktopDeleted
                | Self::StorageNotShared
                | Self::ModeNotSupported
                | Self::TargetIsSource
                | Self::TargetNotInPool
                | Self::AlreadyMigrating
                | Self::PinnedToHost
                | Self::Cancelled
                | Self::StartTimeout
                | Self::TargetLost
                | Self::HostFailed
                | Self::TargetNotPrepared
        )
    }
}

reasons! {
    /// Reasons of a DesktopImage's `Ready` condition.
    ImageReason {
        /// Every Ready host of the target pools holds a verified copy.
        Distributed,
        /// Some hosts are still fetching (or have not started).
        Copying,
        /// A host could not make a verified copy (the message names it and why).
        CopyFailed,
        /// No host of the target pools has joined (or none is Ready).
        NoHosts,
        /// The source may not be used from this namespace: a URL import only in the images
        /// namespace.
        SourceNotAllowed,
        /// (`Deleting`) Desktops are pinned to a version of the image; the deletion waits.
        InUse,
        /// `spec.source` sets both or neither of `http` and `desktop`.
        InvalidSource,
        /// The template Desktop of `spec.source.desktop` does not exist in the namespace.
        TemplateNotFound,
        /// The template Desktop is not bound to a host yet.
        TemplateNotBound,
        /// The template Desktop runs (or is to run): it is captured only shut down.
        TemplateRunning,
        /// The template Desktop's pool is not one of `spec.pools`.
        TemplateNotInPool,
        /// The template's host is capturing its disk into the version.
        Capturing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_read_back_from_their_text() {
        for r in SizeReason::ALL {
            assert_eq!(SizeReason::parse(r.as_str()), Some(*r));
        }
        assert_eq!(PoolReason::PoolChangeRefused.as_str(), "PoolChangeRefused");
        assert_eq!(PoolReason::parse("Bound "), None);
    }
}

reasons! {
    /// Reasons of a DesktopBackup's `Ready` condition (operator): why it waits, runs or ended.
    BackupReason {
        /// No Desktop of that name in the namespace (yet).
        DesktopNotFound,
        /// The Desktop the backup pinned was deleted (or made again under its name).
        DesktopGone,
        /// The Desktop is being deleted.
        DesktopDeleting,
        /// The Desktop's pool has no `spec.backup.dir`: nowhere to write.
        NoBackupDir,
        /// The Desktop is not bound to a host yet.
        NotBound,
        /// The Desktop's host is not heartbeating.
        HostNotReady,
        /// The Desktop is moving to another host.
        Migrating,
        /// The Desktop's domain does not run; only running desktops are backed up.
        NotRunning,
        /// Another backup of the Desktop is being written.
        Busy,
        /// The namespace's backups fill its `deskvirt.io/backup-storage` quota.
        QuotaExceeded,
        /// It waited past the operator's pending timeout.
        PendingTimeout,
        /// The host writes the backup.
        Started,
        /// Written, verified, and its checksum recorded.
        Succeeded,
        /// The host could not write or verify it (the message says why); its file is removed.
        BackupFailed,
        /// The host was lost, or the desktop left it, while the backup was written.
        HostLost,
        /// Deleted, but a backup or a desktop being restored still reads its file: the
        /// deletion waits for it.
        InUse,
        /// Deleted: the host that wrote its file removes it.
        RemovingFile,
    }
}

reasons! {
    /// Reasons of a DesktopRestore's `Ready` condition (operator): why it waits, where it is,
    /// or why it failed.
    RestoreReason {
        /// No Desktop of that name in the namespace (yet).
        DesktopNotFound,
        /// The Desktop the restore pinned was deleted (or made again under its name).
        DesktopGone,
        /// The Desktop is being deleted.
        DesktopDeleting,
        /// The Desktop is not stopped (spec.power is not Off, or its domain still runs).
        DesktopRunning,
        /// The idle policy holds the Desktop (suspended with its memory saved, or shut down).
        Suspended,
        /// The Desktop is moving to another host.
        Migrating,
        /// A backup of the Desktop is being written.
        BackupRunning,
        /// Another restore of the Desktop is under way.
        Busy,
        /// The Desktop is not bound to a host.
        NotBound,
        /// The Desktop's host is not heartbeating.
        HostNotReady,
        /// The backup cannot be restored (the message says why, naming spec.backup).
        RestoreUnavailable,
        /// The host builds the new disk.
        Restoring,
        /// The disk is restored; the old one is kept until the desktop has run.
        Restored,
        /// The desktop ran on the restored disk; the old disk is removed.
        Succeeded,
        /// The host refused or failed (the message says why); the desktop's disk is unchanged.
        RestoreFailed,
        /// Its record on the Desktop went before the host acted on it.
        RecordLost,
    }
}
