//! The agent's way through an HTTP CONNECT proxy to the hub: TCP to the proxy (TLS to the proxy
//! itself for an `https://` proxy), one `CONNECT host:port` exchange with
//! `Proxy-Authorization: Basic`, and the tunnelled byte stream the hub's TLS then runs over.
//!
//! This module owns the proxy's credentials once the configuration is loaded. It must never put
//! them in an error, a log line or a `Debug`/`Display` output (the proxy is always shown as
//! `scheme://host:port`), never read more than a bounded response head from the proxy, and never
//! send anything but the CONNECT request before the proxy said yes.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{HOST, PROXY_AUTHORIZATION};
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::TlsConnector;

use super::BoxedIo;
use crate::config::agent::ProxyConfig;
use crate::config::Secret;

/// Largest response head (status line and headers) accepted from a proxy. hyper's smallest
/// read buffer; a CONNECT answer is a status line and a handful of short headers.
pub const MAX_RESPONSE_HEAD: usize = 8192;
/// Most header lines accepted in the proxy's answer.
const MAX_RESPONSE_HEADERS: usize = 32;

/// Why no tunnel through the proxy was opened. Every message names the proxy as
/// `scheme://host:port` and never its credentials.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot reach the proxy {proxy}: {detail}; check `proxy` in config.ini and that the proxy is running")]
    Unreachable { proxy: String, detail: String },
    #[error("the proxy {proxy} did not {step} within {} s; check `proxy` in config.ini and that the proxy is running", .after.as_secs())]
    Timeout {
        proxy: String,
        step: &'static str,
        after: Duration,
    },
    #[error("TLS handshake with the proxy {proxy} failed: {detail}; check that it serves TLS (or write http:// in `proxy`), and set `proxy_ca` when its certificate comes from a private CA")]
    Tls { proxy: String, detail: String },
    #[error("the proxy {proxy} rejected the credentials in `proxy` for CONNECT {target} ({status}); check the user name and password (percent-encode special characters)")]
    BadCredentials {
        proxy: String,
        target: String,
        status: StatusCode,
    },
    #[error("the proxy {proxy} requires authentication for CONNECT {target} ({status}); write proxy = {scheme}://user:password@host:port")]
    NeedsCredentials {
        proxy: String,
        target: String,
        status: StatusCode,
        scheme: &'static str,
    },
    #[error("the proxy {proxy} refused CONNECT {target} ({status}); its administrator must allow CONNECT to port {port}")]
    Refused {
        proxy: String,
        target: String,
        status: StatusCode,
        port: u16,
    },
    #[error("the proxy {proxy} gave an invalid answer to CONNECT {target}: {detail}")]
    BadAnswer {
        proxy: String,
        target: String,
        detail: String,
    },
}

/// A configured proxy, ready to open tunnels. Cheap to share behind an `Arc`.
#[derive(Clone)]
pub struct Proxy {
    https: bool,
    host: String,
    port: u16,
    /// The whole `Proxy-Authorization` value (`Basic <base64>`), when credentials are given.
    authorization: Option<Secret>,
    /// TLS toward the proxy itself, for an `https://` proxy.
    tls: Option<Arc<ClientConfig>>,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("url", &self.url())
            .field("credentials", &self.authorization.is_some())
            .finish()
    }
}

impl fmt::Display for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url())
    }
}

