//! The HTTP/1.1 client of one target: connect (with or without TLS), send, read a bounded
//! response, keep idle connections for reuse, and bound how many requests run at once.
//!
//! This module owns the sockets toward one target. The TCP address always comes from the
//! target's declaration; the request only supplies the `Host` header and the TLS server name.
//! It must never resend a request that may have reached the target, except the idempotent
//! methods after a reused connection turned out dead.
//!
//! A response is read frame by frame into one buffer and refused the moment it passes the size
//! limit, so a target streaming an endless body costs at most the limit. Bodies past a small
//! size share a few agent-wide [`LargeBodies`] slots, so many targets (or many requests) all
//! answering huge bodies at once cannot multiply that cost by the number of requests in flight.

use std::error::Error as StdError;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::{Method, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::request::{self, Prepared};
use super::tls::{self, SkipContext, TlsConfigs, TlsSetupError};
use crate::messages::agent::{
    DialerLimits, TargetSpec, TargetTls, MAX_RESPONSE_BODY_BYTES, MAX_RESPONSE_HEAD_BYTES,
};
use crate::messages::{ForwardError, ForwardRequest, HttpResponse, Scheme};

/// Used when a request carries `timeout_ms == 0`.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

/// The longest a hub may ask the agent to wait for one answer. The hub's own timeouts are far
/// shorter; without a cap a buggy or compromised hub could park requests (and their memory)
/// on the agent for weeks.
pub const MAX_RESPONSE_TIMEOUT: Duration = Duration::from_secs(300);

/// The response timeout of a request that asks for `timeout_ms` (0: the default), capped at
/// [`MAX_RESPONSE_TIMEOUT`], with the milliseconds to report when it runs out.
pub fn response_timeout(timeout_ms: u32) -> (Duration, u32) {
    let asked = if timeout_ms == 0 {
        DEFAULT_RESPONSE_TIMEOUT
    } else {
        Duration::from_millis(u64::from(timeout_ms))
    };
    let timeout = asked.min(MAX_RESPONSE_TIMEOUT);
    (
        timeout,
        u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
    )
}

/// An idle connection older than this is closed rather than reused: servers commonly drop idle
/// connections after about a minute, and a fresh one is cheaper than a failed attempt.
const IDLE_TIMEOUT: Duration = Duration::from_secs(55);

/// How long a finished connection may take to become ready again before it is given up.
const READY_GRACE: Duration = Duration::from_secs(5);

/// One HTTP/1.1 connection to the target: its request handle, and a signal that fires once its
/// socket is closed.
struct Conn {
    send: SendRequest<Full<Bytes>>,
    gone: watch::Receiver<()>,
}

impl Conn {
    fn is_closed(&self) -> bool {
        self.send.is_closed()
    }

    fn is_ready(&self) -> bool {
        self.send.is_ready()
    }
}

/// A request's place among the target's `max_in_flight`. It is given back when the request
/// ends, except when the request leaves behind a connection that is still closing (it timed
/// out, was cancelled, or was refused mid-body): then only once that connection's socket is
/// closed, so that the target never sees more of our connections in use than the bound.
struct InFlightSlot {
    permit: Option<OwnedSemaphorePermit>,
    /// The connection the request is using, until the exchange on it completed.
    conn: Option<watch::Receiver<()>>,
}

impl InFlightSlot {
    fn on(&mut self, conn: &Conn) {
        self.conn = Some(conn.gone.clone());
    }

    /// The exchange completed: the connection is reused or closed in order.
    fn off(&mut self) {
        self.conn = None;
    }
}

impl Drop for InFlightSlot {
    fn drop(&mut self) {
        let (Some(permit), Some(mut gone)) = (self.permit.take(), self.conn.take()) else {
            return;
        };
        if gone.has_changed().is_err() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            // The connection's task closes the socket as soon as it sees the exchange given
            // up; the grace only guards against one that never ends.
            let _ = tokio::time::timeout(READY_GRACE, gone.changed()).await;
            drop(permit);
        });
    }
}

/// What a connection was opened for: a connection is reused only for requests that would
/// have opened the same one.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ConnKey {
    Plain,
    Tls {
        server_name: ServerName<'static>,
        skip_verify: bool,
    },
}

