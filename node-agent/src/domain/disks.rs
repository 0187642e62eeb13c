//! Decides the desktop's system disk (a qcow2 file on virtio) and reads back which files the
//! domains on a host use, so that a disk in use is never deleted.

use std::collections::BTreeSet;

use super::read::{attribute, walk};
use super::xml::{Disk, DiskDriver, DiskSource, DiskTarget};

/// `<disk>` for the qcow2 image at `path`.
pub fn disk(path: &str) -> Disk {
    Disk {
        kind: "file",
        device: "disk",
        driver: DiskDriver {
            name: "qemu",
            format: "qcow2",
            discard: "unmap",
        },
        source: DiskSource {
            file: path.to_string(),
        },
        target: DiskTarget {
            dev: "vda",
            bus: "virtio",
        },
    }
}

/// Every file a domain XML references as a disk or a disk's backing store.
pub fn parse_disk_paths(xml: &str) -> Result<BTreeSet<String>, quick_xml::Error> {
    let mut paths = BTreeSet::new();
    walk(xml, |path, attrs| {
        let in_disk = path.len() >= 4 && path[1] == "devices" && path[2] == "disk";
        if in_disk
            && path.last().is_some_and(|l| l == "source")
            && let Some(file) = attribute(attrs, "file")
        {
            paths.insert(file.to_string());
        }
    })?;
    Ok(paths)
}

/// The files a domain XML attaches as disks, without their backing stores: what a guest's
/// memory refers to, compared before a saved memory image is restored with a new definition.
pub fn parse_disk_sources(xml: &str) -> Result<BTreeSet<String>, quick_xml::Error> {
    let mut paths = BTreeSet::new();
    walk(xml, |path, attrs| {
        if path.len() == 4
            && path[1] == "devices"
            && path[2] == "disk"
            && path[3] == "source"
            && let Some(file) = attribute(attrs, "file")
        {
            paths.insert(file.to_string());
        }
    })?;
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sources_and_backing_stores() {
        let xml = r#"<domain><devices>
  <disk type='file' device='disk'><source file='/d/a.qcow2' index='1'/>
    <backingStore type='file'><source file='/i/base.qcow2'/></backingStore></disk>
  <disk type='file' device='cdrom'><source file='/i/x.iso'/></disk>
  <interface type='network'><source network='n'/></interface>
</devices></domain>"#;
        let paths = parse_disk_paths(xml).unwrap_or_default();
        let expected: BTreeSet<String> = ["/d/a.qcow2", "/i/base.qcow2", "/i/x.iso"]
            .map(String::from)
            .into();
        assert_eq!(paths, expected);
        let sources = parse_disk_sources(xml).unwrap_or_default();
        let expected: BTreeSet<String> = ["/d/a.qcow2", "/i/x.iso"].map(String::from).into();
        assert_eq!(sources, expected);
    }
}
