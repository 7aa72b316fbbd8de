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

fn code_of(m: &ServerMessage) -> Option<&str> {
    match m {
        ServerMessage::Error { code, .. } => Some(code),
        _ => None,
    }
}

/// Item 1: the chain was read only at `open`. After `requestWithdraw`, the delay and
/// `withdraw`, the server acknowledged a new voucher and delivered units nobody could claim.
/// Now the contract's events end a live session on a withdrawal request (its consumption
/// claimed), a later `open` is refused, and so is a channel whose `withdrawDelay` is shorter
/// than the server's minimum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawal_request_ends_the_session_and_its_consumption_is_claimed() {
    use paystream::store::ChannelStore;
    let mut options = per_token();
    options.tokens_per_sec = 50;
    options.limits = Box::new(|l| {
        l.watch_interval_ms = 100;
        l.channel_cache_ms = 0;
    });
    let stack = Stack::start(options).await;
    let id = stack.open_channel(payee(), 1, 1_000).await;
    let mut c = stack.client(id).await;
    c.opened(1, 500).await;
    c.send(&ClientMessage::Request {
        body: serde_json::json!({ "maxTokens": 400 }),
    })
    .await;
    c.recv_until(|m| matches!(m, ServerMessage::App { seq: 4, .. }))
        .await;
    stack.payer.request_withdraw(id).await.unwrap();
    let (seen, code) = c.drain().await;
    assert!(
        seen.iter().any(|m| code_of(m) == Some("channel_not_open")),
        "{seen:?}"
    );
    assert_eq!(
        code,
        Some(4402),
        "the session ends at the withdrawal request"
    );
    let delivered = 5 + seen
        .iter()
        .filter(|m| matches!(m, ServerMessage::App { .. }))
        .count() as u128;
    assert!(delivered < 400, "the stream was cut short");
    let claims = stack.state.store.pending_claims(10).await.unwrap();
    assert_eq!(
        claims.iter().find(|c| c.channel_id == id).map(|c| c.amount),
        Some(delivered),
        "everything delivered is queued for the settler"
    );

    // No new session, before or after the withdrawal.
    let refused = async |stack: &Stack| {
        let mut c = stack.client(id).await;
        let v = c.voucher(2, 500);
        c.send(&ClientMessage::Open(v)).await;
        let (seen, code) = c.drain().await;
        assert!(
            seen.iter().any(|m| code_of(m) == Some("channel_not_open")),
            "{seen:?}"
        );
        assert_eq!(code, Some(4402));
    };
    refused(&stack).await;
    stack.anvil.increase_time(3_601).await;
    stack.payer.withdraw(id).await.unwrap();
    assert!(stack.read_channel(id).await.closed);
    refused(&stack).await;

    // A channel that gives the settler less time than the server needs to claim.
    let short = stack
        .payer
        .open(
            payee(),
            alloy::primitives::Address::ZERO,
            alloy::primitives::B256::repeat_byte(2),
            1_000,
            900,
        )
        .await
        .unwrap()
        .0;
    let mut c = stack.client(short).await;
    let v = c.voucher(1, 10);
    c.send(&ClientMessage::Open(v)).await;
    let (seen, code) = c.drain().await;
    assert!(
        seen.iter()
            .any(|m| code_of(m) == Some("withdraw_delay_too_short")),
        "{seen:?}"
    );
    assert_eq!(code, Some(4402));
}

/// Streams `tokens` tokens on an open session and closes it; returns the receipt's consumed.
async fn stream_and_close(c: &mut common::stack::Client, tokens: u64) -> u128 {
    c.send(&ClientMessage::Request {
        body: serde_json::json!({ "maxTokens": tokens }),
    })
    .await;
    c.recv_until(|m| matches!(m, ServerMessage::End { .. }))
        .await;
    c.send(&ClientMessage::Close {
        close_channel: false,
    })
    .await;
    let seen = c
        .recv_until(|m| matches!(m, ServerMessage::Receipt { .. }))
        .await;
    let Some(ServerMessage::Receipt { consumed, .. }) = seen.last() else {
        unreachable!()
    };
    c.drain().await;
    *consumed
}

