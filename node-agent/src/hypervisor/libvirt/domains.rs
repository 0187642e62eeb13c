//! Decides how each domain operation is carried out on a libvirt connection (blocking), and
//! which libvirt outcomes count as "already done" so teardown is idempotent.

use std::collections::BTreeSet;

use virt::connect::Connect;
use virt::domain::{Domain, DomainState as VirtState};
use virt::enumutil::Enum;
use virt::error::ErrorNumber;
use virt::sys;

use super::connection::Conn;
use super::errors::{found, has_code, map};
use crate::domain::devices_live::{spice_client, stat_devices};
use crate::domain::read::{replace_element, walk};
use crate::domain::{
    DesktopIdentity, METADATA_NS, parse_disk_paths, parse_disk_sources, parse_identity,
    parse_identity_element,
};
use crate::hypervisor::{
    Activity, Change, DomainState, DomainStatus, DomainSummary, HypervisorError, Migrated,
    ObjectKind, Outbound, PauseCause, Result,
};

/// Where libvirt's QEMU driver writes PID files when connected to `qemu:///system`.
const QEMU_PID_DIR: &str = "/run/libvirt/qemu";

pub(super) fn lookup(conn: &Connect, op: &'static str, name: &str) -> Result<Domain> {
    conn.lookup_domain_by_name(name)
        .map_err(|e| map(op, ObjectKind::Domain, name, &e))
}

fn convert_state(state: Enum<VirtState, sys::virDomainState>) -> DomainState {
    match state {
        Enum::Known(VirtState::NoState) => DomainState::NoState,
        Enum::Known(VirtState::Running) => DomainState::Running,
        Enum::Known(VirtState::Blocked) => DomainState::Blocked,
        Enum::Known(VirtState::Paused) => DomainState::Paused,
        Enum::Known(VirtState::Shutdown) => DomainState::ShuttingDown,
        Enum::Known(VirtState::Shutoff) => DomainState::ShutOff,
        Enum::Known(VirtState::Crashed) => DomainState::Crashed,
        Enum::Known(VirtState::PMSuspended) => DomainState::PmSuspended,
        Enum::Unknown(_) => DomainState::Unknown,
    }
}

/// The domain's state, from `virDomainGetInfo` because virt 0.5's `state()` drops errors.
fn state_of(dom: &Domain, op: &'static str, name: &str) -> Result<DomainState> {
    let info = dom
        .info()
        .map_err(|e| map(op, ObjectKind::Domain, name, &e))?;
    Ok(convert_state(info.state))
}

pub(super) fn is_active(dom: &Domain, op: &'static str, name: &str) -> Result<bool> {
    Ok(state_of(dom, op, name)?.is_active())
}

/// Domain `name`, refused unless it runs.
pub(super) fn running(conn: &Connect, op: &'static str, name: &str) -> Result<Domain> {
    let dom = lookup(conn, op, name)?;
    if !is_active(&dom, op, name)? {
        return Err(HypervisorError::Rejected {
            op,
            target: name.to_string(),
            message: "domain is not running".into(),
        });
    }
    Ok(dom)
}

fn has_managed_save(dom: &Domain, op: &'static str, name: &str) -> Result<bool> {
    dom.has_managed_save(0)
        .map_err(|e| map(op, ObjectKind::Domain, name, &e))
}

/// The identity from the metadata API (which strips our namespace), else from the full XML.
fn identity_of(dom: &Domain, name: &str) -> Result<Option<DesktopIdentity>> {
    let kind = sys::VIR_DOMAIN_METADATA_ELEMENT as i32;
    match dom.metadata(kind, Some(METADATA_NS), 0) {
        Ok(xml) => Ok(parse_identity_element(&xml)),
        Err(e) if has_code(&e, ErrorNumber::NoDomainMetadata) => Ok(None),
        Err(_) => {
            let xml = dom
                .xml_desc(0)
                .map_err(|e| map("read domain xml", ObjectKind::Domain, name, &e))?;
            Ok(parse_identity(&xml))
        }
    }
}

