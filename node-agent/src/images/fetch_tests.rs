//! One copy against a local HTTP server and the real `qemu-img`: what lands on disk, what is
//! refused, and that nothing is left behind or overwritten.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use super::error::{CopyError, Reason};
use super::fetch::{InPlace, Progress, fetch, in_place, verify};
use super::sidecar;
use super::testkit::{Reply, Scratch, Server, client, qcow2, settings, sha256, spec};

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0)
}

#[tokio::test]
async fn a_good_sum_makes_a_read_only_verified_file_with_its_record() {
    let dir = Scratch::new("good");
    let image = qcow2(&dir.0, "src.qcow2", &[]);
    let server = Server::start().await;
    let url = server.route("/debian.qcow2", Reply::Bytes(image.clone()));
    let want = spec(&dir.0, &url, &sha256(&image));
    let progress = Progress::default();
    let got = fetch(&client(), &want, &settings(), &progress).await;
    let verified = got.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(verified.sha256, sha256(&image));
    assert_eq!(verified.bytes, image.len() as u64);
    assert_eq!(verified.virtual_bytes, 1 << 20);
    let target = want.final_path();
    assert!(target.ends_with(format!("managed/{}/v1.qcow2", want.uid)));
    assert_eq!(std::fs::read(&target).ok(), Some(image.clone()));
    assert_eq!(mode(&target), 0o444);
    assert_eq!(mode(&want.dir()), 0o755);
    assert!(!want.partial_path().exists());
    let record = sidecar::read(&want.sidecar_path()).await;
    assert_eq!(
        record.map(|r| (r.uid, r.version, r.sha256, r.bytes, r.virtual_bytes)),
        Some((
            want.uid.clone(),
            1,
            sha256(&image),
            image.len() as u64,
            1 << 20
        ))
    );
    assert_eq!(progress.done(), image.len() as u64);
    // Taken on its record from now on.
    assert_eq!(
        in_place(&want).await.ok(),
        Some(InPlace::Verified(verified))
    );
}

#[tokio::test]
async fn a_bad_sum_names_both_sums_and_leaves_nothing() {
    let dir = Scratch::new("badsum");
    let image = qcow2(&dir.0, "src.qcow2", &[]);
    let server = Server::start().await;
    let url = server.route("/x.qcow2", Reply::Bytes(image.clone()));
    let wrong = "0".repeat(64);
    let want = spec(&dir.0, &url, &wrong);
    let got = fetch(&client(), &want, &settings(), &Progress::default()).await;
    let e = got
        .err()
        .unwrap_or_else(|| panic!("a bad sum was accepted"));
    assert_eq!(e.reason(), Reason::ChecksumMismatch);
    assert_eq!(
        e.to_string(),
        format!("expected {wrong}, the file has {}", sha256(&image))
    );
    assert!(!want.final_path().exists());
    assert!(!want.partial_path().exists());
    assert!(!want.sidecar_path().exists());
}

#[tokio::test]
async fn a_qcow2_with_a_backing_file_is_refused_and_removed() {
    let dir = Scratch::new("backing");
    let image = qcow2(
        &dir.0,
        "over.qcow2",
        &["-u", "-b", "/etc/passwd", "-F", "raw"],
    );
    let server = Server::start().await;
    let url = server.route("/over.qcow2", Reply::Bytes(image.clone()));
    let want = spec(&dir.0, &url, &sha256(&image));
    let got = fetch(&client(), &want, &settings(), &Progress::default()).await;
    let e = got
        .err()
        .unwrap_or_else(|| panic!("a backing file was accepted"));
    assert_eq!(e.reason(), Reason::HasBackingFile, "{e}");
    assert!(e.to_string().contains("/etc/passwd"), "{e}");
    assert!(!want.final_path().exists());
    assert!(!want.partial_path().exists());
}

#[tokio::test]
async fn a_raw_file_is_not_an_image() {
    let dir = Scratch::new("raw");
    let raw = vec![7u8; 70_000];
    let server = Server::start().await;
    let url = server.route("/raw.img", Reply::Bytes(raw.clone()));
    let want = spec(&dir.0, &url, &sha256(&raw));
    let got = fetch(&client(), &want, &settings(), &Progress::default()).await;
    let e = got
        .err()
        .unwrap_or_else(|| panic!("a raw file was accepted"));
    assert_eq!(e.reason(), Reason::NotAnImage, "{e}");
    assert!(!want.final_path().exists());
    assert!(!want.partial_path().exists());
}