/// Item 5: each re-open restored the rounded-up consumption, so a payer paid up to one base
/// unit more per session. Ten tokens at 0.003, in three sessions, are 0.09: settled as 1, not 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumption_is_carried_exactly_from_session_to_session() {
    use paystream::store::ChannelStore;
    let stack = Stack::start(Options::new(
        r#"{"perMessage":{"amount":"3","per":"1000"}}"#,
    ))
    .await;
    let id = stack.open_channel(payee(), 1, 1_000).await;
    let mut last = 0;
    for nonce in 1..=3 {
        let mut c = stack.client(id).await;
        c.opened(nonce, 10).await;
        last = stream_and_close(&mut c, 10).await;
    }
    assert_eq!(last, 1, "0.09 base units, rounded up once");
    let claims = stack.state.store.pending_claims(10).await.unwrap();
    assert_eq!(claims[0].amount, 1);
}

/// Item 6: consumption and claim writes that failed when a session ended were only logged, and
/// the same credit could be metered again by the next session on the channel. They are now
/// retried until the store takes them, and the next session starts from them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_refused_at_close_are_retried_and_never_metered_twice() {
    use paystream::store::ChannelStore;
    let stack = Stack::start(per_token()).await;
    let id = stack.open_channel(payee(), 1, 1_000).await;
    let mut c = stack.client(id).await;
    c.opened(1, 100).await;
    c.send(&ClientMessage::Request {
        body: serde_json::json!({ "maxTokens": 7 }),
    })
    .await;
    c.recv_until(|m| matches!(m, ServerMessage::End { .. }))
        .await;
    // Redis is up but refuses every write while the session closes.
    stack.redis.refuse_writes(true);
    c.send(&ClientMessage::Close {
        close_channel: false,
    })
    .await;
    c.recv_until(|m| matches!(m, ServerMessage::Receipt { consumed: 7, .. }))
        .await;
    c.drain().await;
    assert!(
        stack
            .state
            .store
            .pending_claims(10)
            .await
            .unwrap()
            .is_empty(),
        "the store refused the claim"
    );
    stack.redis.refuse_writes(false);
    // The claim lands by itself.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let claims = stack.state.store.pending_claims(10).await.unwrap();
        if let Some(claim) = claims.iter().find(|c| c.channel_id == id) {
            assert_eq!(claim.amount, 7);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the claim never landed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // The next session starts from the 7 consumed, not from what the store had before.
    let mut c = stack.client(id).await;
    let reply = c.open(2, 100).await;
    assert!(
        matches!(reply, ServerMessage::Session { consumed: 7, .. }),
        "{reply:?}"
    );
}

/// Item 6, the parked half: a session parked while the store refused its writes held the only
/// record of its consumption, and an `open` that took the channel over dropped it. The new
/// session now carries the parked one's consumption over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_session_taken_over_passes_its_consumption_on() {
    let stack = Stack::start(per_token()).await;
    let id = stack.open_channel(payee(), 1, 1_000).await;
    let mut c = stack.client(id).await;
    c.opened(1, 100).await;
    c.send(&ClientMessage::Request {
        body: serde_json::json!({ "maxTokens": 9 }),
    })
    .await;
    c.recv_until(|m| matches!(m, ServerMessage::End { .. }))
        .await;
    stack.redis.refuse_writes(true);
    drop(c);
    common::stack::wait_for_metric(&stack, "paystream_sessions_active", 0).await;
    stack.redis.refuse_writes(false);
    let mut c = stack.client(id).await;
    let reply = c.open(2, 100).await;
    assert!(
        matches!(reply, ServerMessage::Session { consumed: 9, .. }),
        "{reply:?}"
    );
}

