//! An in-memory [`Hypervisor`] for unit tests of the controllers' branches: domains and
//! networks kept in a map, with libvirt's rules that the controllers rely on (a name or UUID
//! held by another domain is refused, teardown of something gone is `AlreadyDone`, a managed
//! save is restored by the next start), failures injected per operation, and a journal of the
//! calls that change something. Real-libvirt behaviour is tested against libvirt itself.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::{
    Activity, BackupJob, BackupProgress, Change, Checkpoint, DomainState, DomainStatus,
    DomainSummary, Hold, HostFacts, Hypervisor, HypervisorError, Migrated, ObjectKind, Outbound,
    PauseCause, Result,
};
use crate::domain::{DesktopIdentity, DhcpHost, DomainType, parse_disk_paths, parse_identity};

/// An operation of the trait, to inject a failure into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    List,
    Lookup,
    Define,
    Start,
    Shutdown,
    Destroy,
    Undefine,
    ManagedSave,
    SyncManagedSave,
    RemoveManagedSave,
    Status,
    Xml,
    Network,
    /// Writing a network's DHCP leases (its other calls are [`Op::Network`]).
    Leases,
    DiskPaths,
    UpdateLiveDevice,
    Activity,
    Migrate,
    /// Backups and checkpoints.
    Backup,
}

/// One domain of the fake host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeDomain {
    pub uuid: String,
    pub xml: String,
    pub state: DomainState,
    pub managed_save: bool,
    pub identity: Option<DesktopIdentity>,
    /// Defined (else it only runs, and is gone once it stops).
    pub persistent: bool,
    /// A transient XML that runs in place of the definition (a carrier); it goes when the
    /// domain stops.
    pub live: Option<String>,
}

#[derive(Default)]
struct State {
    domains: BTreeMap<String, FakeDomain>,
    networks: BTreeMap<String, Vec<DhcpHost>>,
    /// The addresses each network's DHCP server counts as leased.
    leased: BTreeMap<String, Vec<DhcpHost>>,
    /// Failures to return: (operation, error, remaining count; `None` for ever).
    failures: Vec<(Op, HypervisorError, Option<u32>)>,
    journal: Vec<String>,
    /// Guests ignore ACPI shutdown requests.
    ignore_acpi: bool,
    /// Domains a job runs on.
    jobs: std::collections::BTreeSet<String>,
    /// The checkpoints libvirt knows, by domain.
    checkpoints: BTreeMap<String, BTreeSet<String>>,
    /// How the last backup of each domain ended (every backup completes at once here).
    backups: BTreeMap<String, BackupProgress>,
    /// How the next migration ends in an error after it went some way: the domain left here
    /// (`None`) or in this state (paused after a failed post-copy, say).
    migrate_ends: Option<(Option<DomainState>, HypervisorError)>,
    /// Why paused domains were paused (`Other` when not said).
    pause_causes: BTreeMap<String, PauseCause>,
    /// The last migration asked for.
    last_outbound: Option<Outbound>,
}

/// The fake host. Clones share it.
#[derive(Clone, Default)]
pub struct FakeHypervisor {
    state: Arc<Mutex<State>>,
}

/// Text of the first `<tag>` element of `xml` (the fake's own light reading).
fn element<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{tag}>"))? + start;
    Some(&xml[start..end])
}

fn rejected(op: &'static str, target: &str, message: &str) -> HypervisorError {
    HypervisorError::Rejected {
        op,
        target: target.to_string(),
        message: message.to_string(),
    }
}

fn not_found(name: &str) -> HypervisorError {
    HypervisorError::NotFound {
        kind: ObjectKind::Domain,
        name: name.to_string(),
    }
}

impl FakeHypervisor {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        match self.state.lock() {
            Ok(mut s) => f(&mut s),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// Every call of `op` fails with `err` from now on.
    pub fn fail(&self, op: Op, err: HypervisorError) {
        self.with(|s| s.failures.push((op, err, None)));
    }

