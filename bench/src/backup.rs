//! Backups, side by side: a running desktop's 2 GiB disk holds 1 GiB its guest wrote (the
//! user's files); after the guest changes a small or a large part of it, deskvirt's incremental `DesktopBackup` (API create → `Succeeded`,
//! verified: `qemu-img check` and SHA-256 included) and its `type: Full` one, against a full
//! copy of the same live disk with `qemu-img convert -U -O qcow2` (what an admin without
//! deskvirt would run), interleaved so all share the noise. Also the guest's I/O pause: the
//! backup job's start (the checkpoint transaction), which the host reports per backup.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use deskvirt_crds::desktop::Phase;
use deskvirt_tests::cluster::unique_suffix;
use deskvirt_tests::host::{eventually, run};
use deskvirt_tests::world::{
    boot_writing, create_pool, disk_of, domain_of, guest_command, guest_desktop, guest_writes,
    patch_pool, setup, take_backup, virsh_system,
};
use kube::api::PostParams;
use serde_json::json;

use crate::migrate::booted;
use crate::stats::{Samples, secs};

/// One kind of change, and what each way of backing it up took.
pub struct Row {
    pub label: String,
    pub changed_mib: u64,
    pub incremental: Samples,
    pub full: Samples,
    pub convert: Samples,
    /// Bytes of the incremental's file and of the disk it copied, per round.
    pub incremental_file: Vec<u64>,
    pub incremental_data: Vec<u64>,
    pub full_file: Vec<u64>,
    pub convert_file: Vec<u64>,
    /// Milliseconds each deskvirt backup's job took to start (the guest agent's freeze, the
    /// checkpoint transaction and the thaw).
    pub start_ms: Vec<u64>,
    /// Milliseconds the guest's file systems stayed frozen, for each quiesced backup.
    pub frozen_ms: Vec<u64>,
}

/// MiB the guest writes at boot: the user's data a full copy copies each time.
const USER_DATA_MIB: u64 = 1024;

/// The changes of each round: name, MiB, and where (MiB into the disk).
const CHANGES: [(&str, u64, u64); 2] = [("small", 1, 1100), ("large", 256, 1200)];

/// Runs `n` interleaved rounds of a small (1 MiB) and a large (256 MiB) change.
pub async fn run_bench(n: usize) -> anyhow::Result<Vec<Row>> {
    let suffix = unique_suffix();
    let mut w = setup(&format!("bakb-{suffix}")).await?;
    let dir = std::env::temp_dir().join(format!("deskvirt-bench-backups-{suffix}"));
    create_pool(&w).await?;
    patch_pool(&w, json!({ "backup": { "dir": dir } })).await?;
    w.start_agent()?;
    w.start_operator()?;
    let desktops = w.desktops();
    desktops
        .create(
            &PostParams::default(),
            &guest_desktop(&w, "bench", "128Mi", {
                let mut extra = boot_writing(USER_DATA_MIB, "175");
                extra["disk"] = json!({ "image": "base.qcow2", "size": "2Gi" });
                extra
            })?,
        )
        .await?;
    eventually(Duration::from_secs(240), "desktop Running", || async {
        Ok((w.phase("bench").await? == Some(Phase::Running)).then_some(()))
    })
    .await?;
    let domain = domain_of(&desktops, &w.user_ns.name, "bench").await?;
    let serial = format!("/var/log/libvirt/qemu/{domain}-serial.log");
    booted(&serial).await?;
    eventually(
        Duration::from_secs(900),
        "the guest's first write",
        || async { Ok((!guest_writes(&PathBuf::from(&serial))?.is_empty()).then_some(())) },
    )
    .await?;
    let live = disk_of(&virsh_system(&["domblklist", &domain])?)?;
    // The chain's first backup, so that each round's incremental holds only its change.
    take_backup(&w, "base", "bench", None).await?;
    let mut rows: Vec<Row> = CHANGES
        .iter()
        .map(|(label, mib, _)| Row {
            label: (*label).to_string(),
            changed_mib: *mib,
            incremental: Samples::new(vec![]),
            full: Samples::new(vec![]),
            convert: Samples::new(vec![]),
            incremental_file: vec![],
            incremental_data: vec![],
            full_file: vec![],
            convert_file: vec![],
            start_ms: vec![],
            frozen_ms: vec![],
        })
        .collect();
    let (mut inc, mut full, mut conv) = (vec![vec![]; 2], vec![vec![]; 2], vec![vec![]; 2]);
    let mut writes = guest_writes(&PathBuf::from(&serial))?.len();
    for i in 0..n {
        for (k, (_, mib, seek)) in CHANGES.into_iter().enumerate() {
            // The guest changes `mib` MiB (a new byte each round, in octal for the guest).
            let byte = 1 + (i * 2 + k) % 250;
            guest_command(&domain, &format!("deskvirt-write {mib} {seek} {byte:03o}")).await?;
            writes += 1;
            eventually(Duration::from_secs(60), "the guest's write", || async {
                Ok((guest_writes(&PathBuf::from(&serial))?.len() >= writes).then_some(()))
            })
            .await?;
            let row = &mut rows[k];
            let (b, took) = take_backup(&w, &format!("inc-{i}-{k}"), "bench", None).await?;
            let st = b.status.unwrap_or_default();
            inc[k].push(took);
            row.incremental_file.push(st.size_bytes.unwrap_or(0));
            row.incremental_data.push(st.data_bytes.unwrap_or(0));
            row.start_ms.extend(st.start_millis);
            row.frozen_ms
                .extend(st.quiesce.as_ref().and_then(|q| q.frozen_millis));
            let out = dir.join(format!("convert-{i}-{k}.qcow2"));
            let t = Instant::now();
            run(
                "qemu-img convert",
                Command::new("qemu-img")
                    .args(["convert", "-U", "-O", "qcow2"])
                    .arg(&live)
                    .arg(&out),
            )?;
            conv[k].push(t.elapsed());
            row.convert_file.push(std::fs::metadata(&out)?.len());
            let _ = std::fs::remove_file(&out);
            let (b, took) =
                take_backup(&w, &format!("full-{i}-{k}"), "bench", Some("Full")).await?;
            let st = b.status.unwrap_or_default();
            full[k].push(took);
            row.full_file.push(st.size_bytes.unwrap_or(0));
            row.start_ms.extend(st.start_millis);
            row.frozen_ms
                .extend(st.quiesce.as_ref().and_then(|q| q.frozen_millis));
            eprintln!(
                "[bench] backup {i} {}: incremental {} ({} KiB), qemu-img convert {} ({} KiB), full {}",
                row.label,
                secs(inc[k][i]),
                row.incremental_file[i] >> 10,
                secs(conv[k][i]),
                row.convert_file[i] >> 10,
                secs(full[k][i]),
            );
        }
    }
    for (k, row) in rows.iter_mut().enumerate() {
        row.incremental = Samples::new(std::mem::take(&mut inc[k]));
        row.full = Samples::new(std::mem::take(&mut full[k]));
        row.convert = Samples::new(std::mem::take(&mut conv[k]));
    }
    drop(w);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(rows)
}