struct Idle {
    key: ConnKey,
    conn: Conn,
    since: Instant,
}

/// Idle keep-alive connections of one target.
struct Pool {
    max_idle: usize,
    idle: Mutex<Vec<Idle>>,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        // The vector stays consistent even if a holder panicked: every operation on it is a
        // single push/remove/retain.
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The most recently used live connection for `key`, if any. Dead and stale ones found
    /// on the way are dropped.
    fn checkout(&self, key: &ConnKey) -> Option<Conn> {
        let mut idle = self.lock();
        idle.retain(|c| !c.conn.is_closed() && c.since.elapsed() < IDLE_TIMEOUT);
        let position = idle
            .iter()
            .rposition(|c| &c.key == key && c.conn.is_ready())?;
        Some(idle.remove(position).conn)
    }

    fn put(&self, key: ConnKey, conn: Conn) {
        if self.max_idle == 0 || conn.is_closed() {
            return;
        }
        let mut idle = self.lock();
        idle.retain(|c| !c.conn.is_closed());
        if idle.len() >= self.max_idle {
            idle.remove(0);
        }
        idle.push(Idle {
            key,
            conn,
            since: Instant::now(),
        });
    }

    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Progress of one request, so that a timeout can say whether the target never accepted the
/// connection or never answered.
struct Progress {
    started: Instant,
    /// Nanoseconds after `started` at which the connect began; 0 while not connecting.
    connecting_since: AtomicU64,
}

impl Progress {
    fn new() -> Self {
        Progress {
            started: Instant::now(),
            connecting_since: AtomicU64::new(0),
        }
    }

    fn connecting(&self) {
        let at = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.connecting_since.store(at.max(1), Ordering::Relaxed);
    }

    fn exchanging(&self) {
        self.connecting_since.store(0, Ordering::Relaxed);
    }

    /// True when the deadline passed during a connect that took the larger share of the
    /// time: the target did not accept. A request that waited most of its time for a slot
    /// (other requests holding the target) and had barely begun to connect timed out because
    /// the target is slow, not unreachable.
    fn stuck_connecting(&self) -> bool {
        let since = self.connecting_since.load(Ordering::Relaxed);
        if since == 0 {
            return false;
        }
        let total = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        total.saturating_sub(since) >= since
    }
}

/// The agent-wide allowance for large response bodies: any body may grow to
/// `unreserved` bytes freely; reading past that waits for one of a few slots shared by every
/// target. Cheap to clone; clones share the slots.
#[derive(Debug, Clone)]
pub struct LargeBodies {
    slots: Arc<Semaphore>,
    unreserved: usize,
}

impl LargeBodies {
    /// The slots `limits` asks for ([`DialerLimits::large_bodies`], at least one).
    pub fn new(limits: &DialerLimits) -> LargeBodies {
        LargeBodies {
            slots: Arc::new(Semaphore::new(limits.large_bodies.max(1))),
            unreserved: limits.unreserved_body_bytes,
        }
    }

    /// Slots free right now.
    pub fn available(&self) -> usize {
        self.slots.available_permits()
    }
}

/// The client of one declared target. Shared (behind an `Arc`) by all forwards in flight.
pub struct TargetClient {
    spec: TargetSpec,
    limits: DialerLimits,
    /// The response body limit in force: the configured one, lowered to what fits in a frame.
    body_limit: usize,
    permits: Arc<Semaphore>,
    large_bodies: LargeBodies,
    pool: Arc<Pool>,
    tls: TlsConfigs,
}

impl std::fmt::Debug for TargetClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetClient")
            .field("name", &self.spec.name)
            .field("addr", &self.spec.addr)
            .field("tls", &self.spec.tls)
            .finish_non_exhaustive()
    }
}

/// Joins an error and its sources into one line.
fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

fn is_idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::PUT | Method::DELETE)
}

