//! Errors of SCIM exchanges, and the one actionable line an administrator reads for each.
//!
//! This module owns the wording of those lines (DESIGN §6, step 5). It must never carry a
//! secret: requests' headers are not kept, only method, path and what the server said.

use crate::messages::ForwardError;
use crate::scim::transport::TransportError;

/// Why a SCIM operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScimError {
    /// No HTTP response at all.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The server answered with a non-success status.
    #[error("{method} {path} answered {status}{}{}",
        scim_type.as_deref().map(|t| format!(" ({t})")).unwrap_or_default(),
        detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Status {
        method: String,
        /// Path without its query string.
        path: String,
        status: u16,
        scim_type: Option<String>,
        detail: Option<String>,
    },
    /// The server answered with a success status, but not with what SCIM promises.
    #[error("unexpected answer at {path}: {detail}")]
    BadResponse { path: String, detail: String },
    /// A group was not renamed or created (nothing was sent): another group, which the run
    /// leaves under its name, already has that displayName.
    #[error("displayName `{wanted}` is taken by group {holder_id} (`{holder_name}`)")]
    NameTaken {
        /// The group's displayName now, for a rename; `None` for a create.
        current: Option<String>,
        /// The displayName the directory gives it.
        wanted: String,
        holder_id: String,
        holder_name: String,
    },
}

impl ScimError {
    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ScimError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// True when the cause will not go away by trying the next resource (wrong credentials,
    /// no agent, undeclared target, rejected certificate): a run should stop sending.
    pub fn is_systemic(&self) -> bool {
        match self {
            ScimError::Status { status, .. } => matches!(status, 401 | 403),
            ScimError::Transport(TransportError::NoConnector { .. }) => true,
            ScimError::Transport(TransportError::Forward(f)) => matches!(
                f,
                ForwardError::UndeclaredTarget { .. }
                    | ForwardError::Tls { .. }
                    | ForwardError::ConnectRefused { .. }
                    | ForwardError::Dns { .. }
                    | ForwardError::ShuttingDown
            ),
            _ => false,
        }
    }

    /// True when a request may have been acted on although no success came back: no answer
    /// at all (timeout, lost tunnel or connection), or a 5xx, which a gateway may send after
    /// passing the request on and a server after storing half of it. A POST that failed so
    /// must be looked up before anyone thinks of repeating it.
    pub fn may_have_landed(&self) -> bool {
        match self {
            ScimError::Status { status, .. } => (500..=599).contains(status),
            ScimError::Transport(TransportError::Timeout { .. })
            | ScimError::Transport(TransportError::Tunnel { .. })
            | ScimError::Transport(TransportError::AgentLost { .. }) => true,
            ScimError::Transport(TransportError::Forward(f)) => matches!(
                f,
                ForwardError::ResponseTimeout { .. }
                    | ForwardError::Network { .. }
                    | ForwardError::TooLarge { .. }
                    | ForwardError::Internal { .. }
            ),
            _ => false,
        }
    }

    /// One line naming the most actionable cause, for the run record and `connect sync`.
    pub fn diagnosis(&self) -> String {
        match self {
            ScimError::Transport(t) => transport_diagnosis(t),
            ScimError::Status {
                method,
                path,
                status,
                scim_type,
                detail,
            } => status_diagnosis(
                method,
                path,
                *status,
                scim_type.as_deref(),
                detail.as_deref(),
            ),
            ScimError::BadResponse { path, detail } => format!(
                "unexpected answer from the SCIM server at {path} ({detail}): check that the \
                 base URL points at a SCIM 2.0 endpoint"
            ),
            ScimError::NameTaken {
                current,
                wanted,
                holder_id,
                holder_name,
            } => {
                let what = match current {
                    Some(current) => format!("rename group `{current}` to `{wanted}`"),
                    None => format!("create group `{wanted}`"),
                };
                format!(
                    "cannot {what}: the application already has another group named \
                     `{holder_name}` (id {holder_id}); give the group another displayName in \
                     the directory, or rename or remove that group in the application"
                )
            }
        }
    }
}