#[tokio::test]
async fn an_existing_file_is_never_overwritten() {
    let dir = Scratch::new("exists");
    let image = qcow2(&dir.0, "src.qcow2", &[]);
    let server = Server::start().await;
    let url = server.route("/x.qcow2", Reply::Bytes(image.clone()));
    let want = spec(&dir.0, &url, &sha256(&image));
    std::fs::create_dir_all(want.dir()).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(want.final_path(), b"mine").unwrap_or_else(|e| panic!("{e}"));
    let got = fetch(&client(), &want, &settings(), &Progress::default()).await;
    assert!(matches!(got, Err(CopyError::Exists { .. })), "{got:?}");
    assert_eq!(
        std::fs::read(want.final_path()).ok().as_deref(),
        Some(&b"mine"[..])
    );
    // Put there while the bytes were on their way: the link refuses, nothing is recorded.
    let target = want.final_path();
    let _ = std::fs::remove_file(&target);
    let late = target.clone();
    let hook = Arc::new(move || {
        let _ = std::fs::write(&late, b"theirs");
    });
    let url = server.route("/late.qcow2", Reply::After(hook, image.clone()));
    let want = spec(&dir.0, &url, &sha256(&image));
    let got = fetch(&client(), &want, &settings(), &Progress::default()).await;
    assert!(matches!(got, Err(CopyError::Exists { .. })), "{got:?}");
    assert_eq!(std::fs::read(&target).ok().as_deref(), Some(&b"theirs"[..]));
    assert!(!want.partial_path().exists());
    assert!(!want.sidecar_path().exists());
    assert_eq!(in_place(&want).await.ok(), Some(InPlace::Unverified));
}

#[tokio::test]
async fn not_found_and_stalls_fail_the_fetch_and_redirects_are_followed() {
    let dir = Scratch::new("http");
    let server = Server::start().await;
    let want = spec(
        &dir.0,
        &format!("{}/none.qcow2", server.base),
        &"0".repeat(64),
    );
    let got = fetch(&client(), &want, &settings(), &Progress::default()).await;
    let e = got.err().unwrap_or_else(|| panic!("a 404 was accepted"));
    assert_eq!(e.reason(), Reason::FetchFailed);
    assert!(e.to_string().contains("404"), "{e}");
    assert!(!want.partial_path().exists());
    let url = server.route("/busy.qcow2", Reply::Status(503));
    let want = spec(&dir.0, &url, &"0".repeat(64));
    let got = fetch(&client(), &want, &settings(), &Progress::default()).await;
    let e = got.err().unwrap_or_else(|| panic!("a 503 was accepted"));
    assert_eq!(e.to_string(), "the server answered 503 Service Unavailable");

    let url = server.route("/stall.qcow2", Reply::Stall(vec![1; 1000], 100_000));
    let want = spec(&dir.0, &url, &"0".repeat(64));
    let progress = Progress::default();
    let got = fetch(&client(), &want, &settings(), &progress).await;
    let e = got
        .err()
        .unwrap_or_else(|| panic!("a stalled fetch ended well"));
    assert_eq!(e.reason(), Reason::FetchFailed);
    assert!(e.to_string().contains("no data"), "{e}");
    assert_eq!(progress.percent(), 1);
    assert!(!want.partial_path().exists());

    let image = qcow2(&dir.0, "src.qcow2", &[]);
    server.route("/real.qcow2", Reply::Bytes(image.clone()));
    let url = server.route("/moved", Reply::Redirect("/real.qcow2".into()));
    let want = spec(&dir.0, &url, &sha256(&image));
    let got = fetch(&client(), &want, &settings(), &Progress::default()).await;
    assert!(got.is_ok(), "{got:?}");
}

#[tokio::test]
async fn a_file_in_place_without_a_record_is_read_again() {
    let dir = Scratch::new("inplace");
    let image = qcow2(&dir.0, "src.qcow2", &[]);
    let want = spec(&dir.0, "http://127.0.0.1:1/unused", &sha256(&image));
    assert_eq!(in_place(&want).await.ok(), Some(InPlace::Missing));
    std::fs::create_dir_all(want.dir()).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(want.final_path(), &image).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(in_place(&want).await.ok(), Some(InPlace::Unverified));
    let got = verify(&want, &settings(), Arc::new(Progress::default())).await;
    let verified = got.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        in_place(&want).await.ok(),
        Some(InPlace::Verified(verified))
    );
    // A record of another sum, or of another size, is no record.
    let mut other = want.clone();
    other.sha256 = "1".repeat(64);
    assert_eq!(in_place(&other).await.ok(), Some(InPlace::Unverified));
    // A damaged file is reported and kept.
    let damaged = want.final_path();
    let _ = std::fs::remove_file(want.sidecar_path());
    std::fs::write(&damaged, b"rotten").unwrap_or_else(|e| panic!("{e}"));
    let got = verify(&want, &settings(), Arc::new(Progress::default())).await;
    let e = got
        .err()
        .unwrap_or_else(|| panic!("a damaged file was verified"));
    assert_eq!(e.reason(), Reason::Damaged);
    assert!(e.to_string().contains(&sha256(b"rotten")), "{e}");
    assert!(damaged.exists());
    assert!(!want.sidecar_path().exists());
}