impl TargetClient {
    /// A client for `spec`. `permits` bounds the requests in flight; pass the same semaphore
    /// to the client that replaces this one after a configuration change, so the bound holds
    /// across the change. `large_bodies` is shared by every target of the agent.
    pub fn new(
        spec: TargetSpec,
        limits: DialerLimits,
        permits: Arc<Semaphore>,
        large_bodies: LargeBodies,
    ) -> Result<Self, TlsSetupError> {
        let tls = TlsConfigs::new(&spec.name, spec.extra_roots.clone())?;
        Ok(TargetClient {
            pool: Arc::new(Pool {
                max_idle: limits.max_idle_per_target,
                idle: Mutex::new(Vec::new()),
            }),
            body_limit: limits.max_response_bytes.min(MAX_RESPONSE_BODY_BYTES),
            spec,
            limits,
            permits,
            large_bodies,
            tls,
        })
    }

    /// The declaration this client serves.
    pub fn spec(&self) -> &TargetSpec {
        &self.spec
    }

    /// Idle connections currently kept for reuse.
    pub fn idle_connections(&self) -> usize {
        self.pool.len()
    }

    /// Forwards `req` to the target and returns its answer, or the typed reason there is none.
    /// A request refused by the checks never opens a connection.
    pub async fn forward(&self, req: &ForwardRequest) -> Result<HttpResponse, ForwardError> {
        let prepared = request::prepare(req)?;
        let key = self.conn_key(req)?;
        let (timeout, timeout_ms) = response_timeout(req.timeout_ms);
        let progress = Progress::new();
        match tokio::time::timeout(timeout, self.exchange(req, &prepared, key, &progress)).await {
            Ok(result) => result,
            Err(_) if progress.stuck_connecting() => Err(ForwardError::ConnectTimeout {
                addr: self.spec.addr.clone(),
            }),
            Err(_) => Err(ForwardError::ResponseTimeout {
                addr: self.spec.addr.clone(),
                timeout_ms,
            }),
        }
    }

    /// Decides plain or TLS, and for TLS the server name and whether certificates are checked.
    fn conn_key(&self, req: &ForwardRequest) -> Result<ConnKey, ForwardError> {
        let use_tls = match (self.spec.tls, req.scheme) {
            (TargetTls::Always, _) => true,
            (TargetTls::Never, _) => false,
            (TargetTls::FromScheme, Scheme::Https) => true,
            (TargetTls::FromScheme, Scheme::Http) => false,
        };
        if !use_tls {
            return Ok(ConnKey::Plain);
        }
        let server_name = tls::server_name(&req.host).ok_or_else(|| ForwardError::Refused {
            reason: format!(
                "host `{}` is not a valid TLS server name (DNS name or IP address)",
                req.host
            ),
        })?;
        Ok(ConnKey::Tls {
            server_name,
            skip_verify: req.skip_tls_verify && self.spec.insecure_allow_skip_tls_check,
        })
    }

    async fn exchange(
        &self,
        req: &ForwardRequest,
        prepared: &Prepared,
        key: ConnKey,
        progress: &Progress,
    ) -> Result<HttpResponse, ForwardError> {
        let id = req.id;
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ForwardError::ShuttingDown)?;
        let mut slot = InFlightSlot {
            permit: Some(permit),
            conn: None,
        };

        let mut request = prepared.to_request();
        while let Some(mut conn) = self.pool.checkout(&key) {
            slot.on(&conn);
            match conn.send.try_send_request(request).await {
                Ok(response) => {
                    tracing::debug!(request_id = id, target_name = %self.spec.name, "sent on a reused connection");
                    return self.read_response(id, response, conn, key, &mut slot).await;
                }
                Err(mut failed) => match failed.take_message() {
                    Some(unsent) => {
                        tracing::debug!(
                            request_id = id,
                            target_name = %self.spec.name,
                            "reused connection was closed before the request left; trying another"
                        );
                        request = unsent;
                    }
                    None if is_idempotent(prepared.method())
                        && failed.error().is_incomplete_message() =>
                    {
                        tracing::debug!(
                            request_id = id,
                            target_name = %self.spec.name,
                            "reused connection closed without an answer; resending idempotent request on a new connection"
                        );
                        request = prepared.to_request();
                        break;
                    }
                    None => return Err(self.network(failed.error())),
                },
            }
        }

