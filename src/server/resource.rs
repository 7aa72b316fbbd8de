//! What sits behind the paywall: a [`Resource`] produces units into a bounded queue, and the
//! connection delivers each one only once it is paid for.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::protocol::EndReason;

/// One unit of a resource: an `app` message's data, or a binary frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Unit {
    /// Sent as `app {seq, data}` and metered per message and per byte of the frame.
    Json(serde_json::Value),
    /// Passed through as a binary frame, metered per message and per byte.
    Binary(Vec<u8>),
}

/// How a resource's stream for one request ended: the `reason` of the `end` message, and what
/// went wrong when the upstream failed (sent as `error {upstream_failed}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    /// Why it ended.
    pub reason: EndReason,
    /// What failed, for [`EndReason::UpstreamFailed`].
    pub failure: Option<String>,
}

impl Ended {
    /// Ended for `reason`.
    pub fn because(reason: EndReason) -> Self {
        Self {
            reason,
            failure: None,
        }
    }

    /// The upstream refused or failed: `failure` says how.
    pub fn failed(failure: impl Into<String>) -> Self {
        Self {
            reason: EndReason::UpstreamFailed,
            failure: Some(failure.into()),
        }
    }
}

/// A streaming resource.
pub trait Resource: Send + Sync + 'static {
    /// What it is (for the 402 challenge).
    fn description(&self) -> String;
    /// Its content type (for the 402 challenge).
    fn mime_type(&self) -> String {
        "application/json".into()
    }
    /// Starts producing units for `request` into `tx`. The producer stops when `tx` is closed
    /// (the connection dropped the receiver) or when it has nothing more to send, and returns
    /// why it ended; `tx` is bounded, so a producer never runs ahead of delivery by more than
    /// its capacity.
    fn start(&self, request: serde_json::Value, tx: mpsc::Sender<Unit>) -> JoinHandle<Ended>;
}

/// Deterministic text, one `app` message per token, at a configurable rate (a request may ask
/// for a slower one with `tokensPerSec`): the resource the tests, the demo and `paystream load`
/// use in place of an LLM.
#[derive(Debug, Clone)]
pub struct TokenGenerator {
    /// Tokens per second (0: as fast as delivery allows).
    pub tokens_per_sec: u32,
    /// Tokens per request unless the request says `maxTokens`.
    pub default_max_tokens: u64,
}

/// The text the generator cycles through.
const CORPUS: &str = "PayStream meters every token it delivers and asks for a fresh voucher before the credit runs low so the stream never stops and nothing is ever delivered unpaid ";

impl TokenGenerator {
    /// The `i`-th token of the corpus (words with their trailing space).
    pub fn token(i: u64) -> &'static str {
        static WORDS: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
        let words = WORDS.get_or_init(|| CORPUS.split_inclusive(' ').collect());
        words[(i % words.len() as u64) as usize]
    }
}

impl Resource for TokenGenerator {
    fn description(&self) -> String {
        format!(
            "deterministic text, {} tokens per second",
            self.tokens_per_sec
        )
    }

    fn start(&self, request: serde_json::Value, tx: mpsc::Sender<Unit>) -> JoinHandle<Ended> {
        let asked = request.get("maxTokens").and_then(|v| v.as_u64());
        let max = asked.unwrap_or(self.default_max_tokens);
        // A request may ask for a slower stream (`tokensPerSec`), never a faster one than
        // configured.
        let wanted = request
            .get("tokensPerSec")
            .and_then(|v| v.as_u64())
            .and_then(|r| u32::try_from(r).ok())
            .filter(|r| *r > 0);
        let rate = match (self.tokens_per_sec, wanted) {
            (0, Some(w)) => w,
            (configured, Some(w)) => configured.min(w),
            (configured, None) => configured,
        };
        tokio::spawn(async move {
            let mut interval = (rate > 0).then(|| {
                let mut i =
                    tokio::time::interval(Duration::from_nanos(1_000_000_000 / u64::from(rate)));
                i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                i
            });
            for i in 0..max {
                if let Some(interval) = interval.as_mut() {
                    interval.tick().await;
                }
                let unit = Unit::Json(serde_json::json!({ "token": TokenGenerator::token(i) }));
                if tx.send(unit).await.is_err() {
                    return Ended::because(EndReason::Cancelled);
                }
            }
            // The generator has no natural end: it stops at the request's limit, or at its
            // default length, which is its whole answer.
            Ended::because(if asked.is_some() {
                EndReason::MaxTokens
            } else {
                EndReason::Completed
            })
        })
    }
}

/// The resources a server offers, by name (`/ws/{name}`).
pub type Resources = std::collections::BTreeMap<String, Arc<dyn Resource>>;
