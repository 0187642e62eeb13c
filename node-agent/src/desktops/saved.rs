//! Decides whether a domain's saved memory (its libvirt managed save image) may be restored,
//! must be discarded, or cannot be judged. Discarding loses what was only in memory, so it
//! needs positive evidence: the disk directory is visible and the disk is not in it, or the
//! image's modification time was read and is older than the desktop's last move to this host.
//! Anything that cannot be read keeps the image and is reported instead. The checks read the
//! file system; the decision ([`judge`]) is pure.

use std::path::Path;
use std::time::SystemTime;

use deskvirt_crds::conditions::Status;
use deskvirt_crds::desktop::Move;

use super::reason::Reason;
use super::status::Cond;

/// What the agent sees of the desktop's disk.
#[derive(Debug)]
pub enum DiskSeen {
    /// The disk is there.
    Present,
    /// Its directory is there and the disk is not.
    Gone,
    /// Its directory is not there: not mounted into the agent, or not made yet.
    DirMissing,
    /// The file system would not say.
    Unreadable(std::io::Error),
}

/// When the saved memory image was written, as far as the agent can tell.
#[derive(Debug)]
pub enum Written {
    /// Not asked: the desktop has not moved.
    NotNeeded,
    /// The image's modification time.
    At(SystemTime),
    /// The image could not be read.
    Unreadable(std::io::Error),
}

/// What to do with the saved memory.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Keep it; the next start restores it.
    Keep,
    /// Delete it, for the reason given; the desktop boots from its disk. `moved` when it is
    /// stale because the desktop ran elsewhere since.
    Discard { why: String, moved: bool },
    /// Keep it and do nothing else until the condition is resolved.
    Blocked(Cond),
}

/// Looks at the desktop's disk.
pub async fn see_disk(disk: &Path) -> DiskSeen {
    match tokio::fs::try_exists(disk).await {
        Ok(true) => DiskSeen::Present,
        Ok(false) => match disk.parent().map(tokio::fs::try_exists) {
            Some(f) => match f.await {
                Ok(true) => DiskSeen::Gone,
                Ok(false) => DiskSeen::DirMissing,
                Err(e) => DiskSeen::Unreadable(e),
            },
            None => DiskSeen::DirMissing,
        },
        Err(e) => DiskSeen::Unreadable(e),
    }
}

/// Reads when `image` was written, when the desktop has moved.
pub async fn written(image: &Path, last_move: Option<&Move>) -> Written {
    if last_move.is_none() {
        return Written::NotNeeded;
    }
    match tokio::fs::metadata(image).await.and_then(|m| m.modified()) {
        Ok(t) => Written::At(t),
        Err(e) => Written::Unreadable(e),
    }
}