/// Also: a payee's `Close` consent never expires on-chain. A cooperative close whose
/// transaction is still pending (here: anvil stops mining) left the channel open to new
/// sessions, which would deliver units the pending close makes unclaimable. The channel is now
/// marked closing in the store before the server signs, and refuses new sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_whose_close_was_signed_takes_no_new_session() {
    let mut options = per_token();
    options.tx_timeout = Some(std::time::Duration::from_secs(2));
    options.limits = Box::new(|l| l.channel_cache_ms = 0);
    let stack = Stack::start(options).await;
    let id = stack.open_channel(payee(), 1, 1_000).await;
    let mut c = stack.client(id).await;
    c.opened(1, 100).await;
    stream_and_close_channel_pending(&stack, &mut c).await;

    let mut other = stack.client(id).await;
    let v = other.voucher(2, 100);
    other.send(&ClientMessage::Open(v)).await;
    let (seen, code) = other.drain().await;
    assert!(
        seen.iter().any(|m| code_of(m) == Some("channel_closing")),
        "{seen:?}"
    );
    assert_eq!(code, Some(4402));
    // Mining again: the pending close lands, at the amount the payee signed.
    stack
        .anvil
        .rpc("evm_setAutomine", serde_json::json!([true]))
        .await;
    stack.anvil.rpc("evm_mine", serde_json::json!([])).await;
    let info = stack.read_channel(id).await;
    assert!(info.closed);
}

async fn stream_and_close_channel_pending(stack: &Stack, c: &mut common::stack::Client) {
    c.send(&ClientMessage::Request {
        body: serde_json::json!({ "maxTokens": 3 }),
    })
    .await;
    c.recv_until(|m| matches!(m, ServerMessage::End { .. }))
        .await;
    stack
        .anvil
        .rpc("evm_setAutomine", serde_json::json!([false]))
        .await;
    c.send(&ClientMessage::Close {
        close_channel: true,
    })
    .await;
    c.recv_until(|m| matches!(m, ServerMessage::Receipt { consumed: 3, .. }))
        .await;
    c.drain().await;
    let pool = stack
        .anvil
        .rpc("txpool_status", serde_json::json!([]))
        .await;
    assert_eq!(pool["pending"], "0x1", "the close is pending");
}

/// Also: `/metrics` added the cumulative amounts at every suspend and close, so a resumed
/// session was counted twice. Each base unit is now counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_each_base_unit_once() {
    let stack = Stack::start(per_token()).await;
    let id = stack.open_channel(payee(), 1, 1_000).await;
    let mut c = stack.client(id).await;
    let ServerMessage::Session { resume_token, .. } = c.open(1, 100).await else {
        panic!()
    };
    c.send(&ClientMessage::Request {
        body: serde_json::json!({ "maxTokens": 5 }),
    })
    .await;
    c.recv_until(|m| matches!(m, ServerMessage::End { .. }))
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
    assert_eq!(stream_and_close(&mut c, 5).await, 10);
    assert_eq!(
        common::stack::metric(&stack, "paystream_consumed_base_units_total").await,
        Some(10)
    );
    assert_eq!(
        common::stack::metric(&stack, "paystream_settled_base_units_total").await,
        Some(10)
    );
    assert_eq!(
        common::stack::metric(&stack, "paystream_vouchers_accepted_total").await,
        Some(1),
        "one voucher: the open (a resume stores none)"
    );
}

/// A session on a channel of 10 base units (a token costs 1) that has asked for 20 tokens, on a
/// server whose watcher polls every 100 ms.
async fn twenty_tokens_on_a_deposit_of_ten()
-> (Stack, alloy::primitives::B256, common::stack::Client) {
    let mut options = per_token();
    options.limits = Box::new(|l| l.watch_interval_ms = 100);
    let stack = Stack::start(options).await;
    let id = stack.open_channel(payee(), 1, 10).await;
    let mut c = stack.client(id).await;
    c.opened(1, 10).await;
    c.send(&ClientMessage::Request {
        body: serde_json::json!({ "maxTokens": 20 }),
    })
    .await;
    (stack, id, c)
}

