//! `kubectl` against the cluster under test, the way a user runs it.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use anyhow::Context;

use crate::cluster::kubeconfig_path;

/// What a kubectl run printed.
#[derive(Debug)]
pub struct Run {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

fn finish(out: Output) -> Run {
    Run {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `kubectl <args>`, optionally feeding `stdin`.
pub fn kubectl(args: &[&str], stdin: Option<&str>) -> anyhow::Result<Run> {
    let mut cmd = Command::new("kubectl");
    cmd.env("KUBECONFIG", kubeconfig_path()?)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("spawning kubectl")?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())?;
    }
    Ok(finish(child.wait_with_output()?))
}
