//! The agent's connection to the hub, up to an open websocket: TCP (or a tunnel through the
//! configured HTTP CONNECT proxy), TLS with the hub's name, and the websocket upgrade that names
//! the service by its lookup hash.
//!
//! This module only opens the connection; the key exchange and everything after it belong to
//! the Session actor. It must never send the service id (only its lookup hash), never show the
//! proxy's credentials, and never wait longer than the given timeout for any step.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use super::proxy::{authority, Proxy, ProxyError};
use super::{BoxedIo, Ws, SERVICE_HEADER};

/// Where and how to reach the hub.
#[derive(Clone)]
pub struct HubEndpoint {
    /// The `hub` URL as configured (shown in logs and status; holds no secret).
    pub url: String,
    pub host: String,
    pub port: u16,
    pub tls: Arc<ClientConfig>,
    /// The HTTP CONNECT proxy on the way, when `proxy` is set.
    pub proxy: Option<Arc<Proxy>>,
}

/// Why the websocket to the hub could not be opened. One line each, naming the fix.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("connecting to {addr}: {detail}")]
    Connect { addr: String, detail: String },
    #[error("connecting to {addr} timed out")]
    ConnectTimeout { addr: String },
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error("`{host}` is not a valid TLS server name")]
    ServerName { host: String },
    #[error("TLS handshake with {addr} timed out")]
    TlsTimeout { addr: String },
    #[error("TLS handshake with {addr} failed: {detail} (is hub_ca set to the hub's CA?)")]
    Tls { addr: String, detail: String },
    #[error("bad hub URL: {0}")]
    Url(String),
    #[error("websocket upgrade with {addr} timed out")]
    UpgradeTimeout { addr: String },
    #[error("the hub does not accept this service (unknown or switched-off service id: check service_id)")]
    ServiceRefused,
    #[error("websocket upgrade failed: {0}")]
    Upgrade(String),
}

impl HubEndpoint {
    /// `host:port` of the hub.
    pub fn addr(&self) -> String {
        authority(&self.host, self.port)
    }

    /// Opens the websocket to the hub, each step (connect or proxy tunnel, TLS, upgrade) within
    /// `step_timeout`.
    pub async fn dial(&self, lookup_hash: &str, step_timeout: Duration) -> Result<Ws, DialError> {
        let addr = self.addr();
        let transport: BoxedIo = match &self.proxy {
            Some(proxy) => proxy.connect(&self.host, self.port, step_timeout).await?,
            None => {
                let tcp = tokio::time::timeout(step_timeout, TcpStream::connect(&addr))
                    .await
                    .map_err(|_| DialError::ConnectTimeout { addr: addr.clone() })?
                    .map_err(|e| DialError::Connect {
                        addr: addr.clone(),
                        detail: e.to_string(),
                    })?;
                let _ = tcp.set_nodelay(true);
                Box::new(tcp)
            }
        };
        let server_name =
            ServerName::try_from(self.host.clone()).map_err(|_| DialError::ServerName {
                host: self.host.clone(),
            })?;
        let tls = tokio::time::timeout(
            step_timeout,
            TlsConnector::from(self.tls.clone()).connect(server_name, transport),
        )
        .await
        .map_err(|_| DialError::TlsTimeout { addr: addr.clone() })?
        .map_err(|e| DialError::Tls {
            addr: addr.clone(),
            detail: e.to_string(),
        })?;
        let io: BoxedIo = Box::new(tls);
        let mut request = self
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| DialError::Url(e.to_string()))?;
        request.headers_mut().insert(
            SERVICE_HEADER,
            HeaderValue::from_str(lookup_hash).map_err(|e| DialError::Url(e.to_string()))?,
        );
        // The hub's websocket frames are bounded like the Noise messages they carry: a header
        // announcing more never makes the agent reserve it.
        let upgrade = tokio_tungstenite::client_async_with_config(
            request,
            io,
            Some(crate::net::tunnel_ws_config()),
        );
        let (ws, _) = tokio::time::timeout(step_timeout, upgrade)
            .await
            .map_err(|_| DialError::UpgradeTimeout { addr: addr.clone() })?
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(response)
                    if response.status() == 403 =>
                {
                    DialError::ServiceRefused
                }
                other => DialError::Upgrade(other.to_string()),
            })?;
        Ok(ws)
    }
}
