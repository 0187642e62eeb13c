//! A desktop's console password: drawn from the kernel's CSPRNG, kept canonically in a mirror
//! Secret in the operator's namespace ([`mirror`]) and handed to the user as a Secret in the
//! desktop's namespace, in the namespaces the administrator allows, that is written under its
//! recorded UID but never read back ([`user`]). Pure.

pub mod mirror;
pub mod user;

/// Bytes of randomness in a password: 160 bits, above the 128-bit floor.
const PASSWORD_BYTES: usize = 20;

/// Characters of a password (hex); shorter stored values are not trusted and drawn anew.
pub const PASSWORD_LEN: usize = 2 * PASSWORD_BYTES;

/// A fresh password: 160 bits from the operating system's CSPRNG, hex-encoded (40 characters,
/// within SPICE's ticket limit and safe in an ini file).
///
/// `getrandom` (rust-random project) is the crate `rand` itself sits on: it reads the kernel's
/// CSPRNG directly with no user-space generator to seed or get wrong, and is already in our lock
/// file.
pub fn new_password() -> Result<String, getrandom::Error> {
    let mut buf = [0u8; PASSWORD_BYTES];
    getrandom::fill(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// The `remote-viewer` file. Fields not yet known (host, port) are left out.
pub fn vv_file(title: &str, host: Option<&str>, port: Option<u16>, password: &str) -> String {
    let mut s = String::from("[virt-viewer]\ntype=spice\n");
    if let Some(h) = host.filter(|h| !h.is_empty()) {
        s.push_str(&format!("host={h}\n"));
    }
    if let Some(p) = port {
        s.push_str(&format!("port={p}\n"));
    }
    s.push_str(&format!(
        "password={password}\ntitle={title}\ndelete-this-file=0\n"
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_long_and_distinct() {
        let a = new_password().unwrap_or_else(|e| panic!("{e}"));
        let b = new_password().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.len(), PASSWORD_LEN);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn viewer_file_leaves_out_what_is_unknown() {
        let vv = vv_file("ns/d", Some("h"), Some(5901), "pw");
        assert!(vv.starts_with("[virt-viewer]\ntype=spice\nhost=h\nport=5901\npassword=pw\n"));
        let vv = vv_file("ns/d", Some(""), None, "pw");
        assert!(!vv.contains("host=") && !vv.contains("port="), "{vv}");
    }
}
