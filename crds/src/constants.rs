//! Every string that crosses a process boundary: API group, labels, annotations, finalizers,
//! field managers, Secret keys and condition types. Both binaries and the chart use these.

/// The API group of every deskvirt resource.
pub const GROUP: &str = "deskvirt.io";
/// The API version served today.
pub const VERSION: &str = "v1alpha1";

/// Label on a Desktop naming the host it is bound to; the node-agent watches only its own.
pub const LABEL_NODE: &str = "deskvirt.io/node";
/// Label on a Desktop naming its pool (mirrors `spec.pool` for label selectors).
pub const LABEL_POOL: &str = "deskvirt.io/pool";
/// Label on objects the operator or agent created, naming the component.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Label on a console Secret naming the Desktop it belongs to.
pub const LABEL_DESKTOP: &str = "deskvirt.io/desktop";

/// Annotation a user sets (to any new value, for example a timestamp) to wake an idle desktop.
pub const ANNOTATION_WAKE: &str = deskvirt_core::idle::ANNOTATION_WAKE;
/// Annotation a user sets (to any new value) to rotate a desktop's SPICE password.
pub const ANNOTATION_ROTATE_PASSWORD: &str = "deskvirt.io/rotate-password";
/// Annotation that lets a Desktop on a lost host finish deleting without host cleanup.
pub const ANNOTATION_FORCE_DELETE: &str = "deskvirt.io/force-delete";

/// Finalizer of the node-agent: domain and disk teardown on the host.
pub const FINALIZER_AGENT: &str = "deskvirt.io/node-agent";
/// Finalizer of the operator: release of ports, MACs and capacity in the ledger.
pub const FINALIZER_OPERATOR: &str = "deskvirt.io/operator";
/// Finalizer on a DesktopBackup that the host which wrote its file removes once the file is
/// gone (after the operator's finalizer: nothing restores from it any more).
pub const FINALIZER_BACKUP_FILE: &str = "deskvirt.io/backup-file";
/// Finalizer of the operator on a DesktopImage: a deleted image stays while any Desktop is
/// pinned to one of its versions (`Deleting=True InUse` names them).
pub const FINALIZER_IMAGE_USERS: &str = "deskvirt.io/image-users";

/// Label on a DesktopBackup that a pool's schedule made (value `true`): the pool's retention
/// may delete it. Backups without it are the user's and stay until the user deletes them.
pub const LABEL_SCHEDULED: &str = "deskvirt.io/scheduled";
/// Annotation on a scheduled DesktopBackup naming the pool whose schedule made it, whose
/// retention applies to it after its Desktop is gone.
pub const ANNOTATION_POOL: &str = "deskvirt.io/pool";
/// On a Desktop: `skip` leaves it out of its pool's backup schedule (its user's own
/// DesktopBackups are still taken; retention of earlier scheduled ones goes on).
pub const ANNOTATION_BACKUP_SCHEDULE: &str = "deskvirt.io/backup-schedule";