    /// The next call of `op` fails with `err`.
    pub fn fail_once(&self, op: Op, err: HypervisorError) {
        self.with(|s| s.failures.push((op, err, Some(1))));
    }

    /// From now on guests ignore ACPI shutdown requests (only a destroy stops them).
    pub fn ignore_acpi(&self) {
        self.with(|s| s.ignore_acpi = true);
    }

    /// Makes network `network`'s DHCP server count `leases` as leased.
    pub fn set_leased(&self, network: &str, leases: Vec<DhcpHost>) {
        self.with(|s| s.leased.insert(network.to_string(), leases));
    }

    /// A job runs on domain `name` (or no longer).
    pub fn set_job(&self, name: &str, running: bool) {
        self.with(|s| {
            if running {
                s.jobs.insert(name.to_string());
            } else {
                s.jobs.remove(name);
            }
        });
    }

    /// The backup job of domain `name` is at `progress`.
    pub fn set_backup(&self, name: &str, progress: BackupProgress) {
        self.with(|s| s.backups.insert(name.to_string(), progress));
    }

    /// The next migration fails with `err` after the domain left this host (`state` `None`)
    /// or was left in `state`.
    pub fn migration_ends(&self, state: Option<DomainState>, err: HypervisorError) {
        self.with(|s| s.migrate_ends = Some((state, err)));
    }

    /// libvirt pauses running domain `name` for `cause`.
    pub fn pause(&self, name: &str, cause: PauseCause) {
        self.with(|s| {
            if let Some(d) = s.domains.get_mut(name) {
                d.state = DomainState::Paused;
                s.pause_causes.insert(name.to_string(), cause);
            }
        });
    }

    /// No more injected failures.
    pub fn clear_failures(&self) {
        self.with(|s| s.failures.clear());
    }

    /// Puts a domain on the host as it is.
    pub fn put(&self, name: &str, domain: FakeDomain) {
        self.with(|s| s.domains.insert(name.to_string(), domain));
    }

    /// The domain named `name`.
    pub fn domain(&self, name: &str) -> Option<FakeDomain> {
        self.with(|s| s.domains.get(name).cloned())
    }

    /// What the last migration was asked to do.
    pub fn last_outbound(&self) -> Option<Outbound> {
        self.with(|s| s.last_outbound.clone())
    }

    /// The calls that changed (or tried to change) something, such as `define team--a`.
    pub fn journal(&self) -> Vec<String> {
        self.with(|s| s.journal.clone())
    }

    fn check(&self, op: Op) -> Result<()> {
        self.with(|s| {
            let Some(i) = s.failures.iter().position(|(o, _, _)| *o == op) else {
                return Ok(());
            };
            let err = s.failures[i].1.clone();
            match &mut s.failures[i].2 {
                Some(n) if *n <= 1 => {
                    s.failures.remove(i);
                }
                Some(n) => *n -= 1,
                None => {}
            }
            Err(err)
        })
    }

    /// Checks the injected failures, journals the call, then runs `f` on the state.
    fn change<T>(
        &self,
        op: Op,
        what: &str,
        name: &str,
        f: impl FnOnce(&mut State) -> Result<T>,
    ) -> Result<T> {
        self.with(|s| s.journal.push(format!("{what} {name}")));
        self.check(op)?;
        self.with(f)
    }

    fn summary(name: &str, d: &FakeDomain) -> DomainSummary {
        DomainSummary {
            name: name.to_string(),
            uuid: d.uuid.clone(),
            state: d.state,
            persistent: d.persistent,
            has_managed_save: d.managed_save,
            identity: d.identity.clone(),
        }
    }
}

impl Hypervisor for FakeHypervisor {
    fn is_connected(&self) -> bool {
        true
    }

    async fn probe(&self) -> bool {
        true
    }

