//! Admin: the hub's HTTP API for administrators, `connect sync` and `connect hub status`.
//! Bearer-token protected, bound to loopback by default.
//!
//! - `GET /api/services`: services, on or off, with their connected agents and targets.
//! - `PUT /api/services/<service>/enabled` `{"enabled": bool}`: switch a service on or off.
//! - `GET /api/apps`: applications with their Last Sync and the run going now, if any.
//! - `POST /api/apps/<app>/sync`: run now (or join the run going) and answer its result.
//! - `GET /api/apps/<app>/runs?before=<run id>&limit=<n>`: runs, newest first.
//! - `GET /api/apps/<app>/runs/<run id>`: one run.
//! - `GET /api/apps/<app>/runs/<run id>/operations?after=<seq>&limit=<n>&failed=true`: its
//!   per-resource operations in plan order.
//! - `/api/apps/<app>/scim/<path>`: any SCIM request, through the tunnel to the app's server,
//!   answered unchanged. When no answer came, a 502 whose `forward_error` is the agent's
//!   typed reason (when the agent gave one).
//! - `GET /api/runtime`: agent sessions alive, runtime tasks and resident memory of the hub.
//!
//! It only reads state and forwards commands to the registry and reconcilers; it never touches
//! the tunnel or the SCIM servers itself. The token is compared in constant time and never
//! logged.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::Method;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post, put};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::services::ServiceBook;
use super::supervisor::ReconcilerTable;
use super::tunnel_transport::TunnelTransport;
use crate::config::hub::AppConfig;
use crate::config::Secret;
pub use crate::messages::hub::AppStatus;
use crate::messages::hub::{
    ReconcilerMsg, ReconcilerStatus, RegistryMsg, RunSummary, RuntimeStats,
};
use crate::scim::client::SCIM_CONTENT_TYPE;
use crate::scim::error::ScimError;
use crate::scim::resources::ScimErrorBody;
use crate::scim::transport::{ScimRequest, Transport, TransportError};
use crate::store::Store;

/// Largest request body the pass-through accepts.
const PASS_THROUGH_MAX_BODY: usize = 16 * 1024 * 1024;

/// Headers the pass-through relays from the caller to the SCIM server. Authorization is not
/// among them: the hub adds the application's own credentials.
const RELAYED_REQUEST_HEADERS: &[&str] = &["content-type", "accept", "if-match", "if-none-match"];

/// How long a forced sync may take before the API gives up waiting (the run goes on).
const SYNC_WAIT: Duration = Duration::from_secs(3600);

/// What the Admin actor starts from.
pub struct AdminArgs {
    pub listener: TcpListener,
    pub token: Secret,
    pub registry: ActorRef<RegistryMsg>,
    pub reconcilers: ReconcilerTable,
    pub book: ServiceBook,
    pub apps: Vec<AppConfig>,
    pub store: Arc<Store>,
    /// Agent sessions alive, kept by the Gateway.
    pub live_sessions: Arc<AtomicUsize>,
}

#[derive(Clone)]
struct ApiState {
    token: Arc<Secret>,
    registry: ActorRef<RegistryMsg>,
    reconcilers: ReconcilerTable,
    book: ServiceBook,
    apps: Arc<Vec<AppConfig>>,
    store: Arc<Store>,
    live_sessions: Arc<AtomicUsize>,
}

/// How long the API waits for a reconciler's status; it answers at once unless it is gone.
const STATUS_WAIT: Duration = Duration::from_secs(2);

/// The Admin actor: owns the HTTP server task.
pub struct Admin;

impl Actor for Admin {
    type Msg = ();
    type State = JoinHandle<()>;
    type Arguments = AdminArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: AdminArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let state = ApiState {
            token: Arc::new(args.token),
            registry: args.registry,
            reconcilers: args.reconcilers,
            book: args.book,
            apps: Arc::new(args.apps),
            store: args.store,
            live_sessions: args.live_sessions,
        };
        let app = router(state);
        let listener = args.listener;
        Ok(tokio::spawn(async move {
            if let Err(e) = axum::serve(
                listener.tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                }),
                app,
            )
            .await
            {
                tracing::error!("admin API stopped: {e}");
            }
        }))
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.abort();
        Ok(())
    }
}

