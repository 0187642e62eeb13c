//! How an image's bytes come over HTTP(S): one client (hyper 1, rustls with the host's roots
//! on kube's ring provider) whose connections open within a deadline, and a GET that wants its
//! response head within a deadline and follows a few redirects (http and https only).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::error::CopyError;

/// The client images are fetched with.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// Redirects followed before a fetch gives up.
pub const MAX_REDIRECTS: usize = 5;

/// A client whose connections (TCP and TLS) open within `connect`, trusting the host's roots
/// (none found: https sources fail, http ones work). Fails only when the crypto provider
/// offers no protocol version.
pub fn client(connect: Duration) -> Result<HttpClient, rustls::Error> {
    let mut tcp = HttpConnector::new();
    tcp.set_connect_timeout(Some(connect));
    tcp.enforce_http(false);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = match HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(provider.clone())
    {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "no trusted roots on this host; https image sources will fail");
            let tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            HttpsConnectorBuilder::new().with_tls_config(tls)
        }
    };
    let https = builder.https_or_http().enable_http1().wrap_connector(tcp);
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

/// `url` as a URI the client can fetch: absolute, http or https.
pub fn parse(url: &str) -> Result<Uri, CopyError> {
    let uri: Uri = url
        .parse()
        .map_err(|_| CopyError::BadUrl("it does not parse".into()))?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.authority().is_some() => Ok(uri),
        _ => Err(CopyError::BadUrl(
            "only http and https URLs are fetched".into(),
        )),
    }
}

/// GETs `url`, following up to [`MAX_REDIRECTS`] redirects; each response head must come
/// within `head`. A final status other than 2xx is an error naming it.
pub async fn get(
    client: &HttpClient,
    url: &str,
    head: Duration,
) -> Result<Response<Incoming>, CopyError> {
    let mut uri = parse(url)?;
    for _ in 0..=MAX_REDIRECTS {
        let request = Request::get(uri.clone())
            .header(
                http::header::USER_AGENT,
                concat!("deskvirt-node-agent/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::<Bytes>::new())
            .map_err(|e| CopyError::BadUrl(e.to_string()))?;
        let response = tokio::time::timeout(head, client.request(request))
            .await
            .map_err(|_| CopyError::Fetch(format!("no answer within {}s", head.as_secs_f32())))?
            .map_err(|e| CopyError::Fetch(crate::agent::error_chain(&e)))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        if !status.is_redirection() || status == StatusCode::NOT_MODIFIED {
            return Err(CopyError::Status { status });
        }
        let location = response
            .headers()
            .get(http::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .ok_or(CopyError::Status { status })?;
        uri = follow(&uri, location)?;
    }
    Err(CopyError::Fetch(format!(
        "more than {MAX_REDIRECTS} redirects"
    )))
}

/// Where a redirect from `from` to `location` leads: an absolute http(s) URL, or a path on the
/// same server.
pub fn follow(from: &Uri, location: &str) -> Result<Uri, CopyError> {
    if location.starts_with('/') && !location.starts_with("//") {
        let mut parts = from.clone().into_parts();
        parts.path_and_query =
            Some(location.parse().map_err(|_| {
                CopyError::Fetch("a redirect to a path that does not parse".into())
            })?);
        return Uri::from_parts(parts)
            .map_err(|_| CopyError::Fetch("a redirect that does not parse".into()));
    }
    parse(location).map_err(|_| CopyError::Fetch("a redirect to a URL that is not http(s)".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_urls_and_redirects_are_followed() {
        assert!(parse("https://images.lab/debian.qcow2").is_ok());
        assert!(parse("file:///etc/shadow").is_err());
        assert!(parse("/relative").is_err());
        let from = Uri::from_static("http://a.lab:8080/x/y.qcow2?t=1");
        let to = follow(&from, "/z.qcow2").map(|u| u.to_string());
        assert_eq!(to.ok().as_deref(), Some("http://a.lab:8080/z.qcow2"));
        let to = follow(&from, "https://b.lab/w").map(|u| u.to_string());
        assert_eq!(to.ok().as_deref(), Some("https://b.lab/w"));
        assert!(follow(&from, "ftp://b.lab/w").is_err());
        assert!(follow(&from, "//b.lab/w").is_err());
    }

    #[tokio::test]
    async fn a_client_builds_without_a_default_provider() {
        assert!(client(Duration::from_secs(1)).is_ok());
    }
}
