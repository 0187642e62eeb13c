//! `deskvirt-bench`: issue 7's benchmarks in one run — time to desktop against plain libvirt,
//! bursts with their API cost, the footprint of both binaries, and placement latency — printed
//! as markdown and written to `results/<timestamp>/` with a latency CDF. `--scale` and
//! `--footprint-desktops` instead run real agents on libvirt's test driver (simulated hosts);
//! `--images` times DesktopImage distribution on such hosts against curl.
#![forbid(unsafe_code)]

mod backup;
mod burst;
mod cold_copy;
mod drain;
mod env;
mod fleet;
mod footprint;
mod image_curl;
mod image_origin;
mod image_watch;
mod images;
mod migrate;
mod migrate_hops;
mod plot;
mod report;
mod scale;
mod scale_report;
mod sched;
mod stats;
mod ttd;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use clap::Parser;
use deskvirt_tests::cluster::{client, ensure_crds, repo_root};
use deskvirt_tests::host::prepare_host;
use k8s_openapi::jiff::Timestamp;

use crate::env::Env;
use crate::report::Report;

/// Benchmarks deskvirt on this machine (real kube-apiserver, libvirt and QEMU).
///
/// With --scale or --footprint-desktops it runs simulated hosts instead: real
/// deskvirt-node-agent processes on libvirt's test:///default driver (no QEMU), one real
/// operator, metrics ports 19000-19200, everything removed at the end. Example:
/// `deskvirt-bench --scale --scale-hosts 100 --scale-desktops 1000 --footprint-desktops 200`.
#[derive(Parser, Debug)]
struct Args {
    /// Desktops per side in the time-to-desktop comparison.
    #[arg(long, default_value_t = 10)]
    n: usize,
    /// Desktops of the paced burst.
    #[arg(long, default_value_t = 20)]
    paced: usize,
    /// Creations per second of the paced burst.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Desktops created all at once.
    #[arg(long, default_value_t = 50)]
    at_once: usize,
    /// Hosts for the placement micro-benchmark.
    #[arg(long, default_value_t = 500)]
    hosts: usize,
    /// Bound desktops for the placement micro-benchmark.
    #[arg(long, default_value_t = 5000)]
    bound: usize,
    /// Timed placements through the bind path (ten times as many for `place_in_pool`).
    #[arg(long, default_value_t = 1000)]
    iterations: usize,
    /// Idle window for CPU and the apiserver's background rate, in seconds.
    #[arg(long, default_value_t = 10)]
    idle_secs: u64,
    /// Only the placement micro-benchmark (no cluster, no VM).
    #[arg(long)]
    scheduler_only: bool,
    /// Skip the time-to-desktop comparison.
    #[arg(long)]
    skip_ttd: bool,
    /// Skip the bursts and the footprint.
    #[arg(long)]
    skip_bursts: bool,
    /// Run debug builds of the operator and the agent instead of release builds.
    #[arg(long)]
    debug_binaries: bool,
    /// Log level of the operator and the agent.
    #[arg(long, default_value = "warn")]
    log: String,
    /// Scale run on simulated hosts: a tenth of the hosts with a tenth of the desktops, all
    /// hosts with a tenth, then all hosts with all desktops; time to all Running, RSS, CPU and
    /// mutating API calls at each step, and `scale.png`. Skips the QEMU sections.
    #[arg(long)]
    scale: bool,
    /// Simulated hosts (agents) of the largest scale step.
    #[arg(long, default_value_t = 100)]
    scale_hosts: usize,
    /// Desktops of the largest scale step.
    #[arg(long, default_value_t = 1000)]
    scale_desktops: usize,
    /// Memory of each scale desktop (1 vCPU each).
    #[arg(long, default_value = "256Mi")]
    scale_memory: String,
    /// Footprint: this many desktops on ONE simulated host; operator and agent RSS, and their
    /// CPU over a quiet window. Skips the QEMU sections.
    #[arg(long)]
    footprint_desktops: Option<usize>,
    /// Memory of each footprint desktop (the test driver's host has 3 GiB; the pool
    /// overcommits memory 4×).
    #[arg(long, default_value = "48Mi")]
    footprint_memory: String,
    /// Quiet window for the footprint's idle CPU, in seconds.
    #[arg(long, default_value_t = 30)]
    footprint_idle_secs: u64,
    /// Extra environment for the simulated fleet's operator and agents, `KEY=VALUE`
    /// (repeatable), for experiments such as `MALLOC_ARENA_MAX=2` or `TOKIO_WORKER_THREADS=1`.
    #[arg(long, value_parser = parse_env)]
    fleet_env: Vec<(String, String)>,
    /// libvirt URI of the simulated hosts' agents. The default, libvirt's in-process test
    /// driver, keeps every domain inside the agent; `test+unix:///default?socket=<libvirtd
    /// socket>` (a daemon's test driver) measures the agent as on a real host.
    #[arg(long, default_value = fleet::TEST_URI)]
    fleet_libvirt_uri: String,