/// How every "no connector" diagnosis starts, whichever of its causes holds.
pub const NO_CONNECTOR: &str = "no connector available";

fn transport_diagnosis(t: &TransportError) -> String {
    match t {
        TransportError::NoConnector { reason, .. } => format!("{NO_CONNECTOR}: {reason}"),
        TransportError::Tunnel { detail } => format!(
            "the tunnel to the agent was lost mid-request ({detail}): check the agent with \
             `connect status` on its VM; the next run retries"
        ),
        TransportError::AgentLost { agent, detail } => format!(
            "the agent `{agent}` was lost before it answered ({detail}): check `connect status` \
             on its VM; with a second agent of the service connected the run goes on through \
             it, and the next run looks up whatever this request may have changed"
        ),
        TransportError::Timeout { after_ms } => format!(
            "no answer within {after_ms} ms: the SCIM server or the agent is too slow; check \
             `connect status` on the agent and the SCIM server's health"
        ),
        TransportError::Forward(f) => forward_diagnosis(f),
    }
}

fn forward_diagnosis(f: &ForwardError) -> String {
    match f {
        ForwardError::UndeclaredTarget { name } => format!(
            "the agent has no target named `{name}`: run `connect set-target {name} \
             <host:port>` on the agent"
        ),
        ForwardError::Refused { reason } => format!(
            "the agent refused the request ({reason}): check the app's target and the agent's \
             version"
        ),
        ForwardError::ConnectRefused { .. }
        | ForwardError::ConnectTimeout { .. }
        | ForwardError::Dns { .. }
        | ForwardError::Network { .. } => format!(
            "network error reaching the target ({f}): check the target host:port, firewall \
             flow and TLS settings"
        ),
        ForwardError::Tls { addr, detail } if is_certificate_problem(detail) => format!(
            "TLS: certificate rejected by {addr} ({detail}): self-signed? declare the target \
             with -insecure-allow-skip-tls-check and enable skip_tls_check on the app"
        ),
        ForwardError::Tls { addr, detail } => format!(
            "TLS handshake with {addr} failed ({detail}): check whether the target speaks TLS \
             (https or http in the base URL, -always-tls / -no-tls on the target)"
        ),
        ForwardError::ResponseTimeout { addr, timeout_ms } => format!(
            "response timeout: {addr} did not answer within {timeout_ms} ms: check the SCIM \
             server's health and load"
        ),
        ForwardError::TooLarge { addr, limit } => format!(
            "response too large: {addr} sent more than {limit} bytes: lower the app's page size"
        ),
        ForwardError::Internal { detail } => {
            format!("agent internal error ({detail}): see the agent's log")
        }
        ForwardError::Busy { name, queued } => format!(
            "the agent is overloaded: target `{name}` already had {queued} requests waiting on \
             it: lower `concurrency` of the apps that use this target, or add an agent"
        ),
        ForwardError::ShuttingDown => {
            "the agent is shutting down: the next run goes through another agent or waits for \
             it to come back"
                .to_string()
        }
    }
}

/// rustls reports certificate trouble with these words; anything else (wrong protocol,
/// handshake failure) is not fixed by skipping certificate checks.
fn is_certificate_problem(detail: &str) -> bool {
    let d = detail.to_ascii_lowercase();
    [
        "certificate",
        "unknownissuer",
        "unknown issuer",
        "self-signed",
        "self signed",
        "notvalidfor",
    ]
    .iter()
    .any(|w| d.contains(w))
}

/// A 404 on `…/Users/<id>` means that one resource is gone; a 404 anywhere else means the
/// base path is wrong.
fn is_resource_path(path: &str) -> bool {
    let mut segments = path.trim_end_matches('/').rsplit('/');
    let _id = segments.next();
    matches!(segments.next(), Some("Users" | "Groups"))
}

