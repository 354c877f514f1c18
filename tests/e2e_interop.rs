//! Interoperability with SCIM servers nobody here wrote, beyond scim2-server: the provisioning
//! scenarios against scimmy (npm), and the scim2-tester conformance checker (PyPI) run against a
//! scim2-server directly and through the hub's SCIM pass-through, whose reports must match: the
//! pass-through and the tunnel under it must be transparent.

mod common;

use common::conformance::{normalize_line, Scim2TesterReport};
use common::deploy::{deploy, App, DeploySpec, Deployment, Target, ADMIN_TOKEN, SCIM_TOKEN};
use common::{http_request, scenarios, Scim2Server, ScimPeer, ScimmyServer};
use serde_json::{json, Value};

#[tokio::test]
async fn scimmy_provisions_updates_and_deprovisions_through_the_tunnel() {
    let (crm, wiki) = scenarios::provisions_updates_and_deprovisions::<ScimmyServer>().await;
    // The habits that set scimmy apart were exercised: PATCH answered 200 with the resource
    // (scim2-server: 204, empty), pages whose itemsPerPage echoes the count asked for, POST
    // answered without a Location header.
    let patched = wiki
        .logs()
        .lines()
        .any(|l| l.starts_with("PATCH /scim/v2/Users/") && l.ends_with(" 200"));
    assert!(patched, "{}", wiki.logs());
    // wiki lists in pages of 5: the engine walked past the first page.
    assert!(
        wiki.logs()
            .contains("GET /scim/v2/Users?startIndex=11&count=5 200"),
        "{}",
        wiki.logs()
    );
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

#[tokio::test]
async fn scimmy_groups_follow_the_directory_through_the_tunnel() {
    let (crm, _wiki) = scenarios::groups_follow_the_directory::<ScimmyServer>().await;
    // scimmy's habits were exercised: group PATCHes answered 200 with the resource, and a
    // group POST answered without a Location header.
    let patched = crm
        .request_log()
        .iter()
        .any(|r| r.method == "PATCH" && r.path.starts_with("/scim/v2/Groups/") && r.status == 200);
    assert!(patched, "{}", crm.logs());
    let created = crm
        .request(
            "POST",
            "/Groups",
            Some(&json!({ "displayName": "probe-location" })),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.text());
    assert_eq!(created.header("location"), None);
    // scimmy takes both forms of member removal; the hub sends the value-filtered path, the
    // only one scim2-server takes too (tests/e2e_groups.rs).
    assert_eq!(
        scenarios::member_removal_forms(&crm).await,
        [(200, true), (200, true)]
    );
}

/// Two empty scim2-servers, one to be reached directly and one only through the tunnel, as the
/// application `tested` of a deployment whose agent is registered. Nobody is granted `tested`, so
/// its scheduled runs find nothing to do and leave whatever a test creates alone.
async fn direct_and_tunnelled() -> (Scim2Server, Scim2Server, Deployment) {
    let (direct, tunnelled) = tokio::join!(
        Scim2Server::start(Some(SCIM_TOKEN)),
        Scim2Server::start(Some(SCIM_TOKEN))
    );
    let mut app = App::new(
        "tested",
        &tunnelled.app_base_url("tested.internal.example"),
        "tested-scim",
    );
    app.grant_groups.clear();
    app.grant_users.clear();
    let deployment = deploy(DeploySpec::new(
        vec![app],
        vec![Target::new("tested-scim", tunnelled.addr().to_string())],
    ))
    .await;
    deployment.wait_for_agent("tested-scim").await;
    (direct, tunnelled, deployment)
}

#[tokio::test]
async fn scim2_tester_reports_are_the_same_directly_and_through_the_pass_through() {
    let (direct, tunnelled, deployment) = direct_and_tunnelled().await;

    let direct_url = direct.base_url.clone();
    let through_url = deployment.pass_through_url("tested");
    let (direct_report, through_report) = tokio::join!(
        tokio::task::spawn_blocking(move || {
            Scim2TesterReport::run(&direct_url, &format!("Bearer {SCIM_TOKEN}"))
        }),
        tokio::task::spawn_blocking(move || {
            Scim2TesterReport::run(&through_url, &format!("Bearer {ADMIN_TOKEN}"))
        })
    );
    let (direct_report, through_report) = (direct_report.unwrap(), through_report.unwrap());
    eprintln!(
        "scim2-tester: {} checks directly in {:?}, {} through the pass-through in {:?}",
        direct_report.checks().len(),
        direct_report.elapsed,
        through_report.checks().len(),
        through_report.elapsed
    );

    // The checker really ran, and the tunnelled run really reached the tunnelled server.
    assert!(direct_report.checks().len() > 100, "{}", direct_report.text);
    assert!(
        tunnelled.logs().contains("POST /v2/Users"),
        "{}",
        tunnelled.logs()
    );

    let (a, b) = (direct_report.normalized(), through_report.normalized());
    if a != b {
        let differing: Vec<String> = a
            .lines()
            .zip(b.lines())
            .filter(|(x, y)| x != y)
            .map(|(x, y)| format!("- {x}\n+ {y}"))
            .collect();
        panic!(
            "the reports differ (- direct, + through the pass-through; {} vs {} lines):\n{}\n\n\
             --- direct report ---\n{}\n--- pass-through report ---\n{}\n{}",
            a.lines().count(),
            b.lines().count(),
            differing.join("\n"),
            direct_report.text,
            through_report.text,
            deployment.logs()
        );
    }
    assert_eq!(direct_report.code, through_report.code);
}

#[test]
fn report_normalization_replaces_ids_hosts_and_the_base_only() {
    let report = Scim2TesterReport {
        url: "http://127.0.0.1:4000/api/apps/x/scim".into(),
        code: 0,
        text: "Performing a SCIM compliance check on http://127.0.0.1:4000/api/apps/x/scim/ ...\n\
               SUCCESS object_creation\n  \
               Successfully created User object with id ffb5562d60e7410a801efac46da8264a"
            .into(),
        elapsed: Default::default(),
    };
    assert_eq!(
        report.normalized(),
        "Performing a SCIM compliance check on <base>/ ...\nSUCCESS object_creation\n  \
         Successfully created User object with id <id>"
    );
    assert_eq!(
        report.checks(),
        [("SUCCESS", "object_creation")],
        "only status lines count as checks"
    );
    assert_eq!(
        normalize_line(
            "  /Schemas/952bfb87-b1f4-446a-9507-f09134cf19e0 at 127.0.0.1:8080 or a.example:9"
        ),
        "  /Schemas/<uuid> at <host> or <host>"
    );
    // A status, a check name or a short hex run is never touched.
    assert_eq!(
        normalize_line("ERROR check_add_attribute W/\"1\" abc123"),
        "ERROR check_add_attribute W/\"1\" abc123"
    );
}

/// One request of [`probe`]. In `path` and header values, `{id}` is the id of the user the last
/// `POST /Users` created and `{etag}` the last ETag received.
struct Step {
    method: &'static str,
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    body: Option<Value>,
}

fn step(method: &'static str, path: &'static str) -> Step {
    Step {
        method,
        path,
        headers: &[],
        body: None,
    }
}

impl Step {
    fn headers(mut self, headers: &'static [(&'static str, &'static str)]) -> Step {
        self.headers = headers;
        self
    }

    fn body(mut self, body: Value) -> Step {
        self.body = Some(body);
        self
    }
}

/// One answer as the caller saw it.
struct Seen {
    status: u16,
    allow: Option<String>,
    content_type: Option<String>,
    /// The body, normalised.
    body: String,
    /// Status, every header that carries meaning (sorted) and the body, normalised with
    /// [`normalize_line`] (ids, hosts, timestamps).
    line: String,
}

/// Sends `steps` in order to the SCIM root at `addr` + `base_path`.
async fn probe(
    addr: std::net::SocketAddr,
    base_path: &str,
    authorization: &str,
    steps: &[Step],
) -> Vec<Seen> {
    // Framing and per-connection headers describe the hop, not the answer.
    const HOP: [&str; 6] = [
        "date",
        "server",
        "connection",
        "content-length",
        "transfer-encoding",
        "keep-alive",
    ];
    let (mut id, mut etag) = (String::new(), String::new());
    let mut seen = Vec::new();
    for s in steps {
        let fill = |text: &str| text.replace("{id}", &id).replace("{etag}", &etag);
        let path = fill(s.path);
        let extra: Vec<(String, String)> = s
            .headers
            .iter()
            .map(|(n, v)| (n.to_string(), fill(v)))
            .collect();
        let mut headers: Vec<(&str, &str)> = vec![("Authorization", authorization)];
        if !extra.iter().any(|(n, _)| n == "Accept") {
            headers.push(("Accept", "application/scim+json"));
        }
        headers.extend(extra.iter().map(|(n, v)| (n.as_str(), v.as_str())));
        let encoded = s.body.as_ref().map(|b| serde_json::to_vec(b).unwrap());
        if encoded.is_some() {
            headers.push(("Content-Type", "application/scim+json"));
        }
        let target = format!("{base_path}{path}");
        let answer = http_request(addr, s.method, &target, &headers, encoded.as_deref())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        if s.method == "POST" && s.path == "/Users" && answer.status == 201 {
            id = answer.json().unwrap()["id"].as_str().unwrap().to_owned();
        }
        if let Some(tag) = answer.header("etag") {
            etag = tag.to_owned();
        }
        let mut shown: Vec<String> = answer
            .headers
            .iter()
            .filter(|(n, _)| !HOP.contains(&n.as_str()))
            .map(|(n, v)| format!("{n}: {v}"))
            .collect();
        shown.sort();
        seen.push(Seen {
            status: answer.status,
            allow: answer.header("allow").map(str::to_owned),
            content_type: answer.header("content-type").map(str::to_owned),
            body: normalize_line(&answer.text()),
            line: normalize_line(&format!(
                "{} {} -> {} [{}] {}",
                s.method,
                s.path,
                answer.status,
                shown.join("; "),
                answer.text()
            )),
        });
    }
    seen
}

/// What the checker does not look at: every header of the answer (Location, ETag,
/// Content-Location, Allow, Content-Type), conditional requests (304, 412), empty bodies (204),
/// errors (400, 404, 405, 409) and percent-encoded paths come back through the pass-through as
/// the server sent them. Methods the tunnel does not carry (HEAD, OPTIONS) get the status the
/// server gives a method it does not support, 405, with `Allow`.
#[tokio::test]
async fn pass_through_answers_as_the_server_does() {
    let (direct, _tunnelled, deployment) = direct_and_tunnelled().await;
    let user = json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": "probe" });
    let patch = json!({
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
        "Operations": [{ "op": "replace", "path": "displayName", "value": "P" }] });
    let steps = [
        step("GET", "/ServiceProviderConfig"),
        step("POST", "/Users").body(user.clone()),
        step("GET", "/Users/{id}"),
        step("GET", "/Users/{id}").headers(&[("If-None-Match", "{etag}")]),
        step("PATCH", "/Users/{id}")
            .headers(&[("If-Match", "W/\"999\"")])
            .body(patch.clone()),
        step("PATCH", "/Users/{id}")
            .headers(&[("If-Match", "{etag}")])
            .body(patch.clone()),
        step("PATCH", "/Users/{id}?attributes=displayName").body(patch),
        step("PUT", "/Users/{id}").body(user.clone()),
        step("POST", "/Users").body(user.clone()),
        step("POST", "/ServiceProviderConfig").body(user),
        step("GET", "/Users?filter=userName%20eq%20probe"),
        step("POST", "/Users/.search").body(json!({
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:SearchRequest"], "count": 1 })),
        step("GET", "/Users/a%20b"),
        step("GET", "/Users/a%2Fb"),
        step(
            "GET",
            "/Schemas/urn:ietf:params:scim:schemas:core:2.0:Group",
        ),
        step("GET", "/Users?count=1").headers(&[("Accept", "text/html")]),
        step("DELETE", "/Users/{id}"),
        step("GET", "/Users/{id}"),
    ];
    let unsupported = [step("HEAD", "/Users"), step("OPTIONS", "/Users")];
    // Not UTF-8 once decoded: scim2-server echoes the raw byte in `Location`, which the tunnel's
    // text headers carry as U+FFFD, so only status and body are compared.
    let not_utf8 = [step("GET", "/Users/%FF")];
    let direct_auth = format!("Bearer {SCIM_TOKEN}");
    let admin_auth = format!("Bearer {ADMIN_TOKEN}");
    let pass_through = "/api/apps/tested/scim";
    let a = probe(direct.addr(), "/v2", &direct_auth, &steps).await;
    let b = probe(deployment.admin_addr(), pass_through, &admin_auth, &steps).await;
    let report: Vec<String> = a
        .iter()
        .zip(&b)
        .map(|(x, y)| match x.line == y.line {
            true => format!("= {}", x.line),
            false => format!("- {}\n+ {}", x.line, y.line),
        })
        .collect();
    assert!(
        a.iter().zip(&b).all(|(x, y)| x.line == y.line),
        "answers differ (- direct, + through the pass-through):\n{}\n{}",
        report.join("\n"),
        deployment.logs()
    );

    let a = probe(direct.addr(), "/v2", &direct_auth, &unsupported).await;
    let b = probe(
        deployment.admin_addr(),
        pass_through,
        &admin_auth,
        &unsupported,
    )
    .await;
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.status, 405, "{}", x.line);
        assert_eq!(y.status, x.status, "{}", y.line);
        assert!(
            x.allow.is_some() && y.allow.is_some(),
            "{}\n{}",
            x.line,
            y.line
        );
        assert_eq!(y.content_type, x.content_type, "{}", y.line);
    }
    assert_eq!(
        b[0].allow.as_deref(),
        Some("GET, POST, PUT, PATCH, DELETE"),
        "{}",
        b[0].line
    );

    let a = probe(direct.addr(), "/v2", &direct_auth, &not_utf8).await;
    let b = probe(
        deployment.admin_addr(),
        pass_through,
        &admin_auth,
        &not_utf8,
    )
    .await;
    assert_eq!(
        (a[0].status, &a[0].body),
        (b[0].status, &b[0].body),
        "{}\n{}",
        a[0].line,
        b[0].line
    );
}
