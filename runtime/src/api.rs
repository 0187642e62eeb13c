//! How the binaries connect to the API server: every call has a deadline. A request must get
//! its response head within the call timeout (a watch gets its head at once, then streams), a
//! connection must open within the connect timeout and a request body go out within the write
//! timeout. The socket read timeout only catches dead connections: it must stay longer than
//! the longest silence of a watch stream (kube asks the server to end a watch after 290 s, and
//! gives up itself 5 s later), so it is fixed at [`READ_TIMEOUT`].

use std::time::Duration;

use clap::Args;
use kube::client::ClientBuilder;
use kube::{Client, Config};

/// Longest silence on a connection before it is taken for dead; longer than a watch's.
pub const READ_TIMEOUT: Duration = Duration::from_secs(330);

/// Deadlines of API calls, as flags (with environment fallbacks).
#[derive(Debug, Clone, Args)]
pub struct ApiTimeouts {
    /// Longest wait for the response head of an API call (a watch's comes at once).
    #[arg(
        long,
        env = "DESKVIRT_API_CALL_TIMEOUT",
        default_value = "10s",
        value_parser = parse_duration
    )]
    pub api_call_timeout: Duration,

    /// Longest wait for a connection to the API server to open.
    #[arg(
        long,
        env = "DESKVIRT_API_CONNECT_TIMEOUT",
        default_value = "5s",
        value_parser = parse_duration
    )]
    pub api_connect_timeout: Duration,

    /// Longest wait for a request to be written to the API server.
    #[arg(
        long,
        env = "DESKVIRT_API_WRITE_TIMEOUT",
        default_value = "10s",
        value_parser = parse_duration
    )]
    pub api_write_timeout: Duration,
}

impl Default for ApiTimeouts {
    fn default() -> Self {
        Self {
            api_call_timeout: Duration::from_secs(10),
            api_connect_timeout: Duration::from_secs(5),
            api_write_timeout: Duration::from_secs(10),
        }
    }
}

impl ApiTimeouts {
    /// Sets the connection timeouts of `config`.
    pub fn apply(&self, config: &mut Config) {
        config.connect_timeout = Some(self.api_connect_timeout);
        config.write_timeout = Some(self.api_write_timeout);
        config.read_timeout = Some(READ_TIMEOUT);
        // The read timeout counts from the request, not from when a pooled connection idled.
        config.reset_reader_on_write = true;
    }
}

/// A client from the in-cluster config or `KUBECONFIG` with the deadlines of `timeouts`.
pub async fn client(timeouts: &ApiTimeouts) -> Result<Client, kube::Error> {
    let mut config = Config::infer().await.map_err(kube::Error::InferConfig)?;
    timeouts.apply(&mut config);
    client_from(config, timeouts.api_call_timeout)
}

/// A client from `config` whose calls each get their response head within `call`.
pub fn client_from(config: Config, call: Duration) -> Result<Client, kube::Error> {
    Ok(ClientBuilder::try_from(config)?
        .with_layer(&tower::timeout::TimeoutLayer::new(call))
        .build())
}

/// A positive duration such as `500ms`, `10s` or `1m`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        _ => return Err(format!("{s:?}: use ms, s or m")),
    };
    if d.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        api: ApiTimeouts,
    }

    #[test]
    fn defaults_and_flags() {
        let f = Flags::try_parse_from(["x"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            f.api.api_call_timeout,
            ApiTimeouts::default().api_call_timeout
        );
        let f = Flags::try_parse_from(["x", "--api-call-timeout", "3s"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(f.api.api_call_timeout, Duration::from_secs(3));
        assert!(Flags::try_parse_from(["x", "--api-call-timeout", "0s"]).is_err());
        let mut config = Config::new(http::Uri::from_static("https://127.0.0.1:1"));
        f.api.apply(&mut config);
        assert_eq!(config.read_timeout, Some(READ_TIMEOUT));
        assert!(
            READ_TIMEOUT > Duration::from_secs(290 + 5),
            "outlasts a watch's silence"
        );
    }

    #[tokio::test]
    async fn a_call_without_an_answer_times_out() {
        // A server that accepts and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let uri = format!("http://127.0.0.1:{port}")
            .parse::<http::Uri>()
            .unwrap_or_else(|e| panic!("{e}"));
        let client = client_from(Config::new(uri), Duration::from_millis(300))
            .unwrap_or_else(|e| panic!("{e}"));
        let started = std::time::Instant::now();
        let result = client.apiserver_version().await;
        assert!(result.is_err(), "{result:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        hold.abort();
    }
}