fn summarize(dom: &Domain) -> Result<DomainSummary> {
    let op = "list domains";
    let name = dom
        .name()
        .map_err(|e| map(op, ObjectKind::Domain, "-", &e))?;
    let err = |e: virt::error::Error| map(op, ObjectKind::Domain, &name, &e);
    Ok(DomainSummary {
        uuid: dom.uuid_string().map_err(err)?,
        state: state_of(dom, op, &name)?,
        persistent: dom.is_persistent().map_err(err)?,
        has_managed_save: has_managed_save(dom, op, &name)?,
        identity: identity_of(dom, &name)?,
        name,
    })
}

/// Every domain; one undefined while we list it is simply left out.
pub(super) fn list(conn: &Connect) -> Result<Vec<DomainSummary>> {
    let doms = conn
        .list_all_domains(0)
        .map_err(|e| map("list domains", ObjectKind::Domain, "-", &e))?;
    let mut out = Vec::with_capacity(doms.len());
    for dom in &doms {
        if let Some(summary) = found(summarize(dom))? {
            out.push(summary);
        }
    }
    Ok(out)
}

/// The domain with `<uuid>` `uuid`; `None` when there is none (or it went away meanwhile).
pub(super) fn by_uuid(conn: &Connect, uuid: &str) -> Result<Option<DomainSummary>> {
    match conn.lookup_domain_by_uuid_string(uuid) {
        Ok(dom) => found(summarize(&dom)),
        Err(e) if has_code(&e, ErrorNumber::NoDomain) => Ok(None),
        Err(e) => Err(map("look up domain", ObjectKind::Domain, uuid, &e)),
    }
}

/// The domain named `name`; `None` when there is none (or it went away meanwhile).
pub(super) fn by_name(conn: &Connect, name: &str) -> Result<Option<DomainSummary>> {
    match conn.lookup_domain_by_name(name) {
        Ok(dom) => found(summarize(&dom)),
        Err(e) if has_code(&e, ErrorNumber::NoDomain) => Ok(None),
        Err(e) => Err(map("look up domain", ObjectKind::Domain, name, &e)),
    }
}

/// Defines (or updates in place, by `<uuid>`) a domain; its name.
pub(super) fn define(conn: &Connect, xml: &str) -> Result<String> {
    let op = "define domain";
    let dom = conn
        .define_domain_xml(xml)
        .map_err(|e| map(op, ObjectKind::Domain, "-", &e))?;
    dom.name().map_err(|e| map(op, ObjectKind::Domain, "-", &e))
}

/// Starts a domain (from its managed save image if any).
pub(super) fn start(conn: &Connect, name: &str, paused: bool) -> Result<Change> {
    let op = "start domain";
    let dom = lookup(conn, op, name)?;
    if is_active(&dom, op, name)? {
        return Ok(Change::AlreadyDone);
    }
    let started = if paused {
        dom.create_with_flags(sys::VIR_DOMAIN_START_PAUSED)
    } else {
        dom.create()
    };
    match started {
        Ok(()) => Ok(Change::Done),
        Err(e) if has_code(&e, ErrorNumber::OperationInvalid) && is_active(&dom, op, name)? => {
            Ok(Change::AlreadyDone)
        }
        Err(e) => Err(map(op, ObjectKind::Domain, name, &e)),
    }
}

/// Starts carrier `xml` paused as a transient domain; refused while a domain `name` runs (a
/// carrier is started only over the stopped desktop, whose definition it leaves as it was).
pub(super) fn start_carrier(conn: &Connect, name: &str, xml: &str) -> Result<()> {
    let op = "start carrier domain";
    if let Some(dom) = found(lookup(conn, op, name))?
        && is_active(&dom, op, name)?
    {
        return Err(HypervisorError::Rejected {
            op,
            target: name.to_string(),
            message: "the domain runs; a carrier starts only in place of a stopped domain".into(),
        });
    }
    conn.create_domain_xml(xml, sys::VIR_DOMAIN_START_PAUSED)
        .map_err(|e| map(op, ObjectKind::Domain, name, &e))?;
    Ok(())
}

