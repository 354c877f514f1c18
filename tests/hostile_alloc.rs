//! What a hostile hub can make the agent allocate, measured.
//!
//! The agent runs in this process (`run::start`, what `connect run` calls) under a global
//! allocator that records the largest single allocation while armed. The hostile hub of
//! `common::hostile` then sends length fields that lie: a websocket frame header announcing
//! 16 MiB, a 7-byte frame whose string claims 15 MiB, and records that keep saying "more" past
//! the frame limit. The agent must refuse each from the length alone, never reserving what was
//! announced. One test in this binary, so no other test's allocations are counted.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::deploy::SERVICE_ID;
use common::hostile::{hub_request, CountingListener, Ended, HostileHub};
use scim_connect::actors::agent::run;
use scim_connect::config::agent::AgentConfig;
use scim_connect::messages::{ForwardError, Frame};
use scim_connect::tunnel::codec::{FLAG_MORE, RECORD_CHUNK_BYTES, SMALL_FRAME_DECODE_LIMIT};
use scim_connect::tunnel::MAX_FRAME_BYTES;

/// Records the largest allocation (or reallocation target) requested while armed.
struct Largest;

static ARMED: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

fn note(size: usize) {
    if ARMED.load(Ordering::Relaxed) {
        LARGEST.fetch_max(size, Ordering::Relaxed);
    }
}

// SAFETY: every call is passed to the system allocator unchanged; only sizes are recorded.
unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Largest = Largest;

fn arm() {
    LARGEST.store(0, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
}

fn disarm() -> usize {
    ARMED.store(false, Ordering::SeqCst);
    LARGEST.load(Ordering::SeqCst)
}

/// How long the agent may take to hang up. Generous: here the allocation is the proof, and
/// sending 16 MiB takes a while on a busy machine.
const HANG_UP_WITHIN: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_length_fields_cost_the_agent_nothing() {
    let hub = HostileHub::start().await;
    let crm = CountingListener::start().await;
    let config = hub.write_agent_config("agent", SERVICE_ID, &[crm.target("crm")]);
    let agent = run::start(&AgentConfig::load(&config).unwrap())
        .await
        .unwrap();

    // Control: a genuine 3 MiB request costs at least 3 MiB, so the counter does see the
    // agent's allocations.
    let mut session = hub.accept_session(SERVICE_ID).await;
    let mut big = hub_request(1, "undeclared", "POST", "/scim/v2/Users");
    big.body = vec![b'x'; 3 << 20];
    let records =
        session.seal_encoded(&scim_connect::tunnel::encode_frame(&Frame::Request(big)).unwrap());
    arm();
    session.send_records(records).await;
    let answer = session.next_frame().await.unwrap();
    let control = disarm();
    assert!(
        matches!(&answer, Frame::Response(r) if matches!(r.result, Err(ForwardError::UndeclaredTarget { .. }))),
        "{answer:?}"
    );
    assert!(control >= 3 << 20, "largest allocation {control} bytes");

    // A websocket frame header announcing 16 MiB. tungstenite's default configuration
    // reserves the announced length at once; the agent's refuses on the header.
    let mut header = vec![0x82, 127];
    header.extend_from_slice(&(16u64 << 20).to_be_bytes());
    arm();
    session.send_raw(&header).await.unwrap();
    assert!(matches!(
        session.ended_within(HANG_UP_WITHIN).await,
        Ended::Closed(_)
    ));
    let largest = disarm();
    assert!(
        largest < SMALL_FRAME_DECODE_LIMIT,
        "a frame header made the agent allocate {largest} bytes"
    );

    // A 7-byte Goodbye whose reason claims 15 MiB: refused from the claim, before bincode
    // allocates the string.
    let mut session = hub.accept_session(SERVICE_ID).await;
    let mut forged = vec![8u8, 0xFC];
    forged.extend_from_slice(&(15u32 << 20).to_le_bytes());
    let records = session.seal_encoded(&forged);
    arm();
    session.send_records(records).await;
    assert!(matches!(
        session.ended_within(HANG_UP_WITHIN).await,
        Ended::Closed(_)
    ));
    let largest = disarm();
    assert!(
        largest <= SMALL_FRAME_DECODE_LIMIT,
        "a 7-byte frame made the agent allocate {largest} bytes"
    );

    // Records that keep saying "more": the reassembly buffer stops at the frame limit.
    let mut session = hub.accept_session(SERVICE_ID).await;
    let chunk = vec![0u8; RECORD_CHUNK_BYTES];
    let records: Vec<Vec<u8>> = (0..MAX_FRAME_BYTES / RECORD_CHUNK_BYTES + 8)
        .map(|_| session.seal_record(FLAG_MORE, &chunk))
        .collect();
    arm();
    let _ = session.try_send_records(records).await;
    assert!(matches!(
        session.ended_within(HANG_UP_WITHIN).await,
        Ended::Closed(_)
    ));
    let largest = disarm();
    assert!(
        largest <= MAX_FRAME_BYTES,
        "an endless frame made the agent allocate {largest} bytes"
    );

    assert_eq!(crm.connections(), 0);
    agent.shutdown().await;
}