#[tokio::test]
async fn a_write_into_a_verified_file_is_found_and_repaired_from_the_source() {
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;
    let dir = Scratch::new("repair");
    let image = qcow2(&dir.0, "src.qcow2", &[]);
    let server = Server::start().await;
    let url = server.route("/lab.qcow2", Reply::Bytes(image.clone()));
    let want = spec(&dir.0, &url, &sha256(&image));
    let fetched = fetch(&client(), &want, &settings(), &Progress::default()).await;
    assert!(fetched.is_ok(), "{fetched:?}");
    let target = want.final_path();
    let inode = std::fs::metadata(&target).map(|m| m.ino()).unwrap_or(0);
    // 4 KiB of other bytes in the middle: the size stays, the time changes.
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .unwrap_or_else(|e| panic!("{e}"));
        f.seek(SeekFrom::Start(512))
            .unwrap_or_else(|e| panic!("{e}"));
        f.write_all(&[0xa5; 4096]).unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(in_place(&want).await.ok(), Some(InPlace::Unverified));
    let read = verify(&want, &settings(), Arc::new(Progress::default())).await;
    assert!(
        matches!(read, Err(CopyError::Damaged { .. })),
        "a damaged file passed: {read:?}"
    );
    let repaired = super::fetch::repair(&client(), &want, &settings(), &Progress::default()).await;
    assert!(repaired.is_ok(), "{repaired:?}");
    assert_eq!(std::fs::read(&target).ok(), Some(image));
    assert_ne!(
        std::fs::metadata(&target).map(|m| m.ino()).unwrap_or(0),
        inode,
        "a new file, not the damaged one rewritten (a running domain keeps its open file)"
    );
    assert_eq!(mode(&target), 0o444);
    assert!(matches!(in_place(&want).await, Ok(InPlace::Verified(_))));
    assert!(!want.partial_path().exists());
}

/// Fetches `reply` under `settings`; the error, after checking that nothing was left.
async fn refused(tag: &str, reply: Reply, settings: super::fetch::Settings) -> CopyError {
    let dir = Scratch::new(tag);
    let server = Server::start().await;
    let url = server.route("/big.qcow2", reply);
    let want = spec(&dir.0, &url, &"0".repeat(64));
    let got = fetch(&client(), &want, &settings, &Progress::default()).await;
    assert!(!want.final_path().exists());
    assert!(!want.partial_path().exists());
    assert!(!want.sidecar_path().exists());
    got.err()
        .unwrap_or_else(|| panic!("{tag}: the fetch was accepted"))
}

#[tokio::test]
async fn a_file_over_the_size_limit_is_refused_by_its_length_or_as_it_grows() {
    let small = super::fetch::Settings {
        max_bytes: 1000,
        ..settings()
    };
    let bytes = vec![7u8; 4096];
    let told = refused("told", Reply::Bytes(bytes.clone()), small.clone()).await;
    assert_eq!(told.reason(), Reason::TooLarge);
    assert!(
        told.to_string().contains("the server offers 4096"),
        "{told}"
    );
    let grown = refused("grown", Reply::Unsized(bytes), small).await;
    assert_eq!(grown.reason(), Reason::TooLarge);
    assert!(grown.to_string().contains("bytes were sent"), "{grown}");
}

#[tokio::test]
async fn a_file_that_would_eat_into_the_reserve_is_not_fetched() {
    let keep_all = super::fetch::Settings {
        reserve_bytes: u64::MAX / 2,
        ..settings()
    };
    let e = refused("room", Reply::Bytes(vec![7u8; 4096]), keep_all.clone()).await;
    assert_eq!(e.reason(), Reason::NoSpace);
    assert!(e.to_string().contains("the file needs 4096"), "{e}");
    // Of unknown length: looked at before the first byte (and every 256 MiB after it).
    let e = refused("room-unsized", Reply::Unsized(vec![7u8; 4096]), keep_all).await;
    assert_eq!(e.reason(), Reason::NoSpace);
}

#[tokio::test]
async fn a_server_that_keeps_dripping_is_given_up_at_the_fetch_deadline() {
    let short = super::fetch::Settings {
        fetch_timeout: std::time::Duration::from_millis(800),
        ..settings()
    };
    let e = refused("drip", Reply::Drip, short).await;
    assert_eq!(e.reason(), Reason::FetchFailed);
    assert!(e.to_string().contains("--image-fetch-timeout"), "{e}");
}