/// Whether a failed stop means the domain was already off or gone.
fn already_off(e: &virt::error::Error) -> bool {
    has_code(e, ErrorNumber::OperationInvalid) || has_code(e, ErrorNumber::NoDomain)
}

/// ACPI shutdown request.
pub(super) fn shutdown(conn: &Connect, name: &str) -> Result<Change> {
    let op = "shut down domain";
    let Some(dom) = found(lookup(conn, op, name))? else {
        return Ok(Change::AlreadyDone);
    };
    if !is_active(&dom, op, name)? {
        return Ok(Change::AlreadyDone);
    }
    match dom.shutdown() {
        Ok(()) => Ok(Change::Done),
        Err(e) if already_off(&e) => Ok(Change::AlreadyDone),
        Err(e) => Err(map(op, ObjectKind::Domain, name, &e)),
    }
}

/// Forced power-off; "domain is not running" counts as done.
pub(super) fn destroy(conn: &Connect, name: &str) -> Result<Change> {
    let op = "destroy domain";
    let Some(dom) = found(lookup(conn, op, name))? else {
        return Ok(Change::AlreadyDone);
    };
    match dom.destroy() {
        Ok(()) => Ok(Change::Done),
        Err(e) if already_off(&e) => Ok(Change::AlreadyDone),
        Err(e) => Err(map(op, ObjectKind::Domain, name, &e)),
    }
}

/// Resumes a paused domain.
pub(super) fn resume(conn: &Connect, name: &str) -> Result<Change> {
    let op = "resume domain";
    let dom = lookup(conn, op, name)?;
    if state_of(&dom, op, name)? != DomainState::Paused {
        return Ok(Change::AlreadyDone);
    }
    dom.resume()
        .map_err(|e| map(op, ObjectKind::Domain, name, &e))?;
    Ok(Change::Done)
}

/// Why libvirt paused `dom`; `Other` when the reason cannot be read (virt 0.5's `state()`
/// turns a failed call into an unknown state, never into a cause the agent acts on).
fn pause_cause(dom: &Domain) -> PauseCause {
    use virt::domain::{DomainPausedReason as R, DomainStateReason};
    match dom.state() {
        Ok((_, Enum::Known(DomainStateReason::Paused(Enum::Known(R::IOError))))) => {
            PauseCause::IoError
        }
        Ok((_, Enum::Known(DomainStateReason::Paused(Enum::Known(R::PostCopyFailed))))) => {
            PauseCause::PostCopyFailed
        }
        _ => PauseCause::Other,
    }
}

/// CPU time, disk and NIC byte counters, and the SPICE client of a running domain.
pub(super) fn activity(conn: &Connect, name: &str) -> Result<Activity> {
    let op = "read activity";
    let dom = lookup(conn, op, name)?;
    let err = |e: virt::error::Error| map(op, ObjectKind::Domain, name, &e);
    let info = dom.info().map_err(err)?;
    let xml = dom.xml_desc(0).map_err(err)?;
    let (disks, nics) = stat_devices(&xml).map_err(|e| HypervisorError::Failed {
        op,
        target: name.to_string(),
        message: e.to_string(),
    })?;
    let positive = |v: i64| u64::try_from(v).unwrap_or(0);
    let mut block_bytes = 0u64;
    for d in &disks {
        if let Ok(s) = dom.block_stats(d) {
            block_bytes = block_bytes.saturating_add(positive(s.rd_bytes) + positive(s.wr_bytes));
        }
    }
    let mut net_bytes = 0u64;
    for n in &nics {
        if let Ok(s) = dom.interface_stats(n) {
            net_bytes = net_bytes.saturating_add(positive(s.rx_bytes) + positive(s.tx_bytes));
        }
    }
    // QMP through libvirt; a domain of another driver (test:///) has no monitor.
    let spice_client = match dom.qemu_monitor_command(r#"{"execute":"query-spice"}"#, 0) {
        Ok(reply) => spice_client(&reply).map_err(|message| HypervisorError::Failed {
            op,
            target: name.to_string(),
            message,
        })?,
        Err(e) if has_code(&e, ErrorNumber::NoSupport) => None,
        Err(e) => return Err(err(e)),
    };
    Ok(Activity {
        cpu_time_ns: info.cpu_time,
        block_bytes,
        net_bytes,
        spice_client,
    })
}

