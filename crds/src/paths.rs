//! The rules every host path deskvirt joins must follow, in one place for both binaries: a pool
//! directory is absolute and clean (no empty, `.` or `..` segment, not `/` itself), two pool
//! directories never lie one inside the other, and a file name inside them is one clean
//! segment. The operator refuses a spec that breaks them; the agent checks again before it
//! creates, clones or deletes anything.

use std::path::{Path, PathBuf};

/// Longest directory path accepted (Linux `PATH_MAX`).
pub const MAX_DIR: usize = 4096;
/// Longest file name accepted (Linux `NAME_MAX`).
pub const MAX_FILE_NAME: usize = 255;

/// Why a path is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("{0:?} is not an absolute path")]
    NotAbsolute(String),
    #[error("{0:?} is the root directory; name a directory below it")]
    Root(String),
    #[error("{0:?} has an empty segment (`//`)")]
    EmptySegment(String),
    #[error("{path:?} has a {segment:?} segment")]
    DotSegment { path: String, segment: String },
    #[error("{0:?} holds a character other than letters, digits, `.`, `_` and `-`")]
    BadCharacter(String),
    #[error("{path:?} is longer than {max} bytes")]
    TooLong { path: String, max: usize },
    #[error("{0:?} is not one file name (it is empty, has a slash or starts with a dot)")]
    NotAFileName(String),
    #[error("{inner:?} lies inside {outer:?}")]
    Overlap { inner: String, outer: String },
}

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// The segments of a clean absolute directory (one trailing slash allowed), or why it is not.
pub fn dir_segments(path: &str) -> Result<Vec<&str>, PathError> {
    if path.len() > MAX_DIR {
        return Err(PathError::TooLong {
            path: path.to_string(),
            max: MAX_DIR,
        });
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(PathError::NotAbsolute(path.to_string()));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() {
        return Err(PathError::Root(path.to_string()));
    }
    let mut out = Vec::new();
    for segment in rest.split('/') {
        match segment {
            "" => return Err(PathError::EmptySegment(path.to_string())),
            "." | ".." => {
                return Err(PathError::DotSegment {
                    path: path.to_string(),
                    segment: segment.to_string(),
                });
            }
            s if !s.chars().all(allowed) => {
                return Err(PathError::BadCharacter(path.to_string()));
            }
            s => out.push(s),
        }
    }
    Ok(out)
}

/// Checks a pool directory.
pub fn check_dir(path: &str) -> Result<(), PathError> {
    dir_segments(path).map(|_| ())
}

/// Checks a file name inside a pool directory: the CRD's `FILE_NAME` pattern, so no slash, no
/// leading dot (hence never `.` or `..`).
pub fn check_file_name(name: &str) -> Result<(), PathError> {
    let mut chars = name.chars();
    let first = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    if !first || !chars.all(allowed) {
        return Err(PathError::NotAFileName(name.to_string()));
    }
    if name.len() > MAX_FILE_NAME {
        return Err(PathError::TooLong {
            path: name.to_string(),
            max: MAX_FILE_NAME,
        });
    }
    Ok(())
}

/// Refuses two clean directories of which one is the other or lies inside it.
pub fn check_apart(a: &str, b: &str) -> Result<(), PathError> {
    let (sa, sb) = (dir_segments(a)?, dir_segments(b)?);
    let overlap = |inner: &str, outer: &str| PathError::Overlap {
        inner: inner.to_string(),
        outer: outer.to_string(),
    };
    if sb.starts_with(&sa) {
        Err(overlap(b, a))
    } else if sa.starts_with(&sb) {
        Err(overlap(a, b))
    } else {
        Ok(())
    }
}

/// `dir/name` once both are checked.
pub fn join(dir: &str, name: &str) -> Result<PathBuf, PathError> {
    check_dir(dir)?;
    check_file_name(name)?;
    Ok(Path::new(dir).join(name))
}

/// Checks a joined path, as text: everything before the last slash is a clean directory and
/// everything after it one file name.
pub fn check_joined(path: &Path) -> Result<(), PathError> {
    let shown = || path.display().to_string();
    let text = path
        .to_str()
        .ok_or_else(|| PathError::BadCharacter(shown()))?;
    let (dir, name) = text
        .rsplit_once('/')
        .ok_or_else(|| PathError::NotAbsolute(shown()))?;
    if dir.is_empty() {
        return Err(PathError::Root(shown()));
    }
    check_dir(dir)?;
    check_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_directories_pass() {
        for ok in [
            "/var/lib/deskvirt/disks",
            "/a/",
            "/.hidden/x",
            "/a/..b/c...",
            "/a-b_c.d",
        ] {
            assert_eq!(check_dir(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn unclean_directories_are_refused() {
        for bad in [
            "", "var/lib", "/", "//", "/a//b", "/a/./b", "/a/..", "/a/../b", "/a b", "/a/ü",
        ] {
            assert!(check_dir(bad).is_err(), "{bad}");
        }
        assert!(check_dir(&format!("/{}", "a".repeat(MAX_DIR))).is_err());
    }

    #[test]
    fn file_names_are_one_clean_segment() {
        for ok in ["debian.qcow2", "_x", "ns--a--1234.qcow2"] {
            assert_eq!(check_file_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", ".", "..", ".x", "a/b", "../a", "a b", "-x"] {
            assert!(check_file_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn directories_inside_each_other_overlap() {
        assert!(check_apart("/srv/images", "/srv/images/disks").is_err());
        assert!(check_apart("/srv/images/", "/srv/images").is_err());
        assert!(check_apart("/srv/disks/x", "/srv/disks").is_err());
        assert_eq!(check_apart("/srv/images", "/srv/images2"), Ok(()));
        assert_eq!(check_apart("/srv/a/images", "/srv/b/images"), Ok(()));
    }

    #[test]
    fn joined_paths_are_checked_both_ways() {
        assert_eq!(
            join("/srv/disks/", "a.qcow2"),
            Ok(PathBuf::from("/srv/disks/a.qcow2"))
        );
        assert!(join("/srv/disks", "../images/base.qcow2").is_err());
        assert_eq!(check_joined(Path::new("/srv/disks/a.qcow2")), Ok(()));
        for bad in [
            "/srv/disks/..",
            "/srv/../a.qcow2",
            "a.qcow2",
            "/a.qcow2",
            "/srv/x/.",
        ] {
            assert!(check_joined(Path::new(bad)).is_err(), "{bad}");
        }
    }
}