fn status_diagnosis(
    method: &str,
    path: &str,
    status: u16,
    scim_type: Option<&str>,
    detail: Option<&str>,
) -> String {
    let said = match (scim_type, detail) {
        (Some(t), Some(d)) => format!(" (server said {t}: {d})"),
        (Some(t), None) => format!(" (server said {t})"),
        (None, Some(d)) => format!(" (server said: {d})"),
        (None, None) => String::new(),
    };
    match status {
        401 => format!("authentication failed (401): check the app's auth mode and secret{said}"),
        403 => format!(
            "forbidden (403) on {method} {path}: check the app's auth mode and secret, and that \
             its account may provision users{said}"
        ),
        404 if is_resource_path(path) => format!(
            "resource not found (404) at {path}: it was removed on the SCIM server outside this \
             hub{said}"
        ),
        404 => format!(
            "endpoint not found (404) at {path}: check the base URL path and SCIM version{said}"
        ),
        409 => format!(
            "conflict (409) on {method} {path}: a resource with the same unique value already \
             exists{said}"
        ),
        429 => format!(
            "rate limited (429) on {method} {path}: the SCIM server asks to slow down; lower \
             the app's concurrency{said}"
        ),
        400 => format!("the SCIM server rejected {method} {path} (400){said}"),
        500..=599 => format!("the SCIM server failed on {method} {path} ({status}){said}"),
        _ => format!("{method} {path} answered {status}{said}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(method: &str, path: &str, status: u16) -> ScimError {
        ScimError::Status {
            method: method.into(),
            path: path.into(),
            status,
            scim_type: None,
            detail: None,
        }
    }

    fn fwd(f: ForwardError) -> ScimError {
        ScimError::Transport(TransportError::Forward(f))
    }

    #[test]
    fn no_connector_names_the_reason() {
        let e = ScimError::Transport(TransportError::NoConnector {
            kind: crate::scim::transport::NoConnectorKind::NoAgent,
            reason: "no agent connected for service `acme`".into(),
        });
        assert_eq!(
            e.diagnosis(),
            "no connector available: no agent connected for service `acme`"
        );
    }

    #[test]
    fn auth_failures() {
        assert_eq!(
            status("GET", "/scim/v2/Users", 401).diagnosis(),
            "authentication failed (401): check the app's auth mode and secret"
        );
        let d = status("GET", "/scim/v2/Users", 403).diagnosis();
        assert!(d.starts_with("forbidden (403)"), "{d}");
        assert!(d.contains("auth mode and secret"), "{d}");
    }

    #[test]
    fn not_found_base_path_versus_resource() {
        assert_eq!(
            status("GET", "/scim/v1/ServiceProviderConfig", 404).diagnosis(),
            "endpoint not found (404) at /scim/v1/ServiceProviderConfig: check the base URL \
             path and SCIM version"
        );
        assert!(status("GET", "/scim/v2/Users", 404)
            .diagnosis()
            .starts_with("endpoint not found (404) at /scim/v2/Users"));
        assert!(status("DELETE", "/scim/v2/Users/abc", 404)
            .diagnosis()
            .starts_with("resource not found (404) at /scim/v2/Users/abc"));
    }

    #[test]
    fn network_errors() {
        for f in [
            ForwardError::ConnectRefused {
                addr: "10.0.0.12:443".into(),
            },
            ForwardError::ConnectTimeout {
                addr: "10.0.0.12:443".into(),
            },
            ForwardError::Dns {
                addr: "scim.local:443".into(),
                detail: "no such host".into(),
            },
            ForwardError::Network {
                addr: "10.0.0.12:443".into(),
                detail: "connection reset".into(),
            },
        ] {
            let d = fwd(f.clone()).diagnosis();
            assert!(d.starts_with("network error reaching the target ("), "{d}");
            assert!(d.contains(&f.to_string()), "{d}");
            assert!(
                d.ends_with("check the target host:port, firewall flow and TLS settings"),
                "{d}"
            );
        }
    }

    #[test]
    fn tls_certificate_versus_protocol() {
        let d = fwd(ForwardError::Tls {
            addr: "10.0.0.12:443".into(),
            detail: "invalid peer certificate: UnknownIssuer".into(),
        })
        .diagnosis();
        assert!(d.starts_with("TLS: certificate rejected"), "{d}");
        assert!(d.contains("-insecure-allow-skip-tls-check"), "{d}");
        assert!(d.contains("skip_tls_check"), "{d}");
        let d = fwd(ForwardError::Tls {
            addr: "10.0.0.12:80".into(),
            detail: "received corrupt message of type InvalidContentType".into(),
        })
        .diagnosis();
        assert!(
            d.starts_with("TLS handshake with 10.0.0.12:80 failed"),
            "{d}"
        );
        assert!(d.contains("-no-tls"), "{d}");
    }

    #[test]
    fn timeouts_size_and_undeclared_target() {
        let d = fwd(ForwardError::ResponseTimeout {
            addr: "10.0.0.12:443".into(),
            timeout_ms: 30000,
        })
        .diagnosis();
        assert!(d.starts_with("response timeout"), "{d}");
        assert!(d.contains("30000 ms"), "{d}");
        let d = ScimError::Transport(TransportError::Timeout { after_ms: 5000 }).diagnosis();
        assert!(d.starts_with("no answer within 5000 ms"), "{d}");
        let d = fwd(ForwardError::TooLarge {
            addr: "10.0.0.12:443".into(),
            limit: 1024,
        })
        .diagnosis();
        assert!(d.starts_with("response too large"), "{d}");
        assert_eq!(
            fwd(ForwardError::UndeclaredTarget {
                name: "hr-app".into()
            })
            .diagnosis(),
            "the agent has no target named `hr-app`: run `connect set-target hr-app \
             <host:port>` on the agent"
        );
        let d = ScimError::Transport(TransportError::Tunnel {
            detail: "agent disconnected".into(),
        })
        .diagnosis();
        assert!(
            d.contains("agent disconnected") && d.contains("connect status"),
            "{d}"
        );
        let lost = ScimError::Transport(TransportError::AgentLost {
            agent: "vm-02".into(),
            detail: "its tunnel closed".into(),
        });
        let d = lost.diagnosis();
        assert!(
            d.starts_with("the agent `vm-02` was lost before it answered (its tunnel closed)"),
            "{d}"
        );
        assert!(lost.may_have_landed(), "a create must be looked up first");
        assert!(!lost.is_systemic(), "the other agent carries on");
    }

    #[test]
    fn other_statuses_show_what_the_server_said() {
        let e = ScimError::Status {
            method: "POST".into(),
            path: "/scim/v2/Users".into(),
            status: 400,
            scim_type: Some("invalidValue".into()),
            detail: Some("userName is required".into()),
        };
        assert_eq!(
            e.diagnosis(),
            "the SCIM server rejected POST /scim/v2/Users (400) (server said invalidValue: \
             userName is required)"
        );
        let e = ScimError::Status {
            method: "POST".into(),
            path: "/scim/v2/Users".into(),
            status: 409,
            scim_type: Some("uniqueness".into()),
            detail: None,
        };
        assert!(e.diagnosis().contains("(server said uniqueness)"));
        assert!(status("GET", "/scim/v2/Users", 503)
            .diagnosis()
            .starts_with("the SCIM server failed on GET /scim/v2/Users (503)"));
        assert!(status("GET", "/scim/v2/Users", 429)
            .diagnosis()
            .starts_with("rate limited (429)"));
        let d = ScimError::BadResponse {
            path: "/scim/v2/Users".into(),
            detail: "not JSON".into(),
        }
        .diagnosis();
        assert!(d.contains("SCIM 2.0 endpoint"), "{d}");
    }
}
