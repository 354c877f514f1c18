//! An in-memory SCIM 2.0 server (Users and Groups) on axum, for `connect demo` and for tests.
//!
//! It is a strict peer on purpose: bodies must carry their schema URN, unknown attributes are
//! rejected (400), filter values must be quoted, userName and group displayName are unique
//! case-insensitively (409), group members must exist when they are added, removing a member
//! that is not there is `noTarget`, a wrong bearer token gets 401 with `WWW-Authenticate`. That
//! way a client bug shows here instead of only against a real server. Like scim2-server, it
//! answers a group PATCH with 204 and does not take a deleted user out of its groups. It must never listen anywhere but the listener it
//! is given, and never persist anything: state lives and dies with the process.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::scim::resources::{
    ListResponse, Name, PatchOp, PatchOpKind, PatchRequest, ScimEmail, ScimErrorBody, ScimGroup,
    ScimUser, PATCH_OP_SCHEMA, SERVICE_PROVIDER_CONFIG_SCHEMA, USER_SCHEMA,
};

mod groups;

/// Where the SCIM root is served.
pub const BASE_PATH: &str = "/scim/v2";
/// The most resources one list page returns, whatever `count` asks for.
pub const MAX_COUNT: usize = 1000;
const SCIM_JSON: &str = "application/scim+json";

/// A running demo SCIM server. Dropping it stops serving; [`shutdown`](Self::shutdown) also
/// waits for in-flight requests.
pub struct DemoScimServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<io::Result<()>>,
}

struct Shared {
    store: Mutex<Store>,
    /// Expected bearer token; `None` accepts every request.
    token: Option<String>,
    requests: AtomicU64,
    addr: SocketAddr,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters for a demo; keep serving.
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl DemoScimServer {
    /// Serve on `listener` (base path `/scim/v2`) in a background task and return at once.
    /// With `bearer_token`, every request except `ServiceProviderConfig` must carry
    /// `Authorization: Bearer <token>`.
    pub async fn start(
        listener: tokio::net::TcpListener,
        bearer_token: Option<String>,
    ) -> io::Result<DemoScimServer> {
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            token: bearer_token,
            requests: AtomicU64::new(0),
            addr,
        });
        let users = format!("{BASE_PATH}/Users");
        let groups = format!("{BASE_PATH}/Groups");
        let router = Router::new()
            .route(
                &format!("{BASE_PATH}/ServiceProviderConfig"),
                get(service_provider_config),
            )
            .route(&users, get(list_users).post(create_user))
            .route(
                &format!("{users}/{{id}}"),
                get(get_user)
                    .put(replace_user)
                    .patch(patch_user)
                    .delete(delete_user),
            )
            .route(&groups, get(groups::list).post(groups::create))
            .route(
                &format!("{groups}/{{id}}"),
                get(groups::get_one)
                    .patch(groups::patch)
                    .delete(groups::delete),
            )
            .fallback(not_found)
            .layer(middleware::from_fn_with_state(
                shared.clone(),
                count_and_authorize,
            ))
            .with_state(shared.clone());
        let listener = listener.tap_io(|stream| {
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY on a demo SCIM connection");
            }
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let serve = axum::serve(listener, router).with_graceful_shutdown(async move {
            let _ = stopped.await;
        });
        let task = tokio::spawn(async move { serve.await });
        Ok(DemoScimServer {
            addr,
            shared,
            stop: Some(stop),
            task,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The SCIM root path (`/scim/v2`).
    pub fn base_path(&self) -> &str {
        BASE_PATH
    }

    /// `http://<addr>/scim/v2`.
    pub fn base_url(&self) -> String {
        format!("http://{}{BASE_PATH}", self.addr)
    }

    /// How many users are stored.
    pub fn user_count(&self) -> usize {
        self.shared.store().users.len()
    }

    /// The stored users, in creation order.
    pub fn users(&self) -> Vec<ScimUser> {
        self.shared
            .store()
            .users
            .values()
            .map(|s| s.resource.clone())
            .collect()
    }

    /// How many groups are stored.
    pub fn group_count(&self) -> usize {
        self.shared.store().groups.len()
    }

    /// The stored groups, in creation order.
    pub fn groups(&self) -> Vec<ScimGroup> {
        self.shared
            .store()
            .groups
            .values()
            .map(|s| s.resource.clone())
            .collect()
    }

    /// How many requests reached the server (rejected ones included).
    pub fn request_count(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// Stop accepting, let in-flight requests finish (up to 5 s), then return.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match tokio::time::timeout(Duration::from_secs(5), &mut self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "demo SCIM server stopped with an error"),
            Ok(Err(e)) => tracing::warn!(error = %e, "demo SCIM server task failed"),
            Err(_) => self.task.abort(),
        }
    }
}

impl Drop for DemoScimServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the server's tables need of a resource.
trait Record {
    /// The resource type, as errors and `meta.resourceType` name it.
    const KIND: &'static str;
    /// The attribute that is unique ignoring case.
    const UNIQUE: &'static str;
    fn unique_value(&self) -> &str;
    fn set_id(&mut self, id: String);
}

impl Record for ScimUser {
    const KIND: &'static str = "User";
    const UNIQUE: &'static str = "userName";
    fn unique_value(&self) -> &str {
        &self.user_name
    }
    fn set_id(&mut self, id: String) {
        self.id = Some(id);
    }
}

impl Record for ScimGroup {
    const KIND: &'static str = "Group";
    const UNIQUE: &'static str = "displayName";
    fn unique_value(&self) -> &str {
        &self.display_name
    }
    fn set_id(&mut self, id: String) {
        self.id = Some(id);
    }
}

/// One stored resource and its bookkeeping.
struct Stored<T> {
    resource: T,
    created: String,
    modified: String,
    version: u64,
}

/// Resources of one type in creation order, with the indexes the endpoints need.
struct Table<T> {
    next_seq: u64,
    rows: BTreeMap<u64, Stored<T>>,
    seq_by_id: HashMap<String, u64>,
    /// Lower-cased unique attribute → id.
    id_by_name: HashMap<String, String>,
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Table {
            next_seq: 0,
            rows: BTreeMap::new(),
            seq_by_id: HashMap::new(),
            id_by_name: HashMap::new(),
        }
    }
}

impl<T: Record> Table<T> {
    fn len(&self) -> usize {
        self.rows.len()
    }

