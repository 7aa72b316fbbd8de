//! Resuming a session with its JWT after a disconnect (DESIGN.md section 6), on a real anvil and
//! redis-server: the balance and state carry over, the token rotates, an old token is refused
//! (4401), and a resume while the session is still connected supersedes it (4409).

mod common;

use common::stack::{Client, Options, Stack, payee};
use paystream::protocol::{ClientMessage, ServerMessage};

fn token_of(m: &ServerMessage) -> String {
    match m {
        ServerMessage::Session { resume_token, .. } => resume_token.clone(),
        other => panic!("expected session, got {other:?}"),
    }
}

async fn resume(stack: &Stack, channel: alloy::primitives::B256, token: &str) -> Client {
    let mut c = stack.client(channel).await;
    c.send(&ClientMessage::Resume {
        token: token.to_string(),
    })
    .await;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_session_resumes_with_its_balance_and_a_new_token() {
    let stack = Stack::start(Options::new(r#"{"perMessage":{"amount":"1","per":"1"}}"#)).await;
    let id = stack.open_channel(payee(), 1, 1_000).await;
    let mut c = stack.client(id).await;
    let first = c.open(1, 100).await;
    let token = token_of(&first);
    assert!(!token.is_empty());
    c.send(&ClientMessage::Request {
        body: serde_json::json!({ "maxTokens": 7 }),
    })
    .await;
    c.recv_until(|m| matches!(m, ServerMessage::App { seq: 6, .. }))
        .await;
    // The connection drops without `close`.
    drop(c);

    let mut c = resume(&stack, id, &token).await;
    let seen = c
        .recv_until(|m| {
            matches!(
                m,
                ServerMessage::Session { .. } | ServerMessage::Error { .. }
            )
        })
        .await;
    let resumed = seen.last().unwrap();
    let ServerMessage::Session {
        nonce,
        cumulative,
        consumed,
        resume_token,
        ..
    } = resumed
    else {
        panic!("expected session, got {resumed:?}");
    };
    assert_eq!(
        (*nonce, *cumulative, *consumed),
        (1, 100, 7),
        "balance and state kept"
    );
    assert_ne!(resume_token, &token, "the token rotates");
    // The session goes on: a voucher at the next nonce is acknowledged, and more tokens flow
    // with their sequence numbers continuing.
    let v = c.voucher(2, 200);
    c.send(&ClientMessage::Voucher(v)).await;
    c.recv_until(|m| matches!(m, ServerMessage::VoucherAck { nonce: 2, .. }))
        .await;
    c.send(&ClientMessage::Request {
        body: serde_json::json!({ "maxTokens": 3 }),
    })
    .await;
    c.recv_until(|m| matches!(m, ServerMessage::App { seq: 9, .. }))
        .await;
    c.send(&ClientMessage::Close {
        close_channel: false,
    })
    .await;
    let (seen, code) = c.drain().await;
    assert!(
        seen.iter().any(|m| matches!(
            m,
            ServerMessage::Receipt {
                consumed: 10,
                settled_amount: 10,
                refund: 990,
                ..
            }
        )),
        "{seen:?}"
    );
    assert_eq!(code, Some(1000));

    // The first token was used: refused. So is the second after close.
    for t in [token.clone(), resume_token.clone()] {
        let mut again = resume(&stack, id, &t).await;
        let (seen, code) = again.drain().await;
        assert!(
            seen.iter().any(
                |m| matches!(m, ServerMessage::Error { code, .. } if code == "bad_resume_token")
            )
        );
        assert_eq!(code, Some(4401));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_a_connected_session_supersedes_the_old_connection() {
    let stack = Stack::start(Options::new(r#"{"perMessage":{"amount":"1","per":"1"}}"#)).await;
    let id = stack.open_channel(payee(), 2, 1_000).await;
    let mut old = stack.client(id).await;
    let token = token_of(&old.open(1, 100).await);

    let mut new = resume(&stack, id, &token).await;
    let seen = new
        .recv_until(|m| {
            matches!(
                m,
                ServerMessage::Session { .. } | ServerMessage::Error { .. }
            )
        })
        .await;
    assert!(
        matches!(seen.last(), Some(ServerMessage::Session { nonce: 1, .. })),
        "{seen:?}"
    );
    let (seen, code) = old.drain().await;
    assert!(
        seen.iter().any(
            |m| matches!(m, ServerMessage::Error { code, .. } if code == "session_superseded")
        ),
        "{seen:?}"
    );
    assert_eq!(
        code,
        Some(4409),
        "the old connection is told it was superseded"
    );

    // A second resume with the same token is refused: it was used.
    let mut third = resume(&stack, id, &token).await;
    let (_, code) = third.drain().await;
    assert_eq!(code, Some(4401));
    // The new connection still works.
    let v = new.voucher(2, 150);
    new.send(&ClientMessage::Voucher(v)).await;
    new.recv_until(|m| matches!(m, ServerMessage::VoucherAck { nonce: 2, .. }))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_session_per_channel_so_credit_is_never_spent_twice() {
    let stack = Stack::start(Options::new(r#"{"perMessage":{"amount":"1","per":"1"}}"#)).await;
    let id = stack.open_channel(payee(), 3, 1_000).await;
    let mut first = stack.client(id).await;
    first.opened(1, 100).await;
    first
        .send(&ClientMessage::Request {
            body: serde_json::json!({ "maxTokens": 30 }),
        })
        .await;
    first
        .recv_until(|m| matches!(m, ServerMessage::App { seq: 29, .. }))
        .await;

    // A second connection on the same channel while the first is live: refused, nothing changes.
    let mut second = stack.client(id).await;
    let refused = second.open(2, 100).await;
    assert!(
        matches!(&refused, ServerMessage::Error { code, retriable: true, .. } if code == "channel_busy"),
        "{refused:?}"
    );

    // Once the first is gone, a new session opens and carries the consumption over: the same
    // credit is not delivered twice.
    drop(first);
    let mut reopened = None;
    for _ in 0..50 {
        // The server notices the drop when it reads the socket's end; retry the open until then.
        match second.open(2, 100).await {
            s @ ServerMessage::Session { .. } => {
                reopened = Some(s);
                break;
            }
            ServerMessage::Error { code, .. } if code == "channel_busy" => {
                tokio::task::yield_now().await
            }
            other => panic!("{other:?}"),
        }
    }
    let Some(ServerMessage::Session { consumed, .. }) = reopened else {
        panic!("never reopened")
    };
    assert_eq!(consumed, 30, "the first session's consumption carries over");
}
