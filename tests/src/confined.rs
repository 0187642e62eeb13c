//! Runs a program the way the chart's node-agent DaemonSet runs the agent on a host: in a mount
//! namespace whose root holds only the image's own files (`/usr`, `/etc`, `/dev`, `/proc`,
//! read-only), the API credentials (the ServiceAccount token a pod gets) and the volumes of the
//! chart's DaemonSet, rendered from the chart with the test's values and mounted where the chart
//! mounts them. A host path the agent reads or writes that the chart does not mount is simply
//! not there, as in the pod.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use k8s_openapi::api::apps::v1::DaemonSet;
use serde_json::{Value, json};

use crate::helm::{chart_dir, template};

/// One volume of the agent's pod, where the chart mounts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Volume {
    /// A host directory (`hostPath`); `create` when the chart asks for `DirectoryOrCreate`.
    Host {
        path: String,
        at: String,
        read_only: bool,
        create: bool,
    },
    /// A scratch directory (`emptyDir`).
    Scratch { at: String },
}

/// The volumes of the node-agent container, from the chart rendered with `node_agent` as
/// its `nodeAgent` values.
pub fn agent_volumes(node_agent: Value) -> anyhow::Result<Vec<Volume>> {
    let rendered = template(
        &chart_dir(),
        "confined",
        "deskvirt-system",
        &json!({ "nodeAgent": node_agent }),
        &[],
        "1.33.0",
    )?;
    let text = rendered
        .iter()
        .find(|(path, _)| path.ends_with("node-agent-daemonset.yaml"))
        .map(|(_, text)| text.clone())
        .context("the chart renders no node-agent DaemonSet")?;
    let ds: DaemonSet = serde_yaml::from_str(&text).context("parsing the DaemonSet")?;
    let pod = ds
        .spec
        .context("DaemonSet spec")?
        .template
        .spec
        .context("pod spec")?;
    let agent = pod.containers.first().context("no container")?;
    let volumes = pod.volumes.unwrap_or_default();
    let mut out = Vec::new();
    for m in agent.volume_mounts.clone().unwrap_or_default() {
        let v = volumes
            .iter()
            .find(|v| v.name == m.name)
            .with_context(|| format!("mount {} has no volume", m.name))?;
        if let Some(h) = &v.host_path {
            out.push(Volume::Host {
                path: h.path.clone(),
                at: m.mount_path.clone(),
                read_only: m.read_only.unwrap_or(false),
                create: h.type_.as_deref() == Some("DirectoryOrCreate"),
            });
        } else if v.empty_dir.is_some() {
            out.push(Volume::Scratch { at: m.mount_path });
        } else {
            anyhow::bail!("volume {} is neither hostPath nor emptyDir", v.name);
        }
    }
    Ok(out)
}

/// Single-quotes `s` for sh.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

/// A command that runs `program` (with the arguments added to it later) confined to
/// `volumes`, the image's files and the files in `credentials` (each at its own path), with
/// its root built under `root`. The command's process is the program's (sh and chroot exec).
pub fn command(
    program: &Path,
    volumes: &[Volume],
    credentials: &[&Path],
    root: &Path,
) -> anyhow::Result<Command> {
    let root_s = quote(path_str(root)?);
    let mut script = vec![
        "set -eu".to_string(),
        format!("r={root_s}"),
        "mkdir -p \"$r\"".into(),
        "mount -t tmpfs -o mode=755 deskvirt-confined \"$r\"".into(),
        // The image: its programs and libraries, /etc, device nodes and /proc; nothing else
        // of the host.
        "for d in usr etc dev proc; do mkdir \"$r/$d\"; done".into(),
        "for d in usr etc; do mount --rbind \"/$d\" \"$r/$d\"; mount -o remount,bind,ro \"$r/$d\"; done".into(),
        "mount --rbind /dev \"$r/dev\"".into(),
        "mount -t proc proc \"$r/proc\"".into(),
        "for l in bin lib lib64 sbin; do ln -s \"usr/$l\" \"$r/$l\"; done".into(),
    ];
    // Parents before children: the scratch /tmp first, then the host directories by depth,
    // then the files (which may lie in either).
    let mut ordered: Vec<&Volume> = volumes.iter().collect();
    ordered.sort_by_key(|v| match v {
        Volume::Scratch { at } => (0, at.len()),
        Volume::Host { at, .. } => (1, at.len()),
    });
    for v in ordered {
        match v {
            Volume::Host {
                path,
                at,
                read_only,
                create,
            } => {
                let (path, at) = (quote(path), quote(at));
                if *create {
                    script.push(format!("mkdir -p {path}"));
                }
                script.push(format!(
                    "mkdir -p \"$r\"{at}; mount --bind {path} \"$r\"{at}"
                ));
                if *read_only {
                    script.push(format!("mount -o remount,bind,ro \"$r\"{at}"));
                }
            }
            Volume::Scratch { at } => {
                let at = quote(at);
                script.push(format!(
                    "mkdir -p \"$r\"{at}; mount -t tmpfs -o size=64m scratch \"$r\"{at}"
                ));
            }
        }
    }
    let mut files: Vec<PathBuf> = vec![program.to_path_buf()];
    files.extend(credentials.iter().map(|c| c.to_path_buf()));
    for f in &files {
        let f = quote(path_str(f)?);
        script.push(format!(
            "mkdir -p \"$r$(dirname {f})\"; touch \"$r\"{f}; mount --bind {f} \"$r\"{f}; mount -o remount,bind,ro \"$r\"{f}"
        ));
    }
    // The root itself is read-only, as the chart's readOnlyRootFilesystem makes it: a write
    // anywhere but the mounts fails here as it would in the pod.
    script.push("mount -o remount,ro \"$r\"".into());
    script.push(format!(
        "exec chroot \"$r\" {} \"$@\"",
        quote(path_str(program)?)
    ));
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(script.join("\n"))
        .arg("confined");
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(quote("a'b"), r"'a'\''b'");
    }
}
