//! Sealing end to end against the real e2fsprogs and util-linux: disks made with
//! `mkfs.ext4 -d` and `sfdisk`, sealed, then read back with `debugfs` and checked with
//! `e2fsck -fn`; and the summary of what was done.

use std::os::unix::fs::symlink;
use std::time::Instant;

use super::testkit::*;
use super::{SUMMARY_CHARS, SealError, Sealed, Tools, seal};

#[tokio::test]
async fn a_partitioned_template_is_sealed_and_sealing_again_changes_nothing_more() {
    let dir = Scratch::new("part");
    let tree = dir.0.join("tree");
    template_tree(&tree);
    let fs = dir.0.join("fs.ext4");
    mkfs(&tree, &fs, "8M", &[]);
    let raw = partitioned(&dir.0, &fs);
    assert!(image_holds(&raw, MARKER), "the test disk holds the key");

    let started = Instant::now();
    let sealed = seal(&raw, &tools()).await.unwrap_or_else(|e| panic!("{e}"));
    eprintln!("sealed in {:?}", started.elapsed());
    assert_eq!(sealed.filesystems, 1);
    assert_eq!(sealed.reset, reset_of_template());
    assert_eq!(
        sealed.skipped,
        vec![
            format!("partition 2 at {}: not ext2/3/4", 18432 * 512),
            "/var/lib/dbus/machine-id: symlink, left alone".to_string(),
        ]
    );
    assert_sealed(&raw, MIB);
    let summary = sealed.summary();
    assert!(
        summary.starts_with("sealed 1 ext2/3/4 file system: emptied /etc/machine-id; removed /var/lib/systemd/random-seed, "),
        "{summary}"
    );
    assert!(
        summary.contains(
            "; left alone: partition 2 at 9437184: not ext2/3/4, /var/lib/dbus/machine-id: symlink"
        ),
        "{summary}"
    );
    // The table is untouched.
    let table = sh("sfdisk", &["--dump", &path_str(&raw)], None);
    assert!(
        String::from_utf8_lossy(&table.stdout).contains("start=        2048, size=       16384")
    );

    let again = seal(&raw, &tools()).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(again.reset, vec!["/etc/machine-id".to_string()]);
    assert_sealed(&raw, MIB);
}

#[tokio::test]
async fn a_whole_disk_file_system_is_sealed_the_same_way() {
    let dir = Scratch::new("whole");
    let tree = dir.0.join("tree");
    template_tree(&tree);
    let raw = dir.0.join("disk.raw");
    mkfs(&tree, &raw, "8M", &[]);
    let sealed = seal(&raw, &tools()).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(sealed.filesystems, 1);
    assert_eq!(sealed.reset, reset_of_template());
    assert_sealed(&raw, 0);
}

#[tokio::test]
async fn a_disk_without_ext_is_left_alone() {
    let dir = Scratch::new("zeros");
    let raw = dir.0.join("zeros.raw");
    std::fs::write(&raw, vec![0u8; 4 * MIB as usize]).unwrap_or_else(|e| panic!("{e}"));
    let sealed = seal(&raw, &tools()).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(sealed.filesystems, 0);
    assert!(sealed.reset.is_empty());
    assert_eq!(
        sealed.skipped,
        vec!["whole disk at 0: not ext2/3/4".to_string()]
    );
    assert_eq!(
        sealed.summary(),
        "no ext2/3/4 file system found; left alone: whole disk at 0: not ext2/3/4"
    );
    let bytes = std::fs::read(&raw).unwrap_or_else(|e| panic!("{e}"));
    assert!(bytes.iter().all(|b| *b == 0));
}

