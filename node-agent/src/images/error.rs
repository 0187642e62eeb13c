//! Why a copy of an image failed: one error per thing that went wrong, each with the closed
//! CamelCase reason the host reports (`HostImage.reason`) and counts in its metrics.

use std::path::Path;

/// The reasons a host's copy is Failed, a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The server could not be reached, answered other than 2xx, or stopped sending.
    FetchFailed,
    /// The bytes fetched do not have the SHA-256 the source names; they were deleted.
    ChecksumMismatch,
    /// The file is not a qcow2 image.
    NotAnImage,
    /// The qcow2 names a backing file or an external data file: every clone would read a file
    /// of the host.
    HasBackingFile,
    /// The image directory's file system is full.
    NoSpace,
    /// Writing the file, or its directory, failed otherwise.
    WriteFailed,
    /// `qemu-img` could not be run, or did not answer in time.
    CheckFailed,
    /// The status names a file other than the image's own (`managed/<uid>/v<version>.qcow2`),
    /// or fields a file name cannot be made of.
    BadFile,
    /// The file in place does not have the version's SHA-256 (kept, for now).
    Damaged,
    /// The file is larger than this host takes (`--image-max-size`).
    TooLarge,
    /// The template's disk could not be captured (flattened, sealed or converted).
    CaptureFailed,
}

/// Every reason's name, for metrics that start at zero.
pub const REASONS: [&str; 11] = [
    "FetchFailed",
    "ChecksumMismatch",
    "NotAnImage",
    "HasBackingFile",
    "NoSpace",
    "WriteFailed",
    "CheckFailed",
    "BadFile",
    "Damaged",
    "TooLarge",
    "CaptureFailed",
];

impl Reason {
    /// The CamelCase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FetchFailed => "FetchFailed",
            Self::ChecksumMismatch => "ChecksumMismatch",
            Self::NotAnImage => "NotAnImage",
            Self::HasBackingFile => "HasBackingFile",
            Self::NoSpace => "NoSpace",
            Self::WriteFailed => "WriteFailed",
            Self::CheckFailed => "CheckFailed",
            Self::BadFile => "BadFile",
            Self::Damaged => "Damaged",
            Self::TooLarge => "TooLarge",
            Self::CaptureFailed => "CaptureFailed",
        }
    }
}

/// Why one copy (a fetch, or a check of a file in place) did not end with a verified file.
/// Messages never carry the URL: it may hold credentials, and the report is read by others.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The URL cannot be fetched at all.
    #[error("the source URL is not usable: {0}")]
    BadUrl(String),
    /// The server answered with a status other than 2xx.
    #[error("the server answered {status}")]
    Status { status: http::StatusCode },
    /// The connection failed, timed out or broke.
    #[error("fetching failed: {0}")]
    Fetch(String),
    /// The bytes fetched have another SHA-256.
    #[error("expected {expected}, the file has {actual}")]
    ChecksumMismatch { expected: String, actual: String },
    /// `qemu-img` does not take the file as qcow2.
    #[error("not a qcow2 image: {0}")]
    NotAnImage(String),
    /// The qcow2 names another file it reads from.
    #[error("the qcow2 names {what} {name:?}; an image must stand alone")]
    HasBackingFile { what: &'static str, name: String },
    /// `qemu-img` could not say.
    #[error("cannot check the file with qemu-img: {0}")]
    Check(String),
    /// A file operation failed.
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: String,
        source: std::io::Error,
    },
    /// The file in place has another SHA-256 than the version's.
    #[error(
        "the file in place does not match the version: expected {expected}, the file has {actual}"
    )]
    Damaged { expected: String, actual: String },
    /// The file is in place already (put there by another attempt): it is never overwritten,
    /// and the next look checks it.
    #[error("{path} exists already and is never overwritten")]
    Exists { path: String },
    /// The server offers, or sent, more bytes than this host takes.
    #[error("the file is larger than the {max} bytes this host takes (--image-max-size): {what}")]
    TooLarge { max: u64, what: String },
    /// Taking the file would leave less free space than the host keeps.
    #[error(
        "{path} has {free} bytes free; the file needs {needed} and the host keeps {reserve} free (--image-reserve)"
    )]
    NoRoom {
        path: String,
        needed: u64,
        free: u64,
        reserve: u64,
    },
    /// The whole fetch took longer than its deadline.
    #[error(
        "the download did not end within {0:?} (--image-fetch-timeout); {1} bytes were fetched"
    )]
    TimedOut(std::time::Duration, u64),
    /// The template's disk could not be captured.
    #[error("capturing the template's disk failed: {0}")]
    Capture(String),
    /// The template's disk is open in another process (a QEMU still shutting down).
    #[error("the template's disk is still in use: {0}")]
    DiskBusy(String),
    /// The task running the copy ended without an answer (it panicked).
    #[error("the copy stopped unexpectedly: {0}")]
    Stopped(String),
}

impl CopyError {
    /// The reason reported for it.
    pub fn reason(&self) -> Reason {
        match self {
            Self::BadUrl(_) | Self::Status { .. } | Self::Fetch(_) | Self::TimedOut(..) => {
                Reason::FetchFailed
            }
            Self::TooLarge { .. } => Reason::TooLarge,
            Self::Capture(_) | Self::DiskBusy(_) => Reason::CaptureFailed,
            Self::NoRoom { .. } => Reason::NoSpace,
            Self::ChecksumMismatch { .. } => Reason::ChecksumMismatch,
            Self::NotAnImage(_) => Reason::NotAnImage,
            Self::HasBackingFile { .. } => Reason::HasBackingFile,
            Self::Check(_) => Reason::CheckFailed,
            Self::Io { source, .. } if no_space(source) => Reason::NoSpace,
            Self::Io { .. } | Self::Exists { .. } | Self::Stopped(_) => Reason::WriteFailed,
            Self::Damaged { .. } => Reason::Damaged,
        }
    }
}

/// Whether `e` says the file system (or the quota) is full.
fn no_space(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// Maps an I/O error of `op` on `path`.
pub(super) fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CopyError {
    let path = path.display().to_string();
    move |source| CopyError::Io { op, path, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_named_once_each() {
        let all = [
            Reason::FetchFailed,
            Reason::ChecksumMismatch,
            Reason::NotAnImage,
            Reason::HasBackingFile,
            Reason::NoSpace,
            Reason::WriteFailed,
            Reason::CheckFailed,
            Reason::BadFile,
            Reason::Damaged,
            Reason::TooLarge,
            Reason::CaptureFailed,
        ];
        let names: Vec<&str> = all.iter().map(|r| r.as_str()).collect();
        assert_eq!(names, REASONS);
    }

    #[test]
    fn a_full_disk_is_no_space() {
        let full = std::io::Error::from(std::io::ErrorKind::StorageFull);
        let e = io("write", Path::new("/x"))(full);
        assert_eq!(e.reason(), Reason::NoSpace);
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert_eq!(
            io("write", Path::new("/x"))(denied).reason(),
            Reason::WriteFailed
        );
    }
}
