//! Groups end to end against a real scim2-server (PyPI), as an administrator deploys it: hub
//! and agent as processes, `connect sync` forcing runs, and every check made through the
//! server's own API. The scenario itself lives in `common::scenarios` and runs against scimmy
//! too (tests/e2e_interop.rs).
//!
//! scim2-server answers a group PATCH with 204 and no body, does not validate members, does
//! not take a deleted user out of its groups, and refuses a `remove` that carries a `value`:
//! the member sets checked by the scenario show the hub removed memberships itself, in the
//! right order, with value-filtered paths.

mod common;

use common::scenarios;
use common::{Scim2Server, ScimPeer};

#[tokio::test]
async fn groups_follow_the_directory_on_a_real_scim_server() {
    let (crm, _wiki) = scenarios::groups_follow_the_directory::<Scim2Server>().await;
    // The habit that sets scim2-server apart was exercised: group PATCHes answered 204.
    let patched = crm
        .request_log()
        .iter()
        .any(|r| r.method == "PATCH" && r.path.starts_with("/v2/Groups/") && r.status == 204);
    assert!(patched, "{}", crm.logs());
    // Why the hub removes members by value-filtered path: scim2-server refuses a `remove`
    // that carries a value (400), the form some clients send instead.
    assert_eq!(
        scenarios::member_removal_forms(&crm).await,
        [(204, true), (400, false)]
    );
}
