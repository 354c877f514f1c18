//! A TCP relay between an agent and the hub that can make the network fail silently: bytes
//! stop flowing, but nobody is told. Each connection the agent opens is relayed to the hub on a
//! fresh connection of its own; faults apply to the connections open at that moment, so the
//! agent's next dial goes through a healthy one.
//!
//! - [`Relay::deafen`]: the hub's bytes are swallowed, the agent's still reach the hub, and the
//!   agent giving the connection up is not passed on: an agent whose heartbeat gives up while
//!   the hub keeps hearing it until then (a one-way outage).
//! - [`Relay::cut`]: the agent's side is reset (as a NAT or firewall that forgot the flow
//!   answers), the hub's side stays open and hears nothing more.
//!
//! The relay reads and discards what the hub sends on a faulty connection, so it sees the moment
//! the hub closes it: [`Relay::open_toward_hub`] counts the connections the hub still holds.
//! It runs on its own thread and runtime (tests may block while it relays) and listens on
//! 127.0.0.1 only.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

const FORWARD: u8 = 0;
const DEAF: u8 = 1;
const CUT: u8 = 2;

/// One relayed connection.
#[derive(Default)]
struct Conn {
    mode: AtomicU8,
    /// Woken when the mode changes.
    changed: Notify,
    /// The hub closed its side.
    hub_closed: AtomicBool,
}

/// The running relay; every connection is closed when it is dropped.
pub struct Relay {
    /// Where agents dial (127.0.0.1).
    pub addr: SocketAddr,
    conns: Arc<Mutex<Vec<Arc<Conn>>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    /// Relays every connection to `upstream` (the hub's agent listener).
    pub fn start(upstream: SocketAddr) -> Relay {
        let conns: Arc<Mutex<Vec<Arc<Conn>>>> = Arc::default();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let shared = conns.clone();
        let thread = std::thread::Builder::new()
            .name("relay".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("relay runtime");
                // Leaving block_on drops the runtime and with it every connection.
                runtime.block_on(async move {
                    let listener = TcpListener::bind("127.0.0.1:0")
                        .await
                        .expect("bind the relay on 127.0.0.1");
                    addr_tx.send(listener.local_addr().unwrap()).unwrap();
                    let accept = async {
                        loop {
                            let Ok((agent, _)) = listener.accept().await else {
                                continue;
                            };
                            let conn = Arc::new(Conn::default());
                            shared.lock().unwrap().push(conn.clone());
                            tokio::spawn(relay(agent, upstream, conn));
                        }
                    };
                    tokio::select! {
                        _ = accept => {}
                        _ = stop_rx => {}
                    }
                });
            })
            .expect("start the relay thread");
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("relay address");
        Relay {
            addr,
            conns,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    fn set_open(&self, mode: u8) {
        for conn in self.conns.lock().unwrap().iter() {
            if conn.mode.load(Ordering::SeqCst) == FORWARD
                && !conn.hub_closed.load(Ordering::SeqCst)
            {
                conn.mode.store(mode, Ordering::SeqCst);
                conn.changed.notify_one();
            }
        }
    }

    /// The connections relayed so far (one per agent dial).
    pub fn accepted(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    /// On every healthy connection: swallow what the hub sends, keep passing what the agent
    /// sends, and never pass on the agent's leaving.
    pub fn deafen(&self) {
        self.set_open(DEAF);
    }

    /// On every healthy connection: reset the agent's side, keep the hub's side open and silent.
    pub fn cut(&self) {
        self.set_open(CUT);
    }

    /// Connections whose hub side the hub has not closed.
    pub fn open_toward_hub(&self) -> usize {
        self.conns
            .lock()
            .unwrap()
            .iter()
            .filter(|c| !c.hub_closed.load(Ordering::SeqCst))
            .count()
    }

    /// Whether the hub closed its side of connection number `index` (0 is the first).
    pub fn hub_closed(&self, index: usize) -> bool {
        self.conns.lock().unwrap()[index]
            .hub_closed
            .load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn relay(agent: TcpStream, upstream: SocketAddr, conn: Arc<Conn>) {
    let Ok(hub) = TcpStream::connect(upstream).await else {
        conn.hub_closed.store(true, Ordering::SeqCst);
        return;
    };
    let _ = agent.set_nodelay(true);
    let _ = hub.set_nodelay(true);
    let (mut hub_read, mut hub_write) = hub.into_split();
    let mut agent = Some(agent);
    let mut from_agent = vec![0u8; 64 * 1024];
    let mut from_hub = vec![0u8; 64 * 1024];
    loop {
        let mode = conn.mode.load(Ordering::SeqCst);
        if mode == CUT {
            if let Some(agent) = agent.take() {
                // Linger 0: the agent gets a reset, as from a middlebox that lost the flow.
                // (Deprecated because a non-zero linger blocks the dropping thread; zero
                // never does.)
                #[allow(deprecated)]
                let _ = agent.set_linger(Some(Duration::ZERO));
            }
        }
        tokio::select! {
            read = async { agent.as_mut().unwrap().read(&mut from_agent).await }, if agent.is_some() => {
                match read {
                    Ok(n) if n > 0 => {
                        if mode != CUT && hub_write.write_all(&from_agent[..n]).await.is_err() {
                            break;
                        }
                    }
                    _ => {
                        agent = None;
                        if mode == FORWARD {
                            let _ = hub_write.shutdown().await;
                        }
                    }
                }
            }
            read = hub_read.read(&mut from_hub) => {
                match read {
                    Ok(n) if n > 0 => {
                        if mode == FORWARD {
                            if let Some(a) = agent.as_mut() {
                                if a.write_all(&from_hub[..n]).await.is_err() {
                                    agent = None;
                                }
                            }
                        }
                    }
                    _ => {
                        conn.hub_closed.store(true, Ordering::SeqCst);
                        break;
                    }
                }
            }
            _ = conn.changed.notified() => {}
        }
    }
    conn.hub_closed.store(true, Ordering::SeqCst);
}