    /// Only live migration: this many desktops moved by a DesktopMigration against as many
    /// plain domains moved by `virsh migrate`, interleaved, between this machine's libvirt and
    /// a second libvirt host (`scripts/second-host.sh`); debug builds of the binaries.
    #[arg(long)]
    migrate: Option<usize>,
    /// Only Cold moves with the disk copied: this many desktops in a pool without shared
    /// storage moved by a Cold DesktopMigration against the same job by hand with `virsh`,
    /// interleaved, between this machine's libvirt and a second host with its own disk dir.
    #[arg(long)]
    cold_copy: Option<usize>,
    /// MiB each guest of `--cold-copy` writes into its disk before the move.
    #[arg(long, default_value_t = 32)]
    cold_copy_mib: u64,
    /// Only host drain: this many running desktops emptied off host A by `spec.drain`,
    /// against a loop of `virsh migrate` over as many plain domains (`--drain-rounds` rounds).
    #[arg(long)]
    drain: Option<usize>,
    /// Only backups: this many rounds of a small and a large change in a running desktop's
    /// disk, each backed up by a deskvirt incremental and a Full DesktopBackup against a
    /// `qemu-img convert` copy of the same disk.
    #[arg(long)]
    backup: Option<usize>,
    /// Only image distribution: a DesktopImage of a local origin's file, POST → `Ready=True`
    /// on `--image-hosts` simulated hosts (each with its own image directory), against curl +
    /// sha256sum (and + openssl dgst -sha256) + qemu-img info + sync of the same file on as
    /// many hosts, interleaved; results in `<results>/<timestamp>/images.md` and `images.csv`.
    #[arg(long)]
    images: bool,
    /// MiB of random data in the test image of `--images`.
    #[arg(long, default_value_t = 256)]
    image_mib: u64,
    /// Rounds of each side per host count in `--images`.
    #[arg(long, default_value_t = 5)]
    image_runs: usize,
    /// Host counts of `--images`, comma-separated (1 to 32: an image lists at most 32 pools,
    /// and each host is alone in a pool of its own).
    #[arg(long, value_delimiter = ',', default_value = "1,4", value_parser = clap::value_parser!(u16).range(1..=32))]
    image_hosts: Vec<u16>,
    /// Rounds of the drain benchmark.
    #[arg(long, default_value = "2")]
    drain_rounds: usize,

    /// Use the operator and agent binaries in this directory (the simulated fleet and the
    /// time-to-desktop run) instead of building them, for example a build of another profile.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Where `<timestamp>/report.md` and `ttd-cdf.png` go.
    #[arg(long)]
    results: Option<PathBuf>,
}