fn median(v: &[u64]) -> u64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    s.get(s.len() / 2).copied().unwrap_or(0)
}

/// The markdown section.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = format!(
        "### Backup of a running desktop, 2 GiB disk holding {USER_DATA_MIB} MiB of data (N={} rounds, interleaved)\n\n\
         | change | way | p50 | max | file (median) | ratio of the medians to `qemu-img convert` (time / file) |\n\
         |---|---|---|---|---|---|\n",
        rows.first().map_or(0, |r| r.incremental.len())
    );
    for r in rows {
        let c = r.convert.p50().as_secs_f64().max(1e-9);
        let cf = median(&r.convert_file).max(1) as f64;
        let line = |way: &str, s: &Samples, file: u64| {
            format!(
                "| {} ({} MiB) | {way} | {} | {} | {} KiB | {:.2}× / {:.2}× |\n",
                r.label,
                r.changed_mib,
                secs(s.p50()),
                secs(s.max()),
                file >> 10,
                s.p50().as_secs_f64() / c,
                file as f64 / cf
            )
        };
        out.push_str(&format!(
            "| {} ({} MiB) | `qemu-img convert -U -O qcow2` of the live disk | {} | {} | {} KiB | 1 / 1 |\n",
            r.label,
            r.changed_mib,
            secs(r.convert.p50()),
            secs(r.convert.max()),
            median(&r.convert_file) >> 10
        ));
        out.push_str(&line(
            "deskvirt incremental, create → `Succeeded`",
            &r.incremental,
            median(&r.incremental_file),
        ));
        out.push_str(&line(
            "deskvirt `type: Full`, create → `Succeeded`",
            &r.full,
            median(&r.full_file),
        ));
        out.push_str(&format!(
            "\nThe incrementals of the {} change copied {} KiB of the disk (median; {} MiB written).\n\n",
            r.label,
            median(&r.incremental_data) >> 10,
            r.changed_mib
        ));
    }
    let starts: Vec<u64> = rows.iter().flat_map(|r| r.start_ms.clone()).collect();
    out.push_str(&format!(
        "The guest's I/O waits only while a backup job starts (the checkpoint transaction; the \
         copy runs beside it): median {} ms, max {} ms over {} backups.\n",
        median(&starts),
        starts.iter().max().copied().unwrap_or(0),
        starts.len()
    ));
    let frozen: Vec<u64> = rows.iter().flat_map(|r| r.frozen_ms.clone()).collect();
    out.push_str(&format!(
        "The guest agent (qemu-ga) froze the guest's file systems for {} of them: median {} ms, \
         max {} ms from freeze to thaw (included in the start above).\n",
        frozen.len(),
        median(&frozen),
        frozen.iter().max().copied().unwrap_or(0),
    ));
    out
}