/// Server-side apply field manager of the operator.
pub const MANAGER_OPERATOR: &str = "deskvirt-operator";
/// Server-side apply field manager of the node-agent.
pub const MANAGER_AGENT: &str = "deskvirt-node-agent";
/// Server-side apply field manager of the node-agent's orphan sweep (`DomainNode.status.orphans`
/// only, apart from the agent's other status fields).
pub const MANAGER_AGENT_SWEEP: &str = "deskvirt-node-agent-sweep";
/// Field manager of the operator's migration record on a Desktop (`status.migration`), apart
/// from the Desktop pass's own status so neither apply drops the other's fields.
pub const MANAGER_OPERATOR_MIGRATION: &str = "deskvirt-operator-migration";
/// Field manager of the source host's migration report on a Desktop's status
/// (`status.migrationReport`), apart from the agent's other status fields.
pub const MANAGER_AGENT_MIGRATION: &str = "deskvirt-node-agent-migration";
/// Field manager of the operator's backup record on a Desktop (`status.backup`).
pub const MANAGER_OPERATOR_BACKUP: &str = "deskvirt-operator-backup";
/// Field manager of the operator's restore chain on a Desktop (`status.restore`): apart from
/// the backup record, as server-side apply drops a manager's fields that an apply leaves out.
pub const MANAGER_OPERATOR_RESTORE: &str = "deskvirt-operator-restore";
/// Field manager of the operator's record of a DesktopRestore on a Desktop's status
/// (`restoreOver`).
pub const MANAGER_OPERATOR_RESTORE_OVER: &str = "deskvirt-operator-restore-over";
/// Field manager of the agent's report of a restore over a Desktop's disk (`restoreReport`).
pub const MANAGER_AGENT_RESTORE: &str = "deskvirt-node-agent-restore";
/// Field manager of the host's `Deleting` condition on a Desktop whose teardown waits for a
/// backup: apart from its backup report, for the same reason.
pub const MANAGER_AGENT_TEARDOWN: &str = "deskvirt-node-agent-teardown";
/// Field manager of the host's backup report on a Desktop (`status.backupReport`).
pub const MANAGER_AGENT_BACKUP: &str = "deskvirt-node-agent-backup";
/// Field manager of the drain's part of a DomainNode's status (`status.drain` and the
/// `Drained` condition), apart from the host pass's fields.
pub const MANAGER_OPERATOR_DRAIN: &str = "deskvirt-operator-drain";
/// Field manager of the operator's `DomainNode.status.incoming` (disks Cold migrations copy to
/// the host).
pub const MANAGER_OPERATOR_INCOMING: &str = "deskvirt-operator-incoming";
/// Field manager of the host's answers to them (`DomainNode.status.prepared`).
pub const MANAGER_AGENT_INCOMING: &str = "deskvirt-node-agent-incoming";
/// Field manager of a host's copies of DesktopImages (`DomainNode.status.images`).
pub const MANAGER_AGENT_IMAGE: &str = "deskvirt-node-agent-image";
/// Field manager of the operator's DesktopImage status.
pub const MANAGER_OPERATOR_IMAGE: &str = "deskvirt-operator-image";
/// Label on the DesktopMigrations a drain makes: the label value of the draining host's name.
pub const LABEL_DRAIN: &str = "deskvirt.io/drain";
/// Annotation on those migrations: the draining host's full name.
pub const ANNOTATION_DRAIN_NODE: &str = "deskvirt.io/drain-node";
/// Annotation the operator puts on a desktop's console mirror before it records a migration on
/// the Desktop: `<migration uid>/<target host>/<port>` ([`crate::migration::Migrating::stamp`]).
/// The source host acts on the record only when the mirror agrees: tenants cannot write there.
pub const ANNOTATION_MIGRATION: &str = "deskvirt.io/migration";

/// Namespace of the heartbeat Leases, one per host, named after the host. It is deskvirt's
/// system namespace, where the leader Lease lives too.
pub const LEASE_NAMESPACE_DEFAULT: &str = "deskvirt-system";

/// The images namespace: only DesktopImages here may import from a URL, and a Desktop of any
/// namespace may use them. Only administrators hold rights in it. The chart's default for a
/// release in `deskvirt-system` (`<release namespace>-images`).
pub const IMAGES_NAMESPACE_DEFAULT: &str = "deskvirt-system-images";

/// Namespace of the console password mirrors, apart from the system namespace so that the
/// agents' Secret read grant reaches no ServiceAccount token.
pub const CONSOLE_NAMESPACE_DEFAULT: &str = "deskvirt-consoles";

/// Annotation on a console password mirror: the UID of the user's `<desktop>-console` Secret the
/// operator created. Every later write of that Secret carries it as a precondition, so a Secret
/// of that name that someone else created (or recreated) is never written over or deleted.
pub const ANNOTATION_CONSOLE_SECRET_UID: &str = "deskvirt.io/console-secret-uid";