/// The host's libvirt and control plane up, and the CRDs in place (the QEMU-only runs).
async fn prepare() -> anyhow::Result<()> {
    prepare_host()?;
    let c = client().await?;
    ensure_crds(&c).await?;
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(n) = args.drain {
        prepare().await?;
        let r = drain::run_bench(n, args.drain_rounds).await?;
        println!("{}", drain::markdown(&r));
        return Ok(());
    }
    if let Some(n) = args.backup {
        prepare().await?;
        let rows = backup::run_bench(n).await?;
        println!("{}", backup::markdown(&rows));
        return Ok(());
    }
    if let Some(n) = args.cold_copy {
        prepare().await?;
        let r = cold_copy::run_bench(n, args.cold_copy_mib).await?;
        println!("{}", cold_copy::markdown(&r));
        return Ok(());
    }
    if args.images {
        return images_run(&args).await;
    }
    if let Some(n) = args.migrate {
        prepare().await?;
        let r = migrate::run_bench(n).await?;
        println!("{}", migrate::markdown(&r));
        return Ok(());
    }
    let fleet_mode = args.scale || args.footprint_desktops.is_some();
    let mut report = Report {
        machine: machine(),
        command: format!(
            "cargo run --release -p deskvirt-bench -- {}",
            std::env::args().skip(1).collect::<Vec<_>>().join(" ")
        ),
        ..Report::default()
    };
    if fleet_mode {
        if let Err(e) = fleet_run(&args, &mut report).await {
            report
                .notes
                .push(format!("simulated-host run failed: {e:#}"));
            eprintln!("[bench] simulated-host run failed: {e:#}");
        }
    } else {
        eprintln!(
            "[bench] placement: {} hosts, {} desktops",
            args.hosts, args.bound
        );
        let r = sched::run(args.hosts, args.bound, args.iterations)?;
        eprintln!("[bench] {}", sched::describe(&r));
        report.sched = Some(r);
    }

    if !args.scheduler_only && !fleet_mode {
        let outcome = tokio::select! {
            r = live(&args, &mut report) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        };
        if let Err(e) = outcome {
            report.notes.push(format!("live run failed: {e:#}"));
            eprintln!("[bench] live run failed: {e:#}");
        }
    }

    let md = report.markdown();
    println!("{md}");
    let dir = results_dir(&args);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("report.md"), &md)?;
    if let Some(t) = &report.ttd {
        let png = dir.join("ttd-cdf.png");
        match plot::cdf(&png, &[("raw libvirt", &t.raw), ("deskvirt", &t.deskvirt)]) {
            Ok(()) => eprintln!("[bench] wrote {}", png.display()),
            Err(e) => eprintln!("[bench] no plot: {e:#}"),
        }
    }
    if !report.scale.is_empty() || report.fleet_footprint.is_some() {
        let png = dir.join("scale.png");
        let steps: Vec<&scale::Step> = report
            .scale
            .iter()
            .chain(report.fleet_footprint.as_ref())
            .collect();
        match plot::scale(&png, &steps) {
            Ok(()) => eprintln!("[bench] wrote {}", png.display()),
            Err(e) => eprintln!("[bench] no plot: {e:#}"),
        }
    }
    eprintln!("[bench] wrote {}", dir.join("report.md").display());
    Ok(())
}

/// A fleet of simulated hosts (none started yet) running the binaries `args` asks for.
async fn create_fleet(
    args: &Args,
    client: kube::Client,
    report: &mut Report,
) -> anyhow::Result<fleet::Fleet> {
    let bin_dir = binaries(args, report)?;
    fleet::Fleet::create(
        client,
        &bin_dir,
        &args.log,
        args.fleet_env.clone(),
        &args.fleet_libvirt_uri,
    )
    .await
}

