//! A minimal SPICE link client for tests: links the main channel only (RSA-OAEP/SHA-1 of the
//! ticket, as spice-server 0.15 expects), reports whether the password was accepted and, when
//! it was, whether the main channel's first message is `SPICE_MSG_MAIN_INIT`.
//!
//! Only the main channel is ever opened: a client that opened the display and inputs channels
//! and dropped them once crashed QEMU's SPICE server. Every read has a timeout.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use rsa::pkcs8::DecodePublicKey;
use rsa::{Oaep, RsaPublicKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `"REDQ"` as a little-endian u32.
const MAGIC: [u8; 4] = *b"REDQ";
/// Protocol version 2.2.
const VERSION_MAJOR: u32 = 2;
const VERSION_MINOR: u32 = 2;
/// `SPICE_CHANNEL_MAIN`.
const CHANNEL_MAIN: u8 = 1;
/// `SPICE_TICKET_PUBKEY_BYTES`: DER SubjectPublicKeyInfo of a 1024-bit RSA key.
const PUBKEY_BYTES: usize = 162;
/// `SPICE_MSG_MAIN_INIT`.
pub const MSG_MAIN_INIT: u16 = 103;
/// `SPICE_LINK_ERR_PERMISSION_DENIED`.
pub const LINK_ERR_PERMISSION_DENIED: u32 = 7;
/// Largest link reply we accept (header says how much follows).
const MAX_REPLY: u32 = 4096;
/// How many main-channel messages we read while looking for `MAIN_INIT`.
const MAX_MESSAGES: usize = 8;

/// How long each connect, read and write may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Result of linking the main channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkOutcome {
    /// The ticket was accepted; `main_init` tells whether `SPICE_MSG_MAIN_INIT` arrived.
    Accepted {
        /// The server sent the main channel's init message.
        main_init: bool,
    },
    /// The server refused the link with this `SpiceLinkErr` code (7 = permission denied).
    Refused {
        /// `SpiceLinkErr` code.
        code: u32,
    },
}

/// Why a link attempt could not complete.
#[derive(Debug)]
pub enum SpiceError {
    /// A socket operation failed.
    Io {
        /// What was being done.
        step: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// A step did not finish in time.
    Timeout {
        /// What was being done.
        step: &'static str,
    },
    /// The server sent something that is not the SPICE link protocol.
    Protocol(String),
    /// The server's public key could not be used.
    Crypto(String),
}

impl fmt::Display for SpiceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io { step, source } => write!(f, "SPICE {step}: {source}"),
            Self::Timeout { step } => write!(f, "SPICE {step}: timed out"),
            Self::Protocol(m) => write!(f, "SPICE protocol: {m}"),
            Self::Crypto(m) => write!(f, "SPICE ticket encryption: {m}"),
        }
    }
}

impl std::error::Error for SpiceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Links the main channel at `addr` with `password`, [`DEFAULT_TIMEOUT`] per step.
pub async fn link(addr: SocketAddr, password: &str) -> Result<LinkOutcome, SpiceError> {
    link_with_timeout(addr, password, DEFAULT_TIMEOUT).await
}

/// Links the main channel at `addr` with `password`, `timeout` per step.
pub async fn link_with_timeout(
    addr: SocketAddr,
    password: &str,
    timeout: Duration,
) -> Result<LinkOutcome, SpiceError> {
    Ok(link_stream(addr, password, timeout).await?.0)
}

/// Links the main channel and keeps the connection open while the returned stream lives, like
/// a SPICE client left connected; `None` when the link was refused.
pub async fn hold(addr: SocketAddr, password: &str) -> Result<Option<TcpStream>, SpiceError> {
    match link_stream(addr, password, DEFAULT_TIMEOUT).await? {
        (LinkOutcome::Accepted { .. }, stream) => Ok(Some(stream)),
        (LinkOutcome::Refused { .. }, _) => Ok(None),
    }
}