/// Label on a console password mirror naming the UID of its Desktop.
pub const LABEL_DESKTOP_UID: &str = "deskvirt.io/desktop-uid";
/// Annotation on a console password mirror: `<namespace>/<name>` of its Desktop, for humans.
pub const ANNOTATION_DESKTOP: &str = "deskvirt.io/desktop";
/// Prefix of a console password mirror's name; the Desktop's UID follows.
///
/// The hand-off of the SPICE password: the operator keeps the canonical password of every
/// bound desktop in a Secret `console-<desktop uid>` in the console namespace
/// ([`CONSOLE_NAMESPACE_DEFAULT`]), labelled [`LABEL_NODE`] with the host it is bound to and
/// [`LABEL_DESKTOP_UID`], key [`SECRET_KEY_PASSWORD`]. A node-agent reads only Secrets of that
/// one namespace (a Role, not a ClusterRole) and watches only those labelled with its own host.
/// No component's ServiceAccount lives there (only the namespace's `default` one, which must
/// stay without any binding), so no useful token can be read through that grant. The
/// user-facing console Secret in the desktop's namespace is written from the mirror, only in
/// the namespaces the administrator lists (one Role each, no get/list/watch), and never read
/// back; neither component holds any Secret right cluster-wide.
pub const CONSOLE_MIRROR_PREFIX: &str = "console-";

/// Name of the console password mirror of the Desktop with UID `uid`.
pub fn console_mirror_name(uid: &str) -> String {
    format!("{CONSOLE_MIRROR_PREFIX}{uid}")
}
/// Name of the operator's leader-election Lease.
pub const LEADER_LEASE: &str = "deskvirt-operator-leader";

/// Key of the SPICE password inside a desktop's console Secret.
pub const SECRET_KEY_PASSWORD: &str = "password";
/// Key of the ready-to-use `remote-viewer` file inside a desktop's console Secret.
pub const SECRET_KEY_VV: &str = "console.vv";

/// Reasons of the `Running` condition the agent writes that other components act on.
pub mod running_reason {
    /// The domain runs.
    pub const RUNNING: &str = "Running";
    /// The idle policy's Suspend is done: memory saved to disk (libvirt managed save).
    pub const SUSPENDED: &str = "Suspended";
    /// The idle policy's Shutdown is done: the domain is off.
    pub const IDLE_SHUTDOWN: &str = "IdleShutdown";
    /// The domain is being saved or shut down for the idle policy.
    pub const RECLAIMING: &str = "Reclaiming";
}

/// Reasons of the operator's `Idle` condition.
pub mod idle_reason {
    use deskvirt_core::reasons::IdleReason;
    /// Active, or no idle policy applies.
    pub const ACTIVE: &str = IdleReason::Active.as_str();
    /// Idle, still within the timeout.
    pub const COUNTING_DOWN: &str = IdleReason::CountingDown.as_str();
    /// Idle past the timeout; the action is asked of the host, or done.
    pub const IDLE_TIMEOUT: &str = IdleReason::IdleTimeout.as_str();
    /// Idle past the timeout, and the policy's action is None: only reported.
    pub const IDLE_REPORTED: &str = IdleReason::IdleReported.as_str();
    /// Woken by the `deskvirt.io/wake` annotation; waiting for room or starting.
    pub const WOKEN: &str = IdleReason::Woken.as_str();
}

/// Reasons of the operator's `ConsoleSecret` condition.
pub mod console_reason {
    /// The console Secret is written and is the operator's own.
    pub const WRITTEN: &str = "Written";
    /// The Desktop's namespace is not among the operator's console user namespaces (chart value
    /// `consoles.userNamespaces`): no Secret is written there.
    pub const NAMESPACE_NOT_ALLOWED: &str = "NamespaceNotAllowed";
    /// A Secret of the console Secret's name exists that the operator did not create: it is
    /// left untouched.
    pub const SECRET_NOT_OURS: &str = "SecretNotOurs";
}