/// `--images`: a fleet of simulated hosts (none started yet), the runs, the report on stdout
/// and in the results directory; the fleet is torn down whatever happens, Ctrl-C included.
async fn images_run(args: &Args) -> anyhow::Result<()> {
    let client = client().await?;
    ensure_crds(&client).await?;
    let mut notes = Report::default();
    let mut fleet = create_fleet(args, client, &mut notes).await?;
    eprintln!(
        "[bench] images run {} (images namespace {}, work dir {})",
        fleet.run,
        fleet.images_ns,
        fleet.work.display()
    );
    let settings = images::Settings {
        mib: args.image_mib,
        runs: args.image_runs,
        hosts: args.image_hosts.iter().map(|&n| usize::from(n)).collect(),
    };
    let outcome = tokio::select! {
        r = images::run_bench(&mut fleet, &settings) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    eprintln!("[bench] tearing down images run {}", fleet.run);
    fleet.teardown().await;
    let result = outcome?;
    let md = format!(
        "{}\n\n`{}`; {}; {}.\n\n{}",
        machine(),
        format_args!(
            "cargo run --release -p deskvirt-bench -- {}",
            std::env::args().skip(1).collect::<Vec<_>>().join(" ")
        ),
        notes.notes.join("; "),
        format_args!(
            "hosts: deskvirt-node-agent on `{}`, each alone in a pool with its own image directory",
            args.fleet_libvirt_uri
        ),
        images::markdown(&result)
    );
    println!("{md}");
    let dir = results_dir(args);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("images.md"), &md)?;
    std::fs::write(dir.join("images.csv"), images::csv(&result))?;
    eprintln!("[bench] wrote {}", dir.join("images.md").display());
    Ok(())
}

/// `<--results or the repository's results/>/<timestamp now>`.
fn results_dir(args: &Args) -> PathBuf {
    let stamp = Timestamp::now().strftime("%Y%m%dT%H%M%SZ").to_string();
    args.results
        .clone()
        .unwrap_or_else(|| {
            let root = repo_root();
            root.canonicalize().unwrap_or(root).join("results")
        })
        .join(stamp)
}

