//! One test per error code and close code of DESIGN.md 4.2, on a real anvil and redis-server;
//! each checks that the bad input changed nothing: the stored voucher is the same, and the
//! session goes on (the next valid voucher is acknowledged at the next nonce).

mod common;

use std::time::Duration;

use alloy::primitives::{Address, B256, Bytes, U256};
use common::raw::Frame;
use common::stack::{Client, Options, Stack, http_get, payee, sign_voucher};
use k256::ecdsa::SigningKey;
use paystream::protocol::{ClientMessage, ServerMessage};
use paystream::store::ChannelStore;

fn per_message() -> Options {
    Options::new(r#"{"perMessage":{"amount":"1","per":"1"}}"#)
}

async fn stored(stack: &Stack, id: B256) -> Option<(u64, u128)> {
    stack
        .state
        .store
        .load(id)
        .await
        .unwrap()
        .map(|s| (s.voucher.nonce, s.voucher.cumulative))
}

/// An open session on a fresh channel (deposit 1,000, accepted cumulative 50 at nonce 1).
async fn session(stack: &Stack, salt: u8) -> (Client, B256) {
    let id = stack.open_channel(payee(), salt, 1_000).await;
    let mut c = stack.client(id).await;
    let opened = c.open(1, 50).await;
    assert!(
        matches!(
            opened,
            ServerMessage::Session {
                nonce: 1,
                cumulative: 50,
                ..
            }
        ),
        "{opened:?}"
    );
    (c, id)
}

/// Reads until an `error`, returning (code, retriable, data nonce).
async fn expect_error(c: &mut Client) -> (String, bool, Option<u64>) {
    let seen = c
        .recv_until(|m| matches!(m, ServerMessage::Error { .. }))
        .await;
    match seen.last().unwrap() {
        ServerMessage::Error {
            code,
            retriable,
            data,
            ..
        } => (code.clone(), *retriable, data.as_ref().map(|d| d.nonce)),
        _ => unreachable!(),
    }
}

/// The session still works and kept its state: a voucher at nonce 2 is acknowledged.
async fn still_accepts_nonce_2(c: &mut Client, stack: &Stack, id: B256) {
    let v = c.voucher(2, 60);
    c.send(&ClientMessage::Voucher(v)).await;
    let seen = c
        .recv_until(|m| {
            matches!(
                m,
                ServerMessage::VoucherAck { .. } | ServerMessage::Error { .. }
            )
        })
        .await;
    assert!(
        matches!(
            seen.last(),
            Some(ServerMessage::VoucherAck {
                nonce: 2,
                cumulative: 60,
                ..
            })
        ),
        "{seen:?}"
    );
    assert_eq!(stored(stack, id).await, Some((2, 60)));
}

async fn refused_voucher(
    stack: &Stack,
    salt: u8,
    make: impl FnOnce(&Client) -> ClientMessage,
    code: &str,
) {
    let (mut c, id) = session(stack, salt).await;
    let bad = make(&c);
    c.send(&bad).await;
    let (got, retriable, nonce) = expect_error(&mut c).await;
    assert_eq!(got, code);
    assert!(retriable);
    assert_eq!(
        nonce,
        Some(1),
        "the error carries the accepted state for re-sync"
    );
    assert_eq!(stored(stack, id).await, Some((1, 50)), "nothing stored");
    still_accepts_nonce_2(&mut c, stack, id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voucher_errors_change_nothing() {
    let stack = Stack::start(per_message()).await;
    // Signed by someone else.
    refused_voucher(
        &stack,
        1,
        |c| {
            let stranger = SigningKey::from_slice(&[9u8; 32]).unwrap();
            ClientMessage::Voucher(sign_voucher(&c.domain, &stranger, c.channel, 2, 60))
        },
        "invalid_signature",
    )
    .await;
    // The high-s twin of a valid signature.
    refused_voucher(
        &stack,
        2,
        |c| ClientMessage::Voucher(high_s(c.voucher(2, 60))),
        "invalid_signature",
    )
    .await;
    // A tampered field (the signature covers cumulative 60, the message says 61).
    refused_voucher(
        &stack,
        3,
        |c| {
            let mut v = c.voucher(2, 60);
            v.cumulative = 61;
            ClientMessage::Voucher(v)
        },
        "invalid_signature",
    )
    .await;
    refused_voucher(
        &stack,
        4,
        |c| ClientMessage::Voucher(c.voucher(1, 70)),
        "stale_nonce",
    )
    .await;
    refused_voucher(
        &stack,
        5,
        |c| ClientMessage::Voucher(c.voucher(2, 40)),
        "cumulative_decreased",
    )
    .await;
    refused_voucher(
        &stack,
        6,
        |c| ClientMessage::Voucher(c.voucher(2, 1_001)),
        "exceeds_deposit",
    )
    .await;
    refused_voucher(
        &stack,
        7,
        |c| {
            let mut v = c.voucher(2, 60);
            v.channel_id = B256::repeat_byte(0x77);
            ClientMessage::Voucher(v)
        },
        "wrong_channel",
    )
    .await;
    // /metrics counts the refusals by code and the vouchers accepted.
    let metrics = http_get(&stack.url, "/metrics").await;
    assert!(
        metrics.contains("paystream_rejected_total{code=\"invalid_signature\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("paystream_rejected_total{code=\"stale_nonce\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("paystream_vouchers_accepted_total 14"),
        "7 opens and 7 vouchers: {metrics}"
    );
    assert!(
        metrics.contains("paystream_voucher_verification_seconds_count 14"),
        "{metrics}"
    );
}

/// The malleable twin: s' = n - s, parity flipped.
fn high_s(mut v: paystream::protocol::SignedStateMsg) -> paystream::protocol::SignedStateMsg {
    let n = U256::from_str_radix(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141",
        16,
    )
    .unwrap();
    let mut bytes = v.signature.to_vec();
    let s = U256::from_be_slice(&bytes[32..64]);
    bytes[32..64].copy_from_slice(&(n - s).to_be_bytes::<32>());
    bytes[64] = if bytes[64] == 27 { 28 } else { 27 };
    v.signature = Bytes::from(bytes);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_errors_change_nothing() {
    let stack = Stack::start(per_message()).await;
    for (salt, text, code) in [
        (10u8, "{not json", "malformed_message"),
        (
            11,
            r#"{"type":"voucher","channelId":"0x12"}"#,
            "malformed_message",
        ),
        (12, r#"{"type":"teleport"}"#, "unknown_type"),
    ] {
        let (mut c, id) = session(&stack, salt).await;
        c.send_text(text).await;
        let (got, retriable, _) = expect_error(&mut c).await;
        assert_eq!((got.as_str(), retriable), (code, true));
        assert_eq!(stored(&stack, id).await, Some((1, 50)));
        still_accepts_nonce_2(&mut c, &stack, id).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_closes_with_1009_after_saving() {
    let stack = Stack::start(per_message()).await;
    let (mut c, id) = session(&stack, 20).await;
    c.send_text(&format!(
        r#"{{"type":"request","body":"{}"}}"#,
        "x".repeat(70 * 1024)
    ))
    .await;
    let (seen, code) = c.drain().await;
    assert!(
        seen.iter()
            .any(|m| matches!(m, ServerMessage::Error { code, .. } if code == "frame_too_large")),
        "{seen:?}"
    );
    assert_eq!(code, Some(1009));
    assert_eq!(stored(&stack, id).await, Some((1, 50)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_this_server_cannot_be_paid_through_close_with_4402() {
    let stack = Stack::start(per_message()).await;
    // Another payee's channel.
    let other_payee = Address::repeat_byte(0x55);
    let id = stack.open_channel(other_payee, 30, 1_000).await;
    let mut c = stack.client(id).await;
    let v = c.voucher(1, 10);
    c.send(&ClientMessage::Open(v)).await;
    let (seen, code) = c.drain().await;
    assert!(
        seen.iter()
            .any(|m| matches!(m, ServerMessage::Error { code, .. } if code == "wrong_payee")),
        "{seen:?}"
    );
    assert_eq!(code, Some(4402));
    assert_eq!(
        stored(&stack, id).await,
        None,
        "nothing stored for a channel that is not ours"
    );
    // An unknown channel, and one whose payer asked to withdraw.
    let withdrawing = stack.open_channel(payee(), 31, 1_000).await;
    stack.payer.request_withdraw(withdrawing).await.unwrap();
    for id in [B256::repeat_byte(0x99), withdrawing] {
        let mut c = stack.client(id).await;
        let v = c.voucher(1, 10);
        c.send(&ClientMessage::Open(v)).await;
        let (seen, code) = c.drain().await;
        assert!(
            seen.iter().any(
                |m| matches!(m, ServerMessage::Error { code, .. } if code == "channel_not_open")
            ),
            "{seen:?}"
        );
        assert_eq!(code, Some(4402));
        assert_eq!(stored(&stack, id).await, None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voucher_flood_closes_with_4429() {
    let mut options = per_message();
    options.params = Box::new(|p| p.max_vouchers_per_sec = 3);
    let stack = Stack::start(options).await;
    let (mut c, id) = session(&stack, 40).await;
    for nonce in 2..10 {
        let v = c.voucher(nonce, 50 + u128::from(nonce));
        if !c.try_send(&ClientMessage::Voucher(v)).await {
            break;
        }
    }
    let (seen, code) = c.drain().await;
    assert!(
        seen.iter()
            .any(|m| matches!(m, ServerMessage::Error { code, .. } if code == "rate_limited")),
        "{seen:?}"
    );
    assert_eq!(code, Some(4429));
    let (nonce, _) = stored(&stack, id).await.unwrap();
    assert!(
        nonce <= 4,
        "at most the vouchers inside the limit were stored, got nonce {nonce}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_unavailable_pauses_and_acknowledges_nothing() {
    let mut stack = Stack::start(per_message()).await;
    let (mut c, _id) = session(&stack, 50).await;
    stack.redis.stop();
    let v = c.voucher(2, 60);
    c.send(&ClientMessage::Voucher(v)).await;
    let seen = c
        .recv_until(|m| matches!(m, ServerMessage::Paused { .. }))
        .await;
    assert!(
        seen.iter()
            .any(|m| matches!(m, ServerMessage::Error { code, .. } if code == "store_unavailable")),
        "{seen:?}"
    );
    assert!(
        !seen
            .iter()
            .any(|m| matches!(m, ServerMessage::VoucherAck { .. })),
        "nothing acknowledged"
    );
    assert!(
        matches!(seen.last(), Some(ServerMessage::Paused { reason }) if reason == "store_unavailable")
    );
    // Opening while the store is down closes with 1011.
    let id = stack.open_channel(payee(), 51, 1_000).await;
    let mut c2 = stack.client(id).await;
    let v = c2.voucher(1, 10);
    c2.send(&ClientMessage::Open(v)).await;
    let (seen, code) = c2.drain().await;
    assert!(
        seen.iter()
            .any(|m| matches!(m, ServerMessage::Error { code, .. } if code == "store_unavailable")),
        "{seen:?}"
    );
    assert_eq!(code, Some(1011));
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_resume_token_closes_with_4401() {
    let stack = Stack::start(per_message()).await;
    let mut c = stack.client(B256::ZERO).await;
    c.send(&ClientMessage::Resume {
        token: "eyJhbGciOiJIUzI1NiJ9.e30.forged".into(),
    })
    .await;
    let (seen, code) = c.drain().await;
    assert!(
        seen.iter()
            .any(|m| matches!(m, ServerMessage::Error { code, .. } if code == "bad_resume_token")),
        "{seen:?}"
    );
    assert_eq!(code, Some(4401));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_open_within_the_handshake_timeout_closes_with_1008() {
    let mut options = per_message();
    options.limits = Box::new(|l| l.handshake_timeout_ms = 300);
    let stack = Stack::start(options).await;
    let mut c = stack.client(B256::ZERO).await;
    let (_, code) = c.drain().await;
    assert_eq!(code, Some(1008));
}

/// A heartbeat is not the handshake's deadline: a client that opens after the server's first
/// Ping, well within the handshake timeout, gets its session. (When the Ping became one more
/// deadline of the connection's one timer, the timer's handler closed every connection without
/// a session with 1008 "open timeout" at the first Ping: the handshake timeout had become the
/// heartbeat's, 5 s by default, and a client retrying an `open` on its connection was cut off.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_before_the_open_does_not_close_the_connection() {
    let mut options = per_message();
    options.params = Box::new(|p| p.heartbeat_ms = 100);
    options.limits = Box::new(|l| l.handshake_timeout_ms = 30_000);
    let stack = Stack::start(options).await;
    let id = stack.open_channel(payee(), 1, 1_000).await;
    let mut raw = stack.raw().await;
    // The server's first Ping: the heartbeat's deadline has come and gone.
    loop {
        match raw.frame_in().await {
            Some(Frame::Ping(_)) => break,
            Some(Frame::Close(code)) => panic!("closed with {code:?} before any open"),
            None => panic!("the connection ended before any open"),
            Some(_) => {}
        }
    }
    let open = stack.client(id).await.voucher(1, 1);
    raw.send(&ClientMessage::Open(open)).await;
    let got = raw.recv().await;
    assert!(
        matches!(got, Some(ServerMessage::Session { .. })),
        "got {got:?}, close code {:?}",
        raw.close_code
    );
}

/// A connection that never opens is cut off at its open deadline however busy it keeps its
/// socket: the deadline was checked only when the connection's timer won its turn, and a client
/// writing frames without pause (here unsolicited Pongs, which ask for no answer and count as
/// activity) could keep the frames ahead of the timer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_floods_frames_is_still_cut_at_its_open_deadline() {
    let mut options = per_message();
    options.limits = Box::new(|l| l.handshake_timeout_ms = 500);
    let stack = Stack::start(options).await;
    let mut raw = stack.raw().await;
    let started = std::time::Instant::now();
    // Written until the server has gone (the write fails once it dropped the socket); bounded.
    let mut open = true;
    while open && started.elapsed() < Duration::from_secs(15) {
        open = raw.pongs(1_000).await;
    }
    assert!(
        !open,
        "still connected after {:?} of frames and no open",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_sessions_with_1001_and_queues_their_claims() {
    let mut stack = Stack::start(per_message()).await;
    let (mut c, id) = session(&stack, 60).await;
    c.send(&ClientMessage::Request {
        body: serde_json::json!({ "maxTokens": 5 }),
    })
    .await;
    c.recv_until(|m| matches!(m, ServerMessage::App { seq: 4, .. }))
        .await;
    stack.shutdown().await;
    let (_, code) = c.drain().await;
    assert_eq!(code, Some(1001));
    let claims = stack.state.store.pending_claims(10).await.unwrap();
    assert_eq!(
        claims.iter().find(|c| c.channel_id == id).map(|c| c.amount),
        Some(5)
    );
}