    async fn host_facts(&self, _domain_type: DomainType) -> Result<HostFacts> {
        Ok(HostFacts {
            hostname: "fake".into(),
            cpu_model: "fake".into(),
            cpu_models: Some(vec!["qemu64".into(), "Westmere".into()]),
            numa_nodes: 1,
            sockets: 1,
            cores_per_socket: 4,
            threads_per_core: 1,
            cpus: 4,
            mhz: 1000,
            memory_bytes: 8 << 30,
            max_vcpus: 4,
            driver: "FAKE".into(),
            hypervisor_version: "0.0.0".into(),
            libvirt_version: "0.0.0".into(),
        })
    }

    async fn list_domains(&self) -> Result<Vec<DomainSummary>> {
        self.check(Op::List)?;
        Ok(self.with(|s| s.domains.iter().map(|(n, d)| Self::summary(n, d)).collect()))
    }

    async fn domain_by_uuid(&self, uuid: &str) -> Result<Option<DomainSummary>> {
        self.check(Op::Lookup)?;
        Ok(self.with(|s| {
            s.domains
                .iter()
                .find(|(_, d)| d.uuid.eq_ignore_ascii_case(uuid))
                .map(|(n, d)| Self::summary(n, d))
        }))
    }

    async fn domain_by_name(&self, name: &str) -> Result<Option<DomainSummary>> {
        self.check(Op::Lookup)?;
        Ok(self.with(|s| s.domains.get(name).map(|d| Self::summary(name, d))))
    }

    async fn define_domain(&self, xml: &str) -> Result<String> {
        let name = element(xml, "name").unwrap_or_default().to_string();
        let uuid = element(xml, "uuid").unwrap_or_default().to_string();
        self.change(Op::Define, "define", &name, |s| {
            if name.is_empty() || uuid.is_empty() {
                return Err(rejected("define domain", "-", "no name or uuid"));
            }
            if let Some((other, _)) = s
                .domains
                .iter()
                .find(|(n, d)| d.uuid.eq_ignore_ascii_case(&uuid) && **n != name)
            {
                return Err(rejected(
                    "define domain",
                    &name,
                    &format!("uuid held by {other}"),
                ));
            }
            let identity = parse_identity(xml);
            match s.domains.get_mut(&name) {
                Some(d) if !d.uuid.eq_ignore_ascii_case(&uuid) => Err(rejected(
                    "define domain",
                    &name,
                    "name held by another uuid",
                )),
                Some(d) => {
                    d.xml = xml.to_string();
                    d.identity = identity;
                    Ok(name.clone())
                }
                None => {
                    s.domains.insert(
                        name.clone(),
                        FakeDomain {
                            uuid,
                            xml: xml.to_string(),
                            state: DomainState::ShutOff,
                            managed_save: false,
                            identity,
                            persistent: true,
                            live: None,
                        },
                    );
                    Ok(name.clone())
                }
            }
        })
    }

    async fn start_domain(&self, name: &str) -> Result<Change> {
        self.change(Op::Start, "start", name, |s| {
            let d = s.domains.get_mut(name).ok_or_else(|| not_found(name))?;
            if d.state.is_active() {
                return Err(rejected("start domain", name, "domain is already running"));
            }
            d.state = DomainState::Running;
            d.managed_save = false;
            Ok(Change::Done)
        })
    }

    async fn start_paused(&self, name: &str) -> Result<Change> {
        self.change(Op::Start, "start paused", name, |s| {
            let d = s.domains.get_mut(name).ok_or_else(|| not_found(name))?;
            if d.state.is_active() {
                return Ok(Change::AlreadyDone);
            }
            d.state = DomainState::Paused;
            Ok(Change::Done)
        })
    }

