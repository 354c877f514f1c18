//! Sockets and TLS set-up shared by both roles: the boxed stream type the websocket runs over,
//! PEM loading, the hub's server TLS configuration, the agent's client TLS configuration toward
//! the hub, and the agent's dialing of the hub (directly or through an HTTP CONNECT proxy).
//!
//! This module only builds connections; it never reads frames or decides what a peer may do.

use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::WebSocketStream;

pub mod dial;
pub mod link;
pub mod proxy;

/// Anything a websocket can run over: plain TCP in tests of the framing, TLS over TCP or TLS
/// over a proxy tunnel in real use.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A type-erased stream, so that agent and hub actors handle one websocket type.
pub type BoxedIo = Box<dyn Io>;

/// The websocket carrying one tunnel.
pub type Ws = WebSocketStream<BoxedIo>;

/// Header in the websocket upgrade naming the service by its lookup hash (never the id).
pub const SERVICE_HEADER: &str = "x-connect-service";

/// The websocket limits of a tunnel, for both roles. Every websocket message of a tunnel is one
/// Noise message (handshake or transport), which is at most 65535 bytes, so nothing larger is
/// ever accepted. tungstenite's defaults (16 MiB frames, 64 MiB messages) are not safe here: it
/// reserves a frame's announced length as soon as it has read the frame header, so one 14-byte
/// header from a hostile peer would cost 16 MiB before the Noise layer could refuse anything.
pub fn tunnel_ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_frame_size(Some(crate::tunnel::noise::MAX_MESSAGE_LEN))
        .max_message_size(Some(crate::tunnel::noise::MAX_MESSAGE_LEN))
        .read_buffer_size(WS_READ_BUFFER)
}

/// Bytes the websocket reads from the stream at a time: one TLS record's worth of plaintext
/// (16 KiB), which is the most one read of a TLS stream yields anyway. tungstenite zeroes the
/// free part of its read buffer before every read, so its default of 128 KiB cost a 128 KiB
/// memset per read — measured as 13 % (agent) and 16 % (hub) of all instructions spent per
/// forwarded request (README, Benchmarks).
pub const WS_READ_BUFFER: usize = 16 * 1024;

/// Errors while loading certificates or keys.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate found (expected -----BEGIN CERTIFICATE-----)")]
    NoCertificate { path: String },
    #[error("{path}: no PEM private key found (expected PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: String },
    #[error("TLS configuration rejected: {0}")]
    Tls(#[from] rustls::Error),
}

/// The crypto provider used everywhere (ring: small and quick to build).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, NetError> {
    let file = std::fs::File::open(path).map_err(|source| NetError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| NetError::Read {
            path: path.display().to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(NetError::NoCertificate {
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, NetError> {
    let file = std::fs::File::open(path).map_err(|source| NetError::Read {
        path: path.display().to_string(),
        source,
    })?;
    rustls_pemfile::private_key(&mut BufReader::new(file))
        .map_err(|source| NetError::Read {
            path: path.display().to_string(),
            source,
        })?
        .ok_or_else(|| NetError::NoKey {
            path: path.display().to_string(),
        })
}

/// TLS configuration of the hub's agent listener.
pub fn hub_server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, NetError> {
    let certs = load_certs(cert)?;
    let key = load_key(key)?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

/// Trust anchors for the agent's connection to the hub (and to an `https://` proxy): the
/// system's roots plus the optional `hub_ca` (or `proxy_ca`) file. System roots that fail to
/// load are skipped (a minimal VM may have none) as long as something is left to trust.
pub fn hub_client_config(hub_ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, NetError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = hub_ca {
        for cert in load_certs(path)? {
            roots.add(cert)?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