        progress.connecting();
        let first_bytes = Arc::new(FirstBytes::default());
        let mut conn = self.connect(req, &key, &first_bytes).await?;
        slot.on(&conn);
        progress.exchanging();
        match conn.send.try_send_request(request).await {
            Ok(response) => self.read_response(id, response, conn, key, &mut slot).await,
            Err(failed) => {
                let error = failed.into_error();
                match first_bytes.get() {
                    Some(first) if key == ConnKey::Plain && looks_like_tls(first) => {
                        Err(ForwardError::Tls {
                            addr: self.spec.addr.clone(),
                            detail: self.tls_answer_to_plain_http(),
                        })
                    }
                    _ => Err(self.network(&error)),
                }
            }
        }
    }

    /// What to do when a plain-HTTP request was answered with TLS records: the port serves
    /// HTTPS. Deliberately free of the word "certificate": skipping checks does not help here.
    fn tls_answer_to_plain_http(&self) -> String {
        let name = &self.spec.name;
        match self.spec.tls {
            TargetTls::Never => format!(
                "plain HTTP was sent, but the target answered in TLS: it serves HTTPS on this \
                 port; target `{name}` is declared with -no-tls: declare it again without \
                 -no-tls (connect set-target {name} {addr} -override) and use an https:// base \
                 URL",
                addr = self.spec.addr
            ),
            TargetTls::FromScheme | TargetTls::Always => format!(
                "plain HTTP was sent, but the target answered in TLS: it serves HTTPS on this \
                 port; use an https:// base URL for the application, or declare target \
                 `{name}` with -always-tls"
            ),
        }
    }

    fn network(&self, err: &(dyn StdError + 'static)) -> ForwardError {
        ForwardError::Network {
            addr: self.spec.addr.clone(),
            detail: chain(err),
        }
    }

    /// Opens a new connection: resolve, TCP connect (TCP_NODELAY), TLS if asked, HTTP/1.1
    /// handshake. Resolution, and then connect plus TLS handshake, each take at most the
    /// connect timeout.
    async fn connect(
        &self,
        req: &ForwardRequest,
        key: &ConnKey,
        first_bytes: &Arc<FirstBytes>,
    ) -> Result<Conn, ForwardError> {
        let addr = &self.spec.addr;
        let connect_timeout = self.limits.connect_timeout;
        let started = Instant::now();

        let resolved =
            match tokio::time::timeout(connect_timeout, tokio::net::lookup_host(addr)).await {
                Err(_) => {
                    return Err(ForwardError::Dns {
                        addr: addr.clone(),
                        detail: format!("no answer within {} s", connect_timeout.as_secs_f32()),
                    })
                }
                Ok(Err(e)) => {
                    return Err(ForwardError::Dns {
                        addr: addr.clone(),
                        detail: e.to_string(),
                    })
                }
                Ok(Ok(found)) => found.collect::<Vec<_>>(),
            };
        if resolved.is_empty() {
            return Err(ForwardError::Dns {
                addr: addr.clone(),
                detail: "the name has no address".to_owned(),
            });
        }

        let deadline = Instant::now() + connect_timeout;
        let stream = tokio::time::timeout_at(deadline, self.connect_any(&resolved))
            .await
            .map_err(|_| ForwardError::ConnectTimeout { addr: addr.clone() })??;
        stream.set_nodelay(true).map_err(|e| self.network(&e))?;

        let conn = match key {
            ConnKey::Plain => {
                self.handshake(Sniffing {
                    inner: stream,
                    first: first_bytes.clone(),
                })
                .await?
            }
            ConnKey::Tls {
                server_name,
                skip_verify,
            } => {
                let config = if *skip_verify {
                    self.tls.insecure()
                } else {
                    self.tls.verified().await.map_err(|e| ForwardError::Tls {
                        addr: addr.clone(),
                        detail: format!("cannot prepare certificate verification: {e}"),
                    })?
                };
                let skip = if *skip_verify {
                    SkipContext::Skipped
                } else if req.skip_tls_verify {
                    SkipContext::RequestedNotAllowed
                } else if self.spec.insecure_allow_skip_tls_check {
                    SkipContext::AllowedNotRequested
                } else {
                    SkipContext::NotRequested
                };
                let connector = TlsConnector::from(config);
                let tls_stream = tokio::time::timeout_at(
                    deadline,
                    connector.connect(server_name.clone(), stream),
                )
                .await
                .map_err(|_| ForwardError::ConnectTimeout { addr: addr.clone() })?
                .map_err(|e| ForwardError::Tls {
                    addr: addr.clone(),
                    detail: tls::describe_handshake_error(&e, &self.spec.name, skip),
                })?;
                self.handshake(tls_stream).await?
            }
        };
        tracing::debug!(
            request_id = req.id,
            target_name = %self.spec.name,
            tls = matches!(key, ConnKey::Tls { .. }),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "opened connection to target"
        );
        Ok(conn)
    }

    /// Tries each resolved address in turn. All refused → `ConnectRefused`; otherwise the last
    /// other failure.
    async fn connect_any(
        &self,
        resolved: &[std::net::SocketAddr],
    ) -> Result<TcpStream, ForwardError> {
        let mut last_other = None;
        for address in resolved {
            match TcpStream::connect(address).await {
                Ok(stream) => return Ok(stream),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    last_other = Some(ForwardError::ConnectTimeout {
                        addr: self.spec.addr.clone(),
                    })
                }
                Err(e) => last_other = Some(self.network(&e)),
            }
        }
        Err(last_other.unwrap_or_else(|| ForwardError::ConnectRefused {
            addr: self.spec.addr.clone(),
        }))
    }

    async fn handshake<T>(&self, io: T) -> Result<Conn, ForwardError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send, connection) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(MAX_RESPONSE_HEAD_BYTES)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| self.network(&e))?;
        let name = self.spec.name.clone();
        let (closed, gone) = watch::channel(());
        tokio::spawn(async move {
            // The connection owns the socket: once it is done, the socket is closed.
            if let Err(e) = connection.await {
                tracing::debug!(target_name = %name, error = %chain(&e), "connection to target ended with an error");
            }
            drop(closed);
        });
        Ok(Conn { send, gone })
    }

    /// Reads the body frame by frame within the size limit, then hands the connection back to
    /// the pool once it can carry another request. A declared length over the limit is refused
    /// before any byte of the body is read; an undeclared one the moment it passes the limit.
    async fn read_response(
        &self,
        id: u64,
        response: Response<Incoming>,
        conn: Conn,
        key: ConnKey,
        slot: &mut InFlightSlot,
    ) -> Result<HttpResponse, ForwardError> {
        let (parts, mut body) = response.into_parts();
        let declared = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let mut buffer = BodyBuffer::new(self.body_limit, &self.large_bodies);
        if let Some(len) = declared {
            // Dropping the unread body makes hyper close this connection.
            buffer.expect(len).await.map_err(|_| self.too_large())?;
        }
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ForwardError::Network {
                addr: self.spec.addr.clone(),
                detail: format!("response body interrupted: {}", chain(&e)),
            })?;
            // Trailers carry nothing the hub reads.
            if let Ok(data) = frame.into_data() {
                buffer.push(&data).await.map_err(|_| self.too_large())?;
            }
        }
        slot.off();
        self.release(id, conn, key);
        Ok(HttpResponse {
            status: parts.status.as_u16(),
            headers: request::response_headers(&parts.headers),
            body: buffer.into_bytes(),
        })
    }

    fn too_large(&self) -> ForwardError {
        ForwardError::TooLarge {
            addr: self.spec.addr.clone(),
            limit: self.body_limit as u64,
        }
    }

    fn release(&self, id: u64, mut conn: Conn, key: ConnKey) {
        if self.pool.max_idle == 0 || conn.is_closed() {
            return;
        }
        if conn.is_ready() {
            self.pool.put(key, conn);
            return;
        }
        // hyper marks the connection ready only after its task has finished the previous
        // exchange; wait for that in the background rather than delaying the answer.
        let pool = self.pool.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(READY_GRACE, conn.send.ready()).await {
                Ok(Ok(())) => pool.put(key, conn),
                _ => tracing::trace!(request_id = id, "connection not reusable"),
            }
        });
    }
}

