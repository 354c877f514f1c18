//! The Forward actor: one per in-flight request, supervised by its target's dialer.
//!
//! It owns the work of a single request: it sends it through the target's client and delivers
//! the one response. It must never outlive its request (it stops after answering), never answer
//! twice, and never log a body or a header. A panic or error here must stay here: the dialer
//! catches it through supervision and answers the request for it.
//!
//! The work runs in `handle` of a message the actor sends itself in `post_start`, not in
//! `pre_start`: in ractor 0.16 a panic in `pre_start` only fails the `spawn_linked` call (the
//! supervisor link is made after `pre_start`, so no supervision event is emitted), whereas a
//! panic or error in `handle` reaches the dialer as `SupervisionEvent::ActorFailed` carrying the
//! panic message. `handle` also runs under ractor's signal guard, so `kill()` (used for Cancel)
//! interrupts a request waiting on the network.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tracing::Instrument;

use crate::forwarding::TargetClient;
use crate::logging::untrusted;
use crate::messages::agent::ResponseSink;
use crate::messages::{ForwardError, ForwardRequest, ForwardResponse, HttpResponse};

/// Header that makes a Forward panic on purpose, to exercise supervision in tests. Honoured
/// only in test builds or with the `test-hooks` cargo feature.
pub const TEST_PANIC_HEADER: &str = "x-connect-test-panic";

/// Ensures a request is answered at most once, whether by its Forward, by the dialer after a
/// failure, or not at all after a Cancel.
#[derive(Debug, Default)]
pub struct AnswerOnce(AtomicBool);

impl AnswerOnce {
    /// True for the first caller only: that caller answers (or, for Cancel, decides that
    /// nobody will).
    pub fn claim(&self) -> bool {
        !self.0.swap(true, Ordering::AcqRel)
    }

    /// True once someone answered, or a Cancel decided that nobody will: the request is no
    /// longer in flight, although its Forward may still be ending.
    pub fn is_claimed(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Outcome counters of one target, shared by its dialer and its forwards.
#[derive(Debug, Default)]
pub struct ForwardCounters {
    forwarded: AtomicU64,
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl ForwardCounters {
    /// Counts one answered request.
    pub fn record(&self, result: &Result<HttpResponse, ForwardError>) {
        match result {
            Ok(_) => {
                self.forwarded.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => self.record_error(error),
        }
    }

    /// Counts one request answered with `error`, which becomes the last error shown.
    pub fn record_error(&self, error: &ForwardError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut last = self
            .last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *last = Some(error.to_string());
    }

    /// Shows `message` as the last error without counting a failed request (e.g. a rejected
    /// configuration change).
    pub fn set_last_error(&self, message: String) {
        let mut last = self
            .last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *last = Some(message);
    }

    /// `(forwarded, errors, last_error)`.
    pub fn snapshot(&self) -> (u64, u64, Option<String>) {
        let last = self
            .last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        (
            self.forwarded.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
            last,
        )
    }
}

/// Everything one Forward needs, handed over at spawn.
pub struct ForwardArgs {
    pub request: ForwardRequest,
    pub reply: ResponseSink,
    pub client: Arc<TargetClient>,
    pub answer: Arc<AnswerOnce>,
    pub counters: Arc<ForwardCounters>,
}

/// The only message: do the work (sent by the actor to itself once started).
#[derive(Debug)]
pub enum ForwardMsg {
    Run,
}

/// The per-request actor. Stateless handler; the request lives in the state until `Run`.
#[derive(Debug, Default)]
pub struct Forward;

impl Actor for Forward {
    type Msg = ForwardMsg;
    type State = Option<ForwardArgs>;
    type Arguments = ForwardArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: ForwardArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(Some(args))
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        _state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        myself.send_message(ForwardMsg::Run)?;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        ForwardMsg::Run: ForwardMsg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let Some(args) = state.take() else {
            myself.stop(None);
            return Ok(());
        };
        let request = &args.request;
        let id = request.id;
        test_hooks::maybe_panic(request);

        let target_name = args.client.spec().name.clone();
        // Method and path come from the hub and are only checked inside `forward`: every log
        // line shows them through `untrusted`, so they cannot forge lines of their own.
        // Every event of a forward names its request id itself; the span only adds it to the
        // lines of code below (hyper, rustls) when debugging. At info level a span cost 3 % of
        // the agent's instructions per request: the subscriber formats its fields at creation.
        let span = tracing::debug_span!("forward", request_id = id, target_name = %target_name);
        let path = request
            .path_and_query
            .split('?')
            .next()
            .unwrap_or_default()
            .to_owned();
        tracing::debug!(
            request_id = id,
            target_name = %target_name,
            method = %untrusted(&request.method),
            path = %untrusted(&path),
            "forwarding request"
        );
        let started = Instant::now();
        // Boxed: ractor moves the actor's whole processing future (this handler's included)
        // by value while it starts a Forward, and the client's future is several KiB; moving
        // it was 7 % of the agent's instructions per request (README, Benchmarks).
        let result = Box::pin(args.client.forward(request).instrument(span)).await;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match &result {
            Ok(response) => tracing::info!(
                request_id = id,
                target_name = %target_name,
                method = %untrusted(&request.method),
                path = %untrusted(&path),
                status = response.status,
                bytes = response.body.len(),
                elapsed_ms,
                "forwarded request"
            ),
            Err(error) => tracing::warn!(
                request_id = id,
                target_name = %target_name,
                method = %untrusted(&request.method),
                path = %untrusted(&path),
                elapsed_ms,
                error = %error,
                "request not forwarded"
            ),
        }
        if args.answer.claim() {
            args.counters.record(&result);
            // A closed sink means the session is gone; nobody is left to tell.
            let _ = args.reply.send(ForwardResponse { id, result });
        }
        myself.stop(None);
        Ok(())
    }
}

#[cfg(any(test, feature = "test-hooks"))]
mod test_hooks {
    use super::TEST_PANIC_HEADER;
    use crate::messages::ForwardRequest;

    /// Panics when the request carries `x-connect-test-panic: 1`.
    pub fn maybe_panic(request: &ForwardRequest) {
        let asked = request
            .headers
            .iter()
            .any(|(name, value)| name.eq_ignore_ascii_case(TEST_PANIC_HEADER) && value == b"1");
        if asked {
            panic!(
                "test hook: forced panic in forward of request {}",
                request.id
            );
        }
    }
}

#[cfg(not(any(test, feature = "test-hooks")))]
mod test_hooks {
    use crate::messages::ForwardRequest;

    /// Release builds ignore the test header.
    pub fn maybe_panic(_request: &ForwardRequest) {}
}
