//! The `deskvirt-operator` binary against the real API server: flags, health endpoints, and a
//! clean exit on SIGTERM.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Run;
use deskvirt_tests::cluster::kubeconfig_path;

const BIN: &str = env!("CARGO_BIN_EXE_deskvirt-operator");

fn get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[test]
fn help_lists_the_flags() {
    let out = Command::new(BIN)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--metrics-addr",
        "DESKVIRT_METRICS_ADDR",
        "--namespace",
        "POD_NAMESPACE",
        "--log-format",
        "--host-timeout",
        "--identity",
        "POD_NAME",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}

#[tokio::test]
async fn serves_health_and_stops_on_sigterm() {
    let kubeconfig = kubeconfig_path().unwrap_or_else(|e| panic!("{e:#}"));
    let run = Run::new("op-bin").await;
    let port = common::free_port();
    let mut child = Command::new(BIN)
        .env("KUBECONFIG", &kubeconfig)
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .args(["--namespace", &run.ns])
        // Manage nothing real: only objects of this (empty) test run.
        .args(["--label-selector", &run.selector()])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let start = Instant::now();
    let ready = loop {
        if get(port, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
            break true;
        }
        if start.elapsed() > Duration::from_secs(30) {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if !ready {
        let _ = child.kill();
        panic!("/readyz never answered 200");
    }
    assert!(get(port, "/healthz").is_some_and(|r| r.starts_with("HTTP/1.1 200")));
    let metrics = get(port, "/metrics").unwrap_or_default();
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(metrics.contains("deskvirt_operator_leader"), "{metrics}");

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(status.success());
    let start = Instant::now();
    let code = loop {
        if let Some(s) = child.try_wait().unwrap_or_else(|e| panic!("{e}")) {
            break s.code();
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("operator did not exit within 10s of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(code, Some(0));
}
