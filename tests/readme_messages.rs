//! The README's table "What a failed sync tells you" stays true: every message the hub can put
//! in a Last Sync (the registry's "no connector" causes, every SCIM and transport diagnosis)
//! starts as one of its rows says, and no row describes a message the hub no longer produces.

use std::time::{Duration, SystemTime};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use scim_connect::actors::hub::health::{AgentHealth, SILENT_AFTER};
use scim_connect::actors::hub::reconciler::sync_diagnosis;
use scim_connect::actors::hub::registry::Registry;
use scim_connect::actors::hub::services::ServiceBook;
use scim_connect::config::hub::ServiceConfig;
use scim_connect::config::Secret;
use scim_connect::messages::hub::{AgentEntry, AgentSessionMsg, RegistryMsg, TunnelRequest};
use scim_connect::messages::{ForwardError, Scheme, TargetInfo};
use scim_connect::scim::{DeletionGuard, ScimError, SyncError, TransportError};

const README: &str = include_str!("../README.md");

/// The first cell of each row of the table: its message patterns (`…` stands for anything).
fn readme_patterns() -> Vec<Vec<String>> {
    let section = README
        .split("### What a failed sync tells you")
        .nth(1)
        .expect("README has the section");
    section
        .lines()
        .skip_while(|l| !l.starts_with("| ---"))
        .skip(1)
        .take_while(|l| l.starts_with('|'))
        .map(|row| {
            let first = row.trim_start_matches('|').split(" | ").next().unwrap();
            code_spans(first)
        })
        .collect()
}

/// The contents of the Markdown code spans in `text` (single or double backticks).
fn code_spans(text: &str) -> Vec<String> {
    let mut spans = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find('`') {
        let fence = if rest[start..].starts_with("``") {
            "``"
        } else {
            "`"
        };
        let body = &rest[start + fence.len()..];
        let end = body.find(fence).expect("closed code span");
        let span = &body[..end];
        spans.push(if fence == "``" {
            span.strip_prefix(' ')
                .unwrap_or(span)
                .trim_end()
                .to_string()
        } else {
            span.to_string()
        });
        rest = &body[end + fence.len()..];
    }
    spans
}

/// Whether `message` starts as `pattern` says, `…` matching any text.
fn matches(pattern: &str, message: &str) -> bool {
    let mut pieces = pattern.split('…');
    let first = pieces.next().unwrap_or_default();
    let Some(mut rest) = message.strip_prefix(first) else {
        return false;
    };
    for piece in pieces {
        match rest.find(piece) {
            Some(i) => rest = &rest[i + piece.len()..],
            None => return false,
        }
    }
    true
}

/// An agent session that is never asked anything: the registry only needs its reference.
struct Silent;

impl Actor for Silent {
    type Msg = AgentSessionMsg;
    type State = ();
    type Arguments = ();

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        _args: (),
    ) -> Result<(), ActorProcessingErr> {
        Ok(())
    }
}

/// The registry's own words for each "no connector" cause.
async fn no_connector_messages() -> Vec<String> {
    let service = |name: &str, enabled| ServiceConfig {
        name: name.into(),
        service_id: Secret::new(format!("{name}-service-id-0123456789")),
        enabled,
    };
    let book = ServiceBook::new(&[
        service("on", true),
        service("idle", true),
        service("off", false),
        service("quiet", true),
    ]);
    let (registry, _) = Actor::spawn(None, Registry, book).await.unwrap();
    let (session, _) = Actor::spawn(None, Silent, ()).await.unwrap();
    // An agent of `quiet` that has missed its heartbeats.
    let unheard = AgentHealth::new();
    unheard.heard(SystemTime::now() - SILENT_AFTER - Duration::from_secs(5));
    for (service, session_id, health) in [("on", 1, AgentHealth::new()), ("quiet", 2, unheard)] {
        registry
            .cast(RegistryMsg::Register {
                service: service.into(),
                agent: AgentEntry {
                    session_id,
                    agent_name: "vm".into(),
                    peer: "127.0.0.1:1".into(),
                    targets: vec![TargetInfo {
                        name: "declared".into(),
                    }],
                    connected_at: SystemTime::now(),
                    session: session.clone(),
                    health,
                },
            })
            .unwrap();
    }
    let mut messages = Vec::new();
    for (service, target) in [
        ("off", "declared"),
        ("idle", "declared"),
        ("on", "undeclared"),
        ("missing", "declared"),
        ("quiet", "declared"),
    ] {
        let request = TunnelRequest {
            target: target.into(),
            scheme: Scheme::Http,
            host: "app.example".into(),
            method: "GET".into(),
            path_and_query: "/v2/Users".into(),
            headers: vec![],
            body: vec![],
            skip_tls_verify: false,
            timeout: Duration::from_secs(1),
        };
        let answer = registry
            .call(
                |reply| RegistryMsg::Route {
                    service: service.into(),
                    request,
                    reply,
                },
                Some(Duration::from_secs(5)),
            )
            .await
            .unwrap();
        let ractor::rpc::CallResult::Success(Err(e)) = answer else {
            panic!("{service}/{target}: expected a no-connector error");
        };
        assert!(matches!(e, TransportError::NoConnector { .. }), "{e:?}");
        messages.push(ScimError::Transport(e).diagnosis());
    }
    registry.stop(None);
    session.stop(None);
    messages
}