    fn values(&self) -> impl Iterator<Item = &Stored<T>> {
        self.rows.values()
    }

    fn get(&self, id: &str) -> Option<&Stored<T>> {
        self.seq_by_id.get(id).and_then(|seq| self.rows.get(seq))
    }

    fn contains(&self, id: &str) -> bool {
        self.seq_by_id.contains_key(id)
    }

    fn name_taken(&self, name: &str, except_id: Option<&str>) -> bool {
        self.id_by_name
            .get(&name.to_lowercase())
            .is_some_and(|owner| Some(owner.as_str()) != except_id)
    }

    fn insert(&mut self, mut resource: T) -> Result<&Stored<T>, Failure> {
        if self.name_taken(resource.unique_value(), None) {
            return Err(Failure::uniqueness(T::UNIQUE, resource.unique_value()));
        }
        let id = new_id();
        resource.set_id(id.clone());
        let now = rfc3339_now();
        self.next_seq += 1;
        let seq = self.next_seq;
        self.id_by_name
            .insert(resource.unique_value().to_lowercase(), id.clone());
        self.seq_by_id.insert(id, seq);
        let stored = Stored {
            resource,
            created: now.clone(),
            modified: now,
            version: 1,
        };
        Ok(self.rows.entry(seq).or_insert(stored))
    }

    fn replace(&mut self, id: &str, mut resource: T) -> Result<&Stored<T>, Failure> {
        let seq = *self
            .seq_by_id
            .get(id)
            .ok_or_else(|| Failure::not_found(T::KIND, id))?;
        if self.name_taken(resource.unique_value(), Some(id)) {
            return Err(Failure::uniqueness(T::UNIQUE, resource.unique_value()));
        }
        let stored = self
            .rows
            .get_mut(&seq)
            .ok_or_else(|| Failure::not_found(T::KIND, id))?;
        self.id_by_name
            .remove(&stored.resource.unique_value().to_lowercase());
        self.id_by_name
            .insert(resource.unique_value().to_lowercase(), id.to_string());
        resource.set_id(id.to_string());
        stored.resource = resource;
        stored.modified = rfc3339_now();
        stored.version += 1;
        Ok(stored)
    }

    fn remove(&mut self, id: &str) -> bool {
        let Some(seq) = self.seq_by_id.remove(id) else {
            return false;
        };
        if let Some(stored) = self.rows.remove(&seq) {
            self.id_by_name
                .remove(&stored.resource.unique_value().to_lowercase());
        }
        true
    }
}

/// Everything the server holds.
#[derive(Default)]
struct Store {
    users: Table<ScimUser>,
    groups: Table<ScimGroup>,
}

/// An error answer: status, SCIM `scimType`, and a detail for the client's administrator.
struct Failure {
    status: StatusCode,
    scim_type: Option<&'static str>,
    detail: String,
}

impl Failure {
    fn new(status: StatusCode, scim_type: Option<&'static str>, detail: impl Into<String>) -> Self {
        Failure {
            status,
            scim_type,
            detail: detail.into(),
        }
    }

    fn bad(scim_type: &'static str, detail: impl Into<String>) -> Self {
        Failure::new(StatusCode::BAD_REQUEST, Some(scim_type), detail)
    }

    fn uniqueness(attr: &str, value: &str) -> Self {
        Failure::new(
            StatusCode::CONFLICT,
            Some("uniqueness"),
            format!("{attr} `{value}` is already in use"),
        )
    }

    fn not_found(kind: &str, id: &str) -> Self {
        Failure::new(
            StatusCode::NOT_FOUND,
            None,
            format!("{kind} `{id}` not found"),
        )
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let body = ScimErrorBody {
            status: Some(self.status.as_u16().to_string()),
            scim_type: self.scim_type.map(str::to_string),
            detail: Some(self.detail),
        };
        scim_response(self.status, &body)
    }
}

fn scim_response<T: serde::Serialize>(status: StatusCode, body: &T) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(Body::from(bytes));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(SCIM_JSON));
    response
}

fn user_response(status: StatusCode, stored: &Stored<ScimUser>, base_url: &str) -> Response {
    resource_response(status, render(stored, base_url), stored.version)
}

/// A single-resource answer with `ETag` (and `Location` on creation).
fn resource_response(status: StatusCode, body: Value, version: u64) -> Response {
    let mut response = scim_response(status, &body);
    if let Ok(etag) = HeaderValue::from_str(&format!("W/\"{version}\"")) {
        response.headers_mut().insert(header::ETAG, etag);
    }
    if status == StatusCode::CREATED {
        if let Some(Ok(location)) = body["meta"]["location"].as_str().map(HeaderValue::from_str) {
            response.headers_mut().insert(header::LOCATION, location);
        }
    }
    response
}

