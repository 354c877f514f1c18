//! A SCIM 2.0 client for Users and Groups over an abstract [`Transport`].
//!
//! It owns how requests are shaped (paths, headers, filters, pagination), how answers are
//! checked, and the request layer every caller gets for free: at most `max_in_flight` requests
//! at once, retries of transient faults by the rules of [`crate::scim::retry`], and a pause of
//! the whole client while the server's `Retry-After` runs. It must never open a socket itself,
//! never decide what to provision, never send a non-idempotent request twice when the first
//! may have landed, and never reveal the `Authorization` value (not in `Debug`, not in errors).

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::Method;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::scim::error::ScimError;
use crate::scim::resources::{
    ListResponse, PatchOp, PatchRequest, Resource, ScimErrorBody, ScimGroup, ScimUser,
};
use crate::scim::retry::{Attempts, Idempotency, RetryPolicy, Verdict};
use crate::scim::transport::{ScimRequest, ScimResponse, Transport, TransportError};

/// Media type of SCIM bodies (RFC 7644 §3.1).
pub const SCIM_CONTENT_TYPE: &str = "application/scim+json";

/// Largest page servers are commonly willing to return (scim2-server caps `count` at 1000).
pub const MAX_PAGE_SIZE: u32 = 1000;

/// Everything but the RFC 3986 unreserved characters is escaped in query values and path
/// segments.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Client for one SCIM application.
pub struct ScimClient {
    transport: Arc<dyn Transport>,
    base_path: String,
    authorization: Option<String>,
    page_size: u32,
    retry: RetryPolicy,
    /// Bounds the requests in flight; `None` leaves it to the caller.
    in_flight: Option<Semaphore>,
    /// No request leaves before this instant: the server asked the whole client to wait.
    pause_until: Mutex<Option<Instant>>,
    requests: AtomicUsize,
    retries: AtomicUsize,
    reroutes: AtomicUsize,
}

