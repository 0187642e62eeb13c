//! Running `debugfs` and `sfdisk`: each run within its deadline (killed past it), and what a
//! debugfs run printed turned into an answer or an error naming the command.

use std::ffi::OsStr;
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::fs::Fs;
use super::{SealError, bounded};

/// Longest stderr kept in an error.
const STDERR_CHARS: usize = 500;

impl Fs<'_> {
    /// One read-only request (`debugfs -R`): its stdout and its complaints. A file system
    /// debugfs cannot open is an error here (debugfs still exits 0).
    pub(super) async fn request(&self, request: &str) -> Result<(String, String), SealError> {
        let args = [
            OsStr::new("-R"),
            OsStr::new(request),
            self.device.as_os_str(),
        ];
        let command = format!("{} -R \"{request}\"", self.tools.debugfs);
        let out = run(
            &self.tools.debugfs,
            &args,
            None,
            self.tools.timeout,
            &command,
            Some(self.offset),
        )
        .await?;
        self.answer(command, out)
    }

    /// Several requests in one run (`debugfs [-w] -f -`, fed on stdin).
    pub(super) async fn batch(
        &self,
        write: bool,
        requests: &[String],
    ) -> Result<(String, String), SealError> {
        let mut args = Vec::new();
        if write {
            args.push(OsStr::new("-w"));
        }
        args.extend([OsStr::new("-f"), OsStr::new("-"), self.device.as_os_str()]);
        let command = describe(&self.tools.debugfs, write, requests);
        let mut input = requests.join("\n");
        input.push('\n');
        let out = run(
            &self.tools.debugfs,
            &args,
            Some(input),
            self.tools.timeout,
            &command,
            Some(self.offset),
        )
        .await?;
        self.answer(command, out)
    }

    fn answer(&self, command: String, out: Output) -> Result<(String, String), SealError> {
        let errs = complaints(&out.stderr);
        let unopened = [
            "while trying to open",
            "Filesystem not open",
            "while opening",
        ];
        if !out.status.success() || unopened.iter().any(|u| errs.contains(u)) {
            let errs = if errs.is_empty() {
                format!("exited with {}", out.status)
            } else {
                errs
            };
            return Err(self.failed_cmd(command, errs));
        }
        Ok((String::from_utf8_lossy(&out.stdout).into_owned(), errs))
    }

    pub(super) fn failed(&self, request: &str, stderr: String) -> SealError {
        let command = format!("{} -R \"{request}\"", self.tools.debugfs);
        let stderr = if stderr.is_empty() {
            "no output".into()
        } else {
            stderr
        };
        self.failed_cmd(command, stderr)
    }

    pub(super) fn failed_cmd(&self, command: String, stderr: String) -> SealError {
        SealError::Failed {
            command,
            offset: Some(self.offset),
            stderr,
        }
    }

    pub(super) fn unexpected(&self, request: &str, detail: String) -> SealError {
        SealError::Unexpected {
            command: format!("{} -R \"{request}\"", self.tools.debugfs),
            offset: Some(self.offset),
            detail,
        }
    }
}

/// A batch run as errors name it: its first request and how many follow.
pub(super) fn describe(debugfs: &str, write: bool, requests: &[String]) -> String {
    let flags = if write { "-w -f -" } else { "-f -" };
    let first = requests.first().map(String::as_str).unwrap_or_default();
    match requests.len() {
        0 | 1 => format!("{debugfs} {flags} ({first})"),
        n => format!("{debugfs} {flags} ({first}, and {} more requests)", n - 1),
    }
}

/// What a tool wrote on stderr, without debugfs's version banner, on one line, bounded.
fn complaints(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !is_banner(l))
        .collect();
    bounded(&lines.join("; "), STDERR_CHARS)
}

/// `debugfs 1.47.0 (5-Feb-2023)`.
fn is_banner(line: &str) -> bool {
    line.strip_prefix("debugfs ")
        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
}

/// Runs `program` with `args` (and `input` on stdin) within `limit`; at the deadline the
/// process is killed. The C locale keeps messages in the form parsed here.
pub(super) async fn run(
    program: &str,
    args: &[&OsStr],
    input: Option<String>,
    limit: Duration,
    command: &str,
    offset: Option<u64>,
) -> Result<Output, SealError> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env("LC_ALL", "C")
        .env("DEBUGFS_PAGER", "__none__")
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let spawn_failed = |source| SealError::Spawn {
        command: command.to_string(),
        source,
    };
    let work = async {
        let mut child = cmd.spawn().map_err(spawn_failed)?;
        let stdin = child.stdin.take();
        let feed = async move {
            if let (Some(mut stdin), Some(text)) = (stdin, input) {
                // A tool that stops reading early closes the pipe; its stderr says why.
                let _ = stdin.write_all(text.as_bytes()).await;
            }
        };
        // Fed while its output is read, so a long batch cannot fill both pipes.
        let ((), out) = tokio::join!(feed, child.wait_with_output());
        out.map_err(spawn_failed)
    };
    // Dropping `work` at the deadline drops the child, which kills it.
    tokio::time::timeout(limit, work)
        .await
        .map_err(|_| SealError::Timeout {
            command: command.to_string(),
            offset,
            secs: limit.as_secs(),
        })?
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    const MIB: u64 = 1 << 20;

    #[tokio::test]
    async fn a_run_past_its_deadline_is_killed_and_named() {
        let started = Instant::now();
        let got = run(
            "sleep",
            &[OsStr::new("10")],
            Some("fed\n".into()),
            Duration::from_millis(200),
            "debugfs -R \"stat /etc\"",
            Some(MIB),
        )
        .await;
        assert!(started.elapsed() < Duration::from_secs(5));
        match got {
            Err(e @ SealError::Timeout { .. }) => {
                assert_eq!(
                    e.to_string(),
                    "debugfs -R \"stat /etc\" did not finish within 0s on the file system at byte 1048576"
                );
                assert_eq!(e.category(), "ToolTimeout");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn complaints_drop_the_banner_and_stay_short() {
        assert_eq!(complaints(b"debugfs 1.47.0 (5-Feb-2023)\n"), "");
        assert_eq!(
            complaints(
                b"debugfs 1.47.0 (5-Feb-2023)\n/x: File not found by ext2_lookup \n\nrm: oops\n"
            ),
            "/x: File not found by ext2_lookup; rm: oops"
        );
        assert_eq!(complaints(&vec![b'e'; 2000]).chars().count(), STDERR_CHARS);
        assert_eq!(
            describe("debugfs", true, &["rm /a".into(), "rm /b".into()]),
            "debugfs -w -f - (rm /a, and 1 more requests)"
        );
    }
}