    async fn start_carrier(&self, name: &str, xml: &str) -> Result<()> {
        let uuid = element(xml, "uuid").unwrap_or_default().to_string();
        self.change(Op::Start, "start carrier", name, |s| {
            let identity = parse_identity(xml);
            match s.domains.get_mut(name) {
                Some(d) if d.state.is_active() => {
                    Err(rejected("start carrier domain", name, "domain is running"))
                }
                Some(d) if !d.uuid.eq_ignore_ascii_case(&uuid) => Err(rejected(
                    "start carrier domain",
                    name,
                    "name held by another uuid",
                )),
                Some(d) => {
                    d.live = Some(xml.to_string());
                    d.state = DomainState::Paused;
                    Ok(())
                }
                None => {
                    s.domains.insert(
                        name.to_string(),
                        FakeDomain {
                            uuid,
                            xml: xml.to_string(),
                            state: DomainState::Paused,
                            managed_save: false,
                            identity,
                            persistent: false,
                            live: None,
                        },
                    );
                    Ok(())
                }
            }
        })
    }

    async fn shutdown_domain(&self, name: &str) -> Result<Change> {
        self.change(Op::Shutdown, "shutdown", name, |s| {
            let ignored = s.ignore_acpi;
            Ok(match s.domains.get_mut(name) {
                Some(_) if ignored => Change::Done,
                Some(d) if d.state.is_active() => {
                    d.state = DomainState::ShutOff;
                    Change::Done
                }
                _ => Change::AlreadyDone,
            })
        })
    }

    async fn destroy_domain(&self, name: &str) -> Result<Change> {
        self.change(Op::Destroy, "destroy", name, |s| {
            let change = match s.domains.get_mut(name) {
                Some(d) if d.state.is_active() => {
                    d.state = DomainState::ShutOff;
                    d.live = None;
                    Change::Done
                }
                _ => Change::AlreadyDone,
            };
            // A domain that only ran is gone once it stops.
            if s.domains.get(name).is_some_and(|d| !d.persistent) {
                s.domains.remove(name);
            }
            Ok(change)
        })
    }

    async fn undefine_domain(&self, name: &str) -> Result<Change> {
        self.change(Op::Undefine, "undefine", name, |s| {
            Ok(match s.domains.remove(name) {
                Some(_) => Change::Done,
                None => Change::AlreadyDone,
            })
        })
    }

    async fn managed_save(&self, name: &str) -> Result<Change> {
        self.change(Op::ManagedSave, "save", name, |s| {
            let d = s.domains.get_mut(name).ok_or_else(|| not_found(name))?;
            match (d.state.is_active(), d.managed_save) {
                (true, _) => {
                    d.state = DomainState::ShutOff;
                    d.managed_save = true;
                    Ok(Change::Done)
                }
                (false, true) => Ok(Change::AlreadyDone),
                (false, false) => Err(rejected("managed save", name, "domain is not running")),
            }
        })
    }

    async fn sync_managed_save(&self, name: &str, _image: &Path) -> Result<Change> {
        self.change(Op::SyncManagedSave, "sync-save", name, |s| {
            let d = s.domains.get(name).ok_or_else(|| not_found(name))?;
            Ok(if d.managed_save && !d.state.is_active() {
                Change::Done
            } else {
                Change::AlreadyDone
            })
        })
    }

    async fn remove_managed_save(&self, name: &str) -> Result<Change> {
        self.change(Op::RemoveManagedSave, "discard-save", name, |s| {
            Ok(match s.domains.get_mut(name) {
                Some(d) if d.managed_save => {
                    d.managed_save = false;
                    Change::Done
                }
                _ => Change::AlreadyDone,
            })
        })
    }

    async fn domain_status(&self, name: &str) -> Result<DomainStatus> {
        self.check(Op::Status)?;
        self.with(|s| {
            let d = s.domains.get(name).ok_or_else(|| not_found(name))?;
            Ok(DomainStatus {
                state: d.state,
                cpu_time_ns: 0,
                memory_kib: 1 << 20,
                max_memory_kib: 1 << 20,
                vcpus: 1,
                has_managed_save: d.managed_save,
                paused: (d.state == DomainState::Paused).then(|| {
                    s.pause_causes
                        .get(name)
                        .copied()
                        .unwrap_or(PauseCause::Other)
                }),
            })
        })
    }

