//! What debugfs's answers say (`stat`, `ls -p`, `blocks`, `testb`), read only from their
//! fixed-form parts, and which directory entries' names are reset or may be put into a
//! debugfs request at all.

use std::collections::BTreeMap;

use super::bounded;

/// The inode flag of data kept inline (`EXT4_INLINE_DATA_FL`).
const INLINE_DATA_FL: u32 = 0x1000_0000;

/// A name that may be put into a debugfs request: ASCII letters, digits and `._-+@:,=%~`.
pub(super) fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-+@:,=%~".contains(c))
}

pub(super) fn is_host_key(name: &str) -> bool {
    name.len() > "ssh_host_".len() && name.starts_with("ssh_host_")
}

pub(super) fn is_dhcp_lease(name: &str) -> bool {
    name.ends_with(".leases") || name.ends_with(".lease")
}

pub(super) fn is_nm_lease(name: &str) -> bool {
    name.ends_with(".lease")
}

/// `name` as it may appear in a message: escaped and bounded.
pub(super) fn shown(name: &str) -> String {
    bounded(&name.escape_debug().to_string(), 80)
}

/// What `stat` says is at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Node {
    Absent,
    Dir,
    File(FileInfo),
    /// Any other type, as debugfs names it ("symlink", "FIFO", ...).
    Other(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileInfo {
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) size: u64,
    pub(super) links: u32,
    pub(super) inline: bool,
}

/// Reads `stat`'s output. Only its first lines are read: they have a fixed form, while later
/// ones (extended attributes, symlink targets) carry what the guest wrote.
pub(super) fn parse_stat(out: &str) -> Option<Node> {
    let mut lines = out.lines();
    let first = lines.next()?;
    let words: Vec<&str> = first.split_whitespace().collect();
    if words.first() != Some(&"Inode:") {
        return None;
    }
    let at = |w: &[&str], key: &str| w.iter().position(|x| *x == key);
    let ty_from = at(&words, "Type:")? + 1;
    let ty_to = at(&words, "Mode:")?;
    let ty = words.get(ty_from..ty_to)?.join(" ");
    let flags = words.get(at(&words, "Flags:")? + 1)?;
    let flags = u32::from_str_radix(flags.strip_prefix("0x")?, 16).ok()?;
    match ty.as_str() {
        "directory" => return Some(Node::Dir),
        "regular" => {}
        _ => return Some(Node::Other(ty)),
    }
    let head: Vec<&str> = lines.take(5).flat_map(str::split_whitespace).collect();
    let value = |key: &str| head.get(at(&head, key)? + 1)?.parse::<u64>().ok();
    Some(Node::File(FileInfo {
        uid: u32::try_from(value("User:")?).ok()?,
        gid: u32::try_from(value("Group:")?).ok()?,
        size: value("Size:")?,
        links: u32::try_from(value("Links:")?).ok()?,
        inline: flags & INLINE_DATA_FL != 0,
    }))
}

/// Names in `ls -p`'s output (`/inode/mode/uid/gid/name/size/` a line), without `.` and `..`,
/// and how many lines were not of that form (names holding a line break).
pub(super) fn parse_ls(out: &str) -> (Vec<String>, usize) {
    let mut names = Vec::new();
    let mut odd = 0;
    for line in out.lines().filter(|l| !l.is_empty()) {
        let f: Vec<&str> = line.split('/').collect();
        let good = f.len() == 8
            && f[0].is_empty()
            && f[7].is_empty()
            && f[1].parse::<u64>().is_ok()
            && u32::from_str_radix(f[2], 8).is_ok();
        if !good {
            odd += 1;
        } else if f[5] != "." && f[5] != ".." {
            names.push(f[5].to_string());
        }
    }
    (names, odd)
}

/// Block numbers of `blocks`'s output.
pub(super) fn parse_blocks(out: &str) -> Result<Vec<u64>, String> {
    out.split_whitespace()
        .map(|w| {
            w.parse()
                .map_err(|_| format!("{w:?} is not a block number"))
        })
        .collect()
}

/// Which blocks `testb` says are in use (`Block N marked in use` / `Block N not in use`).
pub(super) fn parse_testb(out: &str) -> BTreeMap<u64, bool> {
    let mut seen = BTreeMap::new();
    for line in out.lines() {
        let Some(rest) = line.strip_prefix("Block ") else {
            continue;
        };
        let Some((n, verdict)) = rest.split_once(' ') else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match verdict.trim() {
            "marked in use" => seen.insert(n, true),
            "not in use" => seen.insert(n, false),
            _ => None,
        };
    }
    seen
}

