//! Decides what a disk backup asks of libvirt and how its answers read: one push-mode backup
//! of a domain's disk into a new qcow2 file, of only the blocks written since a checkpoint (or
//! of the whole disk), that creates the checkpoint the next one starts from; and the
//! checkpoints a backup chain needs redefined in libvirt's metadata, which a live migration or
//! an undefine loses while the disk keeps their bitmaps (docs/design/backup.md).

use std::path::PathBuf;

use quick_xml::escape::escape;

/// One backup of a running domain's disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupJob {
    /// The disk, by its target device (`vda`).
    pub disk: String,
    /// The qcow2 file the backup is written to; it must not exist.
    pub target: PathBuf,
    /// The checkpoint the backup starts from: only the blocks written since go into it, and
    /// the file's backing file is the disk itself. `None`: the whole disk, flattened.
    pub since: Option<String>,
    /// The checkpoint created with it, for the next backup to start from.
    pub checkpoint: String,
}

/// How the guest was held while a backup job started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hold {
    /// The guest agent froze `filesystems` file systems; they were thawed `millis` after the
    /// freeze, once the job had started (or failed to). `thaw_error`: the thaw failed and the
    /// guest's file systems may still be frozen.
    Frozen {
        filesystems: u32,
        millis: u64,
        thaw_error: Option<String>,
    },
    /// Not frozen: what libvirt said of the guest agent. The start is crash-consistent.
    Unfrozen { why: String },
}

/// A checkpoint of a domain's disk: a bitmap in the disk of the same name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub name: String,
    /// The disk, by its target device.
    pub disk: String,
    /// When it was made, seconds since the epoch (libvirt orders checkpoints by it).
    pub created: i64,
}

/// Where the domain's backup job is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupProgress {
    /// No backup runs, and none finished since libvirt started the domain.
    Idle,
    /// Copying: `processed` of `total` bytes.
    Running { processed: u64, total: u64 },
    /// The last backup finished and wrote `bytes` of the disk into its file.
    Completed { bytes: u64 },
    /// The last backup failed; its file is incomplete.
    Failed { message: String },
}

/// `<domainbackup>` for `job`: push mode, the one disk into a qcow2 file.
pub fn backup_xml(job: &BackupJob) -> String {
    let since = job
        .since
        .as_deref()
        .map(|c| format!("<incremental>{}</incremental>", escape(c)))
        .unwrap_or_default();
    format!(
        "<domainbackup mode='push'>{since}<disks><disk name='{}' backup='yes' type='file'>\
         <driver type='qcow2'/><target file='{}'/></disk></disks></domainbackup>",
        escape(job.disk.as_str()),
        escape(job.target.to_string_lossy().as_ref()),
    )
}

/// `<domaincheckpoint>` naming checkpoint `name` of `disk` (as a backup creates it).
pub fn checkpoint_xml(name: &str, disk: &str) -> String {
    format!(
        "<domaincheckpoint><name>{}</name><disks><disk name='{}' checkpoint='bitmap'/>\
         </disks></domaincheckpoint>",
        escape(name),
        escape(disk)
    )
}

/// `<domaincheckpoint>` that redefines `c` over the bitmap the disk holds.
pub fn redefine_xml(c: &Checkpoint) -> String {
    format!(
        "<domaincheckpoint><name>{}</name><creationTime>{}</creationTime><disks>\
         <disk name='{}' checkpoint='bitmap' bitmap='{}'/></disks></domaincheckpoint>",
        escape(c.name.as_str()),
        c.created,
        escape(c.disk.as_str()),
        escape(c.name.as_str())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_incremental_names_its_checkpoint_and_escapes_the_path() {
        let job = BackupJob {
            disk: "vda".into(),
            target: "/backups/a'b&c.qcow2".into(),
            since: Some("c0".into()),
            checkpoint: "c1".into(),
        };
        let xml = backup_xml(&job);
        assert!(xml.contains("<incremental>c0</incremental>"), "{xml}");
        assert!(
            xml.contains("file='/backups/a&apos;b&amp;c.qcow2'"),
            "{xml}"
        );
        let full = backup_xml(&BackupJob { since: None, ..job });
        assert!(!full.contains("incremental"), "{full}");
    }

    #[test]
    fn a_redefined_checkpoint_names_its_bitmap_and_time() {
        let xml = redefine_xml(&Checkpoint {
            name: "c3".into(),
            disk: "vda".into(),
            created: 1_765_000_000,
        });
        assert!(
            xml.contains("<creationTime>1765000000</creationTime>"),
            "{xml}"
        );
        assert!(xml.contains("bitmap='c3'"), "{xml}");
    }
}
