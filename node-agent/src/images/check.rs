//! Decides whether a file is an image desktops may be cloned from: `qemu-img info` with the
//! format given (qcow2, never probed) must take it, and it must stand alone, naming neither a
//! backing file nor an external data file (either would make every clone read a file of the
//! host). `qemu-img info` opens neither of them.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tokio::process::Command;

use super::error::CopyError;

/// What the check learnt of a good image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Qcow2 {
    /// The size of the disk it holds.
    pub virtual_bytes: u64,
}

/// Runs `qemu-img info -f qcow2 --output=json file` within `limit` and judges its answer.
pub async fn qcow2(qemu_img: &str, file: &Path, limit: Duration) -> Result<Qcow2, CopyError> {
    // Dropping the future at the deadline kills the child.
    let run = Command::new(qemu_img)
        .args(["info", "-f", "qcow2", "--output=json"])
        .arg(file)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(limit, run)
        .await
        .map_err(|_| CopyError::Check(format!("no answer within {}s", limit.as_secs())))?
        .map_err(|e| CopyError::Check(format!("cannot run {qemu_img}: {e}")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(CopyError::NotAnImage(last_line(&stderr)));
    }
    parse_info(&out.stdout)
}

/// The last non-empty line of `text`, trimmed to a status message's size.
fn last_line(text: &str) -> String {
    let line = text
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("qemu-img refused it");
    line.chars().take(300).collect()
}

/// Judges the JSON of `qemu-img info`.
pub fn parse_info(json: &[u8]) -> Result<Qcow2, CopyError> {
    let info: Value = serde_json::from_slice(json)
        .map_err(|e| CopyError::Check(format!("qemu-img info did not print JSON: {e}")))?;
    if info.get("format").and_then(Value::as_str) != Some("qcow2") {
        return Err(CopyError::NotAnImage(
            "qemu-img did not read it as qcow2".into(),
        ));
    }
    let named = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let backing =
        named(info.get("backing-filename")).or_else(|| named(info.get("full-backing-filename")));
    if let Some(name) = backing {
        return Err(CopyError::HasBackingFile {
            what: "the backing file",
            name,
        });
    }
    let data_file = info
        .get("format-specific")
        .and_then(|f| f.get("data"))
        .and_then(|d| d.get("data-file"));
    if let Some(name) = named(data_file) {
        return Err(CopyError::HasBackingFile {
            what: "the external data file",
            name,
        });
    }
    let virtual_bytes = info
        .get("virtual-size")
        .and_then(Value::as_u64)
        .ok_or_else(|| CopyError::NotAnImage("qemu-img reports no virtual size".into()))?;
    Ok(Qcow2 { virtual_bytes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<Qcow2, CopyError> {
        parse_info(v.to_string().as_bytes())
    }

    #[test]
    fn a_standalone_qcow2_passes() {
        let got = parse(json!({"format": "qcow2", "virtual-size": 1048576,
            "format-specific": {"type": "qcow2", "data": {"compat": "1.1"}}}));
        assert_eq!(
            got.ok(),
            Some(Qcow2 {
                virtual_bytes: 1048576
            })
        );
    }

    #[test]
    fn backing_and_data_files_are_refused() {
        let got = parse(json!({"format": "qcow2", "virtual-size": 1,
            "backing-filename": "/etc/shadow"}));
        assert!(
            matches!(got, Err(CopyError::HasBackingFile { .. })),
            "{got:?}"
        );
        let got = parse(json!({"format": "qcow2", "virtual-size": 1,
            "format-specific": {"type": "qcow2", "data": {"data-file": "nbd://x"}}}));
        assert!(
            matches!(got, Err(CopyError::HasBackingFile { .. })),
            "{got:?}"
        );
        let got = parse(json!({"format": "raw", "virtual-size": 1}));
        assert!(matches!(got, Err(CopyError::NotAnImage(_))), "{got:?}");
        assert!(matches!(parse_info(b"not json"), Err(CopyError::Check(_))));
    }

    #[test]
    fn refusals_say_the_last_line() {
        assert_eq!(
            last_line("qemu-img: Could not open 'x': Image is not in qcow2 format\n\n"),
            "qemu-img: Could not open 'x': Image is not in qcow2 format"
        );
        assert_eq!(last_line(""), "qemu-img refused it");
    }
}
