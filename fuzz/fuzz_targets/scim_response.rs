//! SCIM answers as a hostile or broken SCIM server sends them to the hub.
//!
//! 1. The bytes as one body, parsed as each shape the hub reads: ListResponses of Users and of
//!    Groups, a User, a Group, an Error, and a ListResponse of raw JSON values.
//! 2. The bytes as a series of answers (`status: u16 LE, len: u16 LE, body`) served one after
//!    the other to the SCIM client, which lists users and groups, looks them up, creates,
//!    patches, deletes and probes the base path with them. Every call ends with a result or a
//!    typed error whose diagnosis is one line; once the answers run out the transport fails, so
//!    every call ends. The client's retry layer waits between attempts (backoff, Retry-After):
//!    it runs on a tokio runtime whose clock is paused, so those waits cost no time.
#![no_main]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};

use futures_util::future::BoxFuture;
use libfuzzer_sys::fuzz_target;
use scim_connect::scim::client::ScimClient;
use scim_connect::scim::error::ScimError;
use scim_connect::scim::resources::{ListResponse, PatchOp, ScimErrorBody, ScimGroup, ScimUser};
use scim_connect::scim::transport::{ScimRequest, ScimResponse, Transport, TransportError};

/// Serves the answers it was given, in order, then fails every request.
struct Scripted(Mutex<VecDeque<ScimResponse>>);

impl Transport for Scripted {
    fn send(&self, _request: ScimRequest) -> BoxFuture<'_, Result<ScimResponse, TransportError>> {
        let next = self.0.lock().unwrap().pop_front();
        Box::pin(async move { next.ok_or(TransportError::Timeout { after_ms: 1 }) })
    }
}

fn answers(mut data: &[u8]) -> VecDeque<ScimResponse> {
    let mut out = VecDeque::new();
    while data.len() >= 4 {
        let status = u16::from_le_bytes([data[0], data[1]]) % 600;
        let len = usize::from(u16::from_le_bytes([data[2], data[3]])).min(data.len() - 4);
        out.push_back(ScimResponse {
            status,
            headers: Vec::new(),
            body: data[4..4 + len].to_vec(),
        });
        data = &data[4 + len..];
    }
    out
}

fn check(result: Result<(), ScimError>) {
    if let Err(e) = result {
        let text = e.diagnosis();
        assert!(!text.contains('\n'), "diagnosis on several lines: {text:?}");
        let _ = e.to_string();
    }
}

/// One runtime for every input: building one per input would dominate the exec rate.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a current-thread runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<ListResponse<ScimUser>>(data);
    let _ = serde_json::from_slice::<ListResponse<ScimGroup>>(data);
    let _ = serde_json::from_slice::<ScimUser>(data);
    let _ = serde_json::from_slice::<ScimGroup>(data);
    let _ = serde_json::from_slice::<ScimErrorBody>(data);
    let _ = serde_json::from_slice::<ListResponse<serde_json::Value>>(data);

    let transport = Arc::new(Scripted(Mutex::new(answers(data))));
    let client = ScimClient::new(
        transport,
        "/scim/v2".into(),
        Some("Bearer fuzz".into()),
        100,
    );
    let user = ScimUser {
        external_id: Some("ext-1".into()),
        user_name: "fuzz@example.com".into(),
        ..Default::default()
    };
    let group = ScimGroup {
        external_id: Some("g-1".into()),
        display_name: "Fuzzers".into(),
        ..Default::default()
    };
    runtime().block_on(async {
        check(client.list_users().await.map(drop));
        check(
            client
                .find_user_by_user_name("Fuzz@Example.com")
                .await
                .map(drop),
        );
        check(client.create_user(&user).await.map(drop));
        check(
            client
                .patch_user("u1", &[PatchOp::replace("active", false.into())])
                .await,
        );
        check(client.delete_user("u1").await);
        check(client.check_base().await);
        check(client.list_groups().await.map(drop));
        check(client.find_group("g-1", "fuzzers").await.map(drop));
        check(client.create_group(&group).await.map(drop));
        check(
            client
                .patch_group("g1", &[PatchOp::replace("displayName", "x".into())])
                .await,
        );
        check(client.delete_group("g1").await);
    });
});
