//! Availability under clients that are slow, silent or hostile (the review of issue 9), on a real
//! anvil and redis-server: a session is never frozen or starved by what another connection, or
//! its own client, does or fails to do.

mod common;

use common::stack::{Options, Stack, payee};
use paystream::protocol::{ClientMessage, ServerMessage};

fn per_token() -> Options {
    Options::new(r#"{"perMessage":{"amount":"1","per":"1"}}"#)
}

/// A `need_voucher` the client could not answer at once must not end the session: while
/// delivery is paused for credit, the server asks again before the deadline. Before the fix it
/// asked once per cumulative, and a client that had deferred the ask (its count lagging the
/// server's by the units in flight) was closed with 4408.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_asks_again_while_paused_for_credit() {
    let mut options = per_token();
    options.params = Box::new(|p| p.voucher_deadline_ms = 6_000);
    let stack = Stack::start(options).await;
    let id = stack.open_channel(payee(), 1, 1_000).await;
    let mut c = stack.client(id).await;
    c.open(1, 5).await;
    c.send(&ClientMessage::Request {
        body: serde_json::json!({ "maxTokens": 20 }),
    })
    .await;
    // The first ask goes unanswered, and delivery stops at the credit's end.
    c.recv_until(|m| matches!(m, ServerMessage::NeedVoucher { .. }))
        .await;
    let seen = c
        .recv_until(|m| matches!(m, ServerMessage::Paused { .. }))
        .await;
    let delivered = seen
        .iter()
        .filter(|m| matches!(m, ServerMessage::App { .. }))
        .count();
    let asked = std::time::Instant::now();
    // Asked again, before the deadline, with the consumption at the pause.
    let seen = c
        .recv_until(|m| matches!(m, ServerMessage::NeedVoucher { .. }))
        .await;
    assert!(asked.elapsed() < std::time::Duration::from_secs(6));
    let Some(ServerMessage::NeedVoucher {
        consumed,
        cumulative,
        deadline_ms,
        ..
    }) = seen.last()
    else {
        unreachable!()
    };
    assert_eq!(
        (*consumed, *cumulative),
        (5, 5),
        "paused at the credit's end"
    );
    assert!(*deadline_ms <= 6_000, "the deadline is not extended");
    assert!(delivered <= 5);
    let v = c.voucher(2, 25);
    c.send(&ClientMessage::Voucher(v)).await;
    c.recv_until(|m| matches!(m, ServerMessage::App { seq: 19, .. }))
        .await;
}