/// Changes a device of the running domain; not running (or gone) counts as done.
pub(super) fn update_live_device(conn: &Connect, name: &str, xml: &str) -> Result<Change> {
    let op = "update live device";
    let Some(dom) = found(lookup(conn, op, name))? else {
        return Ok(Change::AlreadyDone);
    };
    if !is_active(&dom, op, name)? {
        return Ok(Change::AlreadyDone);
    }
    match dom.update_device_flags(xml, sys::VIR_DOMAIN_AFFECT_LIVE) {
        Ok(()) => Ok(Change::Done),
        Err(e) if already_off(&e) => Ok(Change::AlreadyDone),
        Err(e) => Err(map(op, ObjectKind::Domain, name, &e)),
    }
}

fn has_nvram(dom: &Domain, op: &'static str, name: &str) -> Result<bool> {
    let xml = dom
        .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)
        .map_err(|e| map(op, ObjectKind::Domain, name, &e))?;
    let mut nvram = false;
    walk(&xml, |path, _| {
        nvram |= path.len() == 3 && path[1] == "os" && path[2] == "nvram"
    })
    .map_err(|e| HypervisorError::Failed {
        op,
        target: name.to_string(),
        message: e.to_string(),
    })?;
    Ok(nvram)
}

/// Removes the definition with its managed save image and snapshot metadata, and its NVRAM
/// when it has one.
pub(super) fn undefine(conn: &Connect, name: &str) -> Result<Change> {
    let op = "undefine domain";
    let Some(dom) = found(lookup(conn, op, name))? else {
        return Ok(Change::AlreadyDone);
    };
    if !dom
        .is_persistent()
        .map_err(|e| map(op, ObjectKind::Domain, name, &e))?
    {
        return Ok(Change::AlreadyDone);
    }
    // Checkpoints go from libvirt's metadata only (libvirt refuses to undefine a domain with
    // any): their bitmaps stay in the disk, and the backups recorded in the API redefine them.
    let mut flags = sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        | sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA;
    if has_nvram(&dom, op, name)? {
        flags |= sys::VIR_DOMAIN_UNDEFINE_NVRAM;
    }
    let undefined = match dom.undefine_flags(flags) {
        // A driver without checkpoints (libvirt's test driver) refuses the flag: it has none.
        Err(e) if has_code(&e, ErrorNumber::InvalidArg) => {
            dom.undefine_flags(flags & !sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        }
        other => other,
    };
    match undefined {
        Ok(()) => Ok(Change::Done),
        Err(e) if has_code(&e, ErrorNumber::NoDomain) => Ok(Change::AlreadyDone),
        Err(e) => Err(map(op, ObjectKind::Domain, name, &e)),
    }
}

/// Suspends to disk; done already when off with a save image.
pub(super) fn managed_save(conn: &Connect, name: &str) -> Result<Change> {
    let op = "managed save";
    let dom = lookup(conn, op, name)?;
    if !is_active(&dom, op, name)? && has_managed_save(&dom, op, name)? {
        return Ok(Change::AlreadyDone);
    }
    dom.managed_save(0)
        .map_err(|e| map(op, ObjectKind::Domain, name, &e))?;
    Ok(Change::Done)
}

/// Copies the definition (with its SPICE password) into the managed save image at `image`.
///
/// The definition is the inactive, migratable XML: the form libvirt checks against the saved
/// guest ABI (memory, vCPUs, machine, device addresses), while SPICE ports and passwords may
/// change. libvirt does not compare disk sources, so that is checked here: a restore onto
/// another file than the one the saved memory refers to would corrupt it.
pub(super) fn sync_managed_save(conn: &Connect, name: &str, image: &str) -> Result<Change> {
    let op = "update saved memory image";
    let dom = lookup(conn, op, name)?;
    if is_active(&dom, op, name)? || !has_managed_save(&dom, op, name)? {
        return Ok(Change::AlreadyDone);
    }
    let err = |e: virt::error::Error| map(op, ObjectKind::Domain, name, &e);
    let definition = dom
        .xml_desc(
            sys::VIR_DOMAIN_XML_INACTIVE
                | sys::VIR_DOMAIN_XML_SECURE
                | sys::VIR_DOMAIN_XML_MIGRATABLE,
        )
        .map_err(err)?;
    let saved = conn
        .save_image_xml_desc(image, sys::VIR_DOMAIN_SAVE_IMAGE_XML_SECURE)
        .map_err(err)?;
    let unreadable = |e: quick_xml::Error| HypervisorError::Failed {
        op,
        target: name.to_string(),
        message: e.to_string(),
    };
    let wanted = parse_disk_sources(&definition).map_err(unreadable)?;
    let saved_disks = parse_disk_sources(&saved).map_err(unreadable)?;
    if wanted != saved_disks {
        return Err(HypervisorError::Rejected {
            op,
            target: name.to_string(),
            message: format!(
                "the saved memory refers to the disks {saved_disks:?}, the definition to {wanted:?}"
            ),
        });
    }
    conn.save_image_define_xml(image, &definition, 0)
        .map_err(err)?;
    Ok(Change::Done)
}

/// Deletes the managed save image; none (or no domain) counts as done.
pub(super) fn remove_managed_save(conn: &Connect, name: &str) -> Result<Change> {
    let op = "remove saved memory image";
    let Some(dom) = found(lookup(conn, op, name))? else {
        return Ok(Change::AlreadyDone);
    };
    if !has_managed_save(&dom, op, name)? {
        return Ok(Change::AlreadyDone);
    }
    dom.managed_save_remove(0)
        .map_err(|e| map(op, ObjectKind::Domain, name, &e))?;
    Ok(Change::Done)
}

/// State, CPU time and memory.
pub(super) fn status(conn: &Connect, name: &str) -> Result<DomainStatus> {
    let op = "read domain status";
    let dom = lookup(conn, op, name)?;
    let info = dom
        .info()
        .map_err(|e| map(op, ObjectKind::Domain, name, &e))?;
    let state = convert_state(info.state);
    Ok(DomainStatus {
        paused: (state == DomainState::Paused).then(|| pause_cause(&dom)),
        state,
        cpu_time_ns: info.cpu_time,
        memory_kib: info.memory,
        max_memory_kib: info.max_mem,
        vcpus: info.nr_virt_cpu,
        has_managed_save: has_managed_save(&dom, op, name)?,
    })
}

/// Live XML, or the definition with `inactive`; never with the SPICE password.
pub(super) fn xml(conn: &Connect, name: &str, inactive: bool) -> Result<String> {
    let op = "read domain xml";
    let flags = if inactive {
        sys::VIR_DOMAIN_XML_INACTIVE
    } else {
        0
    };
    lookup(conn, op, name)?
        .xml_desc(flags)
        .map_err(|e| map(op, ObjectKind::Domain, name, &e))
}

fn read_pid_file(name: &str) -> Option<u32> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return None;
    }
    let text = std::fs::read_to_string(format!("{QEMU_PID_DIR}/{name}.pid")).ok()?;
    text.trim().parse().ok()
}

