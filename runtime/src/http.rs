//! The operational HTTP endpoint: `/healthz`, `/readyz` and `/metrics` (Prometheus text
//! format). A deliberately small HTTP/1.1 responder: GET only, one response per connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::health::Health;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A bound server; `run` serves until the future is dropped.
pub struct Server {
    listener: TcpListener,
    health: Health,
    registry: Arc<Registry>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.listener.local_addr().ok())
            .finish()
    }
}

impl Server {
    /// Binds `addr` (port 0 picks a free port).
    pub async fn bind(
        addr: SocketAddr,
        health: Health,
        registry: Arc<Registry>,
    ) -> Result<Self, ServeError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
        Ok(Self {
            listener,
            health,
            registry,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves connections forever.
    pub async fn run(self) {
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    let health = self.health.clone();
                    let registry = self.registry.clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(
                            Duration::from_secs(10),
                            respond(stream, &health, &registry),
                        )
                        .await;
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed on the metrics port");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

async fn respond(
    mut stream: TcpStream,
    health: &Health,
    registry: &Registry,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    // Read until the end of the request head (or the buffer is full).
    while len < buf.len() {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            break;
        }
        len += n;
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, ctype, body) = route(method, path, health, registry);
    let reply = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}

fn route(
    method: &str,
    path: &str,
    health: &Health,
    registry: &Registry,
) -> (&'static str, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    if method != "GET" && method != "HEAD" {
        return ("405 Method Not Allowed", TEXT, "only GET\n".into());
    }
    let flag = |ok: bool, name: &str| {
        if ok {
            ("200 OK", TEXT, "ok\n".to_string())
        } else {
            ("503 Service Unavailable", TEXT, format!("not {name}\n"))
        }
    };
    match path {
        "/healthz" | "/livez" => match health.stalled().as_slice() {
            [] => flag(health.is_live(), "live"),
            stalled => (
                "503 Service Unavailable",
                TEXT,
                stalled
                    .iter()
                    .map(|(name, silent)| format!("{name} stalled for {}s\n", silent.as_secs()))
                    .collect(),
            ),
        },
        "/readyz" => flag(health.is_ready(), "ready"),
        "/metrics" => {
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, registry) {
                Ok(()) => (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    out,
                ),
                Err(_) => (
                    "500 Internal Server Error",
                    TEXT,
                    "metrics encoding failed\n".into(),
                ),
            }
        }
        _ => ("404 Not Found", TEXT, "not found\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"));
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .ok();
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok();
        out
    }

    #[tokio::test]
    async fn serves_health_readiness_and_metrics() {
        let health = Health::new();
        let mut registry = Registry::with_prefix("deskvirt_test");
        let counter: prometheus_client::metrics::counter::Counter = Default::default();
        registry.register("things", "Things seen", counter.clone());
        counter.inc();
        let server = Server::bind(
            "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!()),
            health.clone(),
            Arc::new(registry),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let addr = server.local_addr().unwrap_or_else(|| panic!("no addr"));
        tokio::spawn(server.run());

        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        health.set_ready(true);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        let metrics = get(addr, "/metrics").await;
        assert!(
            metrics.contains("deskvirt_test_things_total 1"),
            "{metrics}"
        );
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
    }
}
