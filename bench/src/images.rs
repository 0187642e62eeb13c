//! Image distribution against a plain copy (issue 17, item 8): one test image on one local
//! origin; for each host count N, fresh simulated hosts (each alone in a pool with an image
//! directory of its own, spawned a fraction of the agent's round apart), then rounds
//! interleaved: N curl pipelines at once hashing with `sha256sum`, the same with `openssl`
//! ([`crate::image_curl`]), and a new DesktopImage for the N pools timed from just before its
//! POST (sent at a random point of the agents' round) to `Ready=True` by a watch, with each
//! host's own report and what its copy took ([`crate::image_watch`]). Each image is deleted
//! and its files removed before the next round.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use deskvirt_crds::image::image_file;
use deskvirt_crds::{DesktopImage, DomainNode};
use deskvirt_tests::host::eventually;
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use serde_json::json;
use tokio::sync::oneshot;

use crate::env::RUN_LABEL;
use crate::fleet::Fleet;
use crate::image_curl::{self, Hasher};
use crate::image_origin::{Origin, TestImage};
use crate::image_watch::{self, FileTimes, Steps, Watched};
use crate::stats::{Samples, ratio, secs};

/// Deadline of one API call of the bench's own.
const CALL: Duration = Duration::from_secs(30);
/// The agent's image round (`deskvirt_node_agent::images::ROUND`): every copy starts and is
/// reported at one of its ticks.
const AGENT_ROUND: Duration = Duration::from_secs(2);

/// What to run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// MiB of random data in the test image.
    pub mib: u64,
    /// Rounds per host count.
    pub runs: usize,
    /// Host counts.
    pub hosts: Vec<usize>,
}

/// One round: both sides.
#[derive(Debug, Clone)]
pub struct Round {
    /// The curl pipelines hashing with `sha256sum`, spawn → last exit.
    pub curl: Duration,
    /// The same hashing with `openssl dgst -sha256`.
    pub curl_openssl: Duration,
    /// deskvirt's steps, from the POST.
    pub steps: Steps,
    /// What each host's copy took, by its files.
    pub files: Vec<FileTimes>,
}

/// The rounds of one host count.
#[derive(Debug, Clone)]
pub struct ForHosts {
    pub hosts: usize,
    /// Until every host was Ready and Schedulable.
    pub start: Duration,
    pub rounds: Vec<Round>,
}

/// The whole run.
#[derive(Debug, Clone)]
pub struct ImagesResult {
    pub mib: u64,
    pub bytes: u64,
    pub steps: Vec<ForHosts>,
}

/// Runs every host count of `s` on `fleet` (started and stopped here).
pub async fn run_bench(fleet: &mut Fleet, s: &Settings) -> anyhow::Result<ImagesResult> {
    eprintln!("[bench] images: making a {} MiB test image", s.mib);
    let dir = fleet.work.join("origin");
    let image = crate::image_origin::make(&dir, s.mib).await?;
    let origin = Origin::start(&dir, &fleet.work.join("logs/origin.log")).await?;
    eprintln!(
        "[bench] images: {} ({} bytes, sha256 {}) at {}",
        image.name,
        image.bytes,
        image.sha256,
        origin.url(&image.name)
    );
    let mut steps = Vec::new();
    for &hosts in &s.hosts {
        let stagger = AGENT_ROUND / u32::try_from(hosts.max(1)).unwrap_or(u32::MAX);
        let start = fleet.start_private(hosts, stagger).await?;
        eprintln!("[bench] images: {hosts} hosts Ready in {}", secs(start));
        let mut rounds = Vec::new();
        let outcome = async {
            for r in 0..s.runs {
                let round = round(fleet, &origin, &image, hosts, r, s.mib).await?;
                eprintln!(
                    "[bench] images {hosts}h round {r}: curl+sha256sum {}, curl+openssl {}, deskvirt {} (last host's copy Ready at {})",
                    secs(round.curl),
                    secs(round.curl_openssl),
                    secs(round.steps.ready),
                    secs(round.steps.last_host_ready)
                );
                rounds.push(round);
            }
            Ok::<_, anyhow::Error>(())
        }
        .await;
        fleet.stop().await;
        outcome?;
        steps.push(ForHosts {
            hosts,
            start,
            rounds,
        });
    }
    drop(origin);
    Ok(ImagesResult {
        mib: s.mib,
        bytes: image.bytes,
        steps,
    })
}