#[tokio::test]
async fn hostile_names_and_symlinks_are_left_alone() {
    let dir = Scratch::new("hostile");
    let tree = dir.0.join("tree");
    put(&tree, "etc/ssh/ssh_host_rsa_key", &key());
    put(&tree, "etc/ssh/ssh_host_x\"; touch pwned", b"quoted\n");
    put(&tree, "etc/ssh/ssh_host_new\nline_key", b"broken\n");
    put(&tree, "etc/ssh/sshd_config", b"Port 22\n");
    symlink("sshd_config", tree.join("etc/ssh/ssh_host_link_key"))
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::create_dir_all(tree.join("etc/ssh/ssh_host_dir_key"))
        .unwrap_or_else(|e| panic!("{e}"));
    // A symlinked lease directory is not followed into the user's files.
    put(&tree, "home/student/mine.lease", b"keep me\n");
    std::fs::create_dir_all(tree.join("var/lib")).unwrap_or_else(|e| panic!("{e}"));
    symlink("/home/student", tree.join("var/lib/dhclient")).unwrap_or_else(|e| panic!("{e}"));
    // No machine-id at all: nothing to empty, nothing to report.
    let raw = dir.0.join("disk.raw");
    mkfs(&tree, &raw, "8M", &[]);

    let sealed = seal(&raw, &tools()).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(sealed.filesystems, 1);
    assert_eq!(sealed.reset, vec!["/etc/ssh/ssh_host_rsa_key".to_string()]);
    assert_eq!(
        sealed.skipped,
        vec![
            "/etc/ssh: 2 listing lines of names holding line breaks".to_string(),
            "/etc/ssh/ssh_host_dir_key: directory, left alone".to_string(),
            "/etc/ssh/ssh_host_link_key: symlink, left alone".to_string(),
            "/etc/ssh/ssh_host_x\\\"; touch pwned: a name never put into a debugfs request"
                .to_string(),
            "/var/lib/dhclient: symlink, not followed".to_string(),
        ]
    );
    let (listing, _) = debugfs(&raw, 0, "ls -p /etc/ssh");
    for name in [
        "ssh_host_x\"; touch pwned",
        "ssh_host_new\nline_key",
        "ssh_host_link_key",
        "ssh_host_dir_key",
        "sshd_config",
    ] {
        assert!(
            listing.contains(&format!("/{name}/")),
            "{name} is gone: {listing}"
        );
    }
    assert!(!listing.contains("/ssh_host_rsa_key/"));
    assert_eq!(
        cat(&raw, 0, "/home/student/mine.lease").as_deref(),
        Some(&b"keep me\n"[..])
    );
    assert_eq!(cat(&raw, 0, "/pwned"), None);
    assert_eq!(cat(&raw, 0, "/etc/ssh/pwned"), None);
    assert!(!image_holds(&raw, MARKER));
    assert_clean(&raw, 0);
}

/// `blocks` lists an ext2 file's indirect block with its data: zeroing before the removal
/// would make `rm` lose the blocks the indirect block maps.
#[tokio::test]
async fn an_ext2_file_with_an_indirect_block_is_freed_cleanly() {
    let dir = Scratch::new("ext2");
    let tree = dir.0.join("tree");
    put(
        &tree,
        "var/lib/dhcp/dhclient.leases",
        &format!("{MARKER}\n").repeat(700).into_bytes(),
    );
    let raw = dir.0.join("disk.raw");
    sh(
        "mkfs.ext2",
        &[
            "-q",
            "-F",
            "-b",
            "1024",
            "-d",
            &path_str(&tree),
            &path_str(&raw),
            "4M",
        ],
        None,
    );
    let (blocks, _) = debugfs(&raw, 0, "blocks /var/lib/dhcp/dhclient.leases");
    assert!(blocks.split_whitespace().count() > 20, "{blocks}");
    let sealed = seal(&raw, &tools()).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        sealed.reset,
        vec!["/var/lib/dhcp/dhclient.leases".to_string()]
    );
    assert!(sealed.skipped.is_empty(), "{:?}", sealed.skipped);
    assert!(!image_holds(&raw, MARKER));
    assert_clean(&raw, 0);
}