/// `blocks` sorted, deduplicated, and cut into runs of consecutive numbers `(first, count)`.
pub(super) fn runs(blocks: &[u64]) -> Vec<(u64, u64)> {
    let mut sorted = blocks.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for b in sorted {
        match out.last_mut() {
            Some((first, count)) if *first + *count == b => *count += 1,
            _ => out.push((b, 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_go_into_requests() {
        for good in [
            "ssh_host_ed25519_key",
            "ssh_host_rsa_key.pub",
            "dhclient-6f1c-eth0.lease",
            "internal-0b2a:eth0,x=1%2~.lease",
            "a+b@c",
        ] {
            assert!(safe_name(good), "{good}");
        }
        for bad in [
            "ssh_host_x\"; rm -rf /",
            "ssh_host_x'",
            "ssh_host_a b",
            "ssh_host_a\tb",
            "ssh_host_a\nb",
            "ssh_host_\u{7f}",
            "ssh_host_\u{fffd}",
            "ssh_host_é",
            "a/b",
            "a\\b",
            "<12>",
            "a$b",
            "a;b",
            "",
            ".",
            "..",
            &"a".repeat(256),
        ] {
            assert!(!safe_name(bad), "{bad:?}");
        }
        assert!(
            is_host_key("ssh_host_ecdsa_key")
                && !is_host_key("ssh_host_")
                && !is_host_key("sshd_config")
        );
        assert!(
            is_dhcp_lease("dhclient.eth0.leases")
                && is_dhcp_lease("x.lease")
                && !is_dhcp_lease("leases.txt")
        );
        assert!(is_nm_lease("internal-x-eth0.lease") && !is_nm_lease("x.leases"));
    }

    #[test]
    fn stat_is_read_from_its_fixed_lines_only() {
        let file = "Inode: 14   Type: regular    Mode:  0644   Flags: 0x80000\n\
            Generation: 0    Version: 0x00000000:00000000\n\
            User:  1000   Group:  1001   Project:     0   Size: 33\n\
            File ACL: 0\n\
            Links: 2   Blockcount: 2\n";
        assert_eq!(
            parse_stat(file),
            Some(Node::File(FileInfo {
                uid: 1000,
                gid: 1001,
                size: 33,
                links: 2,
                inline: false
            }))
        );
        let old = "Inode: 14   Type: regular    Mode:  0644   Flags: 0x10000000\n\
            Generation: 0    Version: 0x00000000\n\
            User:     0   Group:     0   Size: 3\n\
            File ACL: 0\n\
            Links: 1   Blockcount: 0\n";
        assert!(matches!(
            parse_stat(old),
            Some(Node::File(FileInfo { inline: true, .. }))
        ));
        // A symlink whose target pretends to be a regular file stays a symlink.
        let link = "Inode: 18   Type: symlink    Mode:  0777   Flags: 0x0\n\
            Fast link dest: \"x\nInode: 1   Type: regular    Mode:  0644   Flags: 0x0\"\n";
        assert_eq!(parse_stat(link), Some(Node::Other("symlink".into())));
        let dev = "Inode: 20   Type: character special    Mode:  0644   Flags: 0x0\n";
        assert_eq!(
            parse_stat(dev),
            Some(Node::Other("character special".into()))
        );
        assert_eq!(
            parse_stat("Inode: 2   Type: directory    Mode:  0755   Flags: 0x80000\n"),
            Some(Node::Dir)
        );
        assert_eq!(parse_stat("something else\n"), None);
        assert_eq!(parse_stat(""), None);
    }

    #[test]
    fn listings_blocks_and_testb_are_parsed() {
        let ls = "/15/040755/0/0/.//\n/12/040755/0/0/..//\n\
            /16/100644/0/0/ssh_host_ed25519_key/3000/\n\
            /14/100644/0/0/ssh_host_new\nline_key/1/\n\
            /19/100644/0/0/sshd_config/8/\n\n";
        let (names, odd) = parse_ls(ls);
        assert_eq!(names, vec!["ssh_host_ed25519_key", "sshd_config"]);
        assert_eq!(odd, 2);
        assert_eq!(
            parse_blocks("1622 1623 1624 \n"),
            Ok(vec![1622, 1623, 1624])
        );
        assert_eq!(parse_blocks(""), Ok(vec![]));
        assert!(parse_blocks("12 x").is_err());
        assert_eq!(runs(&[7, 3, 4, 5, 9, 4]), vec![(3, 3), (7, 1), (9, 1)]);
        let seen = parse_testb(
            "debugfs: testb 1622 2\nBlock 1622 not in use\nBlock 1623 marked in use\nBlock x not in use\n",
        );
        assert_eq!(
            seen.into_iter().collect::<Vec<_>>(),
            vec![(1622, false), (1623, true)]
        );
    }
}
