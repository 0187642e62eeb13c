//! One ext2/3/4 file system of the image: which of its files are reset or left alone (and
//! why), the debugfs changes that reset them, and the zeroing of the blocks they freed.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::io::SeekFrom;
use std::path::Path;

use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use super::parse::{Node, parse_blocks, parse_ls, parse_stat, parse_testb, runs, safe_name, shown};
use super::run::describe;
use super::table::Superblock;
use super::{FIXED, LISTED, MACHINE_ID, MAX_FILES, SealError, Sealed, Tools, bounded};

/// A file to reset.
#[derive(Debug)]
struct Target {
    path: String,
    blocks: Vec<u64>,
}

/// One ext2/3/4 file system of the image, and how to reach it with debugfs.
pub(super) struct Fs<'a> {
    pub(super) tools: &'a Tools,
    pub(super) raw: &'a Path,
    pub(super) device: OsString,
    pub(super) offset: u64,
    pub(super) end: u64,
    pub(super) sb: Superblock,
    /// Put before paths in reports ("partition 2: ", or nothing).
    pub(super) prefix: String,
}

impl Fs<'_> {
    /// Looks, then removes and empties, then zeroes what was freed.
    pub(super) async fn seal(&self, sealed: &mut Sealed) -> Result<(), SealError> {
        let mut dirs = HashMap::new();
        let mut machine_id = None;
        let mut removals = Vec::new();

        if self.is_dir("/etc", &mut dirs, sealed).await? {
            match self.stat(MACHINE_ID).await? {
                Node::File(info) => machine_id = Some((self.target(MACHINE_ID).await?, info)),
                Node::Absent => {}
                other => self.leave(sealed, MACHINE_ID, &other),
            }
        }
        for path in FIXED {
            let parent = path.rsplit_once('/').map_or("/", |(p, _)| p);
            if !self.is_dir(parent, &mut dirs, sealed).await? {
                continue;
            }
            match self.stat(path).await? {
                Node::File(_) => removals.push(self.target(path).await?),
                Node::Absent => {}
                other => self.leave(sealed, path, &other),
            }
        }
        for (dir, wanted) in LISTED {
            if !self.is_dir(dir, &mut dirs, sealed).await? {
                continue;
            }
            let (mut names, odd) = self.list(dir).await?;
            if odd > 0 {
                sealed.skipped.push(format!(
                    "{}{dir}: {odd} listing lines of names holding line breaks",
                    self.prefix
                ));
            }
            names.retain(|n| wanted(n));
            names.sort();
            if names.len() > MAX_FILES {
                return Err(SealError::TooManyFiles {
                    offset: self.offset,
                    dir: dir.into(),
                    limit: MAX_FILES,
                });
            }
            for name in names {
                if !safe_name(&name) {
                    sealed.skipped.push(format!(
                        "{}{dir}/{}: a name never put into a debugfs request",
                        self.prefix,
                        shown(&name)
                    ));
                    continue;
                }
                let path = format!("{dir}/{name}");
                match self.stat(&path).await? {
                    Node::File(_) => removals.push(self.target(&path).await?),
                    Node::Absent => {}
                    other => self.leave(sealed, &path, &other),
                }
            }
        }

        let mut requests = Vec::new();
        if let Some((target, info)) = &machine_id {
            let p = &target.path;
            if info.inline {
                // Punching inline data leaves a flag without its attribute (e2fsck objects):
                // a new empty file replaces it instead.
                requests.push(format!("rm {p}"));
                requests.push(format!("write /dev/null {p}"));
            } else {
                requests.push(format!("punch {p} 0"));
                requests.push(format!("sif {p} size 0"));
            }
            requests.push(format!("sif {p} mode 0100444"));
            requests.push(format!("sif {p} uid 0"));
            requests.push(format!("sif {p} gid 0"));
            tracing::debug!(
                size = info.size,
                links = info.links,
                uid = info.uid,
                gid = info.gid,
                "emptying {p}"
            );
        }
        for target in &removals {
            requests.push(format!("rm {}", target.path));
        }
        if requests.is_empty() {
            return Ok(());
        }
        self.change(&requests).await?;

        let targets: Vec<&Target> = machine_id.iter().map(|(t, _)| t).chain(&removals).collect();
        let all: Vec<u64> = targets
            .iter()
            .flat_map(|t| t.blocks.iter().copied())
            .collect();
        let in_use = self.in_use(&all).await?;
        let free: Vec<u64> = all
            .iter()
            .copied()
            .filter(|b| in_use.get(b) == Some(&false))
            .collect();
        self.zero(&free).await?;
        for target in targets {
            sealed.reset.push(format!("{}{}", self.prefix, target.path));
            let kept = target
                .blocks
                .iter()
                .filter(|b| in_use.get(b) != Some(&false))
                .count();
            if kept > 0 {
                sealed.skipped.push(format!(
                    "{}{}: {kept} of its blocks are still in use (another name links them), not zeroed",
                    self.prefix, target.path
                ));
            }
        }
        Ok(())
    }

    /// Whether `path` and every directory above it are plain directories; what is not, is
    /// reported once.
    async fn is_dir(
        &self,
        path: &str,
        seen: &mut HashMap<String, bool>,
        sealed: &mut Sealed,
    ) -> Result<bool, SealError> {
        let mut at = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            at.push('/');
            at.push_str(part);
            let ok = match seen.get(&at) {
                Some(ok) => *ok,
                None => {
                    let node = self.stat(&at).await?;
                    match &node {
                        Node::Dir | Node::Absent => {}
                        Node::File(_) => sealed.skipped.push(format!(
                            "{}{at}: a regular file, not a directory",
                            self.prefix
                        )),
                        Node::Other(ty) => sealed
                            .skipped
                            .push(format!("{}{at}: {ty}, not followed", self.prefix)),
                    }
                    let ok = node == Node::Dir;
                    seen.insert(at.clone(), ok);
                    ok
                }
            };
            if !ok {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn leave(&self, sealed: &mut Sealed, path: &str, node: &Node) {
        let what = match node {
            Node::Dir => "directory",
            Node::Other(ty) => ty.as_str(),
            Node::File(_) | Node::Absent => return,
        };
        sealed
            .skipped
            .push(format!("{}{path}: {what}, left alone", self.prefix));
    }

    /// A file to reset, with its blocks (all inside the file system).
    async fn target(&self, path: &str) -> Result<Target, SealError> {
        let request = format!("blocks {path}");
        let (out, errs) = self.request(&request).await?;
        if !errs.is_empty() {
            return Err(self.failed(&request, errs));
        }
        let blocks = parse_blocks(&out).map_err(|detail| self.unexpected(&request, detail))?;
        let bs = self.sb.block_size;
        for &block in &blocks {
            let inside = block < self.sb.blocks
                && block
                    .checked_add(1)
                    .and_then(|b| b.checked_mul(bs))
                    .and_then(|b| b.checked_add(self.offset))
                    .is_some_and(|end| end <= self.end);
            if !inside {
                return Err(SealError::BlockOutside {
                    offset: self.offset,
                    path: path.into(),
                    block,
                });
            }
        }
        Ok(Target {
            path: path.into(),
            blocks,
        })
    }

    async fn stat(&self, path: &str) -> Result<Node, SealError> {
        let request = format!("stat {path}");
        let (out, errs) = self.request(&request).await?;
        if out.trim().is_empty() {
            if errs.contains("File not found by ext2_lookup") {
                return Ok(Node::Absent);
            }
            return Err(self.failed(&request, errs));
        }
        parse_stat(&out).ok_or_else(|| self.unexpected(&request, bounded(&out, 200)))
    }

    async fn list(&self, dir: &str) -> Result<(Vec<String>, usize), SealError> {
        let request = format!("ls -p {dir}");
        let (out, errs) = self.request(&request).await?;
        if !errs.is_empty() {
            return Err(self.failed(&request, errs));
        }
        Ok(parse_ls(&out))
    }

    /// Which of `blocks` the file system uses.
    async fn in_use(&self, blocks: &[u64]) -> Result<BTreeMap<u64, bool>, SealError> {
        if blocks.is_empty() {
            return Ok(BTreeMap::new());
        }
        let requests: Vec<String> = runs(blocks)
            .into_iter()
            .map(|(first, count)| format!("testb {first} {count}"))
            .collect();
        let (out, errs) = self.batch(false, &requests).await?;
        let command = describe(&self.tools.debugfs, false, &requests);
        if !errs.is_empty() {
            return Err(self.failed_cmd(command, errs));
        }
        let seen = parse_testb(&out);
        match blocks.iter().find(|b| !seen.contains_key(b)) {
            Some(b) => Err(SealError::Unexpected {
                command,
                offset: Some(self.offset),
                detail: format!("no answer for block {b}"),
            }),
            None => Ok(seen),
        }
    }

    /// Runs the changing `requests` in one debugfs run.
    async fn change(&self, requests: &[String]) -> Result<(), SealError> {
        let (_, errs) = self.batch(true, requests).await?;
        if !errs.is_empty() {
            return Err(self.failed_cmd(describe(&self.tools.debugfs, true, requests), errs));
        }
        Ok(())
    }

    /// Overwrites `blocks` (free ones) with zeros in the image, and syncs it.
    async fn zero(&self, blocks: &[u64]) -> Result<(), SealError> {
        if blocks.is_empty() {
            return Ok(());
        }
        let io = |source| SealError::Io {
            action: "zero freed blocks of",
            path: self.raw.to_path_buf(),
            source,
        };
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .open(self.raw)
            .await
            .map_err(io)?;
        let bs = self.sb.block_size;
        let zeros = vec![0u8; usize::try_from(bs).unwrap_or(65536)];
        for (first, count) in runs(blocks) {
            // Inside the file system: checked when the blocks were read.
            file.seek(SeekFrom::Start(self.offset + first * bs))
                .await
                .map_err(io)?;
            for _ in 0..count {
                file.write_all(&zeros).await.map_err(io)?;
            }
        }
        file.flush().await.map_err(io)?;
        file.sync_all().await.map_err(io)
    }
}
