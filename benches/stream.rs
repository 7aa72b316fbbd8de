//! Paid-stream throughput over loopback against the same stream with no payment layer, measured
//! in the same run (`scripts/bench stream` prints the ratio).
//!
//! Both servers stream the same token generator (unthrottled) through the same bounded queue
//! and send the same `app` frames. The paid one adds everything PayStream does per message:
//! the session, the meter, the `need_voucher` check, and the voucher round trips the client
//! answers at once (one voucher per 10,000 messages). The chain is the in-process EVM and the
//! store is in memory: neither is on the per-message path, and keeping them in process keeps
//! the bench about the payment layer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256, U256};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures_util::{SinkExt, StreamExt};
use k256::ecdsa::SigningKey;
use paystream::chain::Channels;
use paystream::chain::evm::{EvmBackend, EvmNode};
use paystream::channel::{ChannelDomain, signature};
use paystream::meter::Tariff;
use paystream::protocol::{
    ClientMessage, ServerMessage, SignedStateMsg, decode_server, encode_client, encode_server,
};
use paystream::server::resource::{Resource, Resources, TokenGenerator, Unit};
use paystream::server::{self, ServerState};
use paystream::session::SessionParams;
use paystream::store::memory::MemoryStore;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio_tungstenite::tungstenite::Message;

const MESSAGES: u64 = 20_000;
const PAYER: [u8; 32] = [0x11; 32];
const PAYEE: [u8; 32] = [0x22; 32];

struct Paid {
    url: String,
    domain: ChannelDomain,
    channel: B256,
    nonce: u64,
}

async fn start_paid() -> Paid {
    let payer_key = SigningKey::from_slice(&PAYER).unwrap();
    let payee_key = SigningKey::from_slice(&PAYEE).unwrap();
    let payer = signature::address_of(payer_key.verifying_key());
    let payee = signature::address_of(payee_key.verifying_key());
    let node = EvmNode::default();
    node.fund(payer, U256::from(10u128.pow(24)));
    let contract: Channels<EvmBackend> = Channels::deploy(node.backend(payer)).await.unwrap();
    let (channel, _) = contract
        .open(payee, Address::ZERO, B256::ZERO, 10u128.pow(20), 3600)
        .await
        .unwrap();
    let domain = ChannelDomain::new(31337, contract.address());
    let params = SessionParams {
        max_vouchers_per_sec: 1_000,
        ..SessionParams::new(
            domain,
            payee,
            Address::ZERO,
            Tariff::from_json(
                r#"{"perMessage":{"amount":"1","per":"1"},"perByteOut":{"amount":"1","per":"1000"}}"#,
            )
            .unwrap(),
            10_000,
        )
    };
    let mut resources = Resources::new();
    let tokens: Arc<dyn Resource> = Arc::new(TokenGenerator {
        tokens_per_sec: 0,
        default_max_tokens: MESSAGES,
    });
    resources.insert("tokens".into(), tokens);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws/tokens", listener.local_addr().unwrap());
    let chain = contract.with_backend(node.backend(payee));
    let state = Arc::new(ServerState::new(
        params,
        chain,
        MemoryStore::new(),
        resources,
        Some(payee_key),
        "http://bench".into(),
    ));
    tokio::spawn(server::run(listener, state, std::future::pending()));
    Paid {
        url,
        domain,
        channel,
        nonce: 0,
    }
}

fn voucher(p: &mut Paid, cumulative: u128) -> SignedStateMsg {
    p.nonce += 1;
    let key = SigningKey::from_slice(&PAYER).unwrap();
    SignedStateMsg::sign(&p.domain, &key, p.channel, p.nonce, cumulative)
}

