//! Interoperability with SCIM servers nobody here wrote, beyond scim2-server: the provisioning
//! scenarios against scimmy (npm), and the scim2-tester conformance checker (PyPI) run against a
//! scim2-server directly and through the hub's SCIM pass-through, whose reports must match: the
//! pass-through and the tunnel under it must be transparent.

mod common;

use common::{scenarios, ScimPeer, ScimmyServer};
use serde_json::json;

#[tokio::test]
async fn scimmy_provisions_updates_and_deprovisions_through_the_tunnel() {
    let (crm, wiki) = scenarios::provisions_updates_and_deprovisions::<ScimmyServer>().await;
    // The habits that set scimmy apart were exercised: PATCH answered 200 with the resource
    // (scim2-server: 204, empty), POST answered without a Location header.
    let patched = wiki
        .logs()
        .lines()
        .any(|l| l.starts_with("PATCH /scim/v2/Users/") && l.ends_with(" 200"));
    assert!(patched, "{}", wiki.logs());
    let created = crm
        .request(
            "POST",
            "/Users",
            Some(&json!({ "userName": "probe-location" })),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.text());
    assert_eq!(created.header("location"), None);
}