/// QEMU's PID from libvirt's PID file, for a running domain of local `qemu:///system`.
pub(super) fn qemu_pid(conn: &Connect, name: &str) -> Result<Option<u32>> {
    let op = "read qemu pid";
    let dom = lookup(conn, op, name)?;
    let uri = conn
        .uri()
        .map_err(|e| map(op, ObjectKind::Domain, name, &e))?;
    if uri != "qemu:///system" || !is_active(&dom, op, name)? {
        return Ok(None);
    }
    Ok(read_pid_file(name))
}

fn disk_paths_of(dom: &Domain, name: &str, out: &mut BTreeSet<String>) -> Result<()> {
    let op = "list disk paths";
    let err = |e: virt::error::Error| map(op, ObjectKind::Domain, name, &e);
    let mut flags = vec![0];
    if dom.is_active().map_err(err)? && dom.is_persistent().map_err(err)? {
        flags.push(sys::VIR_DOMAIN_XML_INACTIVE);
    }
    for flag in flags {
        let xml = dom.xml_desc(flag).map_err(err)?;
        let paths = parse_disk_paths(&xml).map_err(|e| HypervisorError::Failed {
            op,
            target: name.to_string(),
            message: e.to_string(),
        })?;
        out.extend(paths);
    }
    Ok(())
}