/// One round on `hosts` hosts: the curl pipelines first on even rounds, last on odd ones.
async fn round(
    fleet: &Fleet,
    origin: &Origin,
    image: &TestImage,
    hosts: usize,
    r: usize,
    mib: u64,
) -> anyhow::Result<Round> {
    let url = origin.url(&image.name);
    let limit = Duration::from_secs(120 + mib);
    let scratch = fleet.work.join("curl");
    let plain = |h| image_curl::run(h, &url, &scratch, hosts, &image.sha256, limit);
    let (curl, curl_openssl, (steps, files)) = if r.is_multiple_of(2) {
        let c = plain(Hasher::Sha256sum).await?;
        let o = plain(Hasher::Openssl).await?;
        (c, o, distribute(fleet, &url, image, hosts, r, limit).await?)
    } else {
        let d = distribute(fleet, &url, image, hosts, r, limit).await?;
        let o = plain(Hasher::Openssl).await?;
        (plain(Hasher::Sha256sum).await?, o, d)
    };
    Ok(Round {
        curl,
        curl_openssl,
        steps,
        files,
    })
}

/// A new DesktopImage for the pools of `hosts` hosts, timed to `Ready=True`; then deleted and
/// its files removed from every host's image directory.
async fn distribute(
    fleet: &Fleet,
    url: &str,
    image: &TestImage,
    hosts: usize,
    r: usize,
    limit: Duration,
) -> anyhow::Result<(Steps, Vec<FileTimes>)> {
    let name = format!("bench-{hosts}h-{r}");
    let pools: Vec<String> = (0..hosts).map(|i| fleet.private_pool(i)).collect();
    let obj: DesktopImage = serde_json::from_value(json!({
        "apiVersion": "deskvirt.io/v1alpha1", "kind": "DesktopImage",
        "metadata": { "name": name, "namespace": fleet.images_ns, "labels": { RUN_LABEL: fleet.run } },
        "spec": { "source": { "http": { "url": url, "sha256": image.sha256 } }, "pools": pools },
    }))?;
    let images: Api<DesktopImage> = Api::namespaced(fleet.client.clone(), &fleet.images_ns);
    let nodes: Api<DomainNode> = Api::all(fleet.client.clone());
    let selector = format!("{RUN_LABEL}={}", fleet.run);
    let (listed_tx, listed_rx) = oneshot::channel();
    let watching = tokio::spawn(image_watch::watch(
        Watched {
            images: images.clone(),
            nodes: nodes.clone(),
            selector: selector.clone(),
            namespace: fleet.images_ns.clone(),
            name: name.clone(),
            hosts,
        },
        listed_tx,
        limit,
    ));
    if listed_rx.await.is_err() {
        // The task ended before both watches listed: its own error says why.
        watching.await??;
        anyhow::bail!("the image's watches ended before listing");
    }
    // A user's POST comes at any point of the agents' rounds. The bench's own rhythm does
    // not (the previous round's cleanup ends just after a round), so it waits a random part of
    // a round first, untimed.
    tokio::time::sleep(random_part(AGENT_ROUND)).await;
    let t0 = Instant::now();
    let created =
        match tokio::time::timeout(CALL, images.create(&PostParams::default(), &obj)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                watching.abort();
                return Err(e.into());
            }
            Err(_) => {
                watching.abort();
                anyhow::bail!("the POST of image {name} took longer than {CALL:?}");
            }
        };
    let uid = created.metadata.uid.clone().unwrap_or_default();
    let watched = watching.await?;
    let files = match &watched {
        Ok((_, done)) => {
            let version = done.status.as_ref().and_then(|s| s.version).unwrap_or(1);
            (0..hosts)
                .filter_map(|i| {
                    let file = fleet.private_image_dir(i).join(image_file(&uid, version));
                    image_watch::file_times(&file)
                })
                .collect()
        }
        Err(_) => Vec::new(),
    };
    remove(fleet, &images, &nodes, &selector, &name, &uid, hosts).await?;
    let (marks, _) = watched?;
    Ok((marks.steps(t0), files))
}