/// Condition types. Positive polarity; `Ready` is the summary on every kind.
pub mod condition {
    /// Summary: the desktop is usable, the host is heartbeating, the pool can place desktops.
    pub const READY: &str = "Ready";
    /// Desktop: bound to a host with a port and a MAC (operator).
    pub const SCHEDULED: &str = "Scheduled";
    /// Desktop: the libvirt domain exists on the host (agent).
    pub const DOMAIN_DEFINED: &str = "DomainDefined";
    /// Desktop: the domain runs (agent).
    pub const RUNNING: &str = "Running";
    /// Desktop: idle past its timeout; reclamation is pending or done (operator).
    pub const IDLE: &str = "Idle";
    /// DomainNode: the agent can talk to libvirt (agent).
    pub const LIBVIRT_CONNECTED: &str = "LibvirtConnected";
    /// DomainNode: the scheduler may place desktops on the host (operator).
    pub const SCHEDULABLE: &str = "Schedulable";
    /// DomainNode, while `spec.drain` is set: no desktop is bound to the host any more
    /// (operator, drain field manager).
    pub const DRAINED: &str = "Drained";
    /// Desktop: the user's `<desktop>-console` Secret holds the current password (operator).
    pub const CONSOLE_SECRET: &str = "ConsoleSecret";
    /// Desktop: the domain runs with (or, stopped, starts with) the size `spec` asks for
    /// (operator): False while a resize waits for a restart or does not fit its host.
    pub const SIZE_APPLIED: &str = "SizeApplied";
    /// Desktop: `spec.pool` is the pool the desktop is bound in (operator): False after an edit
    /// that would move a bound desktop (refused; moving is a migration).
    pub const POOL_APPLIED: &str = "PoolApplied";
    /// Desktop being deleted, while its host keeps the domain and disk for a backup being
    /// written (agent, backup field manager): reason WaitingForBackup.
    pub const DELETING: &str = "Deleting";
    /// ResourcePool: some hosts are not ready or some desktops failed.
    pub const DEGRADED: &str = "Degraded";
}

/// Reasons of the operator's `Scheduled` (and, while unbound, `Ready`) condition on a Desktop
/// that is refused before any host is considered; nothing is allocated for it.
pub mod scheduled_reason {
    /// A field of the Desktop's spec is invalid (the message names each one).
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// The Desktop's pool has an invalid spec; nothing is placed into it.
    pub const INVALID_POOL: &str = "InvalidPool";
    /// The pool's `namespaceSelector` does not select the Desktop's namespace.
    pub const POOL_NOT_ALLOWED: &str = "PoolNotAllowed";
    /// Binding would take the namespace past a `deskvirt.io/cpu` or `deskvirt.io/memory`
    /// limit of one of its ResourceQuotas.
    pub const QUOTA_EXCEEDED: &str = "QuotaExceeded";
    /// `spec.disk.restoreFrom` names a backup that cannot be restored (yet): missing, not
    /// Succeeded, its chain broken, on another base image or outside the pool's backup dir.
    pub const RESTORE_UNAVAILABLE: &str = "RestoreUnavailable";
    /// `spec.disk.imageRef` names a DesktopImage of a namespace that is neither the Desktop's
    /// nor the images namespace.
    pub const IMAGE_NOT_ALLOWED: &str = "ImageNotAllowed";
    /// `spec.disk.imageRef` names no DesktopImage.
    pub const IMAGE_NOT_FOUND: &str = "ImageNotFound";
    /// The DesktopImage is not copied to the Desktop's pool.
    pub const IMAGE_NOT_IN_POOL: &str = "ImageNotInPool";
    /// No host of the pool holds a verified copy of the image's version yet.
    pub const IMAGE_NOT_READY: &str = "ImageNotReady";
    /// The DesktopImage is being deleted: it takes no new desktops.
    pub const IMAGE_DELETING: &str = "ImageDeleting";
}

/// Reasons of a ResourcePool's `Ready` and `Degraded` conditions set from its spec alone.
pub mod pool_reason {
    /// A field of the pool's spec is invalid (the message names each one).
    pub const INVALID_SPEC: &str = "InvalidSpec";
}

/// `hard` keys of a ResourceQuota that deskvirt enforces itself, since Kubernetes cannot count
/// a custom resource's CPU or memory: the sum over the namespace's bound Desktops of
/// `spec.cpu` (vCPUs) and `spec.memory`. The number of Desktops is Kubernetes' own
/// `count/desktops.deskvirt.io`, enforced at admission.
pub mod quota {
    /// vCPUs of the namespace's bound Desktops.
    pub const CPU: &str = "deskvirt.io/cpu";
    /// Memory of the namespace's bound Desktops.
    pub const MEMORY: &str = "deskvirt.io/memory";
    /// Kubernetes' object count of Desktops.
    pub const COUNT: &str = "count/desktops.deskvirt.io";
    /// Bytes of the namespace's backup files (`status.sizeBytes` of its DesktopBackups that
    /// hold a file): a new backup waits (reason QuotaExceeded) while they reach it. A backup
    /// may take the namespace past it by its own size: its size is known only once written.
    pub const BACKUP_STORAGE: &str = "deskvirt.io/backup-storage";
}
