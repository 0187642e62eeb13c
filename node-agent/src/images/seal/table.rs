//! Where the file systems of a disk image start and end: its partition table (as `sfdisk`
//! reports it, or the whole disk when it has none), and what each one's ext2/3/4 superblock
//! says (block size, block count, a journal still to replay).

use std::ffi::OsStr;
use std::io::SeekFrom;
use std::path::Path;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::run::run;
use super::{SealError, Tools};

/// The superblock's magic number.
const EXT_MAGIC: u16 = 0xEF53;
/// `s_feature_incompat` bits.
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_64BIT: u32 = 0x80;

/// A place a file system may start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Candidate {
    /// "partition N" or "whole disk".
    pub(super) name: String,
    /// Its first byte in the image.
    pub(super) offset: u64,
    /// The byte after its last one (bounded by the image's length).
    pub(super) end: u64,
}

/// The partitions `sfdisk --json` reports, or `None` when it finds no table.
pub(super) async fn partitions(
    raw: &Path,
    tools: &Tools,
    len: u64,
) -> Result<Option<Vec<Candidate>>, SealError> {
    let command = format!("{} --json", tools.sfdisk);
    let args = [OsStr::new("--json"), OsStr::new("--"), raw.as_os_str()];
    let out = run(&tools.sfdisk, &args, None, tools.timeout, &command, None).await?;
    if !out.status.success() || out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    parse_table(&out.stdout, len)
        .map(Some)
        .map_err(|detail| SealError::Unexpected {
            command,
            offset: None,
            detail,
        })
}

/// The partitions of `sfdisk --json`'s output, for an image of `len` bytes.
fn parse_table(json: &[u8], len: u64) -> Result<Vec<Candidate>, String> {
    let v: Value = serde_json::from_slice(json).map_err(|e| format!("not JSON: {e}"))?;
    let table = v
        .get("partitiontable")
        .ok_or("no \"partitiontable\" object")?;
    let sector = table
        .get("sectorsize")
        .and_then(Value::as_u64)
        .unwrap_or(512);
    if !(512..=65536).contains(&sector) {
        return Err(format!("sector size {sector}"));
    }
    let empty = Vec::new();
    let parts = table
        .get("partitions")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    let mut out = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        let field = |name: &str| {
            p.get(name)
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("partition {} has no {name}", i + 1))
        };
        let (start, size) = (field("start")?, field("size")?);
        let number = p
            .get("node")
            .and_then(Value::as_str)
            .and_then(trailing_number)
            .unwrap_or(i + 1);
        let offset = start
            .checked_mul(sector)
            .ok_or_else(|| format!("partition {number} starts past any disk"))?;
        let end = size
            .checked_mul(sector)
            .and_then(|s| s.checked_add(offset))
            .ok_or_else(|| format!("partition {number} ends past any disk"))?;
        if size == 0 {
            continue;
        }
        out.push(Candidate {
            name: format!("partition {number}"),
            offset,
            end: end.min(len),
        });
    }
    Ok(out)
}

/// The number `node` ends with (`disk.raw1` → 1, `/dev/loop0p12` → 12).
fn trailing_number(node: &str) -> Option<usize> {
    let digits = node.len() - node.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    node.get(node.len() - digits..)?.parse().ok()
}

/// What the superblock of an ext2/3/4 file system says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Superblock {
    /// Bytes per block.
    pub(super) block_size: u64,
    /// Blocks of the file system.
    pub(super) blocks: u64,
    /// The journal holds changes not yet written.
    pub(super) needs_recovery: bool,
    /// An external journal, not a file system.
    pub(super) journal_dev: bool,
}

/// The superblock of the candidate, if it holds an ext2/3/4 file system.
pub(super) async fn read_superblock(
    raw: &Path,
    c: &Candidate,
) -> Result<Option<Superblock>, SealError> {
    let at = c.offset.saturating_add(1024);
    if at.saturating_add(1024) > c.end {
        return Ok(None);
    }
    let io = |source| SealError::Io {
        action: "read the superblock of",
        path: raw.to_path_buf(),
        source,
    };
    let mut file = tokio::fs::File::open(raw).await.map_err(io)?;
    file.seek(SeekFrom::Start(at)).await.map_err(io)?;
    let mut bytes = [0u8; 1024];
    file.read_exact(&mut bytes).await.map_err(io)?;
    Ok(parse_superblock(&bytes))
}