/// `KEY=VALUE`.
fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// The simulated-host sections: footprint first (one host), then the scale steps; the fleet
/// is torn down whatever happens, Ctrl-C included.
async fn fleet_run(args: &Args, report: &mut Report) -> anyhow::Result<()> {
    let client = client().await?;
    ensure_crds(&client).await?;
    let bins = if args.debug_binaries {
        "debug"
    } else {
        "release"
    };
    let mut fleet = create_fleet(args, client, report).await?;
    eprintln!(
        "[bench] fleet run {} (pool {}, work dir {})",
        fleet.run,
        fleet.pool,
        fleet.work.display()
    );
    report.notes.push(format!(
        "simulated hosts: real deskvirt-node-agent processes ({bins}) on `{}` with `--hypervisor qemu`, \
         one operator ({bins}), admin kubeconfig, pool network isolated {} with a /24 per host, SPICE \
         ports {}–{} per host (never bound: no QEMU), disks are qcow2 overlays of a 64 MiB base in a temp dir",
        fleet.libvirt_uri,
        fleet::CIDR,
        fleet::SPICE_FIRST,
        fleet::SPICE_LAST
    ));
    if !args.fleet_env.is_empty() {
        report
            .notes
            .push(format!("fleet environment: {:?}", args.fleet_env));
    }
    let outcome = tokio::select! {
        r = fleet_measure(args, &mut fleet, report) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    eprintln!("[bench] tearing down fleet run {}", fleet.run);
    fleet.teardown().await;
    outcome
}

async fn fleet_measure(
    args: &Args,
    fleet: &mut fleet::Fleet,
    report: &mut Report,
) -> anyhow::Result<()> {
    if let Some(n) = args.footprint_desktops {
        let spec = scale::StepSpec {
            label: format!("1 host / {n} desktops"),
            hosts: 1,
            desktops: n,
            memory: args.footprint_memory.clone(),
            idle: Duration::from_secs(args.footprint_idle_secs),
            caches: true,
        };
        report.fleet_footprint = Some(scale::run_step(fleet, &spec).await?);
    }
    if args.scale {
        for spec in scale::steps(args.scale_hosts, args.scale_desktops, &args.scale_memory) {
            let step = scale::run_step(fleet, &spec).await?;
            report.scale.push(step);
        }
    }
    Ok(())
}

/// The parts that need the cluster and libvirt; tears its world down whatever happens.
async fn live(args: &Args, report: &mut Report) -> anyhow::Result<()> {
    let guest = prepare_host()?;
    let client = client().await?;
    ensure_crds(&client).await?;
    let mut env = Env::create(client, &guest).await?;
    eprintln!(
        "[bench] run {} (pool {}, namespace {})",
        env.run, env.pool, env.user_ns
    );
    let result = measure(args, &mut env, report).await;
    eprintln!("[bench] tearing down run {}", env.run);
    env.teardown().await;
    result
}

/// The directory of the operator and agent binaries: `--bin-dir`, else a build of them
/// (release unless `--debug-binaries`); the report notes which.
fn binaries(args: &Args, report: &mut Report) -> anyhow::Result<PathBuf> {
    if let Some(d) = &args.bin_dir {
        report.notes.push(format!(
            "operator and node-agent from {} (not built by the bench)",
            d.display()
        ));
        return Ok(d.clone());
    }
    let bins = if args.debug_binaries {
        "debug"
    } else {
        "release"
    };
    eprintln!("[bench] building the operator and the node-agent ({bins})");
    report
        .notes
        .push(format!("operator and node-agent: {bins} builds"));
    env::build_binaries(!args.debug_binaries)
}

async fn measure(args: &Args, env: &mut Env, report: &mut Report) -> anyhow::Result<()> {
    let dir = binaries(args, report)?;
    report
        .notes
        .push("operator and node-agent run with the admin kubeconfig".into());
    env.start(&dir, &args.log).await?;
    if !args.skip_ttd && args.n > 0 {
        report.ttd = Some(ttd::run_pairs(env, args.n).await?);
    }
    if args.skip_bursts {
        return Ok(());
    }
    let idle = Duration::from_secs(args.idle_secs);
    let (bg, _) = burst::background_rate(&env.client, idle).await?;
    report.background_per_s = Some(bg);
    if args.paced > 0 {
        eprintln!("[bench] burst: {} at {}/s", args.paced, args.rate);
        let label = format!("{} at {}/s", args.paced, args.rate);
        let b = burst::run(env, "paced", &label, args.paced, Some(args.rate), bg).await?;
        report.bursts.push(b);
        env.delete_desktops("deskvirt.io/bench", Duration::from_secs(300))
            .await?;
    }
    if args.at_once > 0 {
        eprintln!("[bench] burst: {} at once", args.at_once);
        let label = format!("{} at once", args.at_once);
        let b = burst::run(env, "once", &label, args.at_once, None, bg).await?;
        report.bursts.push(b);
        report.footprint = Some(burst::footprint(env, args.at_once, idle).await?);
        env.delete_desktops("deskvirt.io/bench", Duration::from_secs(300))
            .await?;
    }
    Ok(())
}

/// `nproc`, the CPU model, memory and the hypervisor mode.
fn machine() -> String {
    let out = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let model = out("lscpu", &[])
        .lines()
        .find(|l| l.starts_with("Model name:"))
        .map(|l| l.trim_start_matches("Model name:").trim().to_string())
        .unwrap_or_default();
    let mem = out("free", &["-g"])
        .lines()
        .find(|l| l.starts_with("Mem:"))
        .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        .unwrap_or_default();
    format!(
        "Machine: {} CPUs (`nproc`), {model}, {mem} GiB RAM, kernel {}; QEMU under TCG (`<domain type='qemu'>`), shared and noisy.",
        out("nproc", &[]),
        out("uname", &["-r"])
    )
}