impl fmt::Debug for ScimClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScimClient")
            .field("base_path", &self.base_path)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .field("page_size", &self.page_size)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl ScimClient {
    /// `base_path` is the absolute path of the SCIM root (e.g. `/scim/v2`); a trailing slash is
    /// tolerated. `authorization` is the full header value (e.g. `Bearer …`). `page_size` is
    /// kept within 1..=1000.
    pub fn new(
        transport: Arc<dyn Transport>,
        base_path: String,
        authorization: Option<String>,
        page_size: u32,
    ) -> Self {
        let trimmed = base_path.trim_end_matches('/');
        let base_path = if trimmed.is_empty() || trimmed.starts_with('/') {
            trimmed.to_string()
        } else {
            format!("/{trimmed}")
        };
        ScimClient {
            transport,
            base_path,
            authorization,
            page_size: page_size.clamp(1, MAX_PAGE_SIZE),
            retry: RetryPolicy::default(),
            in_flight: None,
            pause_until: Mutex::new(None),
            requests: AtomicUsize::new(0),
            retries: AtomicUsize::new(0),
            reroutes: AtomicUsize::new(0),
        }
    }

    /// Retries by `policy` instead of [`RetryPolicy::default`].
    pub fn with_retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// At most `limit` (at least 1) requests of this client in flight at once, whatever its
    /// callers do concurrently.
    pub fn with_max_in_flight(mut self, limit: usize) -> Self {
        self.in_flight = Some(Semaphore::new(limit.max(1)));
        self
    }

    /// The base path requests are sent under.
    pub fn base_path(&self) -> &str {
        &self.base_path
    }

    /// How many requests this client has sent so far, retries included.
    pub fn request_count(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }

    /// How many of those requests were retries.
    pub fn retry_count(&self) -> usize {
        self.retries.load(Ordering::Relaxed)
    }

    /// How many of those retries re-sent a request whose agent was lost before it answered
    /// (through another agent, when the service has one).
    pub fn reroute_count(&self) -> usize {
        self.reroutes.load(Ordering::Relaxed)
    }

    /// Every User the server holds, page by page until `totalResults` is reached.
    pub async fn list_users(&self) -> Result<Vec<ScimUser>, ScimError> {
        self.list_all().await
    }

    /// Every Group the server holds (with its members), page by page like [`list_users`].
    ///
    /// [`list_users`]: Self::list_users
    pub async fn list_groups(&self) -> Result<Vec<ScimGroup>, ScimError> {
        self.list_all().await
    }

    /// Every resource of type `T`, page by page until `totalResults` is reached.
    ///
    /// Pages are advanced by the number of resources actually received, so servers that
    /// return fewer than `count` are followed correctly. The walk stops on an empty page, or
    /// once `totalResults` (re-read on every page, since it may shrink while we walk) is
    /// covered. A server that keeps sending resources already listed is reported rather than
    /// followed forever.
    async fn list_all<T: Resource + DeserializeOwned>(&self) -> Result<Vec<T>, ScimError> {
        let path = format!("{}/{}", self.base_path, T::ENDPOINT);
        let mut found: Vec<T> = Vec::new();
        let mut seen: HashSet<String> = HashSet::new();
        let mut start: u64 = 1;
        loop {
            let query = format!("{path}?startIndex={start}&count={}", self.page_size);
            let response = self.call(Method::GET, &query, None).await?;
            let page: ListResponse<T> = parse(&response, &path)?;
            let received = page.resources.len() as u64;
            if received == 0 {
                break;
            }
            let mut fresh = 0usize;
            for resource in page.resources {
                // A resource without an id cannot be recognised as a repeat by its id; its
                // name (userName, displayName) stands in, so a server that ignores startIndex
                // is caught even then instead of being followed up to whatever totalResults it
                // claims.
                let key = match resource.scim_id() {
                    Some(id) => format!("id:{id}"),
                    None => format!("name:{}", resource.natural_key()),
                };
                if seen.insert(key) {
                    fresh += 1;
                    found.push(resource);
                }
            }
            if fresh == 0 {
                return Err(ScimError::BadResponse {
                    path,
                    detail: format!(
                        "the page at startIndex={start} only repeats {} already listed \
                         (the server seems to ignore startIndex)",
                        T::ENDPOINT.to_lowercase()
                    ),
                });
            }
            start += received;
            if start > page.total_results {
                break;
            }
        }
        Ok(found)
    }

    /// POST a new User; returns it as the server stored it (with its `id`).
    pub async fn create_user(&self, user: &ScimUser) -> Result<ScimUser, ScimError> {
        // `id` is the server's to assign; strict servers reject a client-chosen one.
        let body = ScimUser {
            id: None,
            ..user.clone()
        };
        self.create(&body, "user").await
    }

    /// POST `body` to its endpoint; the answer must be the stored resource with an `id`.
    async fn create<T: Resource + serde::Serialize + DeserializeOwned>(
        &self,
        body: &T,
        noun: &str,
    ) -> Result<T, ScimError> {
        let path = format!("{}/{}", self.base_path, T::ENDPOINT);
        let response = self.call(Method::POST, &path, Some(to_json(body))).await?;
        let created: T = parse(&response, &path)?;
        if created.scim_id().is_none_or(str::is_empty) {
            return Err(ScimError::BadResponse {
                path,
                detail: format!("the created {noun} carries no `id`"),
            });
        }
        Ok(created)
    }

    /// PATCH a User. A 200 with the resource and a 204 without a body are both success.
    pub async fn patch_user(&self, id: &str, ops: &[PatchOp]) -> Result<(), ScimError> {
        let path = self.user_path(id);
        let body = PatchRequest::new(ops.to_vec());
        self.call_with(
            Method::PATCH,
            &path,
            Some(to_json(&body)),
            Idempotency::of_patch(ops),
        )
        .await
        .map(drop)
    }

    /// DELETE a User.
    pub async fn delete_user(&self, id: &str) -> Result<(), ScimError> {
        let path = self.user_path(id);
        self.call(Method::DELETE, &path, None).await.map(drop)
    }

    /// The User whose `userName` equals `user_name` (case-insensitively, as RFC 7643 defines
    /// userName), if any.
    pub async fn find_user_by_user_name(
        &self,
        user_name: &str,
    ) -> Result<Option<ScimUser>, ScimError> {
        let wanted = user_name.to_lowercase();
        self.find_user_where("userName", user_name, |u| {
            u.user_name.to_lowercase() == wanted
        })
        .await
    }

    /// The User whose `externalId` equals `external_id` exactly (RFC 7643 makes it
    /// case-exact), if any.
    pub async fn find_user_by_external_id(
        &self,
        external_id: &str,
    ) -> Result<Option<ScimUser>, ScimError> {
        self.find_user_where("externalId", external_id, |u| {
            u.external_id.as_deref() == Some(external_id)
        })
        .await
    }

    /// `GET Users?filter=<attribute> eq "<value>"`, then the first listed user for which
    /// `is_it` holds: checked again here, since a server that ignores `filter` returns
    /// everyone.
    async fn find_user_where(
        &self,
        attribute: &str,
        value: &str,
        is_it: impl Fn(&ScimUser) -> bool,
    ) -> Result<Option<ScimUser>, ScimError> {
        let path = format!("{}/Users", self.base_path);
        let filter = format!("{attribute} eq {}", filter_string(value));
        let query = format!("{path}?filter={}", utf8_percent_encode(&filter, COMPONENT));
        let response = self.call(Method::GET, &query, None).await?;
        let page: ListResponse<ScimUser> = parse(&response, &path)?;
        Ok(page.resources.into_iter().find(|u| is_it(u)))
    }

    /// The User this hub means by `external_id` / `user_name`: by externalId first (the
    /// hub's own identifier, set by an earlier POST of ours), else by userName (taken by
    /// someone else, or by a server that drops externalId). This is how a create whose answer
    /// never came back is resolved instead of repeated.
    pub async fn find_user(
        &self,
        external_id: &str,
        user_name: &str,
    ) -> Result<Option<ScimUser>, ScimError> {
        if let Some(user) = self.find_user_by_external_id(external_id).await? {
            return Ok(Some(user));
        }
        self.find_user_by_user_name(user_name).await
    }

    /// POST a new Group; returns it as the server stored it (with its `id`).
    pub async fn create_group(&self, group: &ScimGroup) -> Result<ScimGroup, ScimError> {
        let body = ScimGroup {
            id: None,
            ..group.clone()
        };
        self.create(&body, "group").await
    }

    /// PATCH a Group. A 200 with the resource and a 204 without a body are both success.
    pub async fn patch_group(&self, id: &str, ops: &[PatchOp]) -> Result<(), ScimError> {
        let path = self.resource_path("Groups", id);
        let body = PatchRequest::new(ops.to_vec());
        self.call_with(
            Method::PATCH,
            &path,
            Some(to_json(&body)),
            Idempotency::of_patch(ops),
        )
        .await
        .map(drop)
    }

    /// DELETE a Group.
    pub async fn delete_group(&self, id: &str) -> Result<(), ScimError> {
        let path = self.resource_path("Groups", id);
        self.call(Method::DELETE, &path, None).await.map(drop)
    }

    /// The Group whose `externalId` is `external_id` (exactly), else the first whose
    /// `displayName` is `display_name` (case-insensitively), if any: how a group whose
    /// creation answer was lost, or that the server says exists, is found again.
    pub async fn find_group(
        &self,
        external_id: &str,
        display_name: &str,
    ) -> Result<Option<ScimGroup>, ScimError> {
        let by_ext = self.filter_groups("externalId", external_id).await?;
        // Checked again here: a server that ignores `filter` returns every group.
        if let Some(g) = by_ext
            .into_iter()
            .find(|g| g.external_id.as_deref() == Some(external_id))
        {
            return Ok(Some(g));
        }
        let wanted = display_name.to_lowercase();
        Ok(self
            .filter_groups("displayName", display_name)
            .await?
            .into_iter()
            .find(|g| g.display_name.to_lowercase() == wanted))
    }

    async fn filter_groups(&self, attr: &str, value: &str) -> Result<Vec<ScimGroup>, ScimError> {
        let path = format!("{}/Groups", self.base_path);
        let filter = format!("{attr} eq {}", filter_string(value));
        let query = format!("{path}?filter={}", utf8_percent_encode(&filter, COMPONENT));
        let response = self.call(Method::GET, &query, None).await?;
        let page: ListResponse<ScimGroup> = parse(&response, &path)?;
        Ok(page.resources)
    }

    /// GET `<base>/ServiceProviderConfig`: a cheap probe that tells a wrong base path (404) or
    /// wrong credentials apart before a run starts listing.
    pub async fn check_base(&self) -> Result<(), ScimError> {
        let path = format!("{}/ServiceProviderConfig", self.base_path);
        let response = self.call(Method::GET, &path, None).await?;
        let value: serde_json::Value = parse(&response, &path)?;
        if value.is_object() {
            Ok(())
        } else {
            Err(ScimError::BadResponse {
                path,
                detail: "ServiceProviderConfig is not a JSON object".into(),
            })
        }
    }

    fn user_path(&self, id: &str) -> String {
        self.resource_path("Users", id)
    }

    fn resource_path(&self, endpoint: &str, id: &str) -> String {
        format!(
            "{}/{endpoint}/{}",
            self.base_path,
            utf8_percent_encode(id, COMPONENT)
        )
    }

    /// Sends one request with the idempotency its method implies (see
    /// [`Idempotency::of_method`]); a non-2xx answer becomes [`ScimError::Status`].
    pub async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
    ) -> Result<ScimResponse, ScimError> {
        let idempotency = Idempotency::of_method(&method);
        self.call_with(method, path_and_query, body, idempotency)
            .await
    }

    /// Sends one request, retrying transient faults as the policy and `idempotency` allow;
    /// the last attempt's answer is what the caller gets. A non-2xx answer becomes
    /// [`ScimError::Status`].
    pub async fn call_with(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
        idempotency: Idempotency,
    ) -> Result<ScimResponse, ScimError> {
        let mut headers = vec![("Accept".to_string(), SCIM_CONTENT_TYPE.to_string())];
        if body.is_some() {
            headers.push(("Content-Type".to_string(), SCIM_CONTENT_TYPE.to_string()));
        }
        if let Some(auth) = &self.authorization {
            headers.push(("Authorization".to_string(), auth.clone()));
        }
        let request = ScimRequest {
            method: method.clone(),
            path_and_query: path_and_query.to_string(),
            headers,
            body,
        };
        let path = path_and_query
            .split_once('?')
            .map_or(path_and_query, |(p, _)| p);
        let mut attempts = Attempts::new(&self.retry, idempotency);
        let response = loop {
            let result = self.send_once(request.clone()).await;
            let verdict = Verdict::of(&result, SystemTime::now());
            let Some((wait, throttled)) = attempts.next(&verdict) else {
                break result?;
            };
            self.retries.fetch_add(1, Ordering::Relaxed);
            if verdict == Verdict::AgentLost {
                self.reroutes.fetch_add(1, Ordering::Relaxed);
            }
            tracing::warn!(
                %method,
                path,
                wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                "SCIM request retried after {}",
                describe(&result)
            );
            if throttled {
                self.pause_for(wait);
            }
            tokio::time::sleep(wait).await;
        };
        if (200..300).contains(&response.status) {
            return Ok(response);
        }
        let error: ScimErrorBody =
            serde_json::from_slice(&response.body).unwrap_or_else(|_| ScimErrorBody {
                detail: body_snippet(&response.body),
                ..Default::default()
            });
        Err(ScimError::Status {
            method: method.to_string(),
            path: path.to_string(),
            status: response.status,
            scim_type: error
                .scim_type
                .and_then(|t| server_text(&t, MAX_SCIM_TYPE_CHARS)),
            detail: error.detail.and_then(|d| server_text(&d, MAX_DETAIL_CHARS)),
        })
    }

    /// One attempt: waits out a pause the server asked for, takes an in-flight slot, sends.
    async fn send_once(&self, request: ScimRequest) -> Result<ScimResponse, TransportError> {
        loop {
            let until = *self.pause_until.lock().unwrap_or_else(|p| p.into_inner());
            match until {
                Some(until) if until > Instant::now() => tokio::time::sleep_until(until).await,
                _ => break,
            }
        }
        // The semaphore is never closed, so acquiring only fails if it were; sending without a
        // slot is then the lesser evil.
        let _slot = match &self.in_flight {
            Some(s) => s.acquire().await.ok(),
            None => None,
        };
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.transport.send(request).await
    }

    /// Holds every request of this client back for `wait` (or longer, if already held).
    fn pause_for(&self, wait: Duration) {
        let until = Instant::now() + wait;
        let mut pause = self.pause_until.lock().unwrap_or_else(|p| p.into_inner());
        if pause.is_none_or(|p| p < until) {
            *pause = Some(until);
        }
    }
}