fn router(state: ApiState) -> Router {
    Router::new()
        .route("/api/services", get(services))
        .route("/api/apps", get(apps))
        .route("/api/services/{service}/enabled", put(set_enabled))
        .route("/api/apps/{app}/sync", post(sync))
        .route("/api/apps/{app}/runs", get(runs))
        .route("/api/apps/{app}/runs/{run}", get(run))
        .route("/api/apps/{app}/runs/{run}/operations", get(operations))
        .route("/api/apps/{app}/scim/{*path}", any(pass_through))
        .route("/api/runtime", get(runtime))
        // The pass-through carries SCIM bodies, which can be list pages of some size.
        .layer(axum::extract::DefaultBodyLimit::max(PASS_THROUGH_MAX_BODY))
        .with_state(state)
}

/// A snapshot of the reconciler table (references are swapped on restart).
fn reconcilers(state: &ApiState) -> Vec<(String, ActorRef<ReconcilerMsg>)> {
    state
        .reconcilers
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

fn authorized(state: &ApiState, headers: &HeaderMap) -> bool {
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    constant_time_eq(presented.as_bytes(), state.token.expose().as_bytes())
}

fn unauthorized() -> Response {
    error(
        StatusCode::UNAUTHORIZED,
        "missing or wrong admin token (hub.toml [admin] token)",
    )
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn services(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    match state
        .registry
        .call(RegistryMsg::Snapshot, Some(Duration::from_secs(5)))
        .await
    {
        Ok(CallResult::Success(list)) => Json(list).into_response(),
        _ => error(StatusCode::SERVICE_UNAVAILABLE, "registry did not answer"),
    }
}

async fn runtime(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    Json(RuntimeStats {
        agent_sessions: state.live_sessions.load(Ordering::Relaxed),
        tasks: tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks(),
        rss_bytes: resident_bytes(),
    })
    .into_response()
}

/// Resident memory of this process from `/proc/self/status` (`VmRSS`); `None` elsewhere.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

async fn apps(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let table = reconcilers(&state);
    let mut list = Vec::new();
    for app in state.apps.iter() {
        let reconciler = table.iter().find(|(name, _)| *name == app.name);
        let status = match reconciler {
            Some((_, r)) => match r.call(ReconcilerMsg::Status, Some(STATUS_WAIT)).await {
                Ok(CallResult::Success(status)) => Ok(status),
                _ => Err("the app's reconciler did not answer"),
            },
            None => Err("the app's reconciler is not running"),
        };
        let (status, error) = match status {
            Ok(status) => (status, None),
            // The history still knows the last run.
            Err(e) => (
                ReconcilerStatus {
                    last: state.store.last_run(&app.name).ok().flatten(),
                    running_since_unix_ms: None,
                },
                Some(e.to_string()),
            ),
        };
        list.push(AppStatus {
            name: app.name.clone(),
            service: app.service.clone(),
            target: app.target.clone(),
            running_since_unix_ms: status.running_since_unix_ms,
            last_sync: status.last,
            error,
        });
    }
    Json(list).into_response()
}

async fn sync(
    State(state): State<ApiState>,
    Path(app): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let all = reconcilers(&state);
    let Some((_, reconciler)) = all.iter().find(|(name, _)| *name == app) else {
        let known: Vec<&str> = all.iter().map(|(name, _)| name.as_str()).collect();
        return error(
            StatusCode::NOT_FOUND,
            format!(
                "no application `{app}` in hub.toml (known: {})",
                known.join(", ")
            ),
        );
    };
    match reconciler
        .call(ReconcilerMsg::ForceSync, Some(SYNC_WAIT))
        .await
    {
        Ok(CallResult::Success(outcome)) => Json(outcome).into_response(),
        Ok(CallResult::Timeout) => error(
            StatusCode::GATEWAY_TIMEOUT,
            "the run is still going; see GET /api/apps for its result",
        ),
        _ => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the reconciler of `{app}` is not running"),
        ),
    }
}

#[derive(serde::Deserialize)]
struct Enabled {
    enabled: bool,
}

async fn set_enabled(
    State(state): State<ApiState>,
    Path(service): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // The body is read only after the token is checked: a stranger learns nothing, not even
    // what the body should look like.
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let body: Enabled = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the body must be {{\"enabled\": true}} or {{\"enabled\": false}} ({e})"),
            )
        }
    };
    if !state.book.set_enabled(&service, body.enabled) {
        return error(
            StatusCode::NOT_FOUND,
            format!("no service `{service}` in hub.toml"),
        );
    }
    tracing::info!(service = %service, enabled = body.enabled, "service switched by the admin API");
    Json(serde_json::json!({ "service": service, "enabled": body.enabled })).into_response()
}