/// The body passed the limit.
struct OverLimit;

/// A response body being read: one buffer that never grows past the limit, and the large-body
/// slot it holds once it is past the unreserved size.
struct BodyBuffer<'a> {
    bytes: Vec<u8>,
    limit: usize,
    large_bodies: &'a LargeBodies,
    slot: Option<OwnedSemaphorePermit>,
}

impl<'a> BodyBuffer<'a> {
    fn new(limit: usize, large_bodies: &'a LargeBodies) -> Self {
        BodyBuffer {
            bytes: Vec::new(),
            limit,
            large_bodies,
            slot: None,
        }
    }

    /// The target declared `len` bytes: refuse at once when over the limit, otherwise take a
    /// slot first if the body will need one, and reserve its size.
    async fn expect(&mut self, len: u64) -> Result<(), OverLimit> {
        let len = usize::try_from(len).map_err(|_| OverLimit)?;
        if len > self.limit {
            return Err(OverLimit);
        }
        self.make_room(len).await;
        self.bytes.reserve_exact(len);
        Ok(())
    }

    /// Appends one frame of the body, waiting for a large-body slot when it first grows past
    /// the unreserved size.
    async fn push(&mut self, data: &[u8]) -> Result<(), OverLimit> {
        let len = self.bytes.len() + data.len();
        if len > self.limit {
            return Err(OverLimit);
        }
        self.make_room(len).await;
        if len > self.bytes.capacity() {
            // Grow geometrically, but never past the limit.
            let target = (self.bytes.capacity() * 2).clamp(len, self.limit);
            self.bytes.reserve_exact(target - self.bytes.len());
        }
        self.bytes.extend_from_slice(data);
        Ok(())
    }

