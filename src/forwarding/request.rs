//! Checks a [`ForwardRequest`] and turns it into an HTTP/1.1 request for hyper.
//!
//! This module owns what the agent agrees to send: SCIM methods only, an origin-form request
//! target (`/path?query`, nothing that names another host), no control characters that could
//! split a request, no hop-by-hop headers from the hub. It must never open a connection:
//! everything it refuses is refused before any socket exists. It treats every field as hostile:
//! a compromised hub chooses all of them, so refusals repeat them only through
//! [`untrusted`].

use std::str::FromStr;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Method, Request, Version};
use http_body_util::Full;

use crate::logging::untrusted;
use crate::messages::{ForwardError, ForwardRequest};

/// The methods SCIM 2.0 uses (RFC 7644 §3.2); everything else is refused.
pub const SCIM_METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus the ones the agent
/// computes itself (`Host`, `Content-Length`) and `Expect`, which this client does not honour.
const DROPPED_HEADERS: [&str; 12] = [
    "connection",
    "upgrade",
    "transfer-encoding",
    "keep-alive",
    "te",
    "trailer",
    "trailers",
    "host",
    "content-length",
    "expect",
    "proxy-connection",
    "proxy-authorization",
];

/// A checked request, ready to be turned into a hyper request as many times as needed (a
/// request that never left on a dead pooled connection is sent again on a fresh one).
#[derive(Debug, Clone)]
pub struct Prepared {
    method: Method,
    path_and_query: PathAndQuery,
    headers: HeaderMap,
    body: Bytes,
}

fn refused(reason: impl Into<String>) -> ForwardError {
    ForwardError::Refused {
        reason: reason.into(),
    }
}

fn has_control(bytes: &[u8]) -> bool {
    bytes.iter().any(|b| matches!(b, b'\r' | b'\n' | 0))
}

/// True for headers that must not cross the agent: the fixed hop-by-hop set, any `Proxy-*`, and
/// every header the request's own `Connection` header names.
fn is_dropped(name: &HeaderName, connection_listed: &[String]) -> bool {
    let name = name.as_str();
    DROPPED_HEADERS.contains(&name)
        || name.starts_with("proxy-")
        || connection_listed.iter().any(|listed| listed == name)
}