/// What an attempt met, for the retry log line: the status or the transport error, never a
/// header (the request's carry the credentials).
fn describe(result: &Result<ScimResponse, TransportError>) -> String {
    match result {
        Ok(response) => format!("status {}", response.status),
        Err(e) => e.to_string(),
    }
}

/// A SCIM filter string literal: JSON string escaping, always quoted (unquoted values are
/// rejected by strict servers).
fn filter_string(value: &str) -> String {
    serde_json::Value::String(value.to_string()).to_string()
}

fn to_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Serializing our own plain structs into a Vec cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn parse<T: DeserializeOwned>(response: &ScimResponse, path: &str) -> Result<T, ScimError> {
    serde_json::from_slice(&response.body).map_err(|e| ScimError::BadResponse {
        path: path.to_string(),
        detail: match body_snippet(&response.body) {
            None => format!("status {} with an empty body", response.status),
            Some(s) => format!("not a SCIM body ({e}); it starts with `{s}`"),
        },
    })
}

/// The start of a body, printable, for error messages about bodies that are not SCIM JSON.
fn body_snippet(body: &[u8]) -> Option<String> {
    server_text(&String::from_utf8_lossy(body), MAX_SNIPPET_CHARS)
}

/// Longest `scimType`, `detail` and non-JSON body snippet quoted from a server's error.
const MAX_SCIM_TYPE_CHARS: usize = 120;
const MAX_DETAIL_CHARS: usize = 500;
const MAX_SNIPPET_CHARS: usize = 120;