/// With `inline_data` the machine ID lives in its inode, where punching breaks the file
/// system: it is replaced by a new empty file.
#[tokio::test]
async fn an_inline_machine_id_is_replaced() {
    let dir = Scratch::new("inline");
    let tree = dir.0.join("tree");
    template_tree(&tree);
    let raw = dir.0.join("disk.raw");
    mkfs(&tree, &raw, "8M", &["-O", "inline_data"]);
    let before = debugfs(&raw, 0, "stat /etc/machine-id").0;
    assert!(before.contains("Size of inline data"), "{before}");
    let sealed = seal(&raw, &tools()).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(sealed.reset, reset_of_template());
    let id = stat_words(&raw, 0, "/etc/machine-id");
    assert_eq!(after(&id, "Mode:").as_deref(), Some("0444"), "{id:?}");
    assert_eq!(after(&id, "User:").as_deref(), Some("0"), "{id:?}");
    assert_eq!(after(&id, "Size:").as_deref(), Some("0"), "{id:?}");
    assert_eq!(cat(&raw, 0, "/etc/ssh/ssh_host_ed25519_key"), None);
    assert!(!image_holds(&raw, MARKER));
    assert_clean(&raw, 0);
}

#[tokio::test]
async fn a_journal_needing_recovery_is_refused_before_any_change() {
    let dir = Scratch::new("dirty");
    let tree = dir.0.join("tree");
    template_tree(&tree);
    let raw = dir.0.join("disk.raw");
    mkfs(&tree, &raw, "8M", &[]);
    sh(
        "debugfs",
        &["-w", "-R", "feature needs_recovery", &path_str(&raw)],
        None,
    );
    let before = std::fs::read(&raw).unwrap_or_else(|e| panic!("{e}"));
    let got = seal(&raw, &tools()).await;
    assert!(
        matches!(got, Err(SealError::NeedsRecovery { offset: 0 })),
        "{got:?}"
    );
    assert_eq!(std::fs::read(&raw).ok(), Some(before));
}

#[tokio::test]
async fn missing_tools_and_odd_paths_are_errors_naming_them() {
    let dir = Scratch::new("errors");
    let tree = dir.0.join("tree");
    template_tree(&tree);
    let raw = dir.0.join("disk.raw");
    mkfs(&tree, &raw, "8M", &[]);

    let missing = Tools {
        debugfs: dir.0.join("no-debugfs").display().to_string(),
        ..tools()
    };
    match seal(&raw, &missing).await {
        Err(e @ SealError::Spawn { .. }) => {
            assert!(e.to_string().contains("no-debugfs -R \"stat /etc\""), "{e}")
        }
        other => panic!("{other:?}"),
    }

    match seal(&dir.0, &tools()).await {
        Err(e @ SealError::BadImage { .. }) => {
            assert!(e.to_string().contains("not a regular file"))
        }
        other => panic!("{other:?}"),
    }
    let odd = dir.0.join("a?b.raw");
    std::fs::write(&odd, b"").unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(
        seal(&odd, &tools()).await,
        Err(SealError::BadImage { .. })
    ));
}

#[test]
fn summaries_stay_within_a_status_message() {
    let sealed = Sealed {
        filesystems: 2,
        reset: std::iter::once("partition 2: /etc/machine-id".to_string())
            .chain((0..500).map(|i| format!("partition 2: /etc/ssh/ssh_host_{i}_key")))
            .collect(),
        skipped: (0..300)
            .map(|i| format!("partition {i} at {i}: not ext2/3/4"))
            .collect(),
    };
    let summary = sealed.summary();
    assert!(
        summary.chars().count() <= SUMMARY_CHARS,
        "{}",
        summary.len()
    );
    assert!(summary.starts_with("sealed 2 ext2/3/4 file systems: emptied partition 2: /etc/machine-id; removed partition 2: /etc/ssh/ssh_host_0_key, "), "{summary}");
    assert!(
        summary.contains(" more; left alone: partition 0 at 0: not ext2/3/4, "),
        "{summary}"
    );
    assert!(summary.ends_with(" more"), "{summary}");
    let nothing = Sealed {
        filesystems: 1,
        ..Sealed::default()
    };
    assert_eq!(
        nothing.summary(),
        "sealed 1 ext2/3/4 file system: nothing to reset"
    );
    let long = Sealed {
        filesystems: 1,
        reset: vec![],
        skipped: vec!["x".repeat(5000)],
    };
    assert!(long.summary().chars().count() <= SUMMARY_CHARS);
}
