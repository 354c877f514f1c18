//! Admin: the hub's HTTP API for administrators and for `connect sync`. Bearer-token protected,
//! bound to loopback by default.
//!
//! It only reads state and forwards commands to the registry and reconcilers; it never touches
//! the tunnel or the SCIM servers itself. The token is compared in constant time and never
//! logged.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::supervisor::ReconcilerTable;
use crate::config::Secret;
use crate::messages::hub::{ReconcilerMsg, RegistryMsg, RunSummary};

/// How long a forced sync may take before the API gives up waiting (the run goes on).
const SYNC_WAIT: Duration = Duration::from_secs(3600);

/// What the Admin actor starts from.
pub struct AdminArgs {
    pub listener: TcpListener,
    pub token: Secret,
    pub registry: ActorRef<RegistryMsg>,
    pub reconcilers: ReconcilerTable,
}

#[derive(Clone)]
struct ApiState {
    token: Arc<Secret>,
    registry: ActorRef<RegistryMsg>,
    reconcilers: ReconcilerTable,
}

/// One application in `GET /api/apps`.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct AppStatus {
    pub name: String,
    pub last_sync: Option<RunSummary>,
}

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
        .route("/api/apps/{app}/sync", post(sync))
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

async fn apps(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let mut list = Vec::new();
    for (name, reconciler) in reconcilers(&state) {
        let last_sync = match reconciler
            .call(ReconcilerMsg::LastRun, Some(Duration::from_secs(2)))
            .await
        {
            Ok(CallResult::Success(last)) => last,
            _ => None,
        };
        list.push(AppStatus {
            name: name.clone(),
            last_sync,
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
        Ok(CallResult::Success(summary)) => Json(summary).into_response(),
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
