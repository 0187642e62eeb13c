//! An HTTP origin for image imports, started by a test: serves files of one directory by name
//! over HTTP/1.1 on loopback (GET only, `Content-Length` set, 404 for anything else) and
//! counts the requests each path got.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// A running origin; it stops when dropped.
pub struct Origin {
    pub port: u16,
    requests: Arc<Mutex<BTreeMap<String, u32>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Origin {
    /// Serves the files of `dir` at `http://127.0.0.1:<port>/<name>`.
    pub async fn start(dir: PathBuf) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let requests = Arc::new(Mutex::new(BTreeMap::new()));
        let counted = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (dir, counted) = (dir.clone(), counted.clone());
                tokio::spawn(async move {
                    let _ = serve(stream, &dir, &counted).await;
                });
            }
        });
        Ok(Self {
            port,
            requests,
            task,
        })
    }

    /// The URL of file `name`.
    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }

    /// How many requests asked for `/<name>`.
    pub fn requests(&self, name: &str) -> u32 {
        self.requests
            .lock()
            .map(|r| r.get(&format!("/{name}")).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    stream: tokio::net::TcpStream,
    dir: &std::path::Path,
    counted: &Mutex<BTreeMap<String, u32>>,
) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    let mut request = String::new();
    lines.read_line(&mut request).await?;
    loop {
        let mut header = String::new();
        if lines.read_line(&mut header).await? == 0 || header.trim().is_empty() {
            break;
        }
    }
    let path = request.split_whitespace().nth(1).unwrap_or("/").to_string();
    if let Ok(mut c) = counted.lock() {
        *c.entry(path.clone()).or_insert(0) += 1;
    }
    let name = path.trim_start_matches('/');
    let file =
        (!name.is_empty() && !name.contains('/') && !name.starts_with('.')).then(|| dir.join(name));
    match file.map(std::fs::read) {
        Some(Ok(bytes)) if request.starts_with("GET ") => {
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: application/octet-stream\r\nconnection: close\r\n\r\n",
                bytes.len()
            );
            write.write_all(head.as_bytes()).await?;
            write.write_all(&bytes).await?;
        }
        _ => {
            write
                .write_all(
                    b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                )
                .await?;
        }
    }
    write.shutdown().await?;
    Ok(())
}
