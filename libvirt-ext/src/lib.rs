//! The libvirt calls that `virt` 0.5 does not wrap, with safe signatures: aborting a domain's
//! job (a migration that does not converge), switching a migration to post-copy, the
//! checkpoint and backup calls of incremental disk backups, freezing and thawing a guest's
//! file systems through its guest agent, a job's statistics read
//! without `virt`'s unsound conversion, and a network's DHCP leases. This is
//! the workspace's only crate with `unsafe` code; every other crate forbids it, and the
//! node-agent reaches these calls only through its `Hypervisor` door.
#![deny(clippy::undocumented_unsafe_blocks)]

use std::ffi::CStr;
use std::os::raw::c_int;

use virt::domain::Domain;
use virt::error::Error;
use virt::network::Network;

/// Aborts the job running on `dom` (`virDomainAbortJob`): a migration stops and the domain
/// runs on here as before.
pub fn abort_job(dom: &Domain) -> Result<(), Error> {
    // SAFETY: `dom` is borrowed for the whole call, so the virDomainPtr it holds stays valid
    // (virt frees it only on drop); virDomainAbortJob neither takes ownership of it nor keeps
    // it, and libvirt allows the call from another thread while the job runs.
    let ret = unsafe { virt_sys::virDomainAbortJob(dom.as_ptr()) };
    if ret == -1 {
        return Err(Error::last_error());
    }
    Ok(())
}

/// Switches the outgoing migration of `dom`, started with `VIR_MIGRATE_POSTCOPY`, to post-copy
/// (`virDomainMigrateStartPostCopy`): the domain runs on the target from now on, and pages it
/// lacks are fetched from here.
pub fn start_post_copy(dom: &Domain) -> Result<(), Error> {
    // SAFETY: as in `abort_job`: the borrowed `dom` keeps its pointer valid for the call,
    // which does not keep it; flags must be 0.
    let ret = unsafe { virt_sys::virDomainMigrateStartPostCopy(dom.as_ptr(), 0) };
    if ret == -1 {
        return Err(Error::last_error());
    }
    Ok(())
}

/// Starts a push-mode backup job on `dom` (`virDomainBackupBegin`) as `backup_xml` describes
/// it (`<domainbackup>`: the disks, their target files, and the checkpoint an incremental
/// starts from), creating checkpoint `checkpoint_xml` in the same transaction when given. The
/// job runs on after the call returns; its end shows in the domain's job stats.
pub fn backup_begin(
    dom: &Domain,
    backup_xml: &CStr,
    checkpoint_xml: Option<&CStr>,
) -> Result<(), Error> {
    let checkpoint = checkpoint_xml.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: the borrowed `dom` keeps its virDomainPtr valid for the call; both strings are
    // NUL-terminated and borrowed for the call (libvirt copies what it keeps), the checkpoint
    // one may be NULL as the API allows; flags must be 0 for a push backup.
    let ret =
        unsafe { virt_sys::virDomainBackupBegin(dom.as_ptr(), backup_xml.as_ptr(), checkpoint, 0) };
    if ret == -1 {
        return Err(Error::last_error());
    }
    Ok(())
}

/// Creates checkpoint `xml` on `dom` (`virDomainCheckpointCreateXML`), or with `redefine` only
/// records in libvirt's metadata one whose bitmap the disk already holds (after a migration,
/// a restart of libvirt with lost metadata, or a bitmap added offline).
pub fn checkpoint_create(dom: &Domain, xml: &CStr, redefine: bool) -> Result<(), Error> {
    let flags = if redefine {
        virt_sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
    } else {
        0
    };
    // SAFETY: the borrowed `dom` keeps its pointer valid for the call and `xml` is a
    // NUL-terminated string borrowed for it. The checkpoint handle returned is ours to free.
    let cp = unsafe { virt_sys::virDomainCheckpointCreateXML(dom.as_ptr(), xml.as_ptr(), flags) };
    if cp.is_null() {
        return Err(Error::last_error());
    }
    // SAFETY: `cp` is the non-null handle just returned, freed once here and not used after.
    unsafe { virt_sys::virDomainCheckpointFree(cp) };
    Ok(())
}

