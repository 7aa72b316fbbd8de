//! The paying client against the server, a real anvil and redis-server: it pays a full
//! stream and checks the receipt, refuses terms over its policy before any money moves, refuses
//! to sign for a server that overclaims, and pays for an OpenAI-compatible upstream exactly per
//! delivered token, also when the upstream fails mid-stream.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::{Address, B256};
use common::anvil::dev_signer;
use common::stack::{ETH, Options, Stack, payee, payer_key};
use futures_util::{SinkExt, StreamExt};
use http_body_util::StreamBody;
use hyper::body::{Bytes, Frame};
use paystream::chain::Channels;
use paystream::chain::rpc::RpcBackend;
use paystream::client::{ClientError, Event, Payer, Policy, fetch_challenge};
use paystream::meter::Price;
use paystream::protocol::{ClientMessage, ServerMessage, decode_client, encode_server};
use paystream::server::openai::OpenAiUpstream;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

fn policy(chain_id: u64) -> Policy {
    Policy {
        max_per_message: Some(Price { amount: 1, per: 1 }),
        max_per_second: None,
        max_per_byte_out: None,
        max_per_byte_in: None,
        max_total: ETH,
        max_credit_window: 100,
        allowed_payees: vec![payee()],
        allowed_chains: vec![chain_id],
    }
}

async fn payer(stack: &Stack, policy: Policy) -> Payer<RpcBackend> {
    let backend = RpcBackend::connect(&stack.anvil.url, dev_signer(1))
        .await
        .unwrap();
    Payer::new(Channels::at(backend, stack.contract), payer_key(), policy)
}