/// Found in review: a session that used up its deposit was told to top it up, but the top-up
/// never resumed it (the ask for that cumulative had been spent). The watcher's `ToppedUp`
/// now raises the deposit and the session asks again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_top_up_resumes_a_session_that_ran_out_of_deposit() {
    let (stack, id, mut c) = twenty_tokens_on_a_deposit_of_ten().await;
    // Told to top up when the ask hits the deposit; paused when the credit is used up.
    let mut seen = c
        .recv_until(|m| code_of(m) == Some("exceeds_deposit"))
        .await;
    seen.extend(
        c.recv_until(|m| matches!(m, ServerMessage::Paused { .. }))
            .await,
    );
    assert_eq!(
        seen.iter()
            .filter(|m| matches!(m, ServerMessage::App { .. }))
            .count(),
        10
    );
    stack
        .payer
        .top_up(id, alloy::primitives::Address::ZERO, 100)
        .await
        .unwrap();
    let seen = c
        .recv_until(|m| matches!(m, ServerMessage::NeedVoucher { .. }))
        .await;
    let Some(ServerMessage::NeedVoucher { suggested, .. }) = seen.last() else {
        unreachable!()
    };
    assert!(*suggested > 10 && *suggested <= 110, "{suggested}");
    let v = c.voucher(2, 30);
    c.send(&ClientMessage::Voucher(v)).await;
    let (seq, reason) = match c
        .recv_until(|m| matches!(m, ServerMessage::End { .. }))
        .await
        .pop()
    {
        Some(ServerMessage::End { seq, reason }) => (seq, reason),
        _ => unreachable!(),
    };
    assert_eq!((seq, reason.as_str()), (Some(19), "max_tokens"));
}

/// Found in review: the watcher told one event from another by its block, channel and kind, so
/// a second top-up of a channel in the same block was taken for a repeat and dropped. The live
/// session kept the deposit after the first, and refused a voucher the second one covered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_top_ups_in_one_block_both_raise_the_live_session_deposit() {
    let (stack, id, mut c) = twenty_tokens_on_a_deposit_of_ten().await;
    c.recv_until(|m| matches!(m, ServerMessage::Paused { .. }))
        .await;
    // Two top-ups of 100 in one block, from two senders (anyone may top up a channel).
    stack
        .anvil
        .rpc("evm_setAutomine", serde_json::json!([false]))
        .await;
    let other = paystream::chain::Channels::at(
        paystream::chain::rpc::RpcBackend::connect(&stack.anvil.url, common::anvil::dev_signer(3))
            .await
            .unwrap(),
        stack.payer.address(),
    );
    let (first, second) = (stack.payer.clone(), other);
    let first = tokio::spawn(async move {
        first
            .top_up(id, alloy::primitives::Address::ZERO, 100)
            .await
    });
    let second = tokio::spawn(async move {
        second
            .top_up(id, alloy::primitives::Address::ZERO, 100)
            .await
    });
    // Both in the pool before the block is mined (polled, within a bound).
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let pool = stack
            .anvil
            .rpc("txpool_status", serde_json::json!([]))
            .await;
        if pool["pending"] == "0x2" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the top-ups never reached the pool: {pool}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    stack
        .anvil
        .rpc("evm_setAutomine", serde_json::json!([true]))
        .await;
    stack.anvil.rpc("evm_mine", serde_json::json!([])).await;
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    assert_eq!(stack.read_channel(id).await.deposit, 210);
    c.recv_until(|m| matches!(m, ServerMessage::NeedVoucher { .. }))
        .await;
    // 150 is within the deposit only with both top-ups.
    c.send(&ClientMessage::Voucher(c.voucher(2, 150))).await;
    let seen = c
        .recv_until(|m| matches!(m, ServerMessage::VoucherAck { .. }) || code_of(m).is_some())
        .await;
    assert!(
        matches!(
            seen.last(),
            Some(ServerMessage::VoucherAck { nonce: 2, .. })
        ),
        "{seen:?}"
    );
}