/// One paid session streaming `MESSAGES` tokens; returns the time from request to last token.
async fn paid_stream(p: &mut Paid) -> Duration {
    let (mut ws, _) = tokio_tungstenite::connect_async(&p.url).await.unwrap();
    // Each run is a new session on the same channel: the cumulative keeps growing.
    let start_credit = 20_000 + u128::from(p.nonce) * 1_000_000;
    let open = voucher(p, start_credit);
    ws.send(Message::Text(
        encode_client(&ClientMessage::Open(open)).into(),
    ))
    .await
    .unwrap();
    let started = loop {
        let t = match ws.next().await {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(_)) => continue,
            other => panic!("the connection ended before the session opened: {other:?}"),
        };
        match decode_server(&t).unwrap() {
            ServerMessage::Error { code, message, .. } => panic!("open refused: {code}: {message}"),
            ServerMessage::Session { .. } => {
                let body = serde_json::json!({ "maxTokens": MESSAGES });
                ws.send(Message::Text(
                    encode_client(&ClientMessage::Request { body }).into(),
                ))
                .await
                .unwrap();
                break Instant::now();
            }
            _ => {}
        }
    };
    let mut received = 0;
    while received < MESSAGES {
        let t = match ws.next().await {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(_)) => continue,
            _ => panic!("stream ended early"),
        };
        match decode_server(&t).unwrap() {
            ServerMessage::App { .. } => received += 1,
            ServerMessage::NeedVoucher { suggested, .. } => {
                let v = voucher(p, suggested.max(start_credit + 1));
                ws.send(Message::Text(
                    encode_client(&ClientMessage::Voucher(v)).into(),
                ))
                .await
                .unwrap();
            }
            ServerMessage::Error { code, message, .. } => panic!("{code}: {message}"),
            _ => {}
        }
    }
    let elapsed = started.elapsed();
    ws.send(Message::Text(
        encode_client(&ClientMessage::Close {
            close_channel: false,
        })
        .into(),
    ))
    .await
    .unwrap();
    // The session has ended once its receipt is out (or the connection is): only then is the
    // channel free for the next run's session (one live session per channel).
    while let Some(Ok(message)) = ws.next().await {
        if let Message::Text(t) = message
            && let Ok(ServerMessage::Receipt { .. }) = decode_server(&t)
        {
            break;
        }
    }
    elapsed
}

/// The same stream with no payment layer: the generator, the bounded queue, the same frames.
async fn start_unpaid() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
                let Some(Ok(Message::Text(_request))) = ws.next().await else {
                    return;
                };
                let (tx, mut rx) = tokio::sync::mpsc::channel(64);
                let generator = TokenGenerator {
                    tokens_per_sec: 0,
                    default_max_tokens: MESSAGES,
                };
                let producer = generator.start(serde_json::json!({ "maxTokens": MESSAGES }), tx);
                let mut seq = 0;
                while let Some(Unit::Json(data)) = rx.recv().await {
                    let frame = encode_server(&ServerMessage::App { seq, data });
                    seq += 1;
                    if ws.send(Message::Text(frame.into())).await.is_err() {
                        break;
                    }
                }
                producer.abort();
            });
        }
    });
    url
}

async fn unpaid_stream(url: &str) -> Duration {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(Message::Text("{}".into())).await.unwrap();
    let started = Instant::now();
    let mut received = 0;
    while received < MESSAGES {
        match ws.next().await {
            Some(Ok(Message::Text(_))) => received += 1,
            Some(Ok(_)) => {}
            _ => panic!("stream ended early"),
        }
    }
    started.elapsed()
}

fn streams(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let mut paid = rt.block_on(start_paid());
    let unpaid = rt.block_on(start_unpaid());
    let mut group = c.benchmark_group("stream_throughput");
    group.throughput(Throughput::Elements(MESSAGES));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));
    group.bench_function("unpaid", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| rt.block_on(unpaid_stream(&unpaid)))
                .sum()
        })
    });
    group.bench_function("paid", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| rt.block_on(paid_stream(&mut paid)))
                .sum()
        })
    });
    group.finish();
}

criterion_group!(benches, streams);
criterion_main!(benches);