/// Streams until `tokens` units arrived or the stream ended; returns the units received.
async fn consume(session: &mut paystream::client::PaySession, tokens: u64) -> Vec<String> {
    let mut got = Vec::new();
    while (got.len() as u64) < tokens {
        match tokio::time::timeout(Duration::from_secs(30), session.next())
            .await
            .expect("events keep coming")
        {
            Ok(Some(Event::App { data, .. })) => {
                got.push(data["token"].as_str().unwrap_or_default().to_string())
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => panic!("{e}"),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_pays_a_full_stream_and_checks_the_receipt() {
    let mut options = Options::new(r#"{"perMessage":{"amount":"7","per":"10"}}"#);
    options.tokens_per_sec = 500;
    let stack = Stack::start(options).await;
    let challenge = fetch_challenge(&format!("{}/tokens", stack.url))
        .await
        .unwrap();
    let client = payer(&stack, policy(stack.chain_id)).await;
    let mut session = client
        .start(&challenge, B256::repeat_byte(1), 10_000)
        .await
        .unwrap();
    session
        .request(serde_json::json!({ "maxTokens": 400 }))
        .await
        .unwrap();
    let got = consume(&mut session, 400).await;
    assert_eq!(got.len(), 400);
    assert!(session.vouchers_signed() >= 2, "credit was extended");
    let receipt = session.close(false).await.unwrap();
    assert_eq!(receipt.consumed, (400u128 * 7).div_ceil(10));
    assert_eq!(receipt.settled, receipt.consumed);
    assert_eq!(receipt.refund, 10_000 - receipt.settled);
    // The same salt reuses the channel on the next session (no new deposit).
    let again = client
        .start(&challenge, B256::repeat_byte(1), 10_000)
        .await
        .unwrap();
    assert_eq!(again.deposit(), 10_000);
    again.close(true).await.unwrap();
    assert!(
        stack.read_channel(stack.read_channel_id(1)).await.closed,
        "closed cooperatively"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terms_over_the_policy_are_refused_before_any_money_moves() {
    let stack = Stack::start(Options::new(r#"{"perMessage":{"amount":"2","per":"1"}}"#)).await;
    let challenge = fetch_challenge(&format!("{}/tokens", stack.url))
        .await
        .unwrap();
    let cases: Vec<(Policy, &str)> = vec![
        (policy(stack.chain_id), "perMessage costs 2/1"),
        (
            Policy {
                max_per_message: None,
                ..policy(stack.chain_id)
            },
            "allows no perMessage",
        ),
        (
            Policy {
                max_per_message: Some(Price::whole(5)),
                allowed_chains: vec![1],
                ..policy(stack.chain_id)
            },
            "network",
        ),
        (
            Policy {
                max_per_message: Some(Price::whole(5)),
                allowed_payees: vec![Address::repeat_byte(1)],
                ..policy(stack.chain_id)
            },
            "payee",
        ),
    ];
    for (policy, expect) in cases {
        let client = payer(&stack, policy).await;
        let err = client
            .start(&challenge, B256::repeat_byte(2), 1_000)
            .await
            .err()
            .expect("refused");
        assert!(matches!(err, ClientError::Terms(_)), "{err:?}");
        assert!(err.to_string().contains(expect), "{err}");
    }
    let id = stack.read_channel_id(2);
    assert!(
        paystream::chain::ChannelChain::read_channel(&stack.payer, id)
            .await
            .unwrap()
            .is_none(),
        "no channel was opened"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_refuses_to_sign_for_a_server_that_overclaims() {
    // A real contract and channel on anvil; a server that lies about consumption: 5 tokens
    // delivered at 1 each, then it claims 1,000.
    let stack = Stack::start(Options::new(r#"{"perMessage":{"amount":"1","per":"1"}}"#)).await;
    let mut challenge = fetch_challenge(&format!("{}/tokens", stack.url))
        .await
        .unwrap();
    let mut after: Vec<ServerMessage> = (0..5).map(app).collect();
    after.push(ServerMessage::NeedVoucher {
        consumed: 1_000,
        cumulative: 100,
        suggested: 5_000,
        deadline_ms: 30_000,
    });
    let (url, mut signed) = fake_server(session_of(per_unit()), after, vec![]).await;
    challenge.accepts[0].extra.ws_endpoint = url;
    let client = payer(&stack, policy(stack.chain_id)).await;
    let mut session = client
        .start(&challenge, B256::repeat_byte(3), 1_000)
        .await
        .unwrap();
    let mut tokens = 0;
    let err = loop {
        match session.next().await {
            Ok(Some(Event::App { .. })) => tokens += 1,
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended without the overclaim"),
            Err(e) => break e,
        }
    };
    assert_eq!(tokens, 5);
    match err {
        ClientError::ServerOverclaims {
            claimed,
            received,
            window,
        } => {
            assert_eq!((claimed, received, window), (1_000, 5, 100));
        }
        other => panic!("expected ServerOverclaims, got {other:?}"),
    }
    drop(session);
    assert_eq!(signed.recv().await, Some((1, 100)), "the open");
    assert_eq!(
        signed.recv().await,
        None,
        "nothing was signed for the overclaim"
    );
}

/// A fake server on a real channel: it asks for a voucher before sending anything (the units
/// are still in flight), so the client's own count plus its window (2) does not exceed the
/// credit it already signed (2) and it can only wait. Then it sends tokens at 1/1000 each:
/// from the first one the client's count allows more credit, and it must answer the ask it
/// deferred, without being asked again. Before the fix it dropped the ask, and the real server
/// never asked twice: the demo paused at exhausted credit and ended with 4408 about half the
/// time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_answers_a_deferred_need_voucher_once_its_count_catches_up() {
    let stack = Stack::start(Options::new(
        r#"{"perMessage":{"amount":"1","per":"1000"}}"#,
    ))
    .await;
    let mut challenge = fetch_challenge(&format!("{}/tokens", stack.url))
        .await
        .unwrap();
    let mut after = vec![ServerMessage::NeedVoucher {
        consumed: 1,
        cumulative: 2,
        suggested: 6,
        deadline_ms: 30_000,
    }];
    after.extend((0..1_500).map(app));
    let (url, mut signed) = fake_server(session_of(per_thousandth()), after, vec![]).await;
    challenge.accepts[0].extra.ws_endpoint = url;
    let mut policy = policy(stack.chain_id);
    policy.max_credit_window = 2;
    let client = payer(&stack, policy).await;
    let mut session = client
        .start(&challenge, B256::repeat_byte(4), 1_000)
        .await
        .unwrap();
    assert_eq!(
        signed.recv().await,
        Some((1, 2)),
        "the first voucher is one window"
    );
    let reader = tokio::spawn(async move { while let Ok(Some(_)) = session.next().await {} });
    let got = tokio::time::timeout(Duration::from_secs(20), signed.recv())
        .await
        .expect("the client answered the deferred ask");
    // Signed at the first token: its count (0.001, rounded up to 1) plus its window (2).
    assert_eq!(got, Some((2, 3)));
    reader.abort();
}

fn app(seq: u64) -> ServerMessage {
    ServerMessage::App {
        seq,
        data: serde_json::json!({ "token": "x" }),
    }
}

/// A `session` for [`fake_server`] (which fills in the open's nonce and cumulative).
fn session_of(tariff: paystream::meter::Tariff) -> ServerMessage {
    ServerMessage::Session {
        session_id: "s".into(),
        resume_token: "t".into(),
        channel_id: B256::ZERO,
        nonce: 0,
        cumulative: 0,
        consumed: 0,
        tariff: Box::new(tariff),
        heartbeat_ms: 5_000,
    }
}

fn per_unit() -> paystream::meter::Tariff {
    paystream::meter::Tariff::from_json(r#"{"perMessage":{"amount":"1","per":"1"}}"#).unwrap()
}

/// A fake server for `start`: answers the first `open` with `first` (a `session` gets the
/// open's nonce and cumulative) followed by `after`, and each later message with `then`;
/// reports every voucher (`open` or `voucher`) the client signed.
async fn fake_server(
    first: ServerMessage,
    after: Vec<ServerMessage>,
    then: Vec<ServerMessage>,
) -> (String, tokio::sync::mpsc::UnboundedReceiver<(u64, u128)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws/tokens", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
        let send = |m: &ServerMessage| Message::Text(encode_server(m).into());
        let mut then = then.into_iter();
        let mut first = Some(first);
        while let Some(Ok(Message::Text(text))) = ws.next().await {
            let signed = match decode_client(&text) {
                Ok(ClientMessage::Open(v) | ClientMessage::Voucher(v)) => v,
                _ => continue,
            };
            let _ = tx.send((signed.nonce, signed.cumulative));
            let reply = match first.take() {
                Some(mut m) => {
                    if let ServerMessage::Session {
                        nonce, cumulative, ..
                    } = &mut m
                    {
                        (*nonce, *cumulative) = (signed.nonce, signed.cumulative);
                    }
                    let mut reply = vec![m];
                    reply.extend(after.clone());
                    reply
                }
                None => then.by_ref().collect(),
            };
            for m in &reply {
                if ws.send(send(m)).await.is_err() {
                    return;
                }
            }
        }
    });
    (url, rx)
}

fn per_thousandth() -> paystream::meter::Tariff {
    paystream::meter::Tariff::from_json(r#"{"perMessage":{"amount":"1","per":"1000"}}"#).unwrap()
}

/// Item 2: answering `open` with `stale_nonce` data `{nonce: 7, cumulative: 1000}` made the
/// client sign (8, 1000) on a 1,000 deposit with nothing delivered. A client re-syncs its
/// nonce from anything (nonces cost nothing), but a cumulative only to one it can prove: its
/// own signature over it, or the contract's `claimed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_server_cannot_resync_the_client_to_its_deposit() {
    let stack = Stack::start(Options::new(
        r#"{"perMessage":{"amount":"1","per":"1000"}}"#,
    ))
    .await;
    let mut challenge = fetch_challenge(&format!("{}/tokens", stack.url))
        .await
        .unwrap();
    let lie = ServerMessage::Error {
        code: "stale_nonce".into(),
        message: "stale nonce".into(),
        retriable: true,
        data: Some(paystream::protocol::ErrorData {
            nonce: 7,
            cumulative: 1_000,
            consumed: 1_000,
            signature: None,
        }),
    };
    let (url, mut signed) = fake_server(lie.clone(), vec![], vec![lie]).await;
    challenge.accepts[0].extra.ws_endpoint = url;
    let mut policy = policy(stack.chain_id);
    policy.max_credit_window = 2;
    let client = payer(&stack, policy).await;
    let result = client.start(&challenge, B256::repeat_byte(5), 1_000).await;
    assert!(
        matches!(result, Err(ClientError::UnprovenState { .. })),
        "{:?}",
        result.err()
    );
    let mut vouchers = Vec::new();
    while let Ok(v) = signed.try_recv() {
        vouchers.push(v);
    }
    assert!(
        vouchers.iter().all(|(_, cumulative)| *cumulative <= 2),
        "signed only its first window: {vouchers:?}"
    );
}

/// Item 2, second half: the consumption a server states at `session` became the client's
/// baseline, so a lying server got the credit it had authorized counted as received, and one
/// more window on top. The baseline is now at most what the client can prove was consumed
/// before (the contract's `claimed`; here nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_server_gets_no_free_window_from_its_session_consumed() {
    let stack = Stack::start(Options::new(
        r#"{"perMessage":{"amount":"1","per":"1000"}}"#,
    ))
    .await;
    let mut challenge = fetch_challenge(&format!("{}/tokens", stack.url))
        .await
        .unwrap();
    let mut session = session_of(per_thousandth());
    if let ServerMessage::Session { consumed, .. } = &mut session {
        *consumed = 2;
    }
    // Then it asks for more, having delivered nothing, and delivers one token at 1/1000.
    let after = vec![
        ServerMessage::NeedVoucher {
            consumed: 2,
            cumulative: 2,
            suggested: 10,
            deadline_ms: 30_000,
        },
        app(0),
    ];
    let (url, mut signed) = fake_server(session, after, vec![]).await;
    challenge.accepts[0].extra.ws_endpoint = url;
    let mut policy = policy(stack.chain_id);
    policy.max_credit_window = 2;
    let client = payer(&stack, policy).await;
    let mut session = client
        .start(&challenge, B256::repeat_byte(6), 1_000)
        .await
        .unwrap();
    assert_eq!(signed.recv().await, Some((1, 2)), "the open: one window");
    let reader = tokio::spawn(async move { while let Ok(Some(_)) = session.next().await {} });
    // What it received is worth its own count (one token: 1, rounded up), not the server's
    // word: it signs that plus its window, 3, not 5.
    let next = tokio::time::timeout(Duration::from_secs(10), signed.recv())
        .await
        .expect("the client answers once its count allows");
    assert_eq!(next, Some((2, 3)));
    reader.abort();
}

/// A server that drops the connection, refuses the resume, and on the client's re-open says
/// the channel's earlier consumption was the whole credit signed, then asks for more: before,
/// the client believed it (it signed that credit), signed another window with nothing
/// delivered, and a server repeating this drained the deposit a window at a time. Now what it
/// believes of earlier consumption is bounded by its own count of what it received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_dropping_connections_cannot_drain_the_deposit_through_re_opens() {
    let stack = Stack::start(Options::new(
        r#"{"perMessage":{"amount":"1","per":"1000"}}"#,
    ))
    .await;
    let mut challenge = fetch_challenge(&format!("{}/tokens", stack.url))
        .await
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws/tokens", listener.local_addr().unwrap());
    let (tx, mut signed) = tokio::sync::mpsc::unbounded_channel::<(u64, u128)>();
    tokio::spawn(async move {
        for round in 0..6 {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                continue;
            };
            let send = |m: &ServerMessage| Message::Text(encode_server(m).into());
            while let Some(Ok(Message::Text(text))) = ws.next().await {
                match decode_client(&text) {
                    Ok(ClientMessage::Open(v)) => {
                        let _ = tx.send((v.nonce, v.cumulative));
                        let mut session = session_of(per_thousandth());
                        if let ServerMessage::Session {
                            nonce,
                            cumulative,
                            consumed,
                            ..
                        } = &mut session
                        {
                            (*nonce, *cumulative) = (v.nonce, v.cumulative);
                            // After the first round: "all of it was consumed before".
                            *consumed = if round == 0 { 0 } else { v.cumulative };
                        }
                        let ask = ServerMessage::NeedVoucher {
                            consumed: v.cumulative,
                            cumulative: v.cumulative,
                            suggested: v.cumulative + 2,
                            deadline_ms: 30_000,
                        };
                        let _ = ws.send(send(&session)).await;
                        let _ = ws.send(send(&ask)).await;
                        // Then the connection drops.
                        break;
                    }
                    Ok(ClientMessage::Voucher(v)) => {
                        let _ = tx.send((v.nonce, v.cumulative));
                    }
                    Ok(ClientMessage::Resume { .. }) => {
                        let refused = ServerMessage::Error {
                            code: "bad_resume_token".into(),
                            message: "unknown session".into(),
                            retriable: false,
                            data: None,
                        };
                        let _ = ws.send(send(&refused)).await;
                        break;
                    }
                    _ => {}
                }
            }
        }
    });
    challenge.accepts[0].extra.ws_endpoint = url;
    let mut policy = policy(stack.chain_id);
    policy.max_credit_window = 2;
    let client = payer(&stack, policy).await;
    let mut session = client
        .start(&challenge, B256::repeat_byte(7), 1_000)
        .await
        .unwrap();
    session.set_reconnect(paystream::client::Reconnect {
        first_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(50),
        max_wait: Duration::from_secs(30),
        max_attempts: 12,
    });
    // The client follows the server through its drops, refused resumes and re-opens, until
    // it stops believing it or gives up.
    let outcome = loop {
        match tokio::time::timeout(Duration::from_secs(60), session.next())
            .await
            .expect("the client ends one way or another")
        {
            Ok(Some(_)) => continue,
            other => break other,
        }
    };
    let mut vouchers = Vec::new();
    while let Ok(v) = signed.try_recv() {
        vouchers.push(v);
    }
    assert!(
        vouchers.len() >= 2,
        "the client re-opened at least once: {vouchers:?}"
    );
    assert!(
        vouchers.iter().all(|(_, cumulative)| *cumulative <= 2),
        "nothing was delivered: the client signs no credit beyond its first window: {vouchers:?} ({outcome:?})"
    );
}

/// What a fake upstream does.
#[derive(Clone, Copy)]
enum Upstream {
    /// Streams this many content deltas, then `[DONE]`.
    Completes(usize),
    /// Streams this many, then breaks the connection.
    Crashes(usize),
    /// Refuses the request with a 500.
    Refuses,
}

/// A fake OpenAI-compatible upstream behaving as `mode` says.
async fn fake_upstream(mode: Upstream) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| async move {
                    let tokens = match mode {
                        Upstream::Completes(n) | Upstream::Crashes(n) => n,
                        Upstream::Refuses => 0,
                    };
                    let mut frames: Vec<Result<Frame<Bytes>, std::io::Error>> = (0..tokens)
                        .map(|i| {
                            let chunk = serde_json::json!({ "choices": [{ "delta": { "content": format!("t{i} ") } }] });
                            Ok(Frame::data(Bytes::from(format!("data: {chunk}\n\n"))))
                        })
                        .collect();
                    frames.insert(0, Ok(Frame::data(Bytes::from(": keep-alive\n\ndata: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n"))));
                    if let Upstream::Crashes(_) = mode {
                        frames.push(Err(std::io::Error::other("upstream crashed")));
                    } else {
                        frames.push(Ok(Frame::data(Bytes::from("data: [DONE]\n\n"))));
                    }
                    let body = StreamBody::new(futures_util::stream::iter(frames));
                    let status = match mode {
                        Upstream::Refuses => 500,
                        _ => 200,
                    };
                    let response = hyper::Response::builder()
                        .status(status)
                        .header("content-type", "text/event-stream")
                        .body(body)
                        .unwrap();
                    Ok::<_, Infallible>(response)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    url
}

/// What a client saw of a request to an upstream: tokens, the errors' codes, the `end`, and
/// the receipt after closing.
struct Upstreamed {
    tokens: usize,
    errors: Vec<String>,
    end: (Option<u64>, String),
    receipt: paystream::client::Receipt,
}

async fn pay_upstream(base_url: String) -> Upstreamed {
    let mut options = Options::new(r#"{"perMessage":{"amount":"3","per":"1000"}}"#);
    options.resource = Some(Arc::new(OpenAiUpstream {
        base_url,
        model: "fake".into(),
        api_key: None,
        timeout: Duration::from_secs(10),
    }));
    let stack = Stack::start(options).await;
    let challenge = fetch_challenge(&format!("{}/tokens", stack.url))
        .await
        .unwrap();
    let client = payer(
        &stack,
        Policy {
            max_per_message: Some(Price {
                amount: 1,
                per: 100,
            }),
            ..policy(stack.chain_id)
        },
    )
    .await;
    let mut session = client
        .start(&challenge, B256::repeat_byte(4), 1_000)
        .await
        .unwrap();
    session
        .request(serde_json::json!({ "prompt": "hello" }))
        .await
        .unwrap();
    // Every way the stream ends is a message: read until `end`.
    let mut tokens = 0;
    let mut errors = Vec::new();
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(30), session.next())
            .await
            .expect("the stream ends with a message")
        {
            Ok(Some(Event::App { data, .. })) => {
                assert_eq!(data["token"], format!("t{tokens} "));
                tokens += 1;
            }
            Ok(Some(Event::Error { code, .. })) => errors.push(code),
            Ok(Some(Event::End { seq, reason })) => break (seq, reason),
            Ok(Some(_)) => {}
            other => panic!("{other:?}"),
        }
    };
    Upstreamed {
        tokens,
        errors,
        end,
        receipt: session.close(false).await.unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_upstream_is_charged_per_delivered_token() {
    let got = pay_upstream(fake_upstream(Upstream::Completes(1_000)).await).await;
    assert_eq!(got.tokens, 1_000);
    assert_eq!(got.end, (Some(999), "completed".to_string()));
    assert!(got.errors.is_empty(), "{:?}", got.errors);
    assert_eq!(got.receipt.consumed, 3, "1,000 tokens at 0.003 = exactly 3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_failing_mid_stream_bills_only_what_was_delivered() {
    // The upstream emits 700 tokens and then breaks the connection; whatever of them reached
    // the client (the break can lose the last few in transit) is what is billed, exactly, and
    // the client is told: `error {upstream_failed}`, `end {upstream_failed}` (it used to hear
    // nothing, and waited on silence).
    let got = pay_upstream(fake_upstream(Upstream::Crashes(700)).await).await;
    assert!((600..=700).contains(&got.tokens), "{}", got.tokens);
    assert_eq!(got.errors, ["upstream_failed"]);
    assert_eq!(
        got.end,
        (Some(got.tokens as u64 - 1), "upstream_failed".to_string())
    );
    assert_eq!(
        got.receipt.consumed,
        (got.tokens as u128 * 3).div_ceil(1000)
    );
    assert_eq!(got.receipt.settled, got.receipt.consumed);
}

/// An upstream that refuses the request, or cannot be reached: `upstream_failed` with what
/// went wrong, an `end` with no unit, and nothing billed for the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_or_unreachable_upstream_says_so() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    for base_url in [fake_upstream(Upstream::Refuses).await, closed] {
        let got = pay_upstream(base_url).await;
        assert_eq!(got.tokens, 0);
        assert_eq!(got.errors, ["upstream_failed"]);
        assert_eq!(got.end, (None, "upstream_failed".to_string()));
        assert_eq!(
            got.receipt.consumed, 0,
            "nothing was delivered, nothing is billed"
        );
    }
}
