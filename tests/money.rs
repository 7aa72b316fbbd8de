//! Money safety (the review of issue 9), on a real anvil with the contract deployed and a real
//! redis-server: nothing is delivered that nobody can claim, nobody pays for another's session,
//! and no consumption is lost or counted twice.

mod common;

use common::stack::{Options, Stack, payee};
use paystream::protocol::{ClientMessage, ServerMessage};

fn per_token() -> Options {
    Options::new(r#"{"perMessage":{"amount":"1","per":"1"}}"#)
}

fn is_reply(m: &ServerMessage) -> bool {
    matches!(
        m,
        ServerMessage::Session { .. } | ServerMessage::Error { .. }
    )
}

/// Item 4: the last stored voucher was a bearer token. An `open` repeating it was accepted
/// without a new signature, so anyone who saw it (plain `ws://`, a proxy's log, `settle`
/// calldata) could stream on the payer's credit. `open` now needs a state the payer signed
/// after the stored one: a nonce above it (the same cumulative is fine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_open_gets_nothing() {
    let stack = Stack::start(per_token()).await;
    let id = stack.open_channel(payee(), 1, 1_000).await;
    let mut honest = stack.client(id).await;
    let open = honest.voucher(1, 100);
    honest.send(&ClientMessage::Open(open.clone())).await;
    let reply = honest.recv_until(is_reply).await.pop().unwrap();
    assert!(matches!(reply, ServerMessage::Session { .. }), "{reply:?}");
    honest
        .send(&ClientMessage::Request {
            body: serde_json::json!({ "maxTokens": 10 }),
        })
        .await;
    honest
        .recv_until(|m| matches!(m, ServerMessage::App { seq: 9, .. }))
        .await;
    honest
        .send(&ClientMessage::Close {
            close_channel: false,
        })
        .await;
    honest.drain().await;

    // Someone with no key replays the open it saw.
    let mut thief = stack.client(id).await;
    thief.send(&ClientMessage::Open(open)).await;
    let reply = thief.recv_until(is_reply).await.pop().unwrap();
    assert!(
        matches!(&reply, ServerMessage::Error { code, .. } if code == "stale_nonce"),
        "a replayed open must be refused: {reply:?}"
    );
    thief
        .send(&ClientMessage::Request {
            body: serde_json::json!({ "maxTokens": 10 }),
        })
        .await;
    let reply = thief
        .recv_until(|m| matches!(m, ServerMessage::Error { .. } | ServerMessage::App { .. }))
        .await
        .pop()
        .unwrap();
    assert!(
        matches!(&reply, ServerMessage::Error { code, .. } if code == "no_session"),
        "{reply:?}"
    );
    drop(thief);

    // The payer re-opens with a fresh signature at the same cumulative.
    let mut honest = stack.client(id).await;
    let reply = honest.open(2, 100).await;
    assert!(
        matches!(
            reply,
            ServerMessage::Session {
                nonce: 2,
                cumulative: 100,
                consumed: 10,
                ..
            }
        ),
        "{reply:?}"
    );
}