    async fn resume_domain(&self, name: &str) -> Result<Change> {
        self.change(Op::Start, "resume", name, |s| {
            let d = s.domains.get_mut(name).ok_or_else(|| not_found(name))?;
            if d.state != DomainState::Paused {
                return Ok(Change::AlreadyDone);
            }
            d.state = DomainState::Running;
            s.pause_causes.remove(name);
            Ok(Change::Done)
        })
    }

    async fn domain_xml(&self, name: &str, inactive: bool) -> Result<String> {
        self.check(Op::Xml)?;
        self.with(|s| {
            s.domains
                .get(name)
                .map(|d| match &d.live {
                    Some(live) if !inactive => live.clone(),
                    _ => d.xml.clone(),
                })
                .ok_or_else(|| not_found(name))
        })
    }

    async fn qemu_pid(&self, _name: &str) -> Result<Option<u32>> {
        Ok(None)
    }

    async fn ensure_network(&self, xml: &str) -> Result<String> {
        let name = element(xml, "name").unwrap_or_default().to_string();
        self.change(Op::Network, "network", &name, |s| {
            s.networks.entry(name.clone()).or_default();
            Ok(name.clone())
        })
    }

    async fn sync_dhcp_hosts(&self, network: &str, hosts: &[DhcpHost]) -> Result<Change> {
        self.change(Op::Leases, "leases", network, |s| {
            s.networks.insert(network.to_string(), hosts.to_vec());
            Ok(Change::Done)
        })
    }

    async fn remove_network(&self, name: &str) -> Result<Change> {
        self.change(Op::Network, "remove-network", name, |s| {
            Ok(match s.networks.remove(name) {
                Some(_) => Change::Done,
                None => Change::AlreadyDone,
            })
        })
    }

    async fn domain_disk_paths(&self) -> Result<BTreeSet<String>> {
        self.check(Op::DiskPaths)?;
        Ok(self.with(|s| {
            s.domains
                .values()
                .flat_map(|d| std::iter::once(&d.xml).chain(&d.live))
                .flat_map(|xml| parse_disk_paths(xml).unwrap_or_default())
                .collect()
        }))
    }

    async fn update_live_device(&self, name: &str, device_xml: &str) -> Result<Change> {
        // A link cycled is journaled as such; other devices (a new password) as an update.
        let verb = if device_xml.contains("<link state=\"down\"") {
            "link-down"
        } else if device_xml.contains("<link state=\"up\"") {
            "link-up"
        } else {
            "update-device"
        };
        self.change(Op::UpdateLiveDevice, verb, name, |s| {
            let d = s.domains.get(name).ok_or_else(|| not_found(name))?;
            Ok(if d.state.is_active() {
                Change::Done
            } else {
                Change::AlreadyDone
            })
        })
    }

    async fn activity(&self, name: &str) -> Result<Activity> {
        self.check(Op::Activity)?;
        self.with(|s| match s.domains.get(name) {
            Some(d) if d.state.is_active() => Ok(Activity {
                cpu_time_ns: 0,
                block_bytes: 0,
                net_bytes: 0,
                spice_client: None,
            }),
            Some(_) => Err(rejected("activity", name, "domain is not running")),
            None => Err(not_found(name)),
        })
    }

    async fn dhcp_hosts(&self, network: &str) -> Result<Vec<DhcpHost>> {
        self.check(Op::Network)?;
        self.with(|s| {
            s.networks
                .get(network)
                .cloned()
                .ok_or_else(|| HypervisorError::NotFound {
                    kind: ObjectKind::Network,
                    name: network.to_string(),
                })
        })
    }

    async fn leased_addresses(&self, network: &str) -> Result<Vec<DhcpHost>> {
        self.check(Op::Network)?;
        Ok(self.with(|s| s.leased.get(network).cloned().unwrap_or_default()))
    }