/// A uniformly random part of `whole`, from the kernel's random source (zero if unreadable).
fn random_part(whole: Duration) -> Duration {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        return Duration::ZERO;
    }
    whole.mul_f64(u64::from_le_bytes(bytes) as f64 / u64::MAX as f64)
}

/// Deletes image `name`, waits until no host of the run reports it any more (an agent that
/// still targeted it would fetch it again), then removes its files from every host.
async fn remove(
    fleet: &Fleet,
    images: &Api<DesktopImage>,
    nodes: &Api<DomainNode>,
    selector: &str,
    name: &str,
    uid: &str,
    hosts: usize,
) -> anyhow::Result<()> {
    tokio::time::timeout(CALL, images.delete(name, &DeleteParams::default()))
        .await
        .map_err(|_| anyhow::anyhow!("deleting image {name} took longer than {CALL:?}"))??;
    let key = format!("{}/{name}", fleet.images_ns);
    eventually(
        Duration::from_secs(60),
        "hosts forget the image",
        || async {
            let list =
                tokio::time::timeout(CALL, nodes.list(&ListParams::default().labels(selector)))
                    .await
                    .map_err(|_| {
                        anyhow::anyhow!("listing DomainNodes took longer than {CALL:?}")
                    })??;
            let held = list.items.iter().any(|dn| {
                dn.status
                    .as_ref()
                    .is_some_and(|s| s.images.iter().any(|i| i.image == key))
            });
            Ok((!held).then_some(()))
        },
    )
    .await?;
    anyhow::ensure!(!uid.is_empty(), "image {name} has no UID");
    for i in 0..hosts {
        let dir = fleet.private_image_dir(i).join("managed").join(uid);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(anyhow::Error::new(e).context(format!("removing {}", dir.display())));
            }
            _ => {}
        }
    }
    Ok(())
}

/// MiB/s of `bytes` in `d`.
fn mibps(bytes: u64, d: Duration) -> f64 {
    if d.is_zero() {
        f64::NAN
    } else {
        bytes as f64 / (1024.0 * 1024.0) / d.as_secs_f64()
    }
}

fn p90(s: &Samples) -> Duration {
    s.percentile(90.0)
}

/// The report: both sides per host count, deskvirt's steps, and the agents' own copy times.
pub fn markdown(r: &ImagesResult) -> String {
    let mut out = String::new();
    let runs = r.steps.first().map_or(0, |s| s.rounds.len());
    let _ = writeln!(
        out,
        "### Image distribution, {} MiB of random data as a qcow2 ({} bytes), one local origin \
         (N={runs} rounds per host count, interleaved)\n",
        r.mib, r.bytes
    );
    out.push_str(
        "| hosts | way | p50 | p90 | MiB/s per host (p50) | ratio of the p50s: to `sha256sum` / to `openssl` |\n\
         |---|---|---|---|---|---|\n",
    );
    for step in &r.steps {
        let n = step.hosts;
        let series = |f: fn(&Round) -> Duration| Samples::new(step.rounds.iter().map(f).collect());
        let curl = series(|x| x.curl);
        let openssl = series(|x| x.curl_openssl);
        let copy = Samples::new(
            step.rounds
                .iter()
                .flat_map(|x| x.files.iter().map(|f| f.download + f.check))
                .collect(),
        );
        let row = |out: &mut String, way: &str, s: &Samples| {
            let _ = writeln!(
                out,
                "| {n} | {way} | {} | {} | {:.0} | {:.2}× / {:.2}× |",
                secs(s.p50()),
                secs(p90(s)),
                mibps(r.bytes, s.p50()),
                ratio(s.p50(), curl.p50()),
                ratio(s.p50(), openssl.p50())
            );
        };
        let plain = |h: Hasher| {
            if n == 1 {
                format!("`{}`", h.describe())
            } else {
                format!("{n} × `{}` at once, to the last exit", h.describe())
            }
        };
        row(&mut out, &plain(Hasher::Sha256sum), &curl);
        row(&mut out, &plain(Hasher::Openssl), &openssl);
        row(
            &mut out,
            &format!("**deskvirt: POST → `Ready=True` ({n}/{n} hosts)**"),
            &series(|x| x.steps.ready),
        );
        row(
            &mut out,
            "deskvirt: POST → last host's copy `Ready` in its DomainNode",
            &series(|x| x.steps.last_host_ready),
        );
        row(
            &mut out,
            "the agent's copy itself (file birth → its record), each host",
            &copy,
        );
    }
    out.push_str(
        "\nEach deskvirt POST went at a random point of the agents' 2 s round (a random 0–2 s \
         pause before it, not counted), and the agents were spawned 2 s / N apart, so that their \
         rounds do not tick together.\n",
    );
    for step in &r.steps {
        let _ = write!(out, "\n{}", steps_table(step));
    }
    out
}

