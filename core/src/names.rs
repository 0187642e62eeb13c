//! Decides how names tenants and admins choose become names elsewhere: a Kubernetes label value
//! (unchanged when valid, otherwise a readable prefix and a hash, so any Desktop, pool or host
//! name up to 253 characters can be selected by label) and a desktop's libvirt domain name
//! (unique per Desktop: it carries the UID). Shared by the agent, the tests and the tools.

/// 64-bit FNV-1a: small, dependency-free and stable across releases and platforms. MACs, IPs,
/// host-side names and label values are derived with it, so it must never change.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(PRIME)
    })
}

/// Longest label value Kubernetes accepts.
pub const MAX_LABEL_VALUE: usize = 63;

/// Whether `v` is a valid label value: at most 63 characters of `[A-Za-z0-9._-]`, beginning and
/// ending with an alphanumeric character (or empty).
pub fn is_label_value(v: &str) -> bool {
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    v.is_empty()
        || (v.len() <= MAX_LABEL_VALUE
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && alnum(v.chars().next())
            && alnum(v.chars().last()))
}

/// The label value standing for `name`: `name` itself when it is a valid label value, else the
/// first characters of it that are, `-` and 16 hex digits of its FNV-1a hash (63 characters at
/// most). Deterministic, so every component computes the same value from the same name; two
/// names that differ map to different values unless their 64-bit hashes collide. Compare the
/// full name (in status or spec) after selecting by label.
pub fn label_value(name: &str) -> String {
    if is_label_value(name) {
        return name.to_string();
    }
    let hash = format!("{:016x}", fnv1a64(name.as_bytes()));
    let room = MAX_LABEL_VALUE - hash.len() - 1;
    let prefix: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(room)
        .collect();
    let prefix = prefix.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
    if prefix.is_empty() {
        hash
    } else {
        format!("{prefix}-{hash}")
    }
}

/// Longest name a release before the UID suffix gave a domain.
const MAX_LEGACY_DOMAIN_NAME: usize = 63;

/// Separator between namespace, name and UID in a domain name.
const SEPARATOR: &str = "--";

/// Whether `c` may appear in a host-side name as is: safe in file names, shells and URLs.
pub fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// `value` if it is short and made of safe characters only; otherwise a readable prefix of its
/// safe characters, a dash and the FNV-1a hash of the whole value, `max` characters at most.
pub fn safe_or_hashed(value: &str, max: usize) -> String {
    if !value.is_empty() && value.len() <= max && value.chars().all(is_name_char) {
        return value.to_string();
    }
    let hash = format!("{:016x}", fnv1a64(value.as_bytes()));
    let room = max.saturating_sub(hash.len() + 1);
    let prefix: String = value
        .chars()
        .filter(|c| is_name_char(*c))
        .take(room)
        .collect();
    if prefix.is_empty() {
        hash
    } else {
        format!("{prefix}-{hash}")
    }
}

/// Longest domain name we generate: the readable part, the separator and a UID.
pub const MAX_DESKTOP_DOMAIN_NAME: usize = READABLE + SEPARATOR.len() + 36;

/// Longest readable part (namespace and name) of a domain name; the Desktop UID follows it.
const READABLE: usize = 40;

/// The libvirt domain name of a desktop: `<namespace>--<name>--<uid>`, the readable part cut
/// to [`READABLE`] characters of ASCII letters, digits, `-`, `_` and `.`. The UID makes it
/// unique per Desktop whatever names tenants pick (`a--x` in `team` and `x` in `team--a` once
/// both became `team--a--x`); the prefix keeps `virsh list` readable. Deterministic, so the
/// agent finds the same domain again after a restart. Disk, save image and serial log are
/// named after it.
pub fn domain_name(namespace: &str, name: &str, uid: &str) -> String {
    let readable: String = format!("{namespace}{SEPARATOR}{name}")
        .chars()
        .filter(|c| is_name_char(*c))
        .take(READABLE)
        .collect();
    let uid = safe_or_hashed(&uid.to_ascii_lowercase(), 36);
    format!("{readable}{SEPARATOR}{uid}")
}

/// The domain name releases before the UID suffix gave a desktop (`<namespace>--<name>`, or a
/// prefix and a hash when long). Only for reading: such a domain is found by its `<uuid>` and
/// adopted under the name it has; nothing new is ever given this name.
pub fn legacy_domain_name(namespace: &str, name: &str) -> String {
    safe_or_hashed(
        &format!("{namespace}{SEPARATOR}{name}"),
        MAX_LEGACY_DOMAIN_NAME,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn valid_values_stay_as_they_are() {
        assert_eq!(label_value("host-1"), "host-1");
        assert_eq!(label_value(&"a".repeat(63)), "a".repeat(63));
    }

    #[test]
    fn long_and_odd_names_become_valid_distinct_values() {
        for name in [
            "a".repeat(64),
            "b".repeat(253),
            "node.example.org-".into(),
            "-x".into(),
            "..".into(),
            format!("{}.{}", "c".repeat(62), "d".repeat(62)),
        ] {
            let v = label_value(&name);
            assert!(is_label_value(&v), "{name} → {v}");
            assert_eq!(v, label_value(&name), "deterministic");
        }
        assert_ne!(label_value(&"a".repeat(64)), label_value(&"a".repeat(65)));
        assert!(label_value(&"b".repeat(253)).starts_with("bbbb"));
    }

    const UID: &str = "0b7e9a4c-1111-4222-8333-444455556666";

    #[test]
    fn names_are_readable_and_carry_the_uid() {
        assert_eq!(
            domain_name("team-a", "alice", UID),
            format!("team-a--alice--{UID}")
        );
    }

    #[test]
    fn names_tenants_pick_never_collide() {
        // The collision the old scheme had: `a--x` in `team` and `x` in `team--a`.
        let other = "9f2c1d3e-aaaa-4bbb-8ccc-ddddeeeeffff";
        assert_eq!(
            legacy_domain_name("team", "a--x"),
            legacy_domain_name("team--a", "x")
        );
        assert_ne!(
            domain_name("team", "a--x", UID),
            domain_name("team--a", "x", other)
        );
    }

    #[test]
    fn long_names_fit() {
        let a = domain_name(&"n".repeat(63), &"x".repeat(253), UID);
        assert!(a.len() <= MAX_DESKTOP_DOMAIN_NAME, "{a}");
        assert!(a.starts_with("nnn") && a.ends_with(UID));
        let legacy = legacy_domain_name("ns", &"x".repeat(80));
        assert_eq!(legacy.len(), MAX_LEGACY_DOMAIN_NAME);
        assert_eq!(legacy, legacy_domain_name("ns", &"x".repeat(80)));
        assert_ne!(legacy, legacy_domain_name("ns", &"x".repeat(81)));
    }

    #[test]
    fn unsafe_characters_are_dropped() {
        let a = domain_name("ns", "a/b", UID);
        assert!(a.chars().all(is_name_char), "{a}");
        assert!(a.starts_with("ns--ab--"));
        assert!(domain_name("<>", "&", "u/../x").chars().all(is_name_char));
        assert!(legacy_domain_name("<>", "&").chars().all(is_name_char));
    }
}
