//! The server end to end on 127.0.0.1, against a real anvil with the contract deployed and a
//! real redis-server: paid streams under each kind of tariff, the 402 challenge, and a client
//! that stops paying.

mod common;

use common::stack::{ETH, Options, Stack, payee};
use paystream::protocol::{ClientMessage, PaymentRequired, ServerMessage};
use paystream::store::ChannelStore;

/// What a client saw of a stream it paid for promptly.
#[derive(Debug, Default)]
struct Paid {
    messages: u64,
    bytes: u64,
    vouchers: u64,
    paused: u64,
    receipt: Option<(u128, u128, u128, u128)>,
    close: Option<u16>,
}

/// Opens a session, requests `tokens` tokens, answers every `need_voucher` at once, closes after
/// the last token and returns what it saw.
async fn pay_for_stream(
    stack: &Stack,
    salt: u8,
    deposit: u128,
    window: u128,
    tokens: u64,
) -> (Paid, alloy::primitives::B256) {
    pay_for_stream_capped(stack, salt, deposit, window, tokens, u128::MAX).await
}

/// As [`pay_for_stream`], signing at most the consumption plus `cap` (a client's policy window).
async fn pay_for_stream_capped(
    stack: &Stack,
    salt: u8,
    deposit: u128,
    window: u128,
    tokens: u64,
    cap: u128,
) -> (Paid, alloy::primitives::B256) {
    let id = stack.open_channel(payee(), salt, deposit).await;
    let mut c = stack.client(id).await;
    let opened = c.open(1, window).await;
    assert!(
        matches!(opened, ServerMessage::Session { .. }),
        "{opened:?}"
    );
    c.send(&ClientMessage::Request {
        body: serde_json::json!({ "maxTokens": tokens }),
    })
    .await;
    let mut nonce = 1;
    let mut seen = Paid::default();
    while let Some(m) = c.recv().await {
        match m {
            ServerMessage::App { seq, data } => {
                assert_eq!(seq, seen.messages, "in order, none skipped");
                let frame = paystream::protocol::encode_server(&ServerMessage::App { seq, data });
                seen.bytes += frame.len() as u64;
                seen.messages += 1;
                if seen.messages == tokens {
                    c.send(&ClientMessage::Close {
                        close_channel: false,
                    })
                    .await;
                }
            }
            ServerMessage::NeedVoucher {
                suggested,
                consumed,
                ..
            } => {
                nonce += 1;
                seen.vouchers += 1;
                let v = c.voucher(nonce, suggested.min(consumed.saturating_add(cap)));
                c.send(&ClientMessage::Voucher(v)).await;
            }
            ServerMessage::Paused { .. } => seen.paused += 1,
            ServerMessage::Receipt {
                consumed,
                settled_amount,
                refund,
                cumulative,
                ..
            } => {
                seen.receipt = Some((consumed, settled_amount, refund, cumulative));
            }
            ServerMessage::Error { code, message, .. } => {
                panic!("unexpected error {code}: {message}")
            }
            _ => {}
        }
    }
    seen.close = c.close_code;
    (seen, id)
}

async fn queued_claim(stack: &Stack, id: alloy::primitives::B256) -> u128 {
    let claims = stack.state.store.pending_claims(100).await.unwrap();
    claims
        .iter()
        .find(|c| c.channel_id == id)
        .expect("the final claim is queued")
        .amount
}

/// A token stream at 500 tokens per second: fast, but a steady rate, as a served model is.
fn streaming(tariff: &str) -> Options {
    let mut options = Options::new(tariff);
    options.tokens_per_sec = 500;
    options
}