/// The verdict on saved memory of the desktop whose disk is `disk` (seen as `seen`), saved in
/// `image` (written as `written`), last moved as `last_move`.
pub fn judge(
    disk: &Path,
    seen: &DiskSeen,
    image: &Path,
    written: &Written,
    last_move: Option<&Move>,
) -> Verdict {
    let dir = disk.parent().unwrap_or(disk).display();
    match seen {
        DiskSeen::Present => {}
        DiskSeen::Gone => {
            return Verdict::Discard {
                why: format!("its disk {} is gone", disk.display()),
                moved: false,
            };
        }
        DiskSeen::DirMissing => {
            return Verdict::Blocked(Cond::new(
                Status::False,
                Reason::DiskDirMissing,
                format!(
                    "the disk directory {dir} is not visible to the node-agent (the chart mounts \
                     nodeAgent.diskDir, which must be the pool's storage.diskDir); the memory \
                     saved for this desktop is kept, and the desktop is not started until the \
                     directory is visible"
                ),
            ));
        }
        DiskSeen::Unreadable(e) => {
            return Verdict::Blocked(Cond::new(
                Status::Unknown,
                Reason::DiskIoFailed,
                format!(
                    "cannot look at the disk {}: {e}; the saved memory is kept",
                    disk.display()
                ),
            ));
        }
    }
    let Some(m) = last_move else {
        return Verdict::Keep;
    };
    let at = m.at.0;
    match written {
        Written::NotNeeded => Verdict::Keep,
        Written::At(t) => {
            let secs = t
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let secs = i64::try_from(secs).unwrap_or(i64::MAX);
            if secs < at.as_second() {
                Verdict::Discard {
                    why: format!(
                        "the desktop ran on host {} after it was saved here (it moved at {at})",
                        m.from
                    ),
                    moved: true,
                }
            } else {
                // Saved here after the move: it ran here since, and this is its memory.
                Verdict::Keep
            }
        }
        Written::Unreadable(e) => Verdict::Blocked(Cond::new(
            Status::False,
            Reason::SavedMemoryUnreadable,
            format!(
                "cannot read the saved memory image {}: {e}; the desktop moved at {at}, and \
                 without the image's date the agent cannot tell whether the memory predates the \
                 move. It is kept and the desktop is not started: make the managed save \
                 directory visible to the node-agent (chart value nodeAgent.managedSaveDir)",
                image.display()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;
    use std::time::Duration;

    fn moved_at(secs: i64) -> Move {
        Move {
            from: "h0".into(),
            to: "h1".into(),
            at: Time(Timestamp::from_second(secs).unwrap_or(Timestamp::UNIX_EPOCH)),
        }
    }

    fn at(secs: u64) -> Written {
        Written::At(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
    }

    const DISK: &str = "/d/x.qcow2";
    const IMAGE: &str = "/s/x.save";

    fn verdict(seen: &DiskSeen, written: &Written, m: Option<&Move>) -> Verdict {
        judge(Path::new(DISK), seen, Path::new(IMAGE), written, m)
    }

    #[test]
    fn kept_when_the_desktop_never_moved() {
        assert_eq!(
            verdict(&DiskSeen::Present, &Written::NotNeeded, None),
            Verdict::Keep
        );
    }

    #[test]
    fn saved_before_the_move_is_stale_saved_after_is_kept() {
        let m = moved_at(1000);
        assert!(matches!(
            verdict(&DiskSeen::Present, &at(999), Some(&m)),
            Verdict::Discard { moved: true, .. }
        ));
        assert_eq!(
            verdict(&DiskSeen::Present, &at(1000), Some(&m)),
            Verdict::Keep
        );
        assert_eq!(
            verdict(&DiskSeen::Present, &at(5000), Some(&m)),
            Verdict::Keep,
            "suspended here after it ran here: restored"
        );
    }

    #[test]
    fn an_unreadable_image_is_never_stale() {
        let m = moved_at(1000);
        let unreadable = Written::Unreadable(std::io::Error::from(std::io::ErrorKind::NotFound));
        let Verdict::Blocked(c) = verdict(&DiskSeen::Present, &unreadable, Some(&m)) else {
            panic!("an unreadable image was judged")
        };
        assert_eq!(c.reason, Reason::SavedMemoryUnreadable);
        assert_eq!(c.status, Status::False);
        assert!(c.message.contains(IMAGE), "{}", c.message);
    }

    #[test]
    fn a_missing_disk_needs_its_directory_seen() {
        assert!(matches!(
            verdict(&DiskSeen::Gone, &Written::NotNeeded, None),
            Verdict::Discard { moved: false, .. }
        ));
        let Verdict::Blocked(c) = verdict(&DiskSeen::DirMissing, &Written::NotNeeded, None) else {
            panic!("a missing directory discarded memory")
        };
        assert_eq!(c.reason, Reason::DiskDirMissing);
        assert!(c.message.contains("/d"), "{}", c.message);
        let err = DiskSeen::Unreadable(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert!(matches!(
            verdict(&err, &Written::NotNeeded, None),
            Verdict::Blocked(_)
        ));
    }
}
