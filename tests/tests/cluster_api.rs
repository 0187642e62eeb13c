//! The deskvirt.io API against a real kube-apiserver: the CRDs install and become Established,
//! every example is accepted, invalid manifests are rejected naming the offending field, and
//! `kubectl explain` shows our descriptions.

use deskvirt_tests::cluster::{TestNamespace, client, ensure_crds, repo_root, unique_suffix};
use deskvirt_tests::kubectl::kubectl;

#[tokio::test]
async fn crds_are_established_with_short_names() -> anyhow::Result<()> {
    let c = client().await?;
    ensure_crds(&c).await?;
    for (short, kind) in [
        ("desk", "Desktop"),
        ("dn", "DomainNode"),
        ("pool", "ResourcePool"),
        ("dmig", "DesktopMigration"),
    ] {
        let run = kubectl(
            &["api-resources", "--api-group=deskvirt.io", "-o", "wide"],
            None,
        )?;
        assert!(run.success, "{}", run.stderr);
        let line = run
            .stdout
            .lines()
            .find(|l| l.split_whitespace().any(|w| w == kind))
            .unwrap_or_default()
            .to_string();
        assert!(
            line.split_whitespace().any(|w| w == short),
            "{kind} lacks short name {short}: {line}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn every_example_is_accepted() -> anyhow::Result<()> {
    let c = client().await?;
    ensure_crds(&c).await?;
    let ns = TestNamespace::new(&c, "examples").await?;
    let dir = repo_root().join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 3,
        "expected at least a pool and two desktops in {}",
        dir.display()
    );
    for file in &files {
        // Cluster-scoped examples are validated with a server-side dry run, so tests that run in
        // parallel never see this pool; namespaced ones are really created in our namespace.
        let text = std::fs::read_to_string(file)?;
        let cluster_scoped = text.contains("kind: ResourcePool");
        let path = file.display().to_string();
        let mut args = vec![
            "apply",
            "--server-side",
            "--field-manager=deskvirt-tests",
            "-n",
            &ns.name,
            "-f",
            &path,
        ];
        if cluster_scoped {
            args.push("--dry-run=server");
        }
        let run = kubectl(&args, None)?;
        assert!(run.success, "{path} was rejected: {}", run.stderr);
    }
    let run = kubectl(&["get", "desktops", "-n", &ns.name], None)?;
    assert!(run.success, "{}", run.stderr);
    for column in ["PHASE", "NODE", "SPICE", "USER", "AGE"] {
        assert!(
            run.stdout.contains(column),
            "kubectl get desktops lacks {column}:\n{}",
            run.stdout
        );
    }
    Ok(())
}

/// A manifest the schema must reject, and the field path the error must name.
struct Invalid {
    what: &'static str,
    field: &'static str,
    yaml: String,
}

fn desktop(spec: &str) -> String {
    format!(
        "apiVersion: deskvirt.io/v1alpha1\nkind: Desktop\nmetadata:\n  name: bad-{}\nspec:\n{spec}",
        unique_suffix()
    )
}

fn pool(spec: &str) -> String {
    format!(
        "apiVersion: deskvirt.io/v1alpha1\nkind: ResourcePool\nmetadata:\n  name: bad-{}\nspec:\n{spec}",
        unique_suffix()
    )
}

const DISK: &str = "  disk: {image: debian-12.qcow2}\n";

fn invalid_table() -> Vec<Invalid> {
    let d = |what, field, extra: &str| Invalid {
        what,
        field,
        yaml: desktop(&format!("  pool: lab\n{DISK}{extra}")),
    };
    let p = |what, field, spec: &str| Invalid {
        what,
        field,
        yaml: pool(spec),
    };
    vec![
        d("zero vCPUs", "spec.cpu", "  cpu: 0\n"),
        d("cpu of the wrong type", "spec.cpu", "  cpu: two\n"),
        d(
            "memory in GB instead of Gi",
            "spec.memory",
            "  memory: 4GB\n",
        ),
        d("unknown power state", "spec.power", "  power: Standby\n"),
        d(
            "unknown clone mode",
            "spec.disk.clone",
            "  disk: {image: a.qcow2, clone: Thin}\n",
        ),
        d(
            "image path escaping the image dir",
            "spec.disk.image",
            "  disk: {image: ../etc/shadow}\n",
        ),
        d(
            "disk size not a quantity",
            "spec.disk.size",
            "  disk: {image: a.qcow2, size: big}\n",
        ),
        d(
            "idle timeout not a duration",
            "spec.idle.timeout",
            "  idle: {timeout: soon}\n",
        ),
        d(
            "unknown idle action",
            "spec.idle.action",
            "  idle: {timeout: 30m, action: Hibernate}\n",
        ),
        d(
            "too many USB channels",
            "spec.display.usb.channels",
            "  display: {usb: {channels: 9}}\n",
        ),
        d(
            "USB vendor without 0x",
            "spec.display.usb.allow",
            "  display: {usb: {allow: [{vendor: \"046d\"}]}}\n",
        ),
        d(
            "too many USB filters",
            "spec.display.usb.deny",
            &format!(
                "  display: {{usb: {{deny: [{}]}}}}\n",
                vec!["{class: \"0x08\"}"; 33].join(", ")
            ),
        ),
        d(
            "multicast MAC",
            "spec.network.mac",
            "  network: {mac: \"01:00:5e:00:00:01\"}\n",
        ),
        Invalid {
            what: "missing pool",
            field: "spec.pool",
            yaml: desktop(DISK),
        },
        Invalid {
            what: "missing disk",
            field: "spec.disk",
            yaml: desktop("  pool: lab\n"),
        },
        p(
            "bad MAC prefix",
            "spec.network.macPrefix",
            "  network: {macPrefix: \"zz:00:00\"}\n",
        ),
        p(
            "bad CIDR",
            "spec.network.cidr",
            "  network: {cidr: 10.0.0.0/33}\n",
        ),
        p(
            "unknown network mode",
            "spec.network.mode",
            "  network: {mode: vxlan}\n",
        ),
        p(
            "host prefix too long",
            "spec.network.nodePrefixLength",
            "  network: {nodePrefixLength: 31}\n",
        ),
        p(
            "SPICE port below 1024",
            "spec.display.spicePorts.first",
            "  display: {spicePorts: {first: 80, last: 6000}}\n",
        ),
        p(
            "SPICE port above 65535",
            "spec.display.spicePorts.last",
            "  display: {spicePorts: {first: 5900, last: 70000}}\n",
        ),
        p(
            "CPU overcommit below 1",
            "spec.overcommit.cpu",
            "  overcommit: {cpu: 0.5}\n",
        ),
        p(
            "unknown placement",
            "spec.placement",
            "  placement: Random\n",
        ),
        p(
            "relative image dir",
            "spec.storage.imageDir",
            "  storage: {imageDir: images}\n",
        ),
    ]
}

#[tokio::test]
async fn invalid_manifests_are_rejected_naming_the_field() -> anyhow::Result<()> {
    let c = client().await?;
    ensure_crds(&c).await?;
    let ns = TestNamespace::new(&c, "invalid").await?;
    let table = invalid_table();
    assert!(table.len() >= 12);
    // --validate=false: the apiserver, not kubectl's client-side check, must reject each one.
    let mut failures = vec![];
    for case in &table {
        let run = kubectl(
            &[
                "apply",
                "--server-side",
                "--dry-run=server",
                "--validate=false",
                "-n",
                &ns.name,
                "-f",
                "-",
            ],
            Some(&case.yaml),
        )?;
        if run.success {
            failures.push(format!("{}: accepted\n{}", case.what, case.yaml));
        } else if !run.stderr.contains(case.field) {
            failures.push(format!(
                "{}: error does not name {}: {}",
                case.what,
                case.field,
                run.stderr.trim()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        table.len(),
        failures.join("\n")
    );
    Ok(())
}

#[tokio::test]
async fn kubectl_explain_shows_our_descriptions() -> anyhow::Result<()> {
    let c = client().await?;
    ensure_crds(&c).await?;
    // The apiserver republishes OpenAPI a moment after a CRD changes: retry briefly.
    let mut last = String::new();
    for _ in 0..30 {
        let run = kubectl(&["explain", "desktop.spec.idle"], None)?;
        let mig = kubectl(&["explain", "desktopmigration.spec"], None)?;
        last = format!("{}{}{}{}", run.stdout, run.stderr, mig.stdout, mig.stderr);
        if run.success
            && last.contains("idle for a while")
            && last.contains("connectedIsActive")
            && mig.success
            && mig.stdout.contains("targetNode")
            && mig.stdout.contains("storage.shared")
        {
            let pool = kubectl(&["explain", "resourcepool.spec.overcommit"], None)?;
            assert!(pool.stdout.contains("overcommitted"), "{}", pool.stdout);
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    panic!("kubectl explain did not show our descriptions:\n{last}")
}
