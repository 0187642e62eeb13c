//! The previous release's binaries, for upgrade tests: built from the project's own git history
//! at [`PREVIOUS_RELEASE`] (no download), once per machine, in a target directory of their own
//! so the current build's binaries are never replaced.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use crate::cluster::repo_root;
use crate::host::run;

/// The last commit before host-side names carried the Desktop UID: domains it defined are named
/// `<namespace>--<name>` and have no disk owner record.
pub const PREVIOUS_RELEASE: &str = "5a48f0969c827a869bc47a3368701b49183b76c8";

/// The previous release's node-agent binary, built on first use (a few minutes on 2 cores:
/// its dependencies compile once into `target/previous-release/`).
pub fn previous_node_agent() -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

fn build() -> anyhow::Result<PathBuf> {
    let root = repo_root();
    let base = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"))
        .join("previous-release");
    let short = &PREVIOUS_RELEASE[..12];
    let bin = base.join("target/debug/deskvirt-node-agent");
    let stamp = base.join(format!("built-{short}"));
    if bin.is_file() && stamp.is_file() {
        return Ok(bin);
    }
    let src = base.join(format!("src-{short}"));
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src)?;
    let archive = base.join(format!("{short}.tar"));
    run(
        "git archive of the previous release",
        Command::new("git")
            .current_dir(&root)
            .args(["archive", "--format=tar", "-o"])
            .arg(&archive)
            .arg(PREVIOUS_RELEASE),
    )?;
    run(
        "unpacking the previous release",
        Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(&src),
    )?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(
        "cargo build of the previous release's node-agent",
        Command::new(cargo)
            .current_dir(&src)
            .args(["build", "--locked", "-p", "deskvirt-node-agent", "--bin"])
            .arg("deskvirt-node-agent")
            .env("CARGO_TARGET_DIR", base.join("target"))
            .env("CARGO_INCREMENTAL", "0"),
    )?;
    std::fs::write(&stamp, PREVIOUS_RELEASE)?;
    let _ = std::fs::remove_dir_all(&src);
    let _ = std::fs::remove_file(&archive);
    anyhow::ensure!(bin.is_file(), "{} was not built", bin.display());
    Ok(bin)
}
