//! Every libvirt call has a deadline, against a "daemon" that accepts connections and never
//! answers (a unix socket nobody reads, as a libvirtd stopped with SIGSTOP looks to a client):
//! calls return `Timeout` or fail fast instead of hanging, a hung open blocks no other call,
//! at most one open and one probe are ever stuck, and the handle reports itself not connected.
//! The real daemon stopped with SIGSTOP is `tests/tests/hung_libvirt.rs`.

use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deskvirt_node_agent::domain::DomainType;
use deskvirt_node_agent::hypervisor::libvirt::Deadlines;
use deskvirt_node_agent::hypervisor::{Backoff, Hypervisor, HypervisorError, LibvirtHypervisor};

/// A socket that accepts every connection and never answers; counts the connections.
struct Silent {
    path: std::path::PathBuf,
    held: Arc<Mutex<Vec<UnixStream>>>,
}

impl Silent {
    fn start(tag: &str) -> std::io::Result<Self> {
        let path =
            std::env::temp_dir().join(format!("deskvirt-silent-{tag}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        let held = Arc::new(Mutex::new(Vec::new()));
        let keep = Arc::clone(&held);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                keep.lock().unwrap_or_else(|p| p.into_inner()).push(stream);
            }
        });
        Ok(Self { path, held })
    }

    fn uri(&self) -> String {
        format!("qemu+unix:///system?socket={}", self.path.display())
    }

    fn connections(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        // Hanging up ends the stuck open (the test runtime waits for blocking threads).
        self.held.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let _ = std::fs::remove_file(&self.path);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_never_answers_times_out_without_piling_up_calls() -> anyhow::Result<()> {
    let daemon = Silent::start("calls")?;
    let deadline = Duration::from_millis(800);
    let hv = LibvirtHypervisor::with_deadlines(
        &daemon.uri(),
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(100),
        },
        Deadlines {
            call: deadline,
            slow: deadline,
        },
    );

    // Concurrent calls while the open hangs: each returns by its deadline (none waits behind
    // the hung open longer than that), and only one open reaches the daemon.
    let started = Instant::now();
    let (probe, list, facts, lookup) = tokio::join!(
        hv.probe(),
        hv.list_domains(),
        hv.host_facts(DomainType::Qemu),
        hv.domain_by_name("x"),
    );
    let took = started.elapsed();
    assert!(
        took < deadline + Duration::from_secs(2),
        "calls took {took:?}"
    );
    assert!(!probe, "a silent daemon is not connected");
    for (what, err) in [
        ("list", list.err()),
        ("facts", facts.err()),
        ("lookup", lookup.map(|_| ()).err()),
    ] {
        match err {
            Some(HypervisorError::Timeout { after, .. }) => assert_eq!(after, deadline),
            Some(HypervisorError::Disconnected { .. }) => {}
            other => panic!("{what}: expected Timeout or Disconnected, got {other:?}"),
        }
    }
    assert!(!hv.is_connected());
    assert_eq!(daemon.connections(), 1, "one open at a time");

    // Stalled: calls fail fast without a new thread, and so does a probe: either the first
    // probe still holds the probe slot (it ran the hung open), or it has given up and a new
    // probe finds the stalled open still in flight and does not wait for it.
    let started = Instant::now();
    for _ in 0..20 {
        assert!(hv.list_domains().await.is_err());
        assert!(!hv.probe().await);
    }
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "stalled calls must fail fast, took {:?}",
        started.elapsed()
    );
    let err = hv.list_domains().await.err().map(|e| e.to_string());
    assert!(
        err.as_deref()
            .is_some_and(|m| m.contains("libvirt stopped answering")),
        "{err:?}"
    );
    assert!(
        hv.abandoned_calls() <= 4,
        "{} stuck calls",
        hv.abandoned_calls()
    );
    assert_eq!(daemon.connections(), 1, "no further open while one hangs");
    Ok(())
}
