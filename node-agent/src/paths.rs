//! The agent's own check of every disk path it joins, before it creates, clones or deletes
//! anything: both directories and file names follow `deskvirt_crds::paths` (absolute, no empty,
//! `.` or `..` segment, one clean file name), and a disk never lies in or above the image
//! directory, whatever the Desktop, the pool or a bug upstream said.

use std::path::Path;

use deskvirt_crds::paths::{self, PathError};

/// The directory part of a checked joined path.
fn dir_of(path: &Path) -> Result<&str, PathError> {
    paths::check_joined(path)?;
    path.parent()
        .and_then(Path::to_str)
        .ok_or_else(|| PathError::NotAFileName(path.display().to_string()))
}

/// A disk about to be made from a base image: both clean, the disk's directory apart from the
/// image's.
pub fn check_clone(base: &Path, target: &Path) -> Result<(), PathError> {
    let images = dir_of(base)?;
    let disks = dir_of(target)?;
    paths::check_apart(images, disks)
}

/// A disk about to be deleted: clean, and apart from the (clean) image directory.
pub fn check_removal(target: &Path, image_dir: &Path) -> Result<(), PathError> {
    let disks = dir_of(target)?;
    let images = image_dir
        .to_str()
        .ok_or_else(|| PathError::BadCharacter(image_dir.display().to_string()))?;
    paths::check_apart(images, disks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_apart_paths_pass() {
        let (base, disk) = (
            Path::new("/srv/images/b.qcow2"),
            Path::new("/srv/disks/d.qcow2"),
        );
        assert_eq!(check_clone(base, disk), Ok(()));
        assert_eq!(check_removal(disk, Path::new("/srv/images")), Ok(()));
    }

    #[test]
    fn traversal_and_overlap_are_refused() {
        let disk = Path::new("/srv/disks/d.qcow2");
        for base in [
            "/srv/images/../disks/d.qcow2",
            "/srv/images/.",
            "relative/b.qcow2",
        ] {
            assert!(check_clone(Path::new(base), disk).is_err(), "{base}");
        }
        let base = Path::new("/srv/images/b.qcow2");
        assert!(check_clone(base, Path::new("/srv/images/d.qcow2")).is_err());
        assert!(check_clone(base, Path::new("/srv/images/sub/d.qcow2")).is_err());
        assert!(check_removal(disk, Path::new("/srv")).is_err());
        assert!(
            check_removal(
                Path::new("/srv/disks/../images/b.qcow2"),
                Path::new("/srv/images")
            )
            .is_err()
        );
    }
}