/// Checks `req` and builds the request the target will see. Errors are always
/// [`ForwardError::Refused`] and name what was wrong without echoing header values.
pub fn prepare(req: &ForwardRequest) -> Result<Prepared, ForwardError> {
    if !SCIM_METHODS.contains(&req.method.as_str()) {
        if has_control(req.method.as_bytes()) {
            return Err(refused("method contains CR, LF or NUL"));
        }
        return Err(refused(format!(
            "method `{}` is not a SCIM method (allowed: GET, POST, PUT, PATCH, DELETE)",
            untrusted(&req.method)
        )));
    }
    let method = Method::from_bytes(req.method.as_bytes())
        .map_err(|_| refused(format!("method `{}` is invalid", untrusted(&req.method))))?;

    if has_control(req.path_and_query.as_bytes()) {
        return Err(refused("path contains CR, LF or NUL"));
    }
    if !req.path_and_query.starts_with('/') {
        return Err(refused("path must be absolute (start with `/`)"));
    }
    // `//host/x` is a valid origin-form target, but it reads as a network-path reference to
    // any server that resolves it as a URL (and to many redirect builders); SCIM never needs it.
    if req.path_and_query.starts_with("//") {
        return Err(refused(
            "path must not start with `//` (it would name a host)",
        ));
    }
    // The http crate would silently cut a fragment off; a request target never has one, so a
    // `#` means the hub built something other than what it will be answered for.
    if req.path_and_query.contains('#') {
        return Err(refused(
            "path must not contain `#` (fragments are not sent)",
        ));
    }
    let path_and_query = PathAndQuery::from_str(&req.path_and_query)
        .map_err(|e| refused(format!("path is not a valid request target: {e}")))?;

    if has_control(req.host.as_bytes()) {
        return Err(refused("host contains CR, LF or NUL"));
    }
    let authority = Authority::from_str(&req.host).map_err(|e| {
        refused(format!(
            "host `{}` is not a valid host[:port]: {e}",
            untrusted(&req.host)
        ))
    })?;
    if authority.as_str().contains('@') {
        return Err(refused(format!(
            "host `{}` must not carry user information",
            untrusted(&req.host)
        )));
    }
    let host = HeaderValue::from_str(authority.as_str()).map_err(|_| {
        refused(format!(
            "host `{}` is not a valid header value",
            untrusted(&req.host)
        ))
    })?;

    let mut parsed = Vec::with_capacity(req.headers.len());
    for (name, value) in &req.headers {
        if has_control(name.as_bytes()) {
            return Err(refused("a header name contains CR, LF or NUL"));
        }
        let header_name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| refused(format!("header name `{}` is invalid", untrusted(name))))?;
        if has_control(value) {
            return Err(refused(format!(
                "value of header `{header_name}` contains CR, LF or NUL"
            )));
        }
        let header_value = HeaderValue::from_bytes(value).map_err(|_| {
            refused(format!(
                "value of header `{header_name}` contains a control character"
            ))
        })?;
        parsed.push((header_name, header_value));
    }

    let connection_listed: Vec<String> = parsed
        .iter()
        .filter(|(name, _)| name == header::CONNECTION)
        .filter_map(|(_, value)| value.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|token| token.trim().to_ascii_lowercase())
        .filter(|token| !token.is_empty())
        .collect();

    let mut headers = HeaderMap::with_capacity(parsed.len() + 1);
    headers.insert(header::HOST, host);
    for (name, value) in parsed {
        if !is_dropped(&name, &connection_listed) {
            headers.append(name, value);
        }
    }

    Ok(Prepared {
        method,
        path_and_query,
        headers,
        body: Bytes::copy_from_slice(&req.body),
    })
}

impl Prepared {
    /// The method, e.g. for deciding whether a resend is safe.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The path without its query, for logs (queries may carry user names in filters).
    pub fn path(&self) -> &str {
        self.path_and_query.path()
    }

    /// A fresh hyper request (origin-form target, HTTP/1.1). Cheap: the body is shared.
    pub fn to_request(&self) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(self.body.clone()));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = http::Uri::from(self.path_and_query.clone());
        *request.version_mut() = Version::HTTP_11;
        *request.headers_mut() = self.headers.clone();
        request
    }
}