fn render(stored: &Stored<ScimUser>, base_url: &str) -> Value {
    let mut value = serde_json::to_value(&stored.resource).unwrap_or_default();
    let id = stored.resource.id.as_deref().unwrap_or_default();
    value["meta"] = json!({
        "resourceType": "User",
        "created": stored.created,
        "lastModified": stored.modified,
        "location": format!("{base_url}/Users/{id}"),
        "version": format!("W/\"{}\"", stored.version),
    });
    value
}

/// Absolute base URL as the client addressed us (its `Host`), for `meta.location`.
fn base_url(shared: &Shared, headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| shared.addr.to_string());
    format!("http://{host}{BASE_PATH}")
}

async fn count_and_authorize(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    shared.requests.fetch_add(1, Ordering::Relaxed);
    let open = request.uri().path() == format!("{BASE_PATH}/ServiceProviderConfig");
    if let (Some(token), false) = (&shared.token, open) {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim());
        if !presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes())) {
            let mut response = Failure::new(
                StatusCode::UNAUTHORIZED,
                None,
                "missing or wrong bearer token",
            )
            .into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"scim\""),
            );
            return response;
        }
    }
    next.run(request).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn service_provider_config(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
) -> Response {
    let base = base_url(&shared, &headers);
    let body = json!({
        "schemas": [SERVICE_PROVIDER_CONFIG_SCHEMA],
        "patch": {"supported": true},
        "bulk": {"supported": false, "maxOperations": 0, "maxPayloadSize": 0},
        "filter": {"supported": true, "maxResults": MAX_COUNT},
        "changePassword": {"supported": false},
        "sort": {"supported": false},
        "etag": {"supported": true},
        "authenticationSchemes": [{
            "type": "oauthbearertoken",
            "name": "OAuth Bearer Token",
            "description": "Authentication with a bearer token",
            "primary": true
        }],
        "meta": {
            "resourceType": "ServiceProviderConfig",
            "location": format!("{base}/ServiceProviderConfig")
        }
    });
    scim_response(StatusCode::OK, &body)
}

async fn not_found(request: Request) -> Response {
    Failure::new(
        StatusCode::NOT_FOUND,
        None,
        format!(
            "no SCIM endpoint at {}: this server serves {BASE_PATH}/Users, \
             {BASE_PATH}/Groups and {BASE_PATH}/ServiceProviderConfig",
            request.uri().path()
        ),
    )
    .into_response()
}

/// Which attribute a supported filter tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FilterAttr {
    UserName,
    ExternalId,
    Id,
    DisplayName,
    /// A multi-valued attribute's `value` (inside `members[...]`).
    Value,
}

/// Parse `attr eq "value"` for userName, externalId, id, displayName and value; anything else
/// is refused with the reason. Each endpoint then refuses the attributes it has no use for.
fn parse_filter(filter: &str) -> Result<(FilterAttr, String), Failure> {
    let invalid = |why: &str| Failure::bad("invalidFilter", format!("filter `{filter}`: {why}"));
    let trimmed = filter.trim();
    let (attr, rest) = trimmed
        .split_once(char::is_whitespace)
        .ok_or_else(|| invalid("expected `attribute eq \"value\"`"))?;
    let (op, value) = rest
        .trim_start()
        .split_once(char::is_whitespace)
        .ok_or_else(|| invalid("expected `attribute eq \"value\"`"))?;
    if !op.eq_ignore_ascii_case("eq") {
        return Err(invalid("only the `eq` operator is supported here"));
    }
    let value = value.trim();
    if !value.starts_with('"') {
        return Err(invalid("the value must be a quoted string"));
    }
    let value: String = serde_json::from_str(value)
        .map_err(|_| invalid("the value is not a valid quoted string"))?;
    let attr = match attr.to_ascii_lowercase().as_str() {
        "username" => FilterAttr::UserName,
        "externalid" => FilterAttr::ExternalId,
        "id" => FilterAttr::Id,
        "displayname" => FilterAttr::DisplayName,
        "value" => FilterAttr::Value,
        _ => {
            return Err(invalid(
                "only userName, externalId, id and displayName can be filtered on",
            ))
        }
    };
    Ok((attr, value))
}

/// Query parameters, decoded like a form (`+` is a space).
fn query_params(raw: Option<&str>) -> HashMap<String, String> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    raw.unwrap_or_default()
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// `startIndex` (1-based, default 1) and `count` (default and cap [`MAX_COUNT`]) of a list.
fn page_window(params: &HashMap<String, String>) -> Result<(usize, usize), Failure> {
    let start = integer_param(params, "startIndex")?.unwrap_or(1).max(1) as usize;
    let count = integer_param(params, "count")?
        .unwrap_or(MAX_COUNT as i64)
        .clamp(0, MAX_COUNT as i64) as usize;
    Ok((start, count))
}

/// The parsed `filter` parameter, if any.
fn filter_param(params: &HashMap<String, String>) -> Result<Option<(FilterAttr, String)>, Failure> {
    params
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("filter"))
        .map(|(_, f)| parse_filter(f))
        .transpose()
}

fn integer_param(params: &HashMap<String, String>, name: &str) -> Result<Option<i64>, Failure> {
    params
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| {
            v.trim().parse::<i64>().map_err(|_| {
                Failure::bad(
                    "invalidValue",
                    format!("{name} must be an integer, got `{v}`"),
                )
            })
        })
        .transpose()
}