/// Reads an ext2/3/4 superblock (the 1024 bytes at byte 1024 of the file system).
fn parse_superblock(b: &[u8]) -> Option<Superblock> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?));
    if u16_at(56)? != EXT_MAGIC {
        return None;
    }
    let log = u32_at(24)?;
    if log > 6 {
        // Blocks of more than 64 KiB: not an ext file system Linux mounts.
        return None;
    }
    let incompat = u32_at(96)?;
    let mut blocks = u64::from(u32_at(4)?);
    if incompat & INCOMPAT_64BIT != 0 {
        blocks |= u64::from(u32_at(0x150)?) << 32;
    }
    Some(Superblock {
        block_size: 1024 << log,
        blocks,
        needs_recovery: incompat & INCOMPAT_RECOVER != 0,
        journal_dev: incompat & INCOMPAT_JOURNAL_DEV != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn partition_tables_give_byte_offsets() {
        let dos =
            br#"{"partitiontable": {"label": "dos", "device": "/tmp/x 1.raw", "unit": "sectors",
            "sectorsize": 512, "partitions": [
            {"node": "/tmp/x 1.raw1", "start": 2048, "size": 16384, "type": "83"},
            {"node": "/tmp/x 1.raw2", "start": 18432, "size": 0, "type": "5"},
            {"node": "/tmp/x 1.raw5", "start": 20480, "size": 40000, "type": "83"}]}}"#;
        assert_eq!(
            parse_table(dos, 16 * MIB),
            Ok(vec![
                Candidate {
                    name: "partition 1".into(),
                    offset: MIB,
                    end: 9 * MIB
                },
                Candidate {
                    name: "partition 5".into(),
                    offset: 20480 * 512,
                    end: 16 * MIB
                },
            ])
        );
        let gpt = br#"{"partitiontable": {"label": "gpt", "partitions": [
            {"node": "disk", "start": 34, "size": 10}]}}"#;
        assert_eq!(
            parse_table(gpt, MIB),
            Ok(vec![Candidate {
                name: "partition 1".into(),
                offset: 34 * 512,
                end: 44 * 512
            }])
        );
        let wide =
            br#"{"partitiontable": {"sectorsize": 4096, "partitions": [{"start": 256, "size": 1}]}}"#;
        assert_eq!(parse_table(wide, MIB).map(|p| p[0].offset), Ok(MIB));
        assert_eq!(
            parse_table(br#"{"partitiontable": {"label": "gpt"}}"#, MIB),
            Ok(vec![])
        );
        assert!(parse_table(b"nope", MIB).is_err());
        assert!(
            parse_table(
                br#"{"partitiontable": {"partitions": [{"start": 1}]}}"#,
                MIB
            )
            .is_err()
        );
        assert!(parse_table(br#"{"partitiontable": {"sectorsize": 0}}"#, MIB).is_err());
        let huge = format!(
            r#"{{"partitiontable": {{"partitions": [{{"start": {}, "size": 1}}]}}}}"#,
            u64::MAX
        );
        assert!(parse_table(huge.as_bytes(), MIB).is_err());
        assert_eq!(trailing_number("/dev/loop0p12"), Some(12));
        assert_eq!(trailing_number("disk"), None);
    }

    #[test]
    fn superblocks_are_read_from_their_bytes() {
        let mut sb = vec![0u8; 1024];
        assert_eq!(parse_superblock(&sb), None);
        sb[56..58].copy_from_slice(&0xEF53u16.to_le_bytes());
        sb[24..28].copy_from_slice(&2u32.to_le_bytes());
        sb[4..8].copy_from_slice(&2048u32.to_le_bytes());
        assert_eq!(
            parse_superblock(&sb),
            Some(Superblock {
                block_size: 4096,
                blocks: 2048,
                needs_recovery: false,
                journal_dev: false
            })
        );
        sb[96..100].copy_from_slice(&(INCOMPAT_64BIT | INCOMPAT_RECOVER).to_le_bytes());
        sb[0x150..0x154].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(
            parse_superblock(&sb),
            Some(Superblock {
                block_size: 4096,
                blocks: (1 << 32) + 2048,
                needs_recovery: true,
                journal_dev: false
            })
        );
        sb[24..28].copy_from_slice(&7u32.to_le_bytes());
        assert_eq!(parse_superblock(&sb), None, "blocks of 128 KiB");
        assert_eq!(parse_superblock(&sb[..100]), None);
    }
}