/// Response headers worth returning to the hub: everything except hop-by-hop ones, which
/// described the connection between agent and target.
pub fn response_headers(headers: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    let connection_listed: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|token| token.trim().to_ascii_lowercase())
        .collect();
    headers
        .iter()
        .filter(|(name, _)| {
            let n = name.as_str();
            !(matches!(
                n,
                "connection" | "keep-alive" | "transfer-encoding" | "te" | "trailer" | "upgrade"
            ) || n.starts_with("proxy-")
                || connection_listed.iter().any(|listed| listed == n))
        })
        .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::Scheme;

    fn request(method: &str, path: &str, headers: Vec<(&str, &[u8])>) -> ForwardRequest {
        ForwardRequest {
            id: 1,
            target: "t".into(),
            scheme: Scheme::Http,
            host: "scim.example.com:8080".into(),
            method: method.into(),
            path_and_query: path.into(),
            headers: headers
                .into_iter()
                .map(|(n, v)| (n.to_string(), v.to_vec()))
                .collect(),
            body: b"{}".to_vec(),
            skip_tls_verify: false,
            timeout_ms: 1000,
        }
    }

    fn is_refused(r: Result<Prepared, ForwardError>) -> bool {
        matches!(r, Err(ForwardError::Refused { .. }))
    }

    #[test]
    fn only_scim_methods_pass() {
        for m in SCIM_METHODS {
            assert!(prepare(&request(m, "/Users", vec![])).is_ok(), "{m}");
        }
        for m in ["TRACE", "CONNECT", "OPTIONS", "HEAD", "get", "GET\r\n"] {
            assert!(is_refused(prepare(&request(m, "/Users", vec![]))), "{m:?}");
        }
    }

    #[test]
    fn control_characters_are_refused() {
        assert!(is_refused(prepare(&request(
            "GET",
            "/Users\r\nX-Evil: 1",
            vec![]
        ))));
        assert!(is_refused(prepare(&request("GET", "/Users\0", vec![]))));
        assert!(is_refused(prepare(&request("GET", "Users", vec![]))));
        assert!(is_refused(prepare(&request(
            "GET",
            "/Users",
            vec![("X-A\r\nB", b"1")]
        ))));
        assert!(is_refused(prepare(&request(
            "GET",
            "/Users",
            vec![("X-A", b"1\r\nX-B: 2")]
        ))));
        assert!(is_refused(prepare(&request(
            "GET",
            "/Users",
            vec![("X-A", b"a\0b")]
        ))));
        let mut bad_host = request("GET", "/Users", vec![]);
        bad_host.host = "a.example\r\nX: y".into();
        assert!(is_refused(prepare(&bad_host)));
    }

    #[test]
    fn request_targets_that_name_another_host_are_refused() {
        for path in [
            "http://evil.example/Users",
            "https://evil.example:443/",
            "//evil.example/Users",
            "//",
            "evil.example:80",
            "*",
            "",
            "/Users#fragment",
            "/Users?filter=a#b",
        ] {
            let result = prepare(&request("GET", path, vec![]));
            assert!(is_refused(result), "{path:?} passed");
        }
        // Double slashes further in are a path like any other.
        assert!(prepare(&request("GET", "/scim//Users", vec![])).is_ok());
    }

    #[test]
    fn refusals_repeat_hub_text_only_escaped_and_bounded() {
        let reason = |r: Result<Prepared, ForwardError>| match r {
            Err(ForwardError::Refused { reason }) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        };
        let long = "X".repeat(1 << 20);
        let text = reason(prepare(&request(&long, "/Users", vec![])));
        assert!(text.len() < 200, "{} bytes", text.len());
        let text = reason(prepare(&request(
            "GET",
            "/Users",
            vec![("X\u{1b}[31m", b"1")],
        )));
        assert!(!text.contains('\u{1b}'), "{text:?}");
        let mut bad_host = request("GET", "/Users", vec![]);
        bad_host.host = "evil\texample".into();
        let text = reason(prepare(&bad_host));
        assert!(
            !text.contains('\t') && text.contains("evil\\texample"),
            "{text:?}"
        );
    }

    #[test]
    fn hop_by_hop_headers_are_dropped_and_host_is_set() {
        let prepared = prepare(&request(
            "POST",
            "/Users?x=1",
            vec![
                ("Connection", b"keep-alive, X-Private"),
                ("X-Private", b"1"),
                ("Upgrade", b"websocket"),
                ("Proxy-Authorization", b"Basic eA=="),
                ("Transfer-Encoding", b"chunked"),
                ("Keep-Alive", b"timeout=5"),
                ("TE", b"trailers"),
                ("Trailer", b"X"),
                ("Host", b"evil.example"),
                ("Content-Length", b"999"),
                ("Authorization", b"Bearer t"),
                ("Content-Type", b"application/scim+json"),
            ],
        ))
        .unwrap();
        let req = prepared.to_request();
        let names: Vec<&str> = req.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["host", "authorization", "content-type"]);
        assert_eq!(req.headers()["host"], "scim.example.com:8080");
        assert_eq!(req.uri().to_string(), "/Users?x=1");
        assert_eq!(prepared.path(), "/Users");
    }

    #[test]
    fn hop_by_hop_response_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("etag", HeaderValue::from_static("W/\"1\""));
        assert_eq!(
            response_headers(&h),
            vec![("etag".to_string(), b"W/\"1\"".to_vec())]
        );
    }
}
