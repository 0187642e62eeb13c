//! Decides which libvirt error codes mean "not found", "disconnected" or "rejected", so the
//! rest of the agent never sees a `virt` error.

use virt::error::{Error, ErrorDomain, ErrorNumber};

use crate::hypervisor::error::{HypervisorError, ObjectKind};

/// `Ok(None)` for a missing object, so teardown can answer `AlreadyDone`.
pub(super) fn found<T>(result: Result<T, HypervisorError>) -> Result<Option<T>, HypervisorError> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether `err` carries libvirt error code `code`.
pub(super) fn has_code(err: &Error, code: ErrorNumber) -> bool {
    err.code().is(code)
}

/// Whether `err` means the connection to libvirt is gone.
fn is_disconnect(err: &Error) -> bool {
    let code = err.code();
    code.is_any(vec![ErrorNumber::NoConnect, ErrorNumber::InvalidConn])
        || (err
            .domain()
            .is_any(vec![ErrorDomain::Rpc, ErrorDomain::Remote])
            && code.is_any(vec![
                ErrorNumber::SystemError,
                ErrorNumber::InternalError,
                ErrorNumber::Rpc,
            ]))
}

/// Whether retrying the same request cannot help.
fn is_rejection(err: &Error) -> bool {
    err.code().is_any(vec![
        ErrorNumber::OperationInvalid,
        ErrorNumber::XmlError,
        ErrorNumber::XmlDetail,
        ErrorNumber::XmlInvalidSchema,
        ErrorNumber::InvalidArg,
        ErrorNumber::ArgumentUnsupported,
        ErrorNumber::ConfigUnsupported,
        ErrorNumber::OperationUnsupported,
        ErrorNumber::NoSupport,
        ErrorNumber::DomExist,
        ErrorNumber::NetworkExist,
        ErrorNumber::InvalidMac,
        ErrorNumber::NoOs,
        ErrorNumber::OsType,
        ErrorNumber::CpuIncompatible,
    ])
}

/// Maps a libvirt error of operation `op` on object `target` of kind `kind`.
pub(super) fn map(
    op: &'static str,
    kind: ObjectKind,
    target: &str,
    err: &Error,
) -> HypervisorError {
    let message = err.to_string();
    let error = if has_code(err, ErrorNumber::NoDomain) {
        HypervisorError::NotFound {
            kind: ObjectKind::Domain,
            name: target.to_string(),
        }
    } else if has_code(err, ErrorNumber::NoNetwork) {
        HypervisorError::NotFound {
            kind: ObjectKind::Network,
            name: target.to_string(),
        }
    } else if is_disconnect(err) {
        HypervisorError::Disconnected { op, message }
    } else if is_rejection(err) {
        HypervisorError::Rejected {
            op,
            target: target.to_string(),
            message,
        }
    } else {
        HypervisorError::Failed {
            op,
            target: target.to_string(),
            message,
        }
    };
    if !error.is_not_found() {
        tracing::debug!(op, %kind, target, error = %err, "libvirt call failed");
    }
    error
}