/// Files used as disks by any domain, live or defined.
pub(super) fn disk_paths(conn: &Connect) -> Result<BTreeSet<String>> {
    let op = "list disk paths";
    let doms = conn
        .list_all_domains(0)
        .map_err(|e| map(op, ObjectKind::Domain, "-", &e))?;
    let mut paths = BTreeSet::new();
    for dom in &doms {
        let name = dom
            .name()
            .map_err(|e| map(op, ObjectKind::Domain, "-", &e))?;
        found(disk_paths_of(dom, &name, &mut paths))?;
    }
    Ok(paths)
}

/// Whether a job runs on domain `name` (`virDomainGetJobInfo`: its type is not NONE); `false`
/// when the domain is gone or does not run.
pub(super) fn job_running(conn: &Connect, name: &str) -> Result<bool> {
    let op = "read job";
    let dom = match lookup(conn, op, name) {
        Ok(d) => d,
        Err(e) if e.is_not_found() => return Ok(false),
        Err(e) => return Err(e),
    };
    if !is_active(&dom, op, name)? {
        return Ok(false);
    }
    let info = dom
        .job_info()
        .map_err(|e| map(op, ObjectKind::Domain, name, &e))?;
    Ok(info.r#type != sys::VIR_DOMAIN_JOB_NONE as i32)
}

/// Ends the outgoing migration of domain `name` that ran past its completion timeout: switches
/// it to post-copy (`post_copy`, started with that flag) or aborts it, leaving the domain
/// running here.
pub(super) fn end_migration(conn: &Connect, name: &str, post_copy: bool) -> Result<()> {
    let op = if post_copy {
        "start post-copy"
    } else {
        "abort migration"
    };
    let dom = lookup(conn, op, name)?;
    let ended = if post_copy {
        deskvirt_libvirt_ext::start_post_copy(&dom)
    } else {
        deskvirt_libvirt_ext::abort_job(&dom)
    };
    ended.map_err(|e| map(op, ObjectKind::Domain, name, &e))
}

/// Moves running (or paused) domain `name` live to `out.dest_uri`, peer to peer, its disks'
/// own layers copied along with `out.copy_disks`: defined there from its own definitions with
/// the target's graphics, undefined here once it runs there, the job aborted (the domain left
/// running here) on any error. A carrier (`out.carrier_xml`) goes as that XML says and is not
/// defined there. Then reads the target's completed job for the figures.
pub(super) fn migrate_out(conn: &Connect, name: &str, out: &Outbound) -> Result<Migrated> {
    let op = "migrate";
    // On a connection of its own: while a disk is copied, libvirt answered no other call on
    // the connection the migration ran on (a status read waited past its deadline, and so
    // would a cancel's abort), while another connection was answered at once.
    let uri = conn
        .uri()
        .map_err(|e| map(op, ObjectKind::Domain, name, &e))?;
    let own = Conn::open(&uri).map_err(|e| map(op, ObjectKind::Domain, name, &e))?;
    let Some(conn) = own.get() else {
        return Err(HypervisorError::Disconnected {
            op,
            message: "the migration's connection is closing".into(),
        });
    };
    let dom = running(conn, op, name)?;
    let uuid = dom
        .uuid_string()
        .map_err(|e| map(op, ObjectKind::Domain, name, &e))?;
    let mut flags = sys::VIR_MIGRATE_LIVE
        | sys::VIR_MIGRATE_PEER2PEER
        | sys::VIR_MIGRATE_UNDEFINE_SOURCE
        | sys::VIR_MIGRATE_ABORT_ON_ERROR;
    if out.carrier_xml.is_none() {
        flags |= sys::VIR_MIGRATE_PERSIST_DEST;
    }
    if out.declared_shared {
        flags |= sys::VIR_MIGRATE_UNSAFE;
    }
    if out.copy_disks {
        flags |= sys::VIR_MIGRATE_NON_SHARED_INC;
    }
    if out.limits.auto_converge {
        flags |= sys::VIR_MIGRATE_AUTO_CONVERGE;
    }
    if out.limits.post_copy {
        flags |= sys::VIR_MIGRATE_POSTCOPY;
    }
    // The running and the persistent definitions, each with the target's graphics.
    let on_target = |flags: u32| -> Result<String> {
        let xml = dom
            .xml_desc(flags | sys::VIR_DOMAIN_XML_SECURE | sys::VIR_DOMAIN_XML_MIGRATABLE)
            .map_err(|e| map(op, ObjectKind::Domain, name, &e))?;
        let failed = |message: String| HypervisorError::Failed {
            op,
            target: name.to_string(),
            message,
        };
        replace_element(&xml, &["domain", "devices", "graphics"], &out.graphics_xml)
            .map_err(|e| failed(e.to_string()))?
            .ok_or_else(|| failed("the domain has no <graphics> to move".into()))
    };
    let (dest_xml, persist_xml, graphics_uri) = match &out.carrier_xml {
        // Transient there: the target's agent destroys it and defines the desktop afresh.
        Some(carrier) => (carrier.clone(), None, None),
        None => (
            on_target(0)?,
            Some(on_target(sys::VIR_DOMAIN_XML_INACTIVE)?),
            out.graphics_uri.clone(),
        ),
    };
    let params = virt::domain::MigrateParameters {
        uri: Some(out.migrate_uri.clone()),
        dest_xml: Some(dest_xml),
        persist_xml,
        graphics_uri,
        bandwidth: out.limits.bandwidth_mib,
        ..Default::default()
    };
    // An object the target lacks (its network, say) is no "not found" of this domain: the
    // move is refused, and libvirt's own words say why.
    dom.migrate_to_uri3(Some(&out.dest_uri), params, flags)
        .map_err(|e| match map(op, ObjectKind::Domain, name, &e) {
            HypervisorError::NotFound { .. } => HypervisorError::Rejected {
                op,
                target: name.to_string(),
                message: e.to_string(),
            },
            // This host's libvirt still answers: the connection that broke was its own to the
            // target's libvirt (the target host went away), not this agent's.
            HypervisorError::Disconnected { .. } if conn.is_alive().unwrap_or(false) => {
                HypervisorError::Rejected {
                    op,
                    target: name.to_string(),
                    message: format!(
                        "the connection to the target host's libvirt broke during the move; the \
                         domain runs on here ({e})"
                    ),
                }
            }
            other => other,
        })?;
    // The figures are the target's: the source's domain is gone with its job.
    let stats = Connect::open(Some(&out.dest_uri))
        .and_then(|dest| dest.lookup_domain_by_uuid_string(&uuid))
        .and_then(|d| deskvirt_libvirt_ext::job_stats(&d, true));
    let ms = |v: Option<u64>| std::time::Duration::from_millis(v.unwrap_or(0));
    Ok(match stats {
        Ok(s) => Migrated {
            total: ms(s.time_elapsed_ms),
            downtime: ms(s.downtime_ms),
            bytes: s.data_processed.unwrap_or(0),
        },
        // Moved all the same; only the figures are missing.
        Err(e) => {
            tracing::warn!(domain = name, error = %e, "migrated; the target's figures are unreadable");
            Migrated::default()
        }
    })
}