/// What a server said, fit to be quoted in the one line an administrator reads: trimmed,
/// control characters (a JSON `\n` decodes to a real newline) turned to spaces, at most
/// `limit` characters; `None` when nothing is left.
fn server_text(text: &str, limit: usize) -> Option<String> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    Some(
        text.chars()
            .take(limit)
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect(),
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::scim::resources::PatchOpKind;
    use crate::scim::transport::TransportError;
    use futures_util::future::BoxFuture;
    use serde_json::json;
    use std::sync::Mutex;

    /// Knobs that make the fake server misbehave the way real ones do.
    #[derive(Default, Clone)]
    pub(crate) struct Quirks {
        /// Never return more than this many resources per page.
        pub max_page: Option<usize>,
        /// Leave `itemsPerPage` and `startIndex` out of list responses.
        pub omit_items_per_page: bool,
        /// Remove this many users from the store after each list page (totalResults shrinks).
        pub shrink_per_page: usize,
        /// Report this totalResults but return nothing beyond the real users.
        pub lie_total: Option<u64>,
        /// Ignore startIndex: always return the first page.
        pub ignore_start_index: bool,
        /// Ignore the filter: return everyone.
        pub ignore_filter: bool,
        /// Answer PATCH with 204 and no body.
        pub patch_no_content: bool,
    }

    /// An in-memory SCIM server behind the [`Transport`] trait, with quirks.
    pub(crate) struct FakeTransport {
        pub users: Mutex<Vec<ScimUser>>,
        pub groups: Mutex<Vec<ScimGroup>>,
        pub quirks: Quirks,
        pub log: Mutex<Vec<ScimRequest>>,
    }

    impl FakeTransport {
        pub fn new(n: usize, quirks: Quirks) -> Arc<Self> {
            let users = (0..n)
                .map(|i| ScimUser {
                    id: Some(format!("id{i}")),
                    user_name: format!("user{i}"),
                    ..Default::default()
                })
                .collect();
            Arc::new(FakeTransport {
                users: Mutex::new(users),
                groups: Mutex::new(Vec::new()),
                quirks,
                log: Mutex::new(Vec::new()),
            })
        }

        fn query_param(pq: &str, key: &str) -> Option<String> {
            let (_, q) = pq.split_once('?')?;
            q.split('&').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k == key).then(|| {
                    percent_encoding::percent_decode_str(v)
                        .decode_utf8_lossy()
                        .into_owned()
                })
            })
        }

        fn answer(&self, req: &ScimRequest) -> ScimResponse {
            let json_response = |status: u16, v: serde_json::Value| ScimResponse {
                status,
                headers: vec![("content-type".into(), SCIM_CONTENT_TYPE.into())],
                body: serde_json::to_vec(&v).unwrap(),
            };
            if req.method == Method::GET && req.path_and_query.starts_with("/scim/v2/Groups?") {
                let groups = self.groups.lock().unwrap();
                if let Some(filter) = Self::query_param(&req.path_and_query, "filter") {
                    let found: Vec<&ScimGroup> = groups
                        .iter()
                        .filter(|g| {
                            self.quirks.ignore_filter
                                || filter
                                    == format!(
                                        "externalId eq {}",
                                        filter_string(g.external_id.as_deref().unwrap_or(""))
                                    )
                                || filter.to_lowercase()
                                    == format!(
                                        "displayname eq {}",
                                        filter_string(&g.display_name).to_lowercase()
                                    )
                        })
                        .collect();
                    return json_response(
                        200,
                        json!({"totalResults": found.len(), "Resources": found}),
                    );
                }
                let start: usize = Self::query_param(&req.path_and_query, "startIndex")
                    .unwrap()
                    .parse()
                    .unwrap();
                let count: usize = Self::query_param(&req.path_and_query, "count")
                    .unwrap()
                    .parse()
                    .unwrap();
                let count = self.quirks.max_page.map_or(count, |m| count.min(m));
                let page: Vec<&ScimGroup> = groups.iter().skip(start - 1).take(count).collect();
                return json_response(
                    200,
                    json!({"totalResults": groups.len(), "Resources": page}),
                );
            }
            let mut users = self.users.lock().unwrap();
            if req.method == Method::GET && req.path_and_query.starts_with("/scim/v2/Users?") {
                if let Some(filter) = Self::query_param(&req.path_and_query, "filter") {
                    let wanted: String = filter
                        .strip_prefix("userName eq ")
                        .map(|v| serde_json::from_str(v).unwrap())
                        .unwrap();
                    let found: Vec<&ScimUser> = users
                        .iter()
                        .filter(|u| {
                            self.quirks.ignore_filter || u.user_name.eq_ignore_ascii_case(&wanted)
                        })
                        .collect();
                    return json_response(
                        200,
                        json!({"totalResults": found.len(), "Resources": found}),
                    );
                }
                let start: usize = Self::query_param(&req.path_and_query, "startIndex")
                    .unwrap()
                    .parse()
                    .unwrap();
                let count: usize = Self::query_param(&req.path_and_query, "count")
                    .unwrap()
                    .parse()
                    .unwrap();
                let count = self.quirks.max_page.map_or(count, |m| count.min(m));
                let start = if self.quirks.ignore_start_index {
                    1
                } else {
                    start
                };
                let page: Vec<ScimUser> =
                    users.iter().skip(start - 1).take(count).cloned().collect();
                let total = self.quirks.lie_total.unwrap_or(users.len() as u64);
                let mut body = json!({"totalResults": total, "Resources": page});
                if !self.quirks.omit_items_per_page {
                    body["itemsPerPage"] = json!(page.len());
                    body["startIndex"] = json!(start);
                }
                let shrink = self.quirks.shrink_per_page.min(users.len());
                let keep = users.len() - shrink;
                users.truncate(keep);
                return json_response(200, body);
            }
            if req.method == Method::PATCH {
                if self.quirks.patch_no_content {
                    return ScimResponse {
                        status: 204,
                        headers: vec![],
                        body: vec![],
                    };
                }
                return json_response(200, json!({"id": "x", "userName": "x"}));
            }
            json_response(404, json!({"status": 404, "detail": "no such endpoint"}))
        }
    }

    impl Transport for FakeTransport {
        fn send(
            &self,
            request: ScimRequest,
        ) -> BoxFuture<'_, Result<ScimResponse, TransportError>> {
            let response = self.answer(&request);
            self.log.lock().unwrap().push(request);
            Box::pin(async move { Ok(response) })
        }
    }

    fn client(t: &Arc<FakeTransport>, page: u32) -> ScimClient {
        ScimClient::new(
            t.clone(),
            "/scim/v2/".into(),
            Some("Bearer s3cret".into()),
            page,
        )
    }

    fn ids(users: &[ScimUser]) -> Vec<String> {
        users.iter().map(|u| u.id.clone().unwrap()).collect()
    }

    #[tokio::test]
    async fn users_without_ids_on_a_repeating_page_are_not_followed() {
        // Found while writing the SCIM fuzz target: users without `id` were never counted as
        // repeats, so a server that ignores startIndex was followed up to its totalResults
        // (3 users listed 1000 times over here; forever, with an unbounded totalResults).
        let t = FakeTransport::new(
            3,
            Quirks {
                ignore_start_index: true,
                lie_total: Some(3000),
                ..Default::default()
            },
        );
        for user in t.users.lock().unwrap().iter_mut() {
            user.id = None;
        }
        let err = client(&t, 3).list_users().await.unwrap_err();
        assert!(err.to_string().contains("only repeats users"), "{err}");
        assert_eq!(t.log.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn lists_every_page() {
        let t = FakeTransport::new(250, Quirks::default());
        let users = client(&t, 100).list_users().await.unwrap();
        assert_eq!(users.len(), 250);
        assert_eq!(t.log.lock().unwrap().len(), 3);
        let first = &t.log.lock().unwrap()[0];
        assert_eq!(
            first.path_and_query,
            "/scim/v2/Users?startIndex=1&count=100"
        );
        assert!(first
            .headers
            .contains(&("Authorization".into(), "Bearer s3cret".into())));
    }

    #[tokio::test]
    async fn follows_short_pages_without_items_per_page() {
        let t = FakeTransport::new(
            95,
            Quirks {
                max_page: Some(10),
                omit_items_per_page: true,
                ..Default::default()
            },
        );
        let users = client(&t, 50).list_users().await.unwrap();
        assert_eq!(users.len(), 95);
        let expected: Vec<String> = (0..95).map(|i| format!("id{i}")).collect();
        assert_eq!(ids(&users), expected);
        assert_eq!(t.log.lock().unwrap().len(), 10);
    }

    #[tokio::test]
    async fn stops_when_total_results_shrinks() {
        // 100 users, pages of 10, 15 users vanish after each page: the walk must end.
        let t = FakeTransport::new(
            100,
            Quirks {
                shrink_per_page: 15,
                ..Default::default()
            },
        );
        let users = client(&t, 10).list_users().await.unwrap();
        assert!(users.len() < 100);
        assert!(t.log.lock().unwrap().len() <= 10);
    }

    #[tokio::test]
    async fn stops_on_empty_page_despite_total_results() {
        let t = FakeTransport::new(
            30,
            Quirks {
                lie_total: Some(1_000_000),
                ..Default::default()
            },
        );
        let users = client(&t, 20).list_users().await.unwrap();
        assert_eq!(users.len(), 30);
        assert_eq!(t.log.lock().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn server_ignoring_start_index_is_an_error_not_a_loop() {
        let t = FakeTransport::new(
            30,
            Quirks {
                ignore_start_index: true,
                ..Default::default()
            },
        );
        let err = client(&t, 10).list_users().await.unwrap_err();
        assert!(
            matches!(&err, ScimError::BadResponse { detail, .. } if detail.contains("startIndex")),
            "{err:?}"
        );
        assert_eq!(t.log.lock().unwrap().len(), 2);
    }

    fn fake_groups(t: &FakeTransport, n: usize) {
        let mut groups = t.groups.lock().unwrap();
        for i in 0..n {
            groups.push(ScimGroup {
                id: Some(format!("g{i}")),
                external_id: Some(format!("ext-g{i}")),
                display_name: format!("Group {i}"),
                members: vec![crate::scim::resources::GroupMember::user(&format!("id{i}"))],
            });
        }
    }

    #[tokio::test]
    async fn lists_every_group_page_like_users() {
        let t = FakeTransport::new(
            0,
            Quirks {
                max_page: Some(4),
                ..Default::default()
            },
        );
        fake_groups(&t, 10);
        let groups = client(&t, 100).list_groups().await.unwrap();
        assert_eq!(groups.len(), 10);
        assert_eq!(groups[9].members[0].value, "id9");
        let log = t.log.lock().unwrap();
        assert_eq!(log.len(), 3, "pages of 4, 4 and 2");
        assert_eq!(
            log[1].path_and_query,
            "/scim/v2/Groups?startIndex=5&count=100"
        );
    }

    #[tokio::test]
    async fn find_group_by_external_id_then_display_name() {
        let t = FakeTransport::new(0, Quirks::default());
        fake_groups(&t, 3);
        let c = client(&t, 10);
        let g = c.find_group("ext-g1", "whatever").await.unwrap().unwrap();
        assert_eq!(g.id.as_deref(), Some("g1"));
        let g = c.find_group("unknown", "GROUP 2").await.unwrap().unwrap();
        assert_eq!(g.id.as_deref(), Some("g2"));
        assert!(c.find_group("unknown", "nope").await.unwrap().is_none());
        let log: Vec<String> = t
            .log
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.path_and_query.clone())
            .collect();
        assert_eq!(
            log[0],
            "/scim/v2/Groups?filter=externalId%20eq%20%22ext-g1%22"
        );
        assert_eq!(
            log[2],
            "/scim/v2/Groups?filter=displayName%20eq%20%22GROUP%202%22"
        );
        // A server that ignores the filter is checked again on our side.
        let t = FakeTransport::new(
            0,
            Quirks {
                ignore_filter: true,
                ..Default::default()
            },
        );
        fake_groups(&t, 3);
        let g = client(&t, 10)
            .find_group("ext-g2", "x")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(g.id.as_deref(), Some("g2"));
    }

    #[tokio::test]
    async fn group_patch_accepts_204_and_200() {
        for quirk in [false, true] {
            let t = FakeTransport::new(
                0,
                Quirks {
                    patch_no_content: quirk,
                    ..Default::default()
                },
            );
            client(&t, 10)
                .patch_group("g/1", &[PatchOp::remove("members[value eq \"a\"]")])
                .await
                .unwrap();
            assert_eq!(
                t.log.lock().unwrap()[0].path_and_query,
                "/scim/v2/Groups/g%2F1"
            );
        }
    }

    #[tokio::test]
    async fn filter_is_quoted_escaped_and_encoded() {
        let t = FakeTransport::new(0, Quirks::default());
        t.users.lock().unwrap().push(ScimUser {
            id: Some("q".into()),
            user_name: "O\"Brien \\ Co&x=1".into(),
            ..Default::default()
        });
        let c = client(&t, 10);
        let found = c
            .find_user_by_user_name("o\"brien \\ co&x=1")
            .await
            .unwrap();
        assert_eq!(found.unwrap().id.as_deref(), Some("q"));
        let pq = t.log.lock().unwrap()[0].path_and_query.clone();
        assert_eq!(
            pq,
            "/scim/v2/Users?filter=userName%20eq%20%22o%5C%22brien%20%5C%5C%20co%26x%3D1%22"
        );
    }

    #[tokio::test]
    async fn find_rechecks_a_filter_the_server_ignored() {
        let t = FakeTransport::new(
            5,
            Quirks {
                ignore_filter: true,
                ..Default::default()
            },
        );
        let c = client(&t, 10);
        assert_eq!(
            c.find_user_by_user_name("USER3").await.unwrap().unwrap().id,
            Some("id3".into())
        );
        assert!(c.find_user_by_user_name("nobody").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn patch_accepts_200_with_body_and_204_without() {
        let op = [PatchOp {
            op: PatchOpKind::Replace,
            path: Some("active".into()),
            value: Some(json!(false)),
        }];
        for quirk in [false, true] {
            let t = FakeTransport::new(
                1,
                Quirks {
                    patch_no_content: quirk,
                    ..Default::default()
                },
            );
            client(&t, 10).patch_user("id 0/x", &op).await.unwrap();
            let log = t.log.lock().unwrap();
            assert_eq!(log[0].path_and_query, "/scim/v2/Users/id%200%2Fx");
            let body: serde_json::Value =
                serde_json::from_slice(log[0].body.as_ref().unwrap()).unwrap();
            assert_eq!(body["Operations"][0]["op"], "replace");
        }
    }

    #[tokio::test]
    async fn error_status_is_typed_with_path_without_query() {
        let t = FakeTransport::new(1, Quirks::default());
        let err = client(&t, 10).check_base().await.unwrap_err();
        assert_eq!(
            err,
            ScimError::Status {
                method: "GET".into(),
                path: "/scim/v2/ServiceProviderConfig".into(),
                status: 404,
                scim_type: None,
                detail: Some("no such endpoint".into()),
            }
        );
        assert!(!format!("{:?}", client(&t, 10)).contains("s3cret"));
    }

    /// Answers from a script, in order, then `fallback`; records when each request was sent.
    struct Scripted {
        script: Mutex<std::collections::VecDeque<Result<ScimResponse, TransportError>>>,
        fallback: ScimResponse,
        /// Each request's method, path and send time.
        sent: Mutex<Vec<(Method, String, tokio::time::Instant)>>,
        /// Answer only after this long, to let requests overlap.
        latency: Duration,
        in_flight: AtomicUsize,
        max_in_flight: AtomicUsize,
    }

    impl Scripted {
        fn new(
            script: Vec<Result<ScimResponse, TransportError>>,
            fallback_body: serde_json::Value,
        ) -> Arc<Scripted> {
            Arc::new(Scripted {
                script: Mutex::new(script.into()),
                fallback: ScimResponse {
                    status: 200,
                    headers: vec![],
                    body: serde_json::to_vec(&fallback_body).unwrap(),
                },
                sent: Mutex::new(Vec::new()),
                latency: Duration::ZERO,
                in_flight: AtomicUsize::new(0),
                max_in_flight: AtomicUsize::new(0),
            })
        }

        fn sent(&self) -> Vec<(Method, String, tokio::time::Instant)> {
            self.sent.lock().unwrap().clone()
        }
    }

    impl Transport for Scripted {
        fn send(
            &self,
            request: ScimRequest,
        ) -> BoxFuture<'_, Result<ScimResponse, TransportError>> {
            Box::pin(async move {
                let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                self.max_in_flight.fetch_max(now, Ordering::SeqCst);
                self.sent.lock().unwrap().push((
                    request.method.clone(),
                    request.path_and_query.clone(),
                    tokio::time::Instant::now(),
                ));
                tokio::time::sleep(self.latency).await;
                let next = self.script.lock().unwrap().pop_front();
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
                next.unwrap_or_else(|| Ok(self.fallback.clone()))
            })
        }
    }

    fn status(code: u16, retry_after: Option<&str>) -> Result<ScimResponse, TransportError> {
        Ok(ScimResponse {
            status: code,
            headers: retry_after
                .map(|v| vec![("Retry-After".to_string(), v.to_string())])
                .unwrap_or_default(),
            body: br#"{"detail":"try later"}"#.to_vec(),
        })
    }

    fn lost() -> Result<ScimResponse, TransportError> {
        Err(TransportError::Tunnel {
            detail: "agent disconnected".into(),
        })
    }

    fn scripted_client(t: &Arc<Scripted>) -> ScimClient {
        ScimClient::new(t.clone(), "/scim/v2".into(), None, 100)
    }

    #[tokio::test(start_paused = true)]
    async fn what_the_server_said_is_quoted_on_one_line() {
        // Found by fuzz/fuzz_targets/scim_response.rs: a JSON "\n" in scimType became a line
        // break in the Last Sync message.
        let conflict = Ok(ScimResponse {
            status: 409,
            headers: vec![],
            body: br#"{"scimType":"uniqu\ness","detail":"userName\r\ntaken"}"#.to_vec(),
        });
        let t = Scripted::new(vec![conflict], json!({}));
        let err = scripted_client(&t).patch_user("u1", &[]).await.unwrap_err();
        let ScimError::Status {
            scim_type, detail, ..
        } = &err
        else {
            panic!("{err:?}");
        };
        assert_eq!(scim_type.as_deref(), Some("uniqu ess"));
        assert_eq!(detail.as_deref(), Some("userName  taken"));
        assert!(
            !err.diagnosis().contains(['\n', '\r']),
            "{}",
            err.diagnosis()
        );
        assert_eq!(server_text(" \t ", 10), None);
        assert_eq!(
            server_text(&"x".repeat(600), MAX_DETAIL_CHARS)
                .unwrap()
                .len(),
            500
        );
    }

    #[tokio::test(start_paused = true)]
    async fn get_rides_out_throttling_and_transient_faults() {
        let t = Scripted::new(
            vec![
                status(429, Some("2")),
                status(503, None),
                Err(TransportError::Forward(
                    crate::messages::ForwardError::Network {
                        addr: "10.0.0.1:443".into(),
                        detail: "connection reset".into(),
                    },
                )),
                status(502, None),
            ],
            json!({}),
        );
        let c = scripted_client(&t);
        let start = tokio::time::Instant::now();
        c.check_base().await.unwrap();
        let sent = t.sent();
        assert_eq!(sent.len(), 5);
        assert_eq!((c.request_count(), c.retry_count()), (5, 4));
        // Retry-After: 2 was honoured before the second attempt.
        assert!(sent[1].2 - sent[0].2 >= Duration::from_secs(2), "{sent:?}");
        let policy = RetryPolicy::default();
        let most: Duration = (0..3).map(|i| policy.base_delay * 2u32.pow(i)).sum();
        assert!(start.elapsed() <= Duration::from_secs(2) + most);
    }

    #[tokio::test(start_paused = true)]
    async fn a_post_with_an_unknown_outcome_is_never_repeated() {
        for unknown in [
            lost(),
            status(502, None),
            status(504, None),
            status(503, None),
            Err(TransportError::Timeout { after_ms: 30_000 }),
        ] {
            let t = Scripted::new(vec![unknown], json!({"id": "x", "userName": "a"}));
            let err = scripted_client(&t)
                .create_user(&ScimUser {
                    user_name: "a".into(),
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert_eq!(t.sent().len(), 1, "{err:?}");
            assert!(err.may_have_landed(), "the caller must look it up: {err:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_post_that_never_left_or_was_throttled_is_sent_again() {
        let soon = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(4));
        let t = Scripted::new(
            vec![
                Err(TransportError::NoConnector {
                    kind: crate::scim::transport::NoConnectorKind::NoAgent,
                    reason: "no agent".into(),
                }),
                Err(TransportError::Forward(
                    crate::messages::ForwardError::ConnectRefused {
                        addr: "10.0.0.1:443".into(),
                    },
                )),
                status(429, Some(&soon)),
                status(503, Some("1")),
            ],
            json!({"id": "x", "userName": "a"}),
        );
        let created = scripted_client(&t)
            .create_user(&ScimUser {
                user_name: "a".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(created.id.as_deref(), Some("x"));
        let sent = t.sent();
        assert_eq!(sent.len(), 5);
        // The HTTP date is whole seconds: at least 3 s of the 4 remain.
        assert!(sent[3].2 - sent[2].2 >= Duration::from_secs(3), "{sent:?}");
        assert!(sent[4].2 - sent[3].2 >= Duration::from_secs(1), "{sent:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_switched_off_service_is_not_retried() {
        let t = Scripted::new(
            vec![Err(TransportError::NoConnector {
                kind: crate::scim::transport::NoConnectorKind::ServiceOff,
                reason: "off".into(),
            })],
            json!({}),
        );
        scripted_client(&t).check_base().await.unwrap_err();
        assert_eq!(t.sent().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_bounded_and_the_last_answer_is_reported() {
        let t = Scripted::new((0..20).map(|_| status(503, None)).collect(), json!({}));
        let c = scripted_client(&t);
        let err = c.check_base().await.unwrap_err();
        assert_eq!(err.status(), Some(503));
        assert_eq!(
            t.sent().len(),
            1 + RetryPolicy::default().fault_retries as usize
        );

        let t = Scripted::new((0..20).map(|_| status(429, Some("1"))).collect(), json!({}));
        let c = scripted_client(&t).with_retry(RetryPolicy {
            throttle_retries: 2,
            ..RetryPolicy::default()
        });
        assert_eq!(c.check_base().await.unwrap_err().status(), Some(429));
        assert_eq!(t.sent().len(), 3);

        let t = Scripted::new(vec![status(503, None)], json!({}));
        let c = scripted_client(&t).with_retry(RetryPolicy::none());
        assert_eq!(c.check_base().await.unwrap_err().status(), Some(503));
        assert_eq!(t.sent().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_holds_back_every_request_of_the_client() {
        let t = Scripted::new(vec![status(429, Some("3"))], json!({}));
        let c = scripted_client(&t);
        let start = tokio::time::Instant::now();
        let first = c.check_base();
        let second = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            c.delete_user("u1").await
        };
        let (a, b) = tokio::join!(first, second);
        a.unwrap();
        b.unwrap();
        let sent = t.sent();
        let delete = sent.iter().find(|(m, _, _)| *m == Method::DELETE).unwrap();
        assert!(
            delete.2 - start >= Duration::from_secs(3),
            "the DELETE waited for the server's Retry-After: {sent:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_requests_are_bounded() {
        let mut t = Scripted::new(vec![], json!({}));
        Arc::get_mut(&mut t).unwrap().latency = Duration::from_millis(100);
        let c = scripted_client(&t).with_max_in_flight(3);
        let ids: Vec<String> = (0..10).map(|i| format!("u{i}")).collect();
        let calls: Vec<_> = ids.iter().map(|id| c.delete_user(id)).collect();
        for r in futures_util::future::join_all(calls).await {
            r.unwrap();
        }
        assert_eq!(t.max_in_flight.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_whose_agent_was_lost_is_rerouted_at_once_unless_it_is_a_create() {
        let agent_lost = || {
            Err(TransportError::AgentLost {
                agent: "vm-02".into(),
                detail: "its tunnel closed".into(),
            })
        };
        let t = Scripted::new(vec![agent_lost()], json!({}));
        let c = scripted_client(&t);
        c.delete_user("u1").await.unwrap();
        let sent = t.sent();
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[1].2, sent[0].2, "no backoff before a re-route");
        assert_eq!((c.retry_count(), c.reroute_count()), (1, 1));

        let t = Scripted::new(vec![agent_lost()], json!({"id": "x", "userName": "a"}));
        let c = scripted_client(&t);
        let err = c
            .create_user(&ScimUser {
                user_name: "a".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(t.sent().len(), 1, "a create is the caller's to look up");
        assert!(err.may_have_landed(), "{err:?}");
        assert_eq!(c.reroute_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn patch_is_retried_only_when_its_operations_are_idempotent() {
        let safe = [PatchOp::replace("active", json!(false))];
        let t = Scripted::new(vec![lost()], json!({}));
        scripted_client(&t).patch_user("u1", &safe).await.unwrap();
        assert_eq!(t.sent().len(), 2);

        let append = [PatchOp {
            op: PatchOpKind::Add,
            path: Some("emails".into()),
            value: Some(json!([{ "value": "a@example.com" }])),
        }];
        let t = Scripted::new(vec![lost()], json!({}));
        scripted_client(&t)
            .patch_user("u1", &append)
            .await
            .unwrap_err();
        assert_eq!(t.sent().len(), 1);
    }

    #[tokio::test]
    async fn find_user_prefers_the_external_id() {
        let by_ext = json!({"totalResults": 1, "Resources": [
            {"id": "e1", "userName": "other@example.com", "externalId": "u01"}]});
        let t = Scripted::new(
            vec![Ok(ScimResponse {
                status: 200,
                headers: vec![],
                body: serde_json::to_vec(&by_ext).unwrap(),
            })],
            json!({"totalResults": 0, "Resources": []}),
        );
        let c = scripted_client(&t);
        let found = c.find_user("u01", "person01@example.com").await.unwrap();
        assert_eq!(found.unwrap().id.as_deref(), Some("e1"));
        assert_eq!(
            t.sent()[0].1,
            "/scim/v2/Users?filter=externalId%20eq%20%22u01%22"
        );
        // Not found by externalId: asked by userName next.
        assert!(c
            .find_user("u02", "person02@example.com")
            .await
            .unwrap()
            .is_none());
        let sent = t.sent();
        assert_eq!(sent.len(), 3);
        assert!(sent[2]
            .1
            .contains("userName%20eq%20%22person02%40example.com%22"));
    }
}