async fn list_users(
    State(shared): State<Arc<Shared>>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Failure> {
    let params = query_params(raw.as_deref());
    let (start, count) = page_window(&params)?;
    let filter = filter_param(&params)?;
    if let Some((FilterAttr::Value, _)) = &filter {
        return Err(Failure::bad(
            "invalidFilter",
            "Users can be filtered on userName, externalId, id and displayName",
        ));
    }
    let base = base_url(&shared, &headers);

    let store = shared.store();
    let matches = |s: &&Stored<ScimUser>| match &filter {
        None => true,
        Some((FilterAttr::UserName, v)) => s.resource.user_name.to_lowercase() == v.to_lowercase(),
        Some((FilterAttr::ExternalId, v)) => s.resource.external_id.as_deref() == Some(v.as_str()),
        Some((FilterAttr::Id, v)) => s.resource.id.as_deref() == Some(v.as_str()),
        Some((FilterAttr::DisplayName, v)) => s
            .resource
            .display_name
            .as_deref()
            .is_some_and(|d| d.to_lowercase() == v.to_lowercase()),
        Some((FilterAttr::Value, _)) => false,
    };
    let body = list_page(store.users.values().filter(matches), start, count, |s| {
        render(s, &base)
    });
    drop(store);
    Ok(scim_response(StatusCode::OK, &body))
}

/// The ListResponse of the `count` resources from 1-based `start` among `matching`, with
/// `totalResults` counting all of them.
fn list_page<T>(
    matching: impl Iterator<Item = T>,
    start: usize,
    count: usize,
    mut render: impl FnMut(T) -> Value,
) -> ListResponse<Value> {
    let mut total = 0usize;
    let mut page = Vec::new();
    for (index, item) in matching.enumerate() {
        total += 1;
        if index + 1 >= start && page.len() < count {
            page.push(render(item));
        }
    }
    ListResponse {
        total_results: total as u64,
        start_index: Some(start as u64),
        items_per_page: Some(page.len() as u64),
        resources: page,
    }
}

/// The strict shape of a User body: anything not listed is an error, as on real servers.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct UserIn {
    schemas: Vec<String>,
    /// Read-only; ignored when sent.
    #[serde(default)]
    #[allow(dead_code)]
    id: Option<String>,
    /// Read-only; ignored when sent.
    #[serde(default)]
    #[allow(dead_code)]
    meta: Option<Value>,
    #[serde(default)]
    external_id: Option<String>,
    user_name: String,
    #[serde(default)]
    display_name: Option<String>,
    #[serde(default)]
    name: Option<NameIn>,
    #[serde(default)]
    emails: Option<Vec<EmailIn>>,
    #[serde(default)]
    active: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NameIn {
    #[serde(default)]
    given_name: Option<String>,
    #[serde(default)]
    family_name: Option<String>,
    #[serde(default)]
    formatted: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmailIn {
    value: String,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    primary: Option<bool>,
}

impl UserIn {
    fn from_json(value: Value) -> Result<ScimUser, Failure> {
        let input: UserIn = serde_json::from_value(value)
            .map_err(|e| Failure::bad("invalidSyntax", format!("invalid User: {e}")))?;
        input.into_user()
    }

    fn into_user(self) -> Result<ScimUser, Failure> {
        if !self
            .schemas
            .iter()
            .any(|s| s.eq_ignore_ascii_case(USER_SCHEMA))
        {
            return Err(Failure::bad(
                "invalidSyntax",
                format!("`schemas` must contain {USER_SCHEMA}"),
            ));
        }
        if self.user_name.trim().is_empty() {
            return Err(Failure::bad("invalidValue", "userName must not be empty"));
        }
        let name = self.name.map(|n| Name {
            given_name: n.given_name,
            family_name: n.family_name,
            formatted: n.formatted,
        });
        Ok(ScimUser {
            id: None,
            external_id: self.external_id,
            user_name: self.user_name,
            display_name: self.display_name,
            name: name.filter(|n| !n.is_empty()),
            emails: self
                .emails
                .unwrap_or_default()
                .into_iter()
                .map(|e| ScimEmail {
                    value: e.value,
                    kind: e.kind,
                    primary: e.primary,
                })
                .collect(),
            active: self.active,
        })
    }
}

fn json_body(body: &Bytes) -> Result<Value, Failure> {
    serde_json::from_slice(body)
        .map_err(|e| Failure::bad("invalidSyntax", format!("the body is not valid JSON: {e}")))
}

async fn create_user(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Failure> {
    let user = UserIn::from_json(json_body(&body)?)?;
    let base = base_url(&shared, &headers);
    let mut store = shared.store();
    let stored = store.users.insert(user)?;
    Ok(user_response(StatusCode::CREATED, stored, &base))
}

async fn get_user(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Failure> {
    let base = base_url(&shared, &headers);
    let store = shared.store();
    let stored = store
        .users
        .get(&id)
        .ok_or_else(|| Failure::not_found("User", &id))?;
    Ok(user_response(StatusCode::OK, stored, &base))
}

async fn replace_user(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Failure> {
    let user = UserIn::from_json(json_body(&body)?)?;
    let base = base_url(&shared, &headers);
    let mut store = shared.store();
    let stored = store.users.replace(&id, user)?;
    Ok(user_response(StatusCode::OK, stored, &base))
}

async fn patch_user(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Failure> {
    let request: PatchRequest = serde_json::from_value(json_body(&body)?)
        .map_err(|e| Failure::bad("invalidSyntax", format!("invalid PatchOp request: {e}")))?;
    if !request
        .schemas
        .iter()
        .any(|s| s.eq_ignore_ascii_case(PATCH_OP_SCHEMA))
    {
        return Err(Failure::bad(
            "invalidSyntax",
            format!("`schemas` must contain {PATCH_OP_SCHEMA}"),
        ));
    }
    let base = base_url(&shared, &headers);
    let mut store = shared.store();
    let current = store
        .users
        .get(&id)
        .ok_or_else(|| Failure::not_found("User", &id))?;
    // All operations apply or none does.
    let patched = apply_patch(&current.resource, &request.operations)?;
    let stored = store.users.replace(&id, patched)?;
    Ok(user_response(StatusCode::OK, stored, &base))
}

async fn delete_user(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    if shared.store().users.remove(&id) {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(Failure::not_found("User", &id))
    }
}

/// Top-level attributes a PATCH may target, in their canonical spelling.
const PATCHABLE: &[&str] = &[
    "externalId",
    "userName",
    "displayName",
    "name",
    "emails",
    "active",
];
const NAME_PARTS: &[&str] = &["givenName", "familyName", "formatted"];

fn canonical(list: &[&'static str], attr: &str) -> Option<&'static str> {
    list.iter().copied().find(|a| a.eq_ignore_ascii_case(attr))
}

/// Resolve a simple attribute path (`displayName`, `name.givenName`, optionally prefixed by
/// the User schema URN) to canonical names.
fn resolve_path(path: &str) -> Result<(&'static str, Option<&'static str>), Failure> {
    if path.contains('[') {
        return Err(Failure::bad(
            "invalidPath",
            format!("path `{path}`: value filters in paths are not supported by this server"),
        ));
    }
    let prefix = format!("{USER_SCHEMA}:");
    let local = if path.len() > prefix.len() && path[..prefix.len()].eq_ignore_ascii_case(&prefix) {
        &path[prefix.len()..]
    } else {
        path
    };
    let (attr, sub) = match local.split_once('.') {
        Some((a, s)) => (a, Some(s)),
        None => (local, None),
    };
    if ["id", "meta", "schemas"]
        .iter()
        .any(|r| r.eq_ignore_ascii_case(attr))
    {
        return Err(Failure::bad(
            "mutability",
            format!("path `{path}`: the attribute is read-only"),
        ));
    }
    let attr = canonical(PATCHABLE, attr)
        .ok_or_else(|| Failure::bad("invalidPath", format!("path `{path}`: unknown attribute")))?;
    let sub = match sub {
        None => None,
        Some(s) if attr == "name" => Some(canonical(NAME_PARTS, s).ok_or_else(|| {
            Failure::bad("invalidPath", format!("path `{path}`: unknown name part"))
        })?),
        Some(_) => {
            return Err(Failure::bad(
                "invalidPath",
                format!("path `{path}`: sub-attributes of `{attr}` are not supported here"),
            ))
        }
    };
    Ok((attr, sub))
}

/// Apply `ops` to a copy of `user`; the result is validated like a PUT body.
fn apply_patch(user: &ScimUser, ops: &[PatchOp]) -> Result<ScimUser, Failure> {
    let mut doc = match serde_json::to_value(user) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    };
    for op in ops {
        match (&op.path, op.op) {
            (None, PatchOpKind::Remove) => {
                return Err(Failure::bad("noTarget", "a remove operation needs a path"))
            }
            (None, kind) => {
                let Some(Value::Object(values)) = &op.value else {
                    return Err(Failure::bad(
                        "invalidValue",
                        "an add or replace without a path needs an object value",
                    ));
                };
                for (key, value) in values {
                    set_path(&mut doc, resolve_path(key)?, value.clone(), kind)?;
                }
            }
            (Some(path), PatchOpKind::Remove) => remove_path(&mut doc, resolve_path(path)?),
            (Some(path), kind) => {
                let value = op.value.clone().ok_or_else(|| {
                    Failure::bad(
                        "invalidValue",
                        format!("{} `{path}` needs a value", kind.as_str()),
                    )
                })?;
                set_path(&mut doc, resolve_path(path)?, value, kind)?;
            }
        }
    }
    UserIn::from_json(Value::Object(doc))
}

fn set_path(
    doc: &mut Map<String, Value>,
    (attr, sub): (&'static str, Option<&'static str>),
    value: Value,
    kind: PatchOpKind,
) -> Result<(), Failure> {
    match (attr, sub) {
        ("name", Some(part)) => {
            let name = doc
                .entry("name")
                .or_insert_with(|| Value::Object(Map::new()));
            if !name.is_object() {
                *name = Value::Object(Map::new());
            }
            if let Some(name) = name.as_object_mut() {
                name.insert(part.to_string(), value);
            }
        }
        // A complex value replaces or adds the parts it names and leaves the others.
        ("name", None) => {
            let Value::Object(parts) = value else {
                return Err(Failure::bad("invalidValue", "`name` must be an object"));
            };
            for (part, v) in parts {
                let part = canonical(NAME_PARTS, &part).ok_or_else(|| {
                    Failure::bad("invalidPath", format!("`name.{part}`: unknown name part"))
                })?;
                set_path(doc, ("name", Some(part)), v, kind)?;
            }
        }
        ("emails", None) => {
            let values = match value {
                Value::Array(a) => a,
                single @ Value::Object(_) => vec![single],
                _ => return Err(Failure::bad("invalidValue", "`emails` must be a list")),
            };
            let merged = match (kind, doc.remove("emails")) {
                (PatchOpKind::Add, Some(Value::Array(mut existing))) => {
                    existing.extend(values);
                    existing
                }
                _ => values,
            };
            doc.insert("emails".into(), Value::Array(merged));
        }
        (attr, _) => {
            doc.insert(attr.to_string(), value);
        }
    }
    Ok(())
}

fn remove_path(doc: &mut Map<String, Value>, (attr, sub): (&'static str, Option<&'static str>)) {
    match sub {
        Some(part) => {
            let empty = match doc.get_mut(attr).and_then(Value::as_object_mut) {
                Some(obj) => {
                    obj.remove(part);
                    obj.is_empty()
                }
                None => false,
            };
            if empty {
                doc.remove(attr);
            }
        }
        None => {
            doc.remove(attr);
        }
    }
}

/// A random identifier shaped like a UUID (version 4 bits set).
fn new_id() -> String {
    let mut bytes: [u8; 16] = rand::random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Now as RFC 3339 UTC with milliseconds, e.g. `2026-12-03T21:30:17.945Z`.
fn rfc3339_now() -> String {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(since)
}

fn rfc3339(since_epoch: Duration) -> String {
    let secs = since_epoch.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since_epoch.subsec_millis()
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scim::client::ScimClient;
    use crate::scim::transport::{HttpTransport, ScimRequest, Transport};
    use http::Method;

    struct Peer {
        server: DemoScimServer,
        transport: HttpTransport,
    }

    impl Peer {
        async fn start(token: Option<&str>) -> Peer {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let server = DemoScimServer::start(listener, token.map(str::to_string))
                .await
                .unwrap();
            let addr = server.local_addr();
            Peer {
                server,
                transport: HttpTransport::new(addr, addr.to_string()),
            }
        }

        async fn send(
            &self,
            method: Method,
            path: &str,
            auth: Option<&str>,
            body: Option<Value>,
        ) -> (u16, Vec<(String, String)>, Value) {
            let mut headers = vec![];
            if let Some(a) = auth {
                headers.push(("Authorization".to_string(), a.to_string()));
            }
            let r = self
                .transport
                .send(ScimRequest {
                    method,
                    path_and_query: format!("{BASE_PATH}{path}"),
                    headers,
                    body: body.map(|b| serde_json::to_vec(&b).unwrap()),
                })
                .await
                .unwrap();
            let v = if r.body.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&r.body).unwrap()
            };
            (r.status, r.headers, v)
        }

        fn client(&self, auth: Option<&str>) -> ScimClient {
            ScimClient::new(
                Arc::new(self.transport.clone()),
                BASE_PATH.into(),
                auth.map(str::to_string),
                100,
            )
        }
    }

    fn user(name: &str) -> Value {
        json!({"schemas": [USER_SCHEMA], "userName": name})
    }

    fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    #[tokio::test]
    async fn wrong_token_gets_401_with_www_authenticate_but_config_is_open() {
        let p = Peer::start(Some("tok")).await;
        let (status, headers, body) = p
            .send(Method::GET, "/Users", Some("Bearer nope"), None)
            .await;
        assert_eq!(status, 401);
        assert_eq!(
            header(&headers, "www-authenticate"),
            Some("Bearer realm=\"scim\"")
        );
        assert_eq!(header(&headers, "content-type"), Some(SCIM_JSON));
        assert_eq!(body["status"], "401");
        let (status, _, _) = p.send(Method::GET, "/Users", None, None).await;
        assert_eq!(status, 401);
        let (status, _, _) = p
            .send(Method::GET, "/Users", Some("bearer tok"), None)
            .await;
        assert_eq!(status, 200);
        let (status, _, body) = p
            .send(Method::GET, "/ServiceProviderConfig", None, None)
            .await;
        assert_eq!(status, 200);
        assert_eq!(body["patch"]["supported"], true);
        assert_eq!(p.server.request_count(), 4);
        p.server.shutdown().await;
    }

    #[tokio::test]
    async fn create_conflict_and_meta() {
        let p = Peer::start(None).await;
        let (status, headers, body) = p
            .send(Method::POST, "/Users", None, Some(user("Alice")))
            .await;
        assert_eq!(status, 201);
        let id = body["id"].as_str().unwrap().to_string();
        assert_eq!(id.len(), 36);
        let location = format!("{}/Users/{id}", p.server.base_url());
        assert_eq!(header(&headers, "location"), Some(location.as_str()));
        assert_eq!(body["meta"]["resourceType"], "User");
        assert_eq!(body["meta"]["location"], location.as_str());
        assert!(body["meta"]["created"].as_str().unwrap().ends_with('Z'));
        let (status, _, body) = p
            .send(Method::POST, "/Users", None, Some(user("aLICE")))
            .await;
        assert_eq!(status, 409);
        assert_eq!(body["scimType"], "uniqueness");
        let (status, _, body) = p
            .send(
                Method::POST,
                "/Users",
                None,
                Some(json!({"schemas": [USER_SCHEMA], "userName": "b", "nickName": "x"})),
            )
            .await;
        assert_eq!(status, 400);
        assert!(
            body["detail"].as_str().unwrap().contains("nickName"),
            "{body}"
        );
        let (status, _, _) = p
            .send(Method::POST, "/Users", None, Some(json!({"userName": "c"})))
            .await;
        assert_eq!(status, 400);
        let (status, _, _) = p
            .send(Method::GET, &format!("/Users/{id}"), None, None)
            .await;
        assert_eq!(status, 200);
        let (status, _, body) = p
            .send(Method::DELETE, &format!("/Users/{id}"), None, None)
            .await;
        assert_eq!((status, body), (204, Value::Null));
        let (status, _, _) = p
            .send(Method::GET, &format!("/Users/{id}"), None, None)
            .await;
        assert_eq!(status, 404);
        // The name is free again.
        let (status, _, _) = p
            .send(Method::POST, "/Users", None, Some(user("ALICE")))
            .await;
        assert_eq!(status, 201);
        p.server.shutdown().await;
    }

    #[tokio::test]
    async fn filters_and_pagination() {
        let p = Peer::start(None).await;
        let c = p.client(None);
        for i in 0..1005 {
            let mut u = ScimUser {
                user_name: format!("U{i}"),
                external_id: Some(format!("Ext{i}")),
                ..Default::default()
            };
            if i == 0 {
                u.display_name = Some("first".into());
            }
            c.create_user(&u).await.unwrap();
        }
        let (_, _, body) = p
            .send(Method::GET, "/Users?startIndex=1&count=5000", None, None)
            .await;
        assert_eq!(body["totalResults"], 1005);
        assert_eq!(body["itemsPerPage"], 1000);
        let (_, _, body) = p
            .send(Method::GET, "/Users?startIndex=1001&count=10", None, None)
            .await;
        assert_eq!(body["itemsPerPage"], 5);
        assert_eq!(body["Resources"][0]["userName"], "U1000");
        let (_, _, body) = p
            .send(
                Method::GET,
                "/Users?filter=userName%20eq%20%22u7%22",
                None,
                None,
            )
            .await;
        assert_eq!(body["totalResults"], 1);
        assert_eq!(body["Resources"][0]["userName"], "U7");
        let (_, _, body) = p
            .send(
                Method::GET,
                "/Users?filter=externalId+eq+%22ext7%22",
                None,
                None,
            )
            .await;
        assert_eq!(body["totalResults"], 0);
        let (_, _, body) = p
            .send(
                Method::GET,
                "/Users?filter=externalId+eq+%22Ext7%22",
                None,
                None,
            )
            .await;
        assert_eq!(body["totalResults"], 1);
        let (status, _, body) = p
            .send(Method::GET, "/Users?filter=userName+eq+u7", None, None)
            .await;
        assert_eq!(
            (status, body["scimType"].as_str()),
            (400, Some("invalidFilter"))
        );
        assert_eq!(c.list_users().await.unwrap().len(), 1005);
        p.server.shutdown().await;
    }

    #[tokio::test]
    async fn patch_paths_no_path_form_and_atomicity() {
        let p = Peer::start(None).await;
        let c = p.client(None);
        let created = c
            .create_user(&ScimUser {
                user_name: "bob".into(),
                name: Some(Name {
                    given_name: Some("Bob".into()),
                    family_name: Some("B".into()),
                    formatted: None,
                }),
                emails: vec![ScimEmail {
                    value: "b@x".into(),
                    kind: None,
                    primary: None,
                }],
                ..Default::default()
            })
            .await
            .unwrap();
        let id = created.id.unwrap();
        let path = format!("/Users/{id}");
        let patch = |ops: Value| json!({"schemas": [PATCH_OP_SCHEMA], "Operations": ops});

        let (status, _, body) = p
            .send(
                Method::PATCH,
                &path,
                None,
                Some(patch(json!([
                    {"op": "replace", "path": "displayName", "value": "Bobby"},
                    {"op": "Replace", "path": "NAME.givenName", "value": "Robert"},
                    {"op": "remove", "path": "name.familyName"},
                    {"op": "add", "path": "emails", "value": [{"value": "c@x", "type": "work"}]},
                    {"op": "replace", "value": {"active": false, "externalId": "e-b"}},
                ]))),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["displayName"], "Bobby");
        assert_eq!(body["name"], json!({"givenName": "Robert"}));
        assert_eq!(body["emails"].as_array().unwrap().len(), 2);
        assert_eq!(body["active"], false);
        assert_eq!(body["externalId"], "e-b");
        assert_eq!(body["meta"]["version"], "W/\"2\"");

        // Removing the last name part removes `name`; a bad op rolls back the whole request.
        let (status, _, body) = p
            .send(
                Method::PATCH,
                &path,
                None,
                Some(patch(json!([
                    {"op": "remove", "path": "name.givenName"},
                    {"op": "replace", "path": "nickName", "value": "x"},
                ]))),
            )
            .await;
        assert_eq!(
            (status, body["scimType"].as_str()),
            (400, Some("invalidPath"))
        );
        let (_, _, body) = p.send(Method::GET, &path, None, None).await;
        assert_eq!(body["name"], json!({"givenName": "Robert"}));
        let (status, _, body) = p
            .send(
                Method::PATCH,
                &path,
                None,
                Some(patch(json!([
                    {"op": "remove", "path": "name.givenName"},
                    {"op": "replace", "path": "active", "value": "False"},
                ]))),
            )
            .await;
        assert_eq!(status, 400, "{body}");
        let (_, _, body) = p
            .send(
                Method::PATCH,
                &path,
                None,
                Some(patch(json!([
                {"op": "remove", "path": "name.givenName"}]))),
            )
            .await;
        assert!(body.get("name").is_none(), "{body}");

        // Renaming onto a taken name conflicts; the client sees 200 as success.
        c.create_user(&ScimUser {
            user_name: "carol".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let (status, _, _) = p
            .send(
                Method::PATCH,
                &path,
                None,
                Some(patch(json!([
                {"op": "replace", "path": "userName", "value": "CAROL"}]))),
            )
            .await;
        assert_eq!(status, 409);
        c.patch_user(&id, &[PatchOp::replace("userName", json!("robert"))])
            .await
            .unwrap();
        assert!(c.find_user_by_user_name("Robert").await.unwrap().is_some());
        let (status, _, _) = p
            .send(Method::PATCH, &path, None, Some(json!({"Operations": []})))
            .await;
        assert_eq!(status, 400);
        p.server.shutdown().await;
    }

    #[tokio::test]
    async fn put_replaces_and_unknown_paths_are_scim_404() {
        let p = Peer::start(None).await;
        let (_, _, body) = p
            .send(Method::POST, "/Users", None, Some(user("dan")))
            .await;
        let id = body["id"].as_str().unwrap().to_string();
        let (status, _, body) = p
            .send(Method::PUT, &format!("/Users/{id}"), None, Some(json!({
                "schemas": [USER_SCHEMA], "userName": "dan", "displayName": "Dan", "id": "ignored"})))
            .await;
        assert_eq!(status, 200);
        assert_eq!(body["id"], id.as_str());
        assert_eq!(body["displayName"], "Dan");
        let (status, headers, body) = p.send(Method::GET, "/Bulk", None, None).await;
        assert_eq!(status, 404);
        assert_eq!(header(&headers, "content-type"), Some(SCIM_JSON));
        assert_eq!(body["status"], "404");
        p.server.shutdown().await;
    }

    #[tokio::test]
    async fn groups_validate_members_and_speak_the_rfc_patch_forms() {
        let p = Peer::start(None).await;
        let (_, _, alice) = p
            .send(Method::POST, "/Users", None, Some(user("alice")))
            .await;
        let (_, _, bob) = p
            .send(Method::POST, "/Users", None, Some(user("bob")))
            .await;
        let (a, b) = (alice["id"].as_str().unwrap(), bob["id"].as_str().unwrap());
        let group = |name: &str, members: Value| {
            json!({"schemas": [crate::scim::resources::GROUP_SCHEMA], "displayName": name,
                   "members": members})
        };
        let (status, _, body) = p
            .send(
                Method::POST,
                "/Groups",
                None,
                Some(group("Eng", json!([{"value": "nobody"}]))),
            )
            .await;
        assert_eq!(
            (status, body["scimType"].as_str()),
            (400, Some("invalidValue"))
        );
        let (status, headers, body) = p
            .send(
                Method::POST,
                "/Groups",
                None,
                Some(group("Eng", json!([{"value": a, "type": "User"}]))),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        assert!(header(&headers, "location").is_some());
        assert_eq!(body["members"][0]["display"], "alice");
        let gid = body["id"].as_str().unwrap().to_string();
        let (status, _, _) = p
            .send(Method::POST, "/Groups", None, Some(group("ENG", json!([]))))
            .await;
        assert_eq!(status, 409);

        let patch = |ops: Value| json!({"schemas": [PATCH_OP_SCHEMA], "Operations": ops});
        let path = format!("/Groups/{gid}");
        let (status, _, body) = p
            .send(
                Method::PATCH,
                &path,
                None,
                Some(patch(json!([
                    {"op": "add", "path": "members", "value": [{"value": b}, {"value": a}]},
                    {"op": "replace", "path": "displayName", "value": "Engineering"},
                ]))),
            )
            .await;
        assert_eq!((status, body), (204, Value::Null));
        let (_, _, body) = p.send(Method::GET, &path, None, None).await;
        assert_eq!(body["displayName"], "Engineering");
        assert_eq!(body["members"].as_array().unwrap().len(), 2, "{body}");
        let remove_a = format!("members[value eq \"{a}\"]");
        let (status, _, _) = p
            .send(
                Method::PATCH,
                &path,
                None,
                Some(patch(json!([{"op": "remove", "path": remove_a}]))),
            )
            .await;
        assert_eq!(status, 204);
        let (status, _, body) = p
            .send(
                Method::PATCH,
                &path,
                None,
                Some(patch(json!([{"op": "remove", "path": remove_a}]))),
            )
            .await;
        assert_eq!((status, body["scimType"].as_str()), (400, Some("noTarget")));
        let (_, _, body) = p
            .send(
                Method::GET,
                "/Groups?filter=displayName%20eq%20%22ENGINEERING%22",
                None,
                None,
            )
            .await;
        assert_eq!(body["totalResults"], 1);
        assert_eq!(body["Resources"][0]["members"][0]["value"], b);
        // Like scim2-server: deleting a user leaves its membership behind.
        p.send(Method::DELETE, &format!("/Users/{b}"), None, None)
            .await;
        assert_eq!(p.server.groups()[0].members[0].value, b);
        let (status, _, _) = p.send(Method::DELETE, &path, None, None).await;
        assert_eq!(status, 204);
        assert_eq!(p.server.group_count(), 0);
        p.server.shutdown().await;
    }

    #[test]
    fn dates_are_rfc3339() {
        assert_eq!(rfc3339(Duration::ZERO), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(Duration::from_millis(1_796_333_417_945)),
            "2026-12-03T21:30:17.945Z"
        );
        assert_eq!(
            rfc3339(Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
    }
}