/// Whether `dom` has checkpoint `name` in libvirt's metadata (`virDomainCheckpointLookupByName`);
/// `Ok(false)` when libvirt says there is no such checkpoint.
pub fn checkpoint_exists(dom: &Domain, name: &CStr) -> Result<bool, Error> {
    // SAFETY: the borrowed `dom` keeps its pointer valid for the call and `name` is a
    // NUL-terminated string borrowed for it; flags must be 0. The handle returned is ours.
    let cp = unsafe { virt_sys::virDomainCheckpointLookupByName(dom.as_ptr(), name.as_ptr(), 0) };
    if cp.is_null() {
        let e = Error::last_error();
        if e.code().is(virt::error::ErrorNumber::NoDomainCheckpoint) {
            return Ok(false);
        }
        return Err(e);
    }
    // SAFETY: `cp` is the non-null handle just returned, freed once here and not used after.
    unsafe { virt_sys::virDomainCheckpointFree(cp) };
    Ok(true)
}

/// Deletes checkpoint `name` of `dom` (`virDomainCheckpointDelete`): with `metadata_only` only
/// libvirt's record goes and the disk's bitmap stays; otherwise its bitmap is merged into its
/// parent's (so an incremental since the parent stays exact) and removed.
pub fn checkpoint_delete(dom: &Domain, name: &CStr, metadata_only: bool) -> Result<(), Error> {
    // SAFETY: as in `checkpoint_exists`; the handle is checked for null before use.
    let cp = unsafe { virt_sys::virDomainCheckpointLookupByName(dom.as_ptr(), name.as_ptr(), 0) };
    if cp.is_null() {
        return Err(Error::last_error());
    }
    let flags = if metadata_only {
        virt_sys::VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY
    } else {
        0
    };
    // SAFETY: `cp` is a valid checkpoint handle of ours; deleting the checkpoint does not free
    // the handle, which is freed once right after and not used again.
    let ret = unsafe { virt_sys::virDomainCheckpointDelete(cp, flags) };
    let result = if ret == -1 {
        Err(Error::last_error())
    } else {
        Ok(())
    };
    // SAFETY: as above: freed once, after its last use.
    unsafe { virt_sys::virDomainCheckpointFree(cp) };
    result
}

/// Flushes and freezes every file system of the guest through its guest agent
/// (`virDomainFSFreeze`, all mount points); returns how many were frozen. Fails at once when
/// the domain has no guest agent channel or no agent is connected to it, and after libvirt's
/// agent timeout when one is connected but does not answer.
pub fn fs_freeze(dom: &Domain) -> Result<u32, Error> {
    // SAFETY: the borrowed `dom` keeps its pointer valid for the call; a NULL mount point list
    // with count 0 means all of them, as the API allows; flags must be 0.
    let ret = unsafe { virt_sys::virDomainFSFreeze(dom.as_ptr(), std::ptr::null_mut(), 0, 0) };
    if ret == -1 {
        return Err(Error::last_error());
    }
    Ok(u32::try_from(ret).unwrap_or(0))
}

/// Sets how long libvirt waits for `dom`'s guest agent to answer a command
/// (`virDomainAgentSetResponseTimeout`), in seconds; kept while the domain runs.
pub fn agent_timeout(dom: &Domain, seconds: i32) -> Result<(), Error> {
    // SAFETY: the borrowed `dom` keeps its pointer valid for the call; flags must be 0.
    let ret = unsafe { virt_sys::virDomainAgentSetResponseTimeout(dom.as_ptr(), seconds, 0) };
    if ret == -1 {
        return Err(Error::last_error());
    }
    Ok(())
}