#[derive(serde::Deserialize)]
struct Page {
    /// Runs older than this run id (exclusive); newest first when absent.
    before: Option<i64>,
    limit: Option<usize>,
}

async fn runs(
    State(state): State<ApiState>,
    Path(app): Path<String>,
    Query(page): Query<Page>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    if !state.apps.iter().any(|a| a.name == app) {
        return error(
            StatusCode::NOT_FOUND,
            format!("no application `{app}` in hub.toml"),
        );
    }
    let limit = page.limit.unwrap_or(20).clamp(1, 500);
    match state.store.runs(&app, page.before, limit) {
        Ok(runs) => {
            let next = if runs.len() == limit {
                runs.last().map(|r| r.run_id)
            } else {
                None
            };
            Json(serde_json::json!({ "runs": runs, "next_before": next })).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Run `run_id` of `app`, or the status and message that say why there is none. Run ids are
/// global, so this is also what makes sure a run belongs to the app it is asked under.
fn app_run(state: &ApiState, app: &str, run_id: i64) -> Result<RunSummary, (StatusCode, String)> {
    if !state.apps.iter().any(|a| a.name == app) {
        return Err((
            StatusCode::NOT_FOUND,
            format!("no application `{app}` in hub.toml"),
        ));
    }
    match state.store.run(app, run_id) {
        Ok(Some(summary)) => Ok(summary),
        Ok(None) => Err((
            StatusCode::NOT_FOUND,
            format!("no run {run_id} of `{app}` is kept"),
        )),
        Err(e) => Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

async fn run(
    State(state): State<ApiState>,
    Path((app, run_id)): Path<(String, i64)>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    match app_run(&state, &app, run_id) {
        Ok(summary) => Json(summary).into_response(),
        Err((status, message)) => error(status, message),
    }
}

#[derive(serde::Deserialize)]
struct OpsPage {
    /// Operations after this position (exclusive); from the first when absent.
    after: Option<u32>,
    limit: Option<usize>,
    /// Only the failed ones.
    #[serde(default)]
    failed: bool,
}

async fn operations(
    State(state): State<ApiState>,
    Path((app, run_id)): Path<(String, i64)>,
    Query(page): Query<OpsPage>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    if let Err((status, message)) = app_run(&state, &app, run_id) {
        return error(status, message);
    }
    let limit = page.limit.unwrap_or(100).clamp(1, 1000);
    match state
        .store
        .operations(run_id, page.after, limit, page.failed)
    {
        Ok(ops) => {
            let next = if ops.len() == limit {
                ops.last().map(|o| o.seq)
            } else {
                None
            };
            Json(serde_json::json!({ "run_id": run_id, "operations": ops, "next_after": next }))
                .into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Sends one SCIM request through the tunnel to the application's server and returns its answer
/// unchanged: status, headers and body. Only the application's credentials are added.
///
/// The path is read from the request line and forwarded as the caller wrote it, percent-encoding
/// included: decoding it (as axum's `Path` does) would turn `Users/a%2Fb` into another resource,
/// `a%20b` into a request the agent refuses and `%FF` into a 400 of the hub's own. Methods the
/// tunnel does not carry are answered here as a SCIM server answers a method it does not support
/// (405 with `Allow`), not as a failed forward.
async fn pass_through(
    State(state): State<ApiState>,
    method: Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let (app, path) = split_pass_through_path(uri.path());
    let Some(config) = state.apps.iter().find(|a| a.name == app) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no application `{app}` in hub.toml"),
        );
    };
    if !is_scim_method(&method) {
        return method_not_allowed(&method);
    }
    let mut path_and_query = format!("{}/{}", config.base_url.path, path);
    if let Some(query) = uri.query() {
        path_and_query.push('?');
        path_and_query.push_str(query);
    }
    let mut relayed: Vec<(String, String)> = headers
        .iter()
        .filter(|(name, _)| RELAYED_REQUEST_HEADERS.contains(&name.as_str()))
        .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_string())))
        .collect();
    if let Some(auth) = config.auth.authorization() {
        relayed.push(("authorization".into(), auth.expose().to_string()));
    }
    let request = ScimRequest {
        method,
        path_and_query,
        headers: relayed,
        body: (!body.is_empty()).then(|| body.to_vec()),
    };
    let transport = TunnelTransport::new(state.registry.clone(), config);
    match transport.send(request).await {
        Ok(answer) => {
            let mut response = Response::builder().status(answer.status);
            for (name, value) in &answer.headers {
                // Framing is the admin server's own business.
                if !["content-length", "transfer-encoding", "connection"]
                    .contains(&name.to_ascii_lowercase().as_str())
                {
                    response = response.header(name, value);
                }
            }
            response
                .body(axum::body::Body::from(answer.body))
                .unwrap_or_else(|e| error(StatusCode::BAD_GATEWAY, e.to_string()))
        }
        Err(e) => no_answer(e),
    }
}

/// The 502 of a pass-through that got no answer: the diagnosis for people, and the agent's
/// typed reason for programs (`forward_error`, e.g. `{"TooLarge": {"addr": …, "limit": …}}`).
fn no_answer(e: TransportError) -> Response {
    let forward = match &e {
        TransportError::Forward(f) => serde_json::to_value(f).ok(),
        _ => None,
    };
    let mut body = serde_json::json!({ "error": ScimError::Transport(e).diagnosis() });
    if let Some(forward) = forward {
        body["forward_error"] = forward;
    }
    (StatusCode::BAD_GATEWAY, Json(body)).into_response()
}

/// The methods the tunnel carries (RFC 7644 §3.2); the agent refuses any other.
fn is_scim_method(method: &Method) -> bool {
    [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
    ]
    .contains(method)
}

/// 405 with `Allow` and a SCIM error body, as a SCIM server answers a method it does not serve.
fn method_not_allowed(method: &Method) -> Response {
    let body = ScimErrorBody {
        status: Some("405".into()),
        scim_type: None,
        detail: Some(format!(
            "the SCIM pass-through does not carry {method}: use GET, POST, PUT, PATCH or DELETE"
        )),
    };
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [
            (axum::http::header::ALLOW, "GET, POST, PUT, PATCH, DELETE"),
            (axum::http::header::CONTENT_TYPE, SCIM_CONTENT_TYPE),
        ],
        serde_json::to_vec(&body).unwrap_or_default(),
    )
        .into_response()
}

/// Splits `/api/apps/<app>/scim/<path>` (the route guarantees that shape) into the application
/// name, percent-decoded, and the SCIM path after `scim/`, still encoded as received.
fn split_pass_through_path(uri_path: &str) -> (String, &str) {
    let (app, rest) = uri_path
        .strip_prefix("/api/apps/")
        .and_then(|rest| rest.split_once('/'))
        .unwrap_or_default();
    let app = percent_encoding::percent_decode_str(app)
        .decode_utf8_lossy()
        .into_owned();
    (app, rest.strip_prefix("scim/").unwrap_or_default())
}

#[cfg(test)]
mod pass_through_tests {
    use super::*;

    #[test]
    fn the_path_keeps_its_percent_encoding() {
        assert_eq!(
            split_pass_through_path("/api/apps/crm/scim/Users/a%2Fb%20c%FF"),
            ("crm".to_string(), "Users/a%2Fb%20c%FF")
        );
        assert_eq!(
            split_pass_through_path("/api/apps/my%2Dapp/scim/Schemas/urn:x:y"),
            ("my-app".to_string(), "Schemas/urn:x:y")
        );
    }

    #[test]
    fn methods_outside_scim_get_405_with_allow() {
        for m in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
            assert!(is_scim_method(&Method::from_bytes(m.as_bytes()).unwrap()));
        }
        let response = method_not_allowed(&Method::OPTIONS);
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(
            response.headers()[axum::http::header::ALLOW],
            "GET, POST, PUT, PATCH, DELETE"
        );
        assert_eq!(
            response.headers()[axum::http::header::CONTENT_TYPE],
            SCIM_CONTENT_TYPE
        );
        assert!(!is_scim_method(&Method::HEAD));
    }
}