    async fn migrate_out(&self, name: &str, out: &Outbound) -> Result<Migrated> {
        let copy = if out.copy_disks {
            " copying its disk"
        } else {
            ""
        };
        let carrier = if out.carrier_xml.is_some() {
            " in a carrier"
        } else {
            ""
        };
        let what = format!("migrate to {}{copy}{carrier}", out.dest_uri);
        self.with(|s| s.last_outbound = Some(out.clone()));
        self.change(Op::Migrate, &what, name, |s| {
            let d = s.domains.get(name).ok_or_else(|| not_found(name))?;
            if !d.state.is_active() {
                return Err(rejected("migrate", name, "domain is not running"));
            }
            if let Some((state, err)) = s.migrate_ends.take() {
                match state {
                    Some(state) => {
                        if let Some(d) = s.domains.get_mut(name) {
                            d.state = state;
                        }
                    }
                    None => {
                        s.domains.remove(name);
                    }
                }
                return Err(err);
            }
            // It runs on the target now and is undefined here.
            s.domains.remove(name);
            Ok(Migrated::default())
        })
    }

    async fn job_running(&self, name: &str) -> Result<bool> {
        self.check(Op::Status)?;
        self.with(|s| {
            Ok(s.jobs.contains(name) && s.domains.get(name).is_some_and(|d| d.state.is_active()))
        })
    }

    async fn abort_migration(&self, name: &str) -> Result<()> {
        self.check(Op::Status)?;
        self.with(|s| {
            s.jobs.remove(name);
            Ok(())
        })
    }

    async fn begin_backup(&self, name: &str, job: &BackupJob) -> Result<Hold> {
        let what = format!("backup {} since {:?}", job.checkpoint, job.since);
        self.change(Op::Backup, &what, name, |s| {
            let d = s.domains.get(name).ok_or_else(|| not_found(name))?;
            if !d.state.is_active() {
                return Err(rejected("begin backup", name, "domain is not running"));
            }
            let known = s.checkpoints.entry(name.to_string()).or_default();
            if let Some(since) = &job.since
                && !known.contains(since)
            {
                return Err(rejected("begin backup", name, "no such checkpoint"));
            }
            known.insert(job.checkpoint.clone());
            s.backups
                .insert(name.to_string(), BackupProgress::Completed { bytes: 0 });
            Ok(Hold::Unfrozen {
                why: "QEMU guest agent is not connected".into(),
            })
        })
    }

    async fn abort_backup(&self, name: &str) -> Result<()> {
        self.change(Op::Backup, "abort backup", name, |s| {
            s.domains.get(name).ok_or_else(|| not_found(name))?;
            s.backups.insert(
                name.to_string(),
                BackupProgress::Failed {
                    message: "operation aborted".into(),
                },
            );
            Ok(())
        })
    }

    async fn backup_progress(&self, name: &str) -> Result<BackupProgress> {
        self.check(Op::Backup)?;
        self.with(|s| {
            s.domains.get(name).ok_or_else(|| not_found(name))?;
            Ok(s.backups.get(name).cloned().unwrap_or(BackupProgress::Idle))
        })
    }

    async fn ensure_checkpoint(&self, name: &str, c: &Checkpoint) -> Result<Change> {
        let what = format!("redefine checkpoint {}", c.name);
        self.change(Op::Backup, &what, name, |s| {
            s.domains.get(name).ok_or_else(|| not_found(name))?;
            let added = s
                .checkpoints
                .entry(name.to_string())
                .or_default()
                .insert(c.name.clone());
            Ok(if added {
                Change::Done
            } else {
                Change::AlreadyDone
            })
        })
    }

    async fn delete_checkpoint(&self, name: &str, checkpoint: &str) -> Result<Change> {
        let what = format!("delete checkpoint {checkpoint}");
        self.change(Op::Backup, &what, name, |s| {
            s.domains.get(name).ok_or_else(|| not_found(name))?;
            let gone = s
                .checkpoints
                .get_mut(name)
                .is_some_and(|c| c.remove(checkpoint));
            Ok(if gone {
                Change::Done
            } else {
                Change::AlreadyDone
            })
        })
    }
}