/// Thaws the guest's file systems (`virDomainFSThaw`, all mount points); returns how many.
pub fn fs_thaw(dom: &Domain) -> Result<u32, Error> {
    // SAFETY: as in `fs_freeze`.
    let ret = unsafe { virt_sys::virDomainFSThaw(dom.as_ptr(), std::ptr::null_mut(), 0, 0) };
    if ret == -1 {
        return Err(Error::last_error());
    }
    Ok(u32::try_from(ret).unwrap_or(0))
}

/// What `virDomainGetJobStats` says of a domain's job, the fields the agent reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobFigures {
    /// `virDomainJobType`: none, bounded, unbounded, completed or failed.
    pub job_type: i32,
    /// `virDomainJobOperation` (migration out, backup, ...), when libvirt says.
    pub operation: Option<i32>,
    pub time_elapsed_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    pub data_processed: Option<u64>,
    pub data_total: Option<u64>,
    /// What a backup job copied of the disks ("file processed" in `virsh domjobinfo`).
    pub disk_processed: Option<u64>,
    pub disk_total: Option<u64>,
    /// Why a failed job failed.
    pub error_message: Option<String>,
}

/// The statistics of the job running on `dom`, or with `completed` of the last one that ended
/// (`virDomainGetJobStats`; completed figures are kept for the next read). `virt` 0.5's
/// `Domain::job_stats` hands libvirt's array to Rust's allocator and builds a slice from a null
/// pointer when there are no figures; this reads each field with `virTypedParamsGet*` and frees
/// the array with `virTypedParamsFree`.
pub fn job_stats(dom: &Domain, completed: bool) -> Result<JobFigures, Error> {
    let flags = if completed {
        virt_sys::VIR_DOMAIN_JOB_STATS_COMPLETED | virt_sys::VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED
    } else {
        0
    };
    let mut job_type: c_int = 0;
    let mut params: virt_sys::virTypedParameterPtr = std::ptr::null_mut();
    let mut nparams: c_int = 0;
    // SAFETY: the borrowed `dom` keeps its pointer valid for the call; the three out-pointers
    // point to live locals. On success libvirt allocates `params` (possibly NULL with
    // `nparams` 0), which is ours to free with virTypedParamsFree.
    let ret = unsafe {
        virt_sys::virDomainGetJobStats(
            dom.as_ptr(),
            &mut job_type,
            &mut params,
            &mut nparams,
            flags,
        )
    };
    if ret == -1 {
        return Err(Error::last_error());
    }
    let params = Params {
        ptr: params,
        n: nparams,
    };
    Ok(JobFigures {
        job_type,
        operation: params.int(virt_sys::VIR_DOMAIN_JOB_OPERATION),
        time_elapsed_ms: params.ullong(virt_sys::VIR_DOMAIN_JOB_TIME_ELAPSED),
        downtime_ms: params.ullong(virt_sys::VIR_DOMAIN_JOB_DOWNTIME),
        data_processed: params.ullong(virt_sys::VIR_DOMAIN_JOB_DATA_PROCESSED),
        data_total: params.ullong(virt_sys::VIR_DOMAIN_JOB_DATA_TOTAL),
        disk_processed: params.ullong(virt_sys::VIR_DOMAIN_JOB_DISK_PROCESSED),
        disk_total: params.ullong(virt_sys::VIR_DOMAIN_JOB_DISK_TOTAL),
        error_message: params.string(virt_sys::VIR_DOMAIN_JOB_ERRMSG),
    })
}

/// A DHCP lease the network's dnsmasq handed out and still counts (`virNetworkGetDHCPLeases`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DhcpLease {
    /// The client's MAC address, as libvirt prints it (lower case).
    pub mac: String,
    /// The leased address.
    pub ip: String,
    /// When the lease expires, in seconds since the epoch.
    pub expiry: i64,
}

