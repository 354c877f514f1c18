//! How many SCIM requests a no-change resync costs: provisions `USERS` users in `GROUPS`
//! groups into the in-process demo SCIM server, syncs again with nothing changed, and prints
//! the requests the server received for each run.
//!
//! `cargo run --release --example resync_requests -- [users] [groups] [page_size]`
//! (defaults: 10000 users, 100 groups, page size 100 — the hub's default).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use scim_connect::demo::scim_server::DemoScimServer;
use scim_connect::scim::{
    sync, DeprovisionMode, DesiredGroup, DesiredUser, HttpTransport, Managed, ScimClient,
    ScimEmail, SyncOptions,
};

fn arg(n: usize, default: usize) -> usize {
    std::env::args()
        .nth(n)
        .map(|a| {
            a.parse()
                .expect("arguments are numbers: users groups page_size")
        })
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let users = arg(1, 10_000);
    let groups = arg(2, 100).max(1);
    let page_size = arg(3, 100) as u32;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = DemoScimServer::start(listener, None).await.unwrap();
    let addr = server.local_addr();
    let client = ScimClient::new(
        Arc::new(HttpTransport::new(addr, addr.to_string())),
        server.base_path().to_string(),
        None,
        page_size,
    );

    let desired: Vec<DesiredUser> = (0..users)
        .map(|i| DesiredUser {
            external_id: format!("u{i:06}"),
            user_name: format!("user{i:06}@example.org"),
            display_name: Some(format!("User {i}")),
            given_name: Some("User".into()),
            family_name: Some(format!("N{i}")),
            formatted_name: None,
            emails: vec![ScimEmail {
                value: format!("user{i:06}@example.org"),
                kind: Some("work".into()),
                primary: Some(true),
            }],
            active: true,
        })
        .collect();
    let mut members: HashMap<usize, Vec<String>> = HashMap::new();
    for (i, u) in desired.iter().enumerate() {
        members
            .entry(i % groups)
            .or_default()
            .push(u.external_id.clone());
    }
    let desired_groups: Vec<DesiredGroup> = (0..groups)
        .map(|g| DesiredGroup {
            external_id: format!("g{g:04}"),
            display_name: format!("Group {g}"),
            members: members.remove(&g).unwrap_or_default(),
        })
        .collect();
    let options = SyncOptions::new(DeprovisionMode::Delete);

    let served = server.request_count();
    let clock = Instant::now();
    let first = sync(
        &client,
        &desired,
        &desired_groups,
        &Managed::default(),
        &options,
    )
    .await
    .expect("first run");
    let first_requests = server.request_count() - served;
    println!(
        "first run:  {} users and {} groups created, {} members added, {} failed: {} requests in {:.1} s",
        first.created,
        first.groups.created,
        first.groups.members_added,
        first.failed,
        first_requests,
        clock.elapsed().as_secs_f64()
    );

    let served = server.request_count();
    let clock = Instant::now();
    let again = sync(
        &client,
        &desired,
        &desired_groups,
        &first.managed_after,
        &options,
    )
    .await
    .expect("resync");
    let resync_requests = server.request_count() - served;
    println!(
        "resync:     {} users and {} groups unchanged: {} requests in {:.2} s \
         (page size {page_size}: {} user pages + {} group pages)",
        again.unchanged,
        again.groups.unchanged,
        resync_requests,
        clock.elapsed().as_secs_f64(),
        users.div_ceil(page_size as usize),
        groups.div_ceil(page_size as usize),
    );
    server.shutdown().await;
}