/// Every diagnosis of a SCIM answer or a transport failure.
fn scim_messages() -> Vec<String> {
    let status = |method: &str, path: &str, status, scim_type: Option<&str>| ScimError::Status {
        method: method.into(),
        path: path.into(),
        status,
        scim_type: scim_type.map(str::to_string),
        detail: Some("what the server said".into()),
    };
    let fwd = |f| ScimError::Transport(TransportError::Forward(f));
    let addr = || "10.0.0.12:443".to_string();
    let errors = vec![
        status("GET", "/v2/Users", 401, None),
        status("POST", "/v2/Users", 403, None),
        status("GET", "/nope/v2/Users", 404, None),
        status("PATCH", "/v2/Users/abc", 404, None),
        status("POST", "/v2/Users", 400, Some("invalidValue")),
        status("POST", "/v2/Users", 409, Some("uniqueness")),
        status("GET", "/v2/Users", 429, None),
        status("GET", "/v2/Users", 503, None),
        status("POST", "/v2/Users", 418, None),
        ScimError::BadResponse {
            path: "/v2/Users".into(),
            detail: "not JSON".into(),
        },
        ScimError::NameTaken {
            current: Some("ops".into()),
            wanted: "Operations".into(),
            holder_id: "4f1c".into(),
            holder_name: "operations".into(),
        },
        ScimError::NameTaken {
            current: None,
            wanted: "Sales".into(),
            holder_id: "9a0e".into(),
            holder_name: "sales".into(),
        },
        ScimError::Transport(TransportError::Tunnel {
            detail: "agent disconnected".into(),
        }),
        ScimError::Transport(TransportError::AgentLost {
            agent: "vm-02".into(),
            detail: "its tunnel closed".into(),
        }),
        ScimError::Transport(TransportError::Timeout { after_ms: 40_000 }),
        fwd(ForwardError::UndeclaredTarget { name: "crm".into() }),
        fwd(ForwardError::Refused {
            reason: "method TRACE".into(),
        }),
        fwd(ForwardError::ConnectRefused { addr: addr() }),
        fwd(ForwardError::ConnectTimeout { addr: addr() }),
        fwd(ForwardError::Dns {
            addr: addr(),
            detail: "no such host".into(),
        }),
        fwd(ForwardError::Network {
            addr: addr(),
            detail: "reset".into(),
        }),
        fwd(ForwardError::Tls {
            addr: addr(),
            detail: "invalid peer certificate: UnknownIssuer".into(),
        }),
        fwd(ForwardError::Tls {
            addr: addr(),
            detail: "received corrupt message".into(),
        }),
        fwd(ForwardError::ResponseTimeout {
            addr: addr(),
            timeout_ms: 30_000,
        }),
        fwd(ForwardError::TooLarge {
            addr: addr(),
            limit: 1024,
        }),
        fwd(ForwardError::Internal {
            detail: "panic".into(),
        }),
        fwd(ForwardError::ShuttingDown),
        fwd(ForwardError::Busy {
            name: "crm".into(),
            queued: 2048,
        }),
    ];
    // Every kind of forward error is in the list above: a new one fails to compile here
    // until it is added there (and to the README).
    for error in &errors {
        if let ScimError::Transport(TransportError::Forward(f)) = error {
            match f {
                ForwardError::UndeclaredTarget { .. }
                | ForwardError::Refused { .. }
                | ForwardError::ConnectRefused { .. }
                | ForwardError::ConnectTimeout { .. }
                | ForwardError::Dns { .. }
                | ForwardError::Tls { .. }
                | ForwardError::ResponseTimeout { .. }
                | ForwardError::TooLarge { .. }
                | ForwardError::Network { .. }
                | ForwardError::Internal { .. }
                | ForwardError::ShuttingDown
                | ForwardError::Busy { .. } => {}
            }
        }
    }
    let mut messages: Vec<String> = errors.iter().map(ScimError::diagnosis).collect();
    // The runs that change nothing at all: the deletion guard, and an app without Groups.
    let refusal = DeletionGuard::Count(5).check(9, 1, 40).unwrap_err();
    messages.push(sync_diagnosis(&SyncError::Guard(refusal), "crm"));
    messages.push(sync_diagnosis(
        &SyncError::GroupsUnsupported(status("GET", "/v2/Groups", 404, None)),
        "crm",
    ));
    messages
}

#[tokio::test]
async fn every_last_sync_message_has_its_row_in_the_readme_and_every_row_is_used() {
    let rows = readme_patterns();
    assert!(rows.len() >= 15, "table not found: {rows:?}");
    let mut messages = no_connector_messages().await;
    messages.extend(scim_messages());
    for message in &messages {
        assert!(
            rows.iter().flatten().any(|p| matches(p, message)),
            "no README row for the message:\n  {message}\nrows: {rows:#?}"
        );
    }
    for pattern in rows.iter().flatten() {
        assert!(
            messages.iter().any(|m| matches(pattern, m)),
            "README row `{pattern}` matches no message the hub produces:\n{messages:#?}"
        );
    }
}