/// The DHCP leases of `net` that have not expired (libvirt's view of its dnsmasq's leases,
/// kept whether or not the guest still runs).
pub fn dhcp_leases(net: &Network) -> Result<Vec<DhcpLease>, Error> {
    let mut list: *mut virt_sys::virNetworkDHCPLeasePtr = std::ptr::null_mut();
    // SAFETY: the borrowed `net` keeps its virNetworkPtr valid for the call; a NULL MAC asks
    // for every lease; `list` is a live local that libvirt fills with an array it allocates.
    let n =
        unsafe { virt_sys::virNetworkGetDHCPLeases(net.as_ptr(), std::ptr::null(), &mut list, 0) };
    if n < 0 {
        return Err(Error::last_error());
    }
    let count = usize::try_from(n).unwrap_or(0);
    let text = |p: *const std::os::raw::c_char| {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: a non-null string field of a lease libvirt returned, NUL-terminated and
            // alive until the lease is freed below.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    let mut leases = Vec::with_capacity(count);
    for i in 0..count {
        if list.is_null() {
            break;
        }
        // SAFETY: `list` is the non-null array of `n` lease pointers libvirt returned; `i` is
        // below `n`.
        let lease = unsafe { *list.add(i) };
        if lease.is_null() {
            continue;
        }
        // SAFETY: `lease` is a non-null lease of that array, read before it is freed.
        let l = unsafe { &*lease };
        leases.push(DhcpLease {
            mac: text(l.mac).to_ascii_lowercase(),
            ip: text(l.ipaddr),
            expiry: l.expirytime,
        });
        // SAFETY: each lease is freed once, after its last read, and not used again.
        unsafe { virt_sys::virNetworkDHCPLeaseFree(lease) };
    }
    if !list.is_null() {
        // SAFETY: the array itself, allocated by libvirt with malloc, freed once after all its
        // leases were freed; libvirt documents free() for it.
        unsafe { libc_free(list.cast()) };
    }
    Ok(leases)
}

unsafe extern "C" {
    /// The C library's `free`, for the array `virNetworkGetDHCPLeases` allocates.
    #[link_name = "free"]
    fn libc_free(ptr: *mut std::ffi::c_void);
}

/// A typed parameter array libvirt allocated, freed on drop.
struct Params {
    ptr: virt_sys::virTypedParameterPtr,
    n: c_int,
}

impl Params {
    fn int(&self, name: &CStr) -> Option<i32> {
        if self.ptr.is_null() {
            return None;
        }
        let mut v: c_int = 0;
        // SAFETY: `ptr` is the non-null array of `n` parameters libvirt returned, alive until
        // drop; `name` is NUL-terminated; `v` is a live local. 1 means found.
        let found =
            unsafe { virt_sys::virTypedParamsGetInt(self.ptr, self.n, name.as_ptr(), &mut v) };
        (found == 1).then_some(v)
    }

    fn ullong(&self, name: &CStr) -> Option<u64> {
        if self.ptr.is_null() {
            return None;
        }
        let mut v: std::os::raw::c_ulonglong = 0;
        // SAFETY: as in `int`.
        let found =
            unsafe { virt_sys::virTypedParamsGetULLong(self.ptr, self.n, name.as_ptr(), &mut v) };
        (found == 1).then_some(v)
    }

    fn string(&self, name: &CStr) -> Option<String> {
        if self.ptr.is_null() {
            return None;
        }
        let mut v: *const std::os::raw::c_char = std::ptr::null();
        // SAFETY: as in `int`; on 1, `v` points to a NUL-terminated string inside the array,
        // copied out here before the array is freed.
        let found =
            unsafe { virt_sys::virTypedParamsGetString(self.ptr, self.n, name.as_ptr(), &mut v) };
        if found != 1 || v.is_null() {
            return None;
        }
        // SAFETY: `v` is non-null and NUL-terminated, valid while `self` lives.
        Some(unsafe { CStr::from_ptr(v) }.to_string_lossy().into_owned())
    }
}

impl Drop for Params {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: the array libvirt allocated with its count, freed once here (its strings
            // with it) and never used after.
            unsafe { virt_sys::virTypedParamsFree(self.ptr, self.n) };
        }
    }
}
