//! The seam between the SCIM client and whatever carries its HTTP requests.
//!
//! In production the hub sends each request through an agent's tunnel; tests and benchmarks
//! talk to a SCIM server directly with [`HttpTransport`]. The client only sees [`Transport`],
//! so it never knows (or cares) which one it has. This module owns the request/response shapes
//! and the transport error vocabulary; it must never interpret SCIM semantics.

use std::error::Error as _;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use crate::messages::ForwardError;

/// One HTTP request toward a SCIM server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScimRequest {
    pub method: http::Method,
    /// Absolute path including the base path and query, e.g.
    /// `/scim/v2/Users?startIndex=1&count=100`.
    pub path_and_query: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

/// What the SCIM server answered, whatever the status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScimResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl ScimResponse {
    /// First header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Why a request produced no HTTP response at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// Service off, no agent connected, or no agent advertises the target: `kind` says which,
    /// `reason` says it to the administrator with the fix.
    #[error("no connector available: {reason}")]
    NoConnector {
        kind: NoConnectorKind,
        reason: String,
    },
    /// The agent (or the direct transport, in the agent's vocabulary) could not get an answer.
    #[error(transparent)]
    Forward(ForwardError),
    /// The agent was lost mid-request or the tunnel session closed.
    #[error("tunnel lost: {detail}")]
    Tunnel { detail: String },
    /// The agent carrying the request was lost (its tunnel closed, or it went silent) before it
    /// answered: the request may or may not have reached the application, and another agent of
    /// the service may carry it again.
    #[error("agent `{agent}` was lost before it answered: {detail}")]
    AgentLost { agent: String, detail: String },
    /// The hub gave up waiting.
    #[error("no answer within {after_ms} ms")]
    Timeout { after_ms: u64 },
}

/// Which of the "no connector" causes holds. The first two are the administrator's decision and
/// stay until changed; the last two can be momentary (an agent reconnecting, a target set being
/// reloaded), so a request may wait a little for them to pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoConnectorKind {
    /// hub.toml has no such service.
    UnknownService,
    /// The service is switched off.
    ServiceOff,
    /// No agent of the service is connected.
    NoAgent,
    /// Agents are connected, but none advertises the app's target.
    NoTarget,
}

impl NoConnectorKind {
    /// True when the cause may pass by itself within seconds.
    pub fn may_pass(self) -> bool {
        matches!(self, NoConnectorKind::NoAgent | NoConnectorKind::NoTarget)
    }
}

/// Carries one request to a SCIM server and brings back its response.
pub trait Transport: Send + Sync {
    fn send(&self, request: ScimRequest) -> BoxFuture<'_, Result<ScimResponse, TransportError>>;
}

/// Default limit for [`HttpTransport`] response time.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default limit for [`HttpTransport`] response bodies: a full page of 1000 users fits easily.
const DEFAULT_MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// A direct plain-HTTP transport to one SCIM server, without any tunnel. One connection per
/// request: scim2-server closes after every response anyway, and it keeps this type simple.
#[derive(Debug, Clone)]
pub struct HttpTransport {
    addr: SocketAddr,
    host_header: String,
    timeout: Duration,
    max_response_bytes: usize,
}

impl HttpTransport {
    /// Talk to `addr`, sending `host_header` as `Host` (e.g. `127.0.0.1:8080`).
    pub fn new(addr: SocketAddr, host_header: String) -> Self {
        HttpTransport {
            addr,
            host_header,
            timeout: DEFAULT_TIMEOUT,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        }
    }

    /// Give up on a request (connect included) after `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Refuse response bodies larger than `limit` bytes.
    pub fn with_max_response_bytes(mut self, limit: usize) -> Self {
        self.max_response_bytes = limit;
        self
    }

    async fn exchange(&self, request: ScimRequest) -> Result<ScimResponse, TransportError> {
        let addr = self.addr.to_string();
        let network = |detail: String| {
            TransportError::Forward(ForwardError::Network {
                addr: addr.clone(),
                detail,
            })
        };

        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(|e| connect_error(&addr, e))?;
        // A response written in two pieces must not wait for a delayed ACK.
        stream
            .set_nodelay(true)
            .map_err(|e| network(format!("cannot set TCP_NODELAY: {e}")))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                .await
                .map_err(|e| network(error_chain(&e)))?;
        // The connection task ends by itself once `sender` is dropped or the server closes.
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "SCIM connection ended with an error");
            }
        });

        let mut builder = http::Request::builder()
            .method(request.method)
            .uri(request.path_and_query.as_str())
            .header(http::header::HOST, self.host_header.as_str());
        for (name, value) in &request.headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let http_request = builder
            .body(Full::new(Bytes::from(request.body.unwrap_or_default())))
            .map_err(|e| {
                TransportError::Forward(ForwardError::Refused {
                    reason: format!("invalid request {}: {e}", request.path_and_query),
                })
            })?;

        let response = sender
            .send_request(http_request)
            .await
            .map_err(|e| network(error_chain(&e)))?;
        drop(sender);
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, self.max_response_bytes)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    TransportError::Forward(ForwardError::TooLarge {
                        addr: addr.clone(),
                        limit: self.max_response_bytes as u64,
                    })
                } else {
                    network(format!("reading the response body: {e}"))
                }
            })?
            .to_bytes();

        let headers = parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        Ok(ScimResponse {
            status: parts.status.as_u16(),
            headers,
            body: body.to_vec(),
        })
    }
}

impl Transport for HttpTransport {
    fn send(&self, request: ScimRequest) -> BoxFuture<'_, Result<ScimResponse, TransportError>> {
        Box::pin(async move {
            match tokio::time::timeout(self.timeout, self.exchange(request)).await {
                Ok(result) => result,
                Err(_) => Err(TransportError::Timeout {
                    after_ms: u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX),
                }),
            }
        })
    }
}

fn connect_error(addr: &str, e: io::Error) -> TransportError {
    let addr = addr.to_string();
    TransportError::Forward(match e.kind() {
        io::ErrorKind::ConnectionRefused => ForwardError::ConnectRefused { addr },
        io::ErrorKind::TimedOut => ForwardError::ConnectTimeout { addr },
        _ => ForwardError::Network {
            addr,
            detail: e.to_string(),
        },
    })
}

/// hyper's top-level errors are terse ("connection closed before message completed"); the
/// cause underneath is what an administrator needs.
fn error_chain(e: &hyper::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refused_connection_is_typed() {
        // Bind then drop to get a loopback port nobody listens on.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let t = HttpTransport::new(addr, addr.to_string());
        let err = t
            .send(ScimRequest {
                method: http::Method::GET,
                path_and_query: "/".into(),
                headers: vec![],
                body: None,
            })
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                TransportError::Forward(ForwardError::ConnectRefused { .. })
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn oversized_body_is_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "x".repeat(100) }));
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let t = HttpTransport::new(addr, addr.to_string()).with_max_response_bytes(10);
        let err = t
            .send(ScimRequest {
                method: http::Method::GET,
                path_and_query: "/".into(),
                headers: vec![],
                body: None,
            })
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                TransportError::Forward(ForwardError::TooLarge { limit: 10, .. })
            ),
            "{err:?}"
        );
        server.abort();
    }
}