/// `host:port` with IPv6 literals in brackets: the CONNECT request target and its `Host`.
pub fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl Proxy {
    /// A proxy from its configuration. `tls` must be given for an `https://` proxy (it is what
    /// the proxy's certificate is checked with) and is ignored otherwise.
    pub fn new(config: &ProxyConfig, tls: Option<Arc<ClientConfig>>) -> Proxy {
        let authorization = config.username.as_ref().map(|user| {
            let password = config.password.as_ref().map_or("", Secret::expose);
            let pair = Secret::new(format!("{user}:{password}"));
            Secret::new(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair.expose())
            ))
        });
        Proxy {
            https: config.scheme_https,
            host: config.host.clone(),
            port: config.port,
            authorization,
            tls: if config.scheme_https { tls } else { None },
        }
    }

    /// `http://host:port` or `https://host:port`, without credentials.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme(), authority(&self.host, self.port))
    }

    fn scheme(&self) -> &'static str {
        if self.https {
            "https"
        } else {
            "http"
        }
    }

    /// Opens a tunnel to `host:port` through the proxy. The whole exchange (TCP, TLS to an
    /// `https://` proxy, CONNECT) takes at most `timeout`.
    pub async fn connect(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<BoxedIo, ProxyError> {
        let deadline = Instant::now() + timeout;
        let proxy = self.url();
        let timed_out = |step: &'static str| ProxyError::Timeout {
            proxy: proxy.clone(),
            step,
            after: timeout,
        };
        let proxy_addr = authority(&self.host, self.port);
        let tcp = tokio::time::timeout_at(deadline, TcpStream::connect(&proxy_addr))
            .await
            .map_err(|_| timed_out("accept the connection"))?
            .map_err(|e| ProxyError::Unreachable {
                proxy: proxy.clone(),
                detail: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        let io: BoxedIo = if self.https {
            let config = self.tls.clone().ok_or_else(|| ProxyError::Tls {
                proxy: proxy.clone(),
                detail: "no TLS configuration for an https:// proxy".into(),
            })?;
            let name = ServerName::try_from(self.host.clone()).map_err(|_| ProxyError::Tls {
                proxy: proxy.clone(),
                detail: format!("`{}` is not a valid TLS server name", self.host),
            })?;
            let tls =
                tokio::time::timeout_at(deadline, TlsConnector::from(config).connect(name, tcp))
                    .await
                    .map_err(|_| timed_out("finish the TLS handshake"))?
                    .map_err(|e| ProxyError::Tls {
                        proxy: proxy.clone(),
                        detail: e.to_string(),
                    })?;
            Box::new(tls)
        } else {
            Box::new(tcp)
        };
        tokio::time::timeout_at(deadline, self.handshake(io, host, port))
            .await
            .map_err(|_| timed_out("answer the CONNECT request"))?
    }

    /// The CONNECT exchange over an open connection to the proxy, through hyper's HTTP/1.1
    /// client (strict parsing, bounded head); on a 2xx answer the connection becomes the tunnel.
    pub async fn handshake(
        &self,
        io: BoxedIo,
        host: &str,
        port: u16,
    ) -> Result<BoxedIo, ProxyError> {
        let proxy = self.url();
        let target = authority(host, port);
        let bad = |detail: String| ProxyError::BadAnswer {
            proxy: proxy.clone(),
            target: target.clone(),
            detail,
        };
        let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(MAX_RESPONSE_HEAD)
            .max_headers(MAX_RESPONSE_HEADERS)
            .handshake::<_, Empty<Bytes>>(TokioIo::new(io))
            .await
            .map_err(|e| bad(e.to_string()))?;
        // Drives the connection until the answer is read; after a 2xx it hands the socket to
        // the upgrade below and ends.
        let driver = tokio::spawn(connection.with_upgrades());
        let _stop_driver = AbortOnDrop(driver);

        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri(target.as_str())
            .header(HOST, target.as_str());
        if let Some(authorization) = &self.authorization {
            let mut value = HeaderValue::from_str(authorization.expose())
                .map_err(|_| bad("credentials are not a valid header value".into()))?;
            value.set_sensitive(true);
            request = request.header(PROXY_AUTHORIZATION, value);
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .map_err(|e| bad(format!("cannot build the CONNECT request: {e}")))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| bad(describe_hyper_error(&e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(match status.as_u16() {
                // tinyproxy, among others, answers a wrong password with 401 and reserves 407
                // for a request that carried no credentials at all.
                401 | 407 if self.authorization.is_some() => ProxyError::BadCredentials {
                    proxy,
                    target,
                    status,
                },
                401 | 407 => ProxyError::NeedsCredentials {
                    proxy,
                    target,
                    status,
                    scheme: self.scheme(),
                },
                _ => ProxyError::Refused {
                    proxy,
                    target,
                    status,
                    port,
                },
            });
        }
        let upgraded = hyper::upgrade::on(response)
            .await
            .map_err(|e| bad(format!("the tunnel did not open: {e}")))?;
        Ok(Box::new(TokioIo::new(upgraded)))
    }
}

/// hyper's error, with its cause when it has one ("message head is too large", "invalid
/// HTTP version parsed", "connection closed before message completed").
fn describe_hyper_error(e: &hyper::Error) -> String {
    use std::error::Error as _;
    match e.source() {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<Result<(), hyper::Error>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        // After a successful upgrade the task has already ended; otherwise this closes the
        // connection to the proxy.
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn config(url_user: Option<(&str, &str)>, port: u16) -> ProxyConfig {
        ProxyConfig {
            scheme_https: false,
            host: "127.0.0.1".into(),
            port,
            username: url_user.map(|(u, _)| u.to_string()),
            password: url_user.map(|(_, p)| Secret::new(p)),
        }
    }

    /// A fake proxy that reads one request head, records it, and writes `answer`; then echoes.
    async fn fake_proxy(answer: Vec<u8>) -> (u16, tokio::task::JoinHandle<String>) {
        fake_proxy_with(answer, true).await
    }

    /// Like [`fake_proxy`]; without `echo` it closes the connection after its answer.
    async fn fake_proxy_with(
        answer: Vec<u8>,
        echo: bool,
    ) -> (u16, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if s.read(&mut byte).await.unwrap() == 0 {
                    break;
                }
                head.push(byte[0]);
            }
            let _ = s.write_all(&answer).await;
            let mut buf = [0u8; 64];
            if echo {
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
            String::from_utf8_lossy(&head).into_owned()
        });
        (port, task)
    }

    const T: Duration = Duration::from_secs(5);

    /// The one-line error of a tunnel to `hub:port` through the proxy on `proxy_port`.
    async fn refusal(
        proxy_port: u16,
        credentials: Option<(&str, &str)>,
        port: u16,
        timeout: Duration,
    ) -> String {
        Proxy::new(&config(credentials, proxy_port), None)
            .connect("hub", port, timeout)
            .await
            .err()
            .expect("the tunnel must not open")
            .to_string()
    }

    #[tokio::test]
    async fn connect_sends_basic_auth_and_tunnels_bytes_including_early_ones() {
        // The proxy's first tunnelled bytes arrive in the same packet as its answer.
        let (port, head) = fake_proxy(
            b"HTTP/1.0 200 Connection established\r\nProxy-agent: x\r\n\r\nearly".to_vec(),
        )
        .await;
        let proxy = Proxy::new(&config(Some(("us@er", "p:ss")), port), None);
        let mut io = proxy.connect("hub.example", 8443, T).await.unwrap();
        let mut early = [0u8; 5];
        io.read_exact(&mut early).await.unwrap();
        assert_eq!(&early, b"early");
        io.write_all(b"ping").await.unwrap();
        let mut echoed = [0u8; 4];
        io.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"ping");
        drop(io);
        let head = head.await.unwrap();
        let expected = base64::engine::general_purpose::STANDARD.encode("us@er:p:ss");
        assert!(
            head.starts_with("CONNECT hub.example:8443 HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("host: hub.example:8443\r\n"),
            "{head}"
        );
        assert!(
            head.contains(&format!("proxy-authorization: Basic {expected}\r\n")),
            "{head}"
        );
    }

    #[tokio::test]
    async fn ipv6_target_is_bracketed_and_no_credentials_means_no_header() {
        let (port, head) = fake_proxy(b"HTTP/1.1 200 OK\r\n\r\n".to_vec()).await;
        let proxy = Proxy::new(&config(None, port), None);
        drop(proxy.connect("::1", 443, T).await.unwrap());
        let head = head.await.unwrap();
        assert!(head.starts_with("CONNECT [::1]:443 HTTP/1.1\r\n"), "{head}");
        assert!(
            !head.to_ascii_lowercase().contains("proxy-authorization"),
            "{head}"
        );
    }

    #[tokio::test]
    async fn auth_failures_name_the_proxy_and_status_but_not_the_secret() {
        let (port, _) = fake_proxy(
            b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\nContent-Length: 0\r\n\r\n".to_vec(),
        )
        .await;
        let m = refusal(port, Some(("alice", "hunter2")), 443, T).await;
        let proxy = Proxy::new(&config(Some(("alice", "hunter2")), port), None);
        assert!(
            m.starts_with(&format!(
                "the proxy http://127.0.0.1:{port} rejected the credentials"
            )),
            "{m}"
        );
        assert!(
            m.contains("407 Proxy Authentication Required") && m.contains("CONNECT hub:443"),
            "{m}"
        );
        assert!(!m.contains("hunter2") && !m.contains("alice"), "{m}");
        assert!(!format!("{proxy:?} {proxy}").contains("hunter2"));
        assert!(!format!("{proxy:?} {proxy}").contains("alice"));

        let (port, _) =
            fake_proxy(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n".to_vec()).await;
        let m = refusal(port, None, 443, T).await;
        assert!(
            m.contains("requires authentication")
                && m.contains("write proxy = http://user:password@"),
            "{m}"
        );

        let (port, _) = fake_proxy(b"HTTP/1.1 403 Access violation\r\n\r\n".to_vec()).await;
        let m = refusal(port, None, 8443, T).await;
        assert!(
            m.contains("refused CONNECT hub:8443 (403 Forbidden)") && m.contains("port 8443"),
            "{m}"
        );
    }

    #[tokio::test]
    async fn oversized_or_malformed_heads_are_refused() {
        let mut huge = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..400 {
            huge.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "a".repeat(40)).as_bytes());
        }
        huge.extend_from_slice(b"\r\n");
        for (answer, want) in [
            (
                huge,
                "invalid answer to CONNECT hub:443: message head is too large",
            ),
            (
                b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n".to_vec(),
                "invalid answer to CONNECT hub:443: invalid HTTP header",
            ),
            (
                b"SSH-2.0-OpenSSH_9.2\r\n\r\n".to_vec(),
                "invalid answer to CONNECT hub:443: invalid HTTP version",
            ),
            (
                b"HTTP/1.1 200".to_vec(),
                "invalid answer to CONNECT hub:443: connection closed before",
            ),
        ] {
            let (port, _) = fake_proxy_with(answer, false).await;
            let m = refusal(port, None, 443, T).await;
            assert!(
                m.contains(want) && m.contains(&format!("127.0.0.1:{port}")),
                "{m}"
            );
        }
    }

    #[tokio::test]
    async fn a_proxy_that_is_down_or_silent_is_named() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let m = refusal(port, None, 443, T).await;
        assert!(
            m.starts_with(&format!("cannot reach the proxy http://127.0.0.1:{port}: ")),
            "{m}"
        );
        assert!(m.contains("refused"), "{m}");

        // Accepts, never answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let _keep = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(s);
        });
        let m = refusal(port, None, 443, Duration::from_millis(300)).await;
        assert!(m.contains("did not answer the CONNECT request"), "{m}");
    }
}
