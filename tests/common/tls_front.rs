//! A TLS front for tests: terminates TLS on a loopback port with a certificate made by
//! `scim_connect::certs` and pipes the plaintext to a backend (a scim2-server, a tinyproxy, …),
//! recording what each client sent: the SNI name and the first request head.
//!
//! It runs on a thread of its own with its own runtime, so it keeps serving while a test blocks
//! on a child process (`connect sync`). It must never listen or dial anywhere but 127.0.0.1, and
//! stops when dropped.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use scim_connect::certs::Pem;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

/// The most bytes of a connection's first request kept for [`TlsFront::request_heads`].
const HEAD_LIMIT: usize = 8 * 1024;

/// What one client connection looked like.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    /// The SNI name of the handshake; `None` when the client sent none, or when the
    /// handshake failed before it was read.
    pub server_name: Option<String>,
    /// Whether the TLS handshake completed.
    pub handshake_ok: bool,
    /// The first request head the client sent after the handshake (up to `\r\n\r\n`).
    pub head: String,
}

/// A running TLS front; stopped when dropped.
pub struct TlsFront {
    /// `127.0.0.1:<port>`.
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TlsFront {
    /// Serves `cert` on a free loopback port and forwards every connection to `backend`.
    pub fn start(cert: &Pem, backend: SocketAddr) -> TlsFront {
        let certs = rustls_pemfile::certs(&mut cert.cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("certificate PEM");
        let key = rustls_pemfile::private_key(&mut cert.key.as_bytes())
            .expect("key PEM")
            .expect("a private key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("certificate and key match");
        let acceptor = TlsAcceptor::from(Arc::new(config));

        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (stop, mut stopped) = oneshot::channel::<()>();
        let recorded = seen.clone();
        let thread = std::thread::Builder::new()
            .name(format!("tls-front-{}", addr.port()))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("TLS front runtime");
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(std_listener).unwrap();
                    loop {
                        tokio::select! {
                            _ = &mut stopped => break,
                            accepted = listener.accept() => {
                                let Ok((client, _)) = accepted else { continue };
                                let acceptor = acceptor.clone();
                                let recorded = recorded.clone();
                                tokio::spawn(serve(client, acceptor, backend, recorded));
                            }
                        }
                    }
                });
            })
            .expect("start the TLS front thread");
        TlsFront {
            addr,
            seen,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every connection so far, in the order they were accepted.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(
    client: TcpStream,
    acceptor: TlsAcceptor,
    backend: SocketAddr,
    recorded: Arc<Mutex<Vec<Seen>>>,
) {
    let _ = client.set_nodelay(true);
    let index = {
        let mut all = recorded.lock().unwrap();
        all.push(Seen::default());
        all.len() - 1
    };
    let update = |f: &dyn Fn(&mut Seen)| f(&mut recorded.lock().unwrap()[index]);
    let Ok(tls) = acceptor.accept(client).await else {
        return;
    };
    let name = tls.get_ref().1.server_name().map(str::to_owned);
    update(&|s| {
        s.server_name = name.clone();
        s.handshake_ok = true;
    });
    let Ok(upstream) = TcpStream::connect(backend).await else {
        return;
    };
    let _ = upstream.set_nodelay(true);
    let (mut client_read, mut client_write) = tokio::io::split(tls);
    let (mut up_read, mut up_write) = upstream.into_split();
    let to_backend = async {
        let mut head = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if head.len() < HEAD_LIMIT && !head.windows(4).any(|w| w == b"\r\n\r\n") {
                head.extend_from_slice(&buf[..n.min(HEAD_LIMIT - head.len())]);
                let text = String::from_utf8_lossy(&head);
                let text = text.split("\r\n\r\n").next().unwrap_or_default().to_owned();
                update(&|s| s.head = text.clone());
            }
            if up_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = up_write.shutdown().await;
    };
    let to_client = async {
        let _ = tokio::io::copy(&mut up_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    tokio::join!(to_backend, to_client);
}
