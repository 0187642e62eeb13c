//! What the image tests stand on: a scratch directory, qcow2 files made by the real
//! `qemu-img`, and a small HTTP/1.1 server on a local port whose answers a test sets per path.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::fetch::{CopySpec, Settings, hex};

/// A scratch directory removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("deskvirt-images-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The bytes of a qcow2 image of 1 MiB made by `qemu-img create` with `options`.
pub fn qcow2(dir: &Path, name: &str, options: &[&str]) -> Vec<u8> {
    let file = dir.join(name);
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .args(options)
        .arg(&file)
        .arg("1M")
        .output()
        .unwrap_or_else(|e| panic!("qemu-img: {e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(&file).unwrap_or_else(|e| panic!("{e}"))
}

/// SHA-256 of `bytes`, lowercase hex.
pub fn sha256(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// How the server answers a path.
#[derive(Clone)]
pub enum Reply {
    /// 200 with these bytes.
    Bytes(Vec<u8>),
    /// This status, no body.
    Status(u16),
    /// 302 to this location.
    Redirect(String),
    /// 200 announcing `.1` bytes, sending the first ones and then nothing.
    Stall(Vec<u8>, u64),
    /// Runs the hook, then answers 200 with these bytes.
    After(Arc<dyn Fn() + Send + Sync>, Vec<u8>),
    /// 200 with these bytes and no `Content-Length` (the body ends when the connection does).
    Unsized(Vec<u8>),
    /// 200 of unknown length, one byte every 100 ms for a minute.
    Drip,
}

/// A local HTTP server; stops when dropped.
pub struct Server {
    pub base: String,
    routes: Arc<Mutex<HashMap<String, Reply>>>,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let routes: Arc<Mutex<HashMap<String, Reply>>> = Arc::default();
        let hits: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let (shared, counted) = (routes.clone(), hits.clone());
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(answer(conn, shared.clone(), counted.clone()));
            }
        });
        Self {
            base: format!("http://127.0.0.1:{port}"),
            routes,
            hits,
            task,
        }
    }

    /// Requests of `path` so far.
    pub fn requests(&self, path: &str) -> usize {
        self.hits
            .lock()
            .ok()
            .and_then(|h| h.get(path).copied())
            .unwrap_or(0)
    }

    /// Answers `path` with `reply` from now on; returns the URL of `path`.
    pub fn route(&self, path: &str, reply: Reply) -> String {
        if let Ok(mut r) = self.routes.lock() {
            r.insert(path.to_string(), reply);
        }
        format!("{}{path}", self.base)
    }
}

async fn answer(
    mut conn: tokio::net::TcpStream,
    routes: Arc<Mutex<HashMap<String, Reply>>>,
    hits: Arc<Mutex<HashMap<String, usize>>>,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16384 {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(buf.get(..n).unwrap_or_default()),
        }
    }
    let text = String::from_utf8_lossy(&head);
    let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
    if let Ok(mut h) = hits.lock() {
        *h.entry(path.clone()).or_default() += 1;
    }
    let reply = routes.lock().ok().and_then(|r| r.get(&path).cloned());
    let (status, headers, body): (u16, String, Vec<u8>) = match reply {
        None => (404, String::new(), Vec::new()),
        Some(Reply::Bytes(b)) => (200, String::new(), b),
        Some(Reply::After(hook, b)) => {
            hook();
            (200, String::new(), b)
        }
        Some(Reply::Status(s)) => (s, String::new(), Vec::new()),
        Some(Reply::Redirect(to)) => (302, format!("Location: {to}\r\n"), Vec::new()),
        Some(Reply::Unsized(b)) => {
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                .await;
            let _ = conn.write_all(&b).await;
            let _ = conn.shutdown().await;
            return;
        }
        Some(Reply::Drip) => {
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                .await;
            for _ in 0..600 {
                if conn.write_all(b"x").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            return;
        }
        Some(Reply::Stall(first, total)) => {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n");
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(&first).await;
            tokio::time::sleep(Duration::from_secs(60)).await;
            return;
        }
    };
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n",
        body.len()
    );
    let _ = conn.write_all(head.as_bytes()).await;
    let _ = conn.write_all(&body).await;
    let _ = conn.shutdown().await;
}

/// A UID as the API server makes them.
pub const UID: &str = "5d0c4e2a-1111-4222-8333-444455556666";

/// Copy of version 1 of [`UID`] from `url`, into `dir`.
pub fn spec(dir: &Path, url: &str, sha256: &str) -> CopySpec {
    CopySpec {
        uid: UID.into(),
        version: 1,
        url: url.into(),
        sha256: sha256.into(),
        image_dir: dir.to_path_buf(),
    }
}

/// Short deadlines and the real `qemu-img`.
pub fn settings() -> Settings {
    Settings {
        qemu_img: "qemu-img".into(),
        qemu_img_timeout: Duration::from_secs(30),
        head_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_millis(500),
        fetch_timeout: Duration::from_secs(60),
        max_bytes: 1 << 30,
        reserve_bytes: 0,
    }
}

/// The client the tests fetch with.
pub fn client() -> super::http::HttpClient {
    super::http::client(Duration::from_secs(2)).unwrap_or_else(|e| panic!("{e}"))
}