/// When one step was seen in a round's [`Steps`].
type Step = fn(&Steps) -> Duration;

/// deskvirt's steps for one host count (p50 and p90 from the POST, p50 of the step), and what
/// the agents' copies took by their files.
fn steps_table(step: &ForHosts) -> String {
    let n = step.hosts;
    let rows: [(&str, Step); 6] = [
        ("version cut (operator, image status)", |s| s.cut),
        ("first host reported the copy (agent, `Copying`)", |s| {
            s.first_started
        }),
        ("last host reported the copy", |s| s.last_started),
        ("first host's copy `Ready` (agent, DomainNode)", |s| {
            s.first_host_ready
        }),
        ("last host's copy `Ready`", |s| s.last_host_ready),
        ("image `Ready=True` (operator)", |s| s.ready),
    ];
    let mut out = format!(
        "| step on {n} host{} (seen by a watch) | p50 from the POST | p90 | p50 of the step |\n|---|---|---|---|\n",
        if n == 1 { "" } else { "s" }
    );
    let mut prev: Option<Step> = None;
    for (what, at) in rows {
        let from = Samples::new(step.rounds.iter().map(|x| at(&x.steps)).collect());
        let own = Samples::new(
            step.rounds
                .iter()
                .map(|x| at(&x.steps).saturating_sub(prev.map_or(Duration::ZERO, |p| p(&x.steps))))
                .collect(),
        );
        let _ = writeln!(
            out,
            "| {what} | {} | {} | +{} |",
            secs(from.p50()),
            secs(p90(&from)),
            secs(own.p50())
        );
        prev = Some(at);
    }
    let files: Vec<&FileTimes> = step.rounds.iter().flat_map(|x| x.files.iter()).collect();
    let download = Samples::new(files.iter().map(|f| f.download).collect());
    let check = Samples::new(files.iter().map(|f| f.check).collect());
    let _ = write!(
        out,
        "\nThe agents' copies by their files ({} copies): download and SHA-256 (file birth → last \
         write) p50 {}, p90 {}; `qemu-img info`, read-only, fsync and record (last write → \
         record) p50 {}, p90 {}. Hosts Ready and Schedulable {} after their start.\n",
        files.len(),
        secs(download.p50()),
        secs(p90(&download)),
        secs(check.p50()),
        secs(p90(&check)),
        secs(step.start)
    );
    out
}

/// One line per round and host count, for the results directory.
pub fn csv(r: &ImagesResult) -> String {
    let mut out = String::from(
        "hosts,round,curl_sha256sum_s,curl_openssl_s,cut_s,first_started_s,last_started_s,first_host_ready_s,last_host_ready_s,ready_s,agent_download_s,agent_check_s\n",
    );
    for step in &r.steps {
        for (i, x) in step.rounds.iter().enumerate() {
            let s = &x.steps;
            let max = |f: fn(&FileTimes) -> Duration| {
                x.files
                    .iter()
                    .map(f)
                    .max()
                    .unwrap_or_default()
                    .as_secs_f64()
            };
            let _ = writeln!(
                out,
                "{},{i},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3}",
                step.hosts,
                x.curl.as_secs_f64(),
                x.curl_openssl.as_secs_f64(),
                s.cut.as_secs_f64(),
                s.first_started.as_secs_f64(),
                s.last_started.as_secs_f64(),
                s.first_host_ready.as_secs_f64(),
                s.last_host_ready.as_secs_f64(),
                s.ready.as_secs_f64(),
                max(|f| f.download),
                max(|f| f.check),
            );
        }
    }
    out
}
