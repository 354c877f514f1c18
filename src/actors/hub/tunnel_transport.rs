//! The SCIM client's transport on the hub: every request of one application goes to the
//! Registry, which routes it through an agent of the app's service to the app's target.
//!
//! It also notes which agents were lost with its requests in flight, so that a run can record
//! its failovers; whether to send such a request again is the client's retry layer's call.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::future::BoxFuture;
use ractor::rpc::CallResult;
use ractor::ActorRef;

use crate::config::hub::AppConfig;
use crate::messages::hub::{LostAgent, RegistryMsg, TunnelRequest};
use crate::messages::Scheme;
use crate::scim::transport::{ScimRequest, ScimResponse, Transport, TransportError};

/// Sends one application's SCIM requests through the tunnel.
pub struct TunnelTransport {
    registry: ActorRef<RegistryMsg>,
    service: String,
    target: String,
    scheme: Scheme,
    host: String,
    skip_tls_verify: bool,
    timeout: Duration,
    /// Agent name → requests of this transport it carried when it was lost.
    lost: Mutex<BTreeMap<String, usize>>,
}

impl TunnelTransport {
    /// A transport bound to `app`'s service, target, base URL host and TLS choice.
    pub fn new(registry: ActorRef<RegistryMsg>, app: &AppConfig) -> TunnelTransport {
        TunnelTransport {
            registry,
            service: app.service.clone(),
            target: app.target.clone(),
            scheme: if app.base_url.https {
                Scheme::Https
            } else {
                Scheme::Http
            },
            host: app.base_url.host.clone(),
            skip_tls_verify: app.skip_tls_check,
            timeout: app.request_timeout,
            lost: Mutex::new(BTreeMap::new()),
        }
    }

    /// The agents lost so far with requests of this transport in flight, by name.
    pub fn lost_agents(&self) -> Vec<LostAgent> {
        self.lost
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(agent, requests)| LostAgent {
                agent: agent.clone(),
                requests: *requests,
            })
            .collect()
    }

    fn note(&self, error: &TransportError) {
        if let TransportError::AgentLost { agent, .. } = error {
            *self
                .lost
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(agent.clone())
                .or_default() += 1;
        }
    }
}

impl Transport for TunnelTransport {
    fn send(&self, request: ScimRequest) -> BoxFuture<'_, Result<ScimResponse, TransportError>> {
        Box::pin(async move {
            let tunnel_request = TunnelRequest {
                target: self.target.clone(),
                scheme: self.scheme,
                host: self.host.clone(),
                method: request.method.as_str().to_string(),
                path_and_query: request.path_and_query,
                headers: request
                    .headers
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect(),
                body: request.body.unwrap_or_default(),
                skip_tls_verify: self.skip_tls_verify,
                timeout: self.timeout,
            };
            // The agent session answers every request it accepts; this bound only guards
            // against a registry that is itself gone.
            let bound = self.timeout + Duration::from_secs(10);
            let outcome = self
                .registry
                .call(
                    |reply| RegistryMsg::Route {
                        service: self.service.clone(),
                        request: tunnel_request,
                        reply,
                    },
                    Some(bound),
                )
                .await
                .map_err(|e| TransportError::Tunnel {
                    detail: format!("hub registry unavailable: {e}"),
                })?;
            let response = match outcome {
                CallResult::Success(Ok(response)) => response,
                CallResult::Success(Err(e)) => {
                    self.note(&e);
                    return Err(e);
                }
                CallResult::Timeout => {
                    return Err(TransportError::Timeout {
                        after_ms: bound.as_millis() as u64,
                    })
                }
                CallResult::SenderError => {
                    return Err(TransportError::Tunnel {
                        detail: "the request was dropped by the hub".into(),
                    })
                }
            };
            Ok(ScimResponse {
                status: response.status,
                headers: response
                    .headers
                    .into_iter()
                    .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
                    .collect(),
                body: response.body,
            })
        })
    }
}