fn ceil_div(n: u128, d: u128) -> u128 {
    n.div_ceil(d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_message_stream_settles_the_exact_ceiling() {
    // 0.7 base units per token.
    let stack = Stack::start(streaming(r#"{"perMessage":{"amount":"7","per":"10"}}"#)).await;
    let deposit = ETH;
    let (seen, id) = pay_for_stream(&stack, 1, deposit, 50, 300).await;
    assert_eq!(seen.messages, 300);
    assert_eq!(seen.paused, 0, "a prompt client is never paused");
    assert!(seen.vouchers >= 1, "credit was extended while streaming");
    let (consumed, settled, refund, cumulative) = seen.receipt.expect("a receipt");
    assert_eq!(consumed, ceil_div(300 * 7, 10));
    assert_eq!(settled, consumed);
    assert!(settled <= cumulative);
    assert_eq!(refund, deposit - settled);
    assert_eq!(queued_claim(&stack, id).await, settled);
    assert_eq!(seen.close, Some(1000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_byte_stream_settles_the_exact_ceiling() {
    // 3 base units per 7 bytes out.
    let stack = Stack::start(streaming(r#"{"perByteOut":{"amount":"3","per":"7"}}"#)).await;
    let (seen, id) = pay_for_stream(&stack, 2, ETH, 400, 250).await;
    assert_eq!(seen.messages, 250);
    assert_eq!(seen.paused, 0);
    let (consumed, settled, refund, _) = seen.receipt.unwrap();
    assert_eq!(
        consumed,
        ceil_div(u128::from(seen.bytes) * 3, 7),
        "every byte the client received, exactly"
    );
    assert_eq!((settled, refund), (consumed, ETH - consumed));
    assert_eq!(queued_claim(&stack, id).await, settled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_second_stream_charges_connected_time() {
    // 1,000 base units per second; 100 tokens at 100 per second: about one second.
    let mut options = Options::new(r#"{"perSecond":{"amount":"1000","per":"1"}}"#);
    options.tokens_per_sec = 100;
    let stack = Stack::start(options).await;
    let started = std::time::Instant::now();
    let (seen, id) = pay_for_stream(&stack, 3, ETH, 600, 100).await;
    let wall = started.elapsed().as_nanos();
    assert_eq!(seen.messages, 100);
    assert_eq!(seen.paused, 0);
    let (consumed, settled, refund, cumulative) = seen.receipt.unwrap();
    // At least the ~0.99 s the tokens took, at most the whole wall time of the test.
    assert!(consumed >= 900, "{consumed}");
    assert!(
        consumed <= ceil_div(wall * 1000, 1_000_000_000),
        "{consumed} for {wall} ns"
    );
    assert!(settled <= cumulative);
    assert_eq!((settled, refund), (consumed, ETH - consumed));
    assert_eq!(queued_claim(&stack, id).await, settled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_stream_settles_within_the_accepted_cumulative() {
    let options = streaming(
        r#"{"perMessage":{"amount":"1","per":"3"},"perSecond":{"amount":"100","per":"1"},"perByteOut":{"amount":"1","per":"10"},"perByteIn":{"amount":"1","per":"1"}}"#,
    );
    let stack = Stack::start(options).await;
    let (seen, id) = pay_for_stream(&stack, 4, ETH, 300, 200).await;
    assert_eq!(seen.messages, 200);
    assert_eq!(seen.paused, 0);
    let (consumed, settled, refund, cumulative) = seen.receipt.unwrap();
    // Messages and bytes are known exactly to the client; time adds to them.
    let request = serde_json::to_vec(&serde_json::json!({ "maxTokens": 200 }))
        .unwrap()
        .len() as u128;
    let floor = (200 * 10 + u128::from(seen.bytes) * 3 + request * 30) / 30;
    assert!(consumed >= floor, "{consumed} < {floor}");
    assert!(settled <= cumulative);
    assert_eq!((settled, refund), (consumed, ETH - consumed));
    assert_eq!(queued_claim(&stack, id).await, settled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_402_challenge_is_an_x402_v2_payment_required() {
    let stack = Stack::start(Options::new(
        r#"{"perMessage":{"amount":"3","per":"1000"}}"#,
    ))
    .await;
    for path in ["/tokens", "/ws/tokens"] {
        let response = reqwest_get(&format!("{}{path}", stack.url)).await;
        assert_eq!(response.0, 402);
        let header = response.1.expect("PAYMENT-REQUIRED header");
        let from_header = PaymentRequired::from_header(&header).unwrap();
        let from_body: PaymentRequired = serde_json::from_str(&response.2).unwrap();
        assert_eq!(from_header, from_body, "header and body identical");
        let body: serde_json::Value = serde_json::from_str(&response.2).unwrap();
        assert_eq!(body["x402Version"], 2);
        let accept = from_body.channel_stream().expect("channel-stream offered");
        assert_eq!(accept.network, format!("eip155:{}", stack.chain_id));
        assert_eq!(accept.pay_to, payee());
        assert_eq!(accept.extra.contract, stack.contract);
        assert_eq!(
            accept.extra.ws_endpoint,
            format!("{}/ws/tokens", stack.url.replacen("http", "ws", 1))
        );
        assert_eq!(accept.extra.tariff.per_message.unwrap().per, 1000);
    }
    assert_eq!(reqwest_get(&format!("{}/nothing", stack.url)).await.0, 404);
    let health = reqwest_get(&format!("{}/healthz", stack.url)).await;
    assert_eq!(health.0, 200);
    let metrics = reqwest_get(&format!("{}/metrics", stack.url)).await;
    assert!(metrics.2.contains("paystream_sessions_active"));
}

/// (status, PAYMENT-REQUIRED header, body) over a plain TCP HTTP/1.1 request.
async fn reqwest_get(url: &str) -> (u16, Option<String>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap();
    let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let header = head.lines().find_map(|l| {
        l.split_once(':')
            .filter(|(k, _)| k.eq_ignore_ascii_case("payment-required"))
            .map(|(_, v)| v.trim().to_string())
    });
    (status, header, body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_paying_gets_nothing_unpaid() {
    let mut options = Options::new(r#"{"perMessage":{"amount":"1","per":"1"}}"#);
    options.params = Box::new(|p| p.voucher_deadline_ms = 1_000);
    let stack = Stack::start(options).await;
    let id = stack.open_channel(payee(), 9, ETH).await;
    let mut c = stack.client(id).await;
    c.opened(1, 25).await;
    c.send(&ClientMessage::Request {
        body: serde_json::json!({ "maxTokens": 1000 }),
    })
    .await;
    let (seen, code) = c.drain().await;
    let delivered = seen
        .iter()
        .filter(|m| matches!(m, ServerMessage::App { .. }))
        .count();
    assert_eq!(
        delivered, 25,
        "exactly what the accepted cumulative pays for"
    );
    assert!(
        seen.iter()
            .any(|m| matches!(m, ServerMessage::NeedVoucher { .. }))
    );
    assert!(
        seen.iter()
            .any(|m| matches!(m, ServerMessage::Paused { reason } if reason == "credit_exhausted"))
    );
    assert_eq!(code, Some(4408), "closed at the voucher deadline");
    assert_eq!(
        stack.state.store.pending_claims(10).await.unwrap()[0].amount,
        25
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unthrottled_stream_keeps_flowing_through_voucher_round_trips() {
    // As fast as the socket allows: the session must keep asking and the client keep paying,
    // with no stall, over many credit windows (the client signs at most 5,000 ahead, as a
    // client's policy window would have it; the server's suggestion covers a second of the
    // measured rate, which is the whole stream here).
    let stack = Stack::start(Options::new(r#"{"perMessage":{"amount":"1","per":"1"}}"#)).await;
    let (seen, _) = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        pay_for_stream_capped(&stack, 5, ETH, 1_000, 20_000, 5_000),
    )
    .await
    .expect("the stream completes");
    assert_eq!(seen.messages, 20_000);
    assert!(seen.vouchers >= 4, "{}", seen.vouchers);
    let (consumed, settled, _, _) = seen.receipt.unwrap();
    assert_eq!((consumed, settled), (20_000, 20_000));
}

/// Large binary units, as fast as the socket takes them.
struct Blobs;

impl paystream::server::resource::Resource for Blobs {
    fn description(&self) -> String {
        "blobs".into()
    }

    fn start(
        &self,
        _request: serde_json::Value,
        tx: tokio::sync::mpsc::Sender<paystream::server::resource::Unit>,
    ) -> tokio::task::JoinHandle<paystream::server::resource::Ended> {
        use paystream::protocol::EndReason;
        use paystream::server::resource::Ended;
        tokio::spawn(async move {
            for _ in 0..BLOBS {
                let unit = paystream::server::resource::Unit::Binary(vec![7u8; BLOB_BYTES]);
                if tx.send(unit).await.is_err() {
                    return Ended::because(EndReason::Cancelled);
                }
            }
            Ended::because(EndReason::Completed)
        })
    }
}

const BLOBS: usize = 96;
const BLOB_BYTES: usize = 256 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_is_not_charged_for_the_time_it_blocks_delivery() {
    // 1,000,000 base units per second of delivery; 24 MiB of units is far more than the
    // socket buffers hold, so the server blocks on the socket while the client does not read.
    let mut options = Options::new(r#"{"perSecond":{"amount":"1000000","per":"1"}}"#);
    options.resource = Some(std::sync::Arc::new(Blobs));
    let stack = Stack::start(options).await;
    let id = stack.open_channel(payee(), 6, ETH).await;
    let mut c = stack.client(id).await;
    c.opened(1, ETH / 2).await;
    c.send(&ClientMessage::Request {
        body: serde_json::json!({}),
    })
    .await;
    let started = std::time::Instant::now();
    // The client stops reading for 3 s: this pause is the scenario under test.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let mut blobs = 0;
    while blobs < BLOBS {
        use futures_util::StreamExt;
        match c.ws.next().await {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(_))) => blobs += 1,
            Some(Ok(_)) => {}
            other => panic!("stream ended: {other:?}"),
        }
    }
    let wall = started.elapsed();
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
    // Charged time is consumed / 1e6 seconds. Without the backpressure pause it would be the
    // whole wall time (more than 3 s).
    let charged_ms = consumed / 1_000;
    assert!(wall.as_millis() >= 3_000);
    // At least two of the three seconds the client did not read went uncharged (slack for a
    // slow machine reading the 24 MiB afterwards).
    assert!(
        charged_ms + 2_000 < wall.as_millis(),
        "charged {charged_ms} ms of {} ms: blocked time was charged",
        wall.as_millis()
    );
}

/// An idle session's memory is mostly what its connection's task holds across its awaits: the
/// future is kept small (rare, large paths are boxed), and this budget keeps it so. tokio puts
/// 112 bytes around the future and rounds the task to 128 bytes; at 1,936 bytes of future the
/// task is 2,048 bytes, the allocator's 2 KiB size class (one byte more is its 2.5 KiB class).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_future_stays_within_its_memory_budget() {
    let stack = Stack::start(streaming(r#"{"perMessage":{"amount":"1","per":"1"}}"#)).await;
    let id = stack.open_channel(payee(), 31, 1_000).await;
    let mut c = stack.client(id).await;
    c.opened(1, 100).await;
    let bytes = common::stack::metric(&stack, "paystream_connection_future_bytes")
        .await
        .unwrap();
    eprintln!("a connection's future: {bytes} bytes");
    assert!(
        bytes <= 1_936,
        "{bytes} bytes: the task would be over 2,048 bytes (docs/SERVER.md, \"Memory of an idle session\")"
    );
}

/// Issue 13: every `open` read its channel from the node, so a burst of opens was a burst of
/// RPC calls (and of pooled connections). A channel the server saw opening in the contract's
/// events is served from that: here its session opens with the node gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_seen_opening_needs_no_read_of_the_node() {
    let mut stack = Stack::start(streaming(r#"{"perMessage":{"amount":"1","per":"1"}}"#)).await;
    let id = stack.open_channel(payee(), 41, 1_000).await;
    // The watcher has read the `Opened` event.
    common::stack::wait_for_metric(&stack, "paystream_chain_events_total", 1).await;
    stack.anvil.stop();
    let mut c = stack.client(id).await;
    let opened = c.open(1, 100).await;
    assert!(
        matches!(
            opened,
            ServerMessage::Session {
                nonce: 1,
                cumulative: 100,
                ..
            }
        ),
        "{opened:?}"
    );
}
