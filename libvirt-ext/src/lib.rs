//! The libvirt calls that `virt` 0.5 does not wrap, with safe signatures: aborting a domain's
//! job (a migration that does not converge) and switching a migration to post-copy. This is
//! the workspace's only crate with `unsafe` code; every other crate forbids it, and the
//! node-agent reaches these calls only through its `Hypervisor` door.
#![deny(clippy::undocumented_unsafe_blocks)]

use virt::domain::Domain;
use virt::error::Error;

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