    async fn make_room(&mut self, len: usize) {
        if len > self.large_bodies.unreserved && self.slot.is_none() {
            // The semaphore is never closed; waiting here is bounded by the request's timeout.
            self.slot = self.large_bodies.slots.clone().acquire_owned().await.ok();
        }
    }

    fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

/// The first bytes received on a plain-HTTP connection, kept to recognise a server that
/// answers in TLS (an HTTPS port reached without TLS).
type FirstBytes = std::sync::OnceLock<Vec<u8>>;

/// How many leading bytes are kept: a TLS record header starts with its type and version.
const FIRST_BYTES: usize = 3;

/// True for the start of a TLS record (change_cipher_spec, alert, handshake or application
/// data, protocol major version 3).
fn looks_like_tls(first: &[u8]) -> bool {
    matches!(first, [0x14..=0x17, 0x03, ..])
}

/// A stream that records the first bytes it reads into a [`FirstBytes`].
struct Sniffing<T> {
    inner: T,
    first: Arc<FirstBytes>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Sniffing<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = &buf.filled()[before..];
        if !read.is_empty() && self.first.get().is_none() {
            let _ = self.first.set(read[..read.len().min(FIRST_BYTES)].to_vec());
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Sniffing<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hub_cannot_ask_for_more_than_the_longest_timeout() {
        assert_eq!(
            response_timeout(0),
            (DEFAULT_RESPONSE_TIMEOUT, 60_000),
            "0 asks for the default"
        );
        assert_eq!(
            response_timeout(1_500),
            (Duration::from_millis(1_500), 1_500)
        );
        assert_eq!(response_timeout(u32::MAX), (MAX_RESPONSE_TIMEOUT, 300_000));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_is_blamed_on_the_connect_only_when_the_connect_took_most_of_it() {
        let step = Duration::from_secs(1);
        let connecting_at_once = Progress::new();
        connecting_at_once.connecting();
        tokio::time::advance(step).await;
        assert!(connecting_at_once.stuck_connecting());

        // Waited 9 s for a slot, then 1 s connecting: the target is busy, not unreachable.
        let waited = Progress::new();
        tokio::time::advance(9 * step).await;
        waited.connecting();
        tokio::time::advance(step).await;
        assert!(!waited.stuck_connecting());

        let answering = Progress::new();
        answering.connecting();
        answering.exchanging();
        tokio::time::advance(step).await;
        assert!(!answering.stuck_connecting());
    }
}
