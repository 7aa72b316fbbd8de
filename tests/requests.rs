//! Requests (issue 9, item 9 and the `end` message): a request needs credit for its first unit,
//! requests are rate limited and stream one at a time, and every way a request's stream ends is
//! an `end {seq, reason}`, never silence. On a real anvil and redis-server.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::stack::{Client, Options, Stack, payee};
use paystream::protocol::{ClientMessage, EndReason, ServerMessage};
use paystream::server::resource::{Ended, Resource, TokenGenerator, Unit};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The token generator, counting the requests it was started on.
struct Counting {
    starts: Arc<AtomicUsize>,
    inner: TokenGenerator,
}

impl Resource for Counting {
    fn description(&self) -> String {
        "counted tokens".into()
    }

    fn start(&self, request: serde_json::Value, tx: mpsc::Sender<Unit>) -> JoinHandle<Ended> {
        self.starts.fetch_add(1, Ordering::SeqCst);
        self.inner.start(request, tx)
    }
}

async fn counting(tokens_per_sec: u32) -> (Stack, Arc<AtomicUsize>) {
    let starts = Arc::new(AtomicUsize::new(0));
    let mut options = Options::new(r#"{"perMessage":{"amount":"1","per":"1"}}"#);
    options.resource = Some(Arc::new(Counting {
        starts: starts.clone(),
        inner: TokenGenerator {
            tokens_per_sec,
            default_max_tokens: 100,
        },
    }));
    (Stack::start(options).await, starts)
}

fn request(tokens: u64) -> ClientMessage {
    ClientMessage::Request {
        body: serde_json::json!({ "prompt": "x".repeat(100), "maxTokens": tokens }),
    }
}

fn codes(seen: &[ServerMessage]) -> Vec<&str> {
    seen.iter()
        .filter_map(|m| match m {
            ServerMessage::Error { code, .. } => Some(code.as_str()),
            _ => None,
        })
        .collect()
}

/// Item 9: with no credit, requests started upstream work anyway (1,000 prompts on a session at
/// cumulative 0 started 1,000 upstream requests, paid by the operator). A request now needs
/// credit for its first unit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_needs_credit_for_its_first_unit() {
    let (stack, starts) = counting(0).await;
    let id = stack.open_channel(payee(), 1, 1_000).await;
    let mut c = stack.client(id).await;
    c.opened(1, 0).await;
    c.send(&request(5)).await;
    let seen = c
        .recv_until(|m| matches!(m, ServerMessage::Error { .. }))
        .await;
    assert_eq!(codes(&seen), ["payment_required"]);
    assert_eq!(starts.load(Ordering::SeqCst), 0, "no upstream work unpaid");
    // With credit, it starts.
    let v = c.voucher(2, 10);
    c.send(&ClientMessage::Voucher(v)).await;
    c.recv_until(|m| matches!(m, ServerMessage::VoucherAck { .. }))
        .await;
    c.send(&request(5)).await;
    c.recv_until(|m| matches!(m, ServerMessage::End { .. }))
        .await;
    assert_eq!(starts.load(Ordering::SeqCst), 1);
}

/// Item 9: requests had no rate limit and each new one aborted the last. Now one streams at a
/// time (`request_in_progress`), more than 5 a second are refused (`rate_limited`), and a client
/// that keeps going past twice that is closed with 4429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_rate_limited_and_stream_one_at_a_time() {
    let (stack, starts) = counting(5).await;
    let id = stack.open_channel(payee(), 1, 1_000).await;
    let mut c = stack.client(id).await;
    c.opened(1, 500).await;
    for _ in 0..12 {
        if !c.try_send(&request(50)).await {
            break;
        }
    }
    let (seen, code) = c.drain().await;
    let codes = codes(&seen);
    assert_eq!(
        codes
            .iter()
            .filter(|c| **c == "request_in_progress")
            .count(),
        4,
        "{codes:?}"
    );
    assert_eq!(codes.iter().filter(|c| **c == "rate_limited").count(), 6);
    assert_eq!(code, Some(4429));
    assert_eq!(starts.load(Ordering::SeqCst), 1, "one upstream request");
}

async fn end_of(c: &mut Client) -> (Option<u64>, String) {
    let seen = c
        .recv_until(|m| matches!(m, ServerMessage::End { .. }))
        .await;
    match seen.last() {
        Some(ServerMessage::End { seq, reason }) => (*seq, reason.clone()),
        _ => unreachable!(),
    }
}

/// Also: a request's stream ended in silence (an upstream that failed mid-stream left the
/// session hanging). Every way it ends is now an `end`: the request's limit, a cancellation by
/// a newer request (when configured) or by `close`, a disconnect (`interrupted`, on resume).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_ends_with_end() {
    let mut options = Options::new(r#"{"perMessage":{"amount":"1","per":"1"}}"#);
    options.tokens_per_sec = 200;
    options.params = Box::new(|p| p.replace_requests = true);
    let stack = Stack::start(options).await;
    let id = stack.open_channel(payee(), 1, 1_000).await;
    let mut c = stack.client(id).await;
    let ServerMessage::Session { resume_token, .. } = c.open(1, 500).await else {
        panic!()
    };
    c.send(&request(3)).await;
    assert_eq!(
        end_of(&mut c).await,
        (Some(2), EndReason::MaxTokens.as_str().into())
    );
    // A newer request cancels the running one.
    c.send(&request(100)).await;
    c.recv_until(|m| matches!(m, ServerMessage::App { seq: 4, .. }))
        .await;
    c.send(&request(2)).await;
    let (seq, reason) = end_of(&mut c).await;
    assert_eq!(reason, "cancelled");
    assert!(seq.is_some_and(|s| s >= 4));
    let (_, reason) = end_of(&mut c).await;
    assert_eq!(reason, "max_tokens");
    // A disconnect mid-stream: `interrupted` on resume, and the session goes on.
    c.send(&request(100)).await;
    c.recv_until(|m| matches!(m, ServerMessage::App { .. }))
        .await;
    drop(c);
    common::stack::wait_for_metric(&stack, "paystream_sessions_active", 0).await;
    let mut c = stack.client(id).await;
    c.send(&ClientMessage::Resume {
        token: resume_token,
    })
    .await;
    c.recv_until(|m| matches!(m, ServerMessage::Session { .. }))
        .await;
    let (_, reason) = end_of(&mut c).await;
    assert_eq!(reason, "interrupted");
    // `close` while streaming: `cancelled`, then the receipt.
    c.send(&request(100)).await;
    c.recv_until(|m| matches!(m, ServerMessage::App { .. }))
        .await;
    c.send(&ClientMessage::Close {
        close_channel: false,
    })
    .await;
    let seen = c
        .recv_until(|m| matches!(m, ServerMessage::Receipt { .. }))
        .await;
    assert!(
        seen.iter()
            .any(|m| matches!(m, ServerMessage::End { reason, .. } if reason == "cancelled")),
        "{seen:?}"
    );
}