async fn link_stream(
    addr: SocketAddr,
    password: &str,
    timeout: Duration,
) -> Result<(LinkOutcome, TcpStream), SpiceError> {
    let mut stream = step("connect", timeout, TcpStream::connect(addr)).await?;
    stream.set_nodelay(true).map_err(|source| SpiceError::Io {
        step: "set nodelay",
        source,
    })?;

    step(
        "send link message",
        timeout,
        stream.write_all(&link_message()),
    )
    .await?;

    let mut header = [0u8; 16];
    step(
        "read link reply header",
        timeout,
        stream.read_exact(&mut header),
    )
    .await?;
    if header[0..4] != MAGIC {
        return Err(SpiceError::Protocol(format!(
            "bad magic {:02x?} (not a SPICE server?)",
            &header[0..4]
        )));
    }
    let major = le32(&header, 4);
    if major != VERSION_MAJOR {
        return Err(SpiceError::Protocol(format!(
            "server speaks protocol {major}.{}",
            le32(&header, 8)
        )));
    }
    let size = le32(&header, 12);
    if !(4..=MAX_REPLY).contains(&size) {
        return Err(SpiceError::Protocol(format!("link reply of {size} bytes")));
    }
    let mut reply = vec![0u8; size as usize];
    step("read link reply", timeout, stream.read_exact(&mut reply)).await?;
    let error = le32(&reply, 0);
    if error != 0 {
        return Ok((LinkOutcome::Refused { code: error }, stream));
    }
    let der = reply
        .get(4..4 + PUBKEY_BYTES)
        .ok_or_else(|| SpiceError::Protocol(format!("link reply of {size} bytes has no key")))?;
    let ticket = encrypt_ticket(der, password)?;

    step("send ticket", timeout, stream.write_all(&ticket)).await?;
    let mut result = [0u8; 4];
    step("read link result", timeout, stream.read_exact(&mut result)).await?;
    let code = u32::from_le_bytes(result);
    if code != 0 {
        return Ok((LinkOutcome::Refused { code }, stream));
    }

    // Without the mini-header capability every message has the full 18-byte data header:
    // serial u64, type u16, size u32, sub_list u32.
    for _ in 0..MAX_MESSAGES {
        let mut header = [0u8; 18];
        step(
            "read main channel message header",
            timeout,
            stream.read_exact(&mut header),
        )
        .await?;
        let kind = u16::from_le_bytes([header[8], header[9]]);
        if kind == MSG_MAIN_INIT {
            return Ok((LinkOutcome::Accepted { main_init: true }, stream));
        }
        let size = le32(&header, 10);
        if size > 1 << 20 {
            return Err(SpiceError::Protocol(format!(
                "main channel message {kind} of {size} bytes"
            )));
        }
        let mut body = vec![0u8; size as usize];
        step(
            "read main channel message",
            timeout,
            stream.read_exact(&mut body),
        )
        .await?;
    }
    Ok((LinkOutcome::Accepted { main_init: false }, stream))
}

/// `SpiceLinkHeader` + `SpiceLinkMess` for the main channel, connection id 0, no capabilities.
fn link_message() -> Vec<u8> {
    // connection_id u32, channel_type u8, channel_id u8, num_common_caps u32,
    // num_channel_caps u32, caps_offset u32.
    let mut mess = Vec::with_capacity(18);
    mess.extend_from_slice(&0u32.to_le_bytes());
    mess.push(CHANNEL_MAIN);
    mess.push(0);
    mess.extend_from_slice(&0u32.to_le_bytes());
    mess.extend_from_slice(&0u32.to_le_bytes());
    mess.extend_from_slice(&18u32.to_le_bytes());

    let mut out = Vec::with_capacity(16 + mess.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION_MAJOR.to_le_bytes());
    out.extend_from_slice(&VERSION_MINOR.to_le_bytes());
    out.extend_from_slice(&(mess.len() as u32).to_le_bytes());
    out.extend_from_slice(&mess);
    out
}

/// The NUL-terminated ticket, RSA-OAEP (SHA-1) encrypted with the server's key.
fn encrypt_ticket(der: &[u8], password: &str) -> Result<Vec<u8>, SpiceError> {
    let key = RsaPublicKey::from_public_key_der(der)
        .map_err(|e| SpiceError::Crypto(format!("public key: {e}")))?;
    let mut ticket = password.as_bytes().to_vec();
    ticket.push(0);
    let mut rng = rand::thread_rng();
    key.encrypt(&mut rng, Oaep::new::<sha1::Sha1>(), &ticket)
        .map_err(|e| SpiceError::Crypto(format!("encrypt: {e}")))
}

fn le32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    if let Some(slice) = bytes.get(at..at + 4) {
        word.copy_from_slice(slice);
    }
    u32::from_le_bytes(word)
}

async fn step<T, F>(step: &'static str, timeout: Duration, fut: F) -> Result<T, SpiceError>
where
    F: std::future::Future<Output = std::io::Result<T>>,
{
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(SpiceError::Io { step, source }),
        Err(_) => Err(SpiceError::Timeout { step }),
    }
}

/// Whether the main channel of a held SPICE session carries `host` (the migration messages
/// name the host the desktop moved to) before the connection closes or 15 s pass.
pub async fn told_of(stream: &mut TcpStream, host: &str) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if seen.windows(host.len()).any(|w| w == host.as_bytes()) {
            return true;
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&buf[..n]),
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_message_layout() {
        let m = link_message();
        assert_eq!(m.len(), 34);
        assert_eq!(&m[0..4], b"REDQ");
        assert_eq!(le32(&m, 4), 2);
        assert_eq!(le32(&m, 8), 2);
        assert_eq!(le32(&m, 12), 18);
        assert_eq!(m[20], CHANNEL_MAIN);
        assert_eq!(le32(&m, 30), 18);
    }

    #[test]
    fn garbage_keys_are_errors() {
        assert!(matches!(
            encrypt_ticket(&[0u8; PUBKEY_BYTES], "pw"),
            Err(SpiceError::Crypto(_))
        ));
    }
}
