//! Sessions that outlive their process (issue 11): `paystream serve` processes on one real
//! redis-server and a real anvil, SIGKILLed, restarted, frozen (SIGSTOP) and thawed by PID, with
//! paying clients that reconnect by themselves.
//!
//! - A crash: 50 paid streams on one server, SIGKILLed mid-stream and started again on the same
//!   Redis; every client resumes within its window, every acknowledged voucher is in Redis, no
//!   client gets more than it paid for beyond what the crash forgot, and the final claims are
//!   the ceilings of what was consumed, short of what was delivered by at most the bound
//!   docs/STORE.md states.
//! - A failover: two servers behind a balancer; the first is SIGKILLed and its clients resume on
//!   the second.
//! - Fencing: a frozen lease holder whose channel moved to another server delivers nothing once
//!   thawed, and its writes are refused.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256};
use common::anvil::dev_signer;
use common::serve::{Balancer, Fleet, free_port};
use common::stack::{Client, payer_key};
use paystream::chain::Channels;
use paystream::chain::rpc::RpcBackend;
use paystream::channel::ChannelDomain;
use paystream::client::{Event, PaySession, Payer, Policy, fetch_challenge};
use paystream::meter::Price;
use paystream::protocol::{ClientMessage, ServerMessage};
use paystream::store::ChannelStore;
use paystream::store::redis::RedisStore;
use tokio::sync::mpsc;

/// Tokens a second each stream gets (the fleet's token generator).
const RATE: u64 = 40;
/// The servers save consumption every 500 ms here.
const USAGE_INTERVAL_MS: u64 = 500;
/// Units the server delivers back to back before it looks at its timers (`BATCH_UNITS`).
const BATCH_UNITS: u64 = 32;

/// Short leases and intervals, so that a test takes seconds.
const FAST: &str = r#"
[session]
credit_window = "40"
heartbeat_ms = 1000
usage_interval_ms = 500
resume_window_secs = 60
[limits]
lease_ttl_ms = 1500
max_connections = 256
"#;

fn policy(chain_id: u64, payee: Address) -> Policy {
    Policy {
        max_per_message: Some(Price { amount: 1, per: 1 }),
        max_per_second: None,
        max_per_byte_out: None,
        max_per_byte_in: None,
        max_total: 10_000,
        max_credit_window: 40,
        allowed_payees: vec![payee],
        allowed_chains: vec![chain_id],
    }
}

/// How one paying client's stream went.
struct Outcome {
    channel: B256,
    tokens: u64,
    resumed: bool,
    reconnects: u64,
    interrupted: u32,
    acked: (u64, u128),
    receipt: paystream::client::Receipt,
}

/// Streams `total` tokens, asking again for the rest after an interruption; signals `progress`
/// once `signal_after` tokens arrived, and keeps `acked` at the last acknowledged nonce.
async fn stream(
    mut session: PaySession,
    total: u64,
    signal_after: u64,
    progress: mpsc::Sender<()>,
    acked: Arc<AtomicU64>,
) -> Outcome {
    let channel = session.channel_id();
    session
        .request(serde_json::json!({ "maxTokens": total }))
        .await
        .unwrap();
    let (mut tokens, mut resumed, mut interrupted) = (0u64, false, 0u32);
    loop {
        let event = session
            .next()
            .await
            .unwrap_or_else(|e| panic!("{channel}: {e}"));
        acked.store(session.acknowledged().0, Ordering::SeqCst);
        match event {
            Some(Event::App { .. }) => {
                tokens += 1;
                if tokens == signal_after {
                    let _ = progress.send(()).await;
                }
            }
            Some(Event::Reconnected { resumed: r, .. }) => resumed |= r,
            Some(Event::End { reason, .. }) if reason == "interrupted" => {
                interrupted += 1;
                if tokens >= total {
                    break;
                }
                // The cut request is not replayed: the rest is a new request.
                session
                    .request(serde_json::json!({ "maxTokens": total - tokens }))
                    .await
                    .unwrap();
            }
            Some(Event::End { .. }) => break,
            Some(_) => {}
            None => panic!("{channel}: the stream ended without its end"),
        }
    }
    let acked = session.acknowledged();
    let reconnects = session.reconnects();
    let receipt = session.close(false).await.unwrap();
    Outcome {
        channel,
        tokens,
        resumed,
        reconnects,
        interrupted,
        acked,
        receipt,
    }
}

/// Opens `n` channels (one payer, salts from `salt0`) and their sessions at `url`.
async fn sessions(fleet: &Fleet, url: &str, n: usize, salt0: u8) -> Vec<PaySession> {
    let chain = Channels::at(
        RpcBackend::connect(&fleet.anvil.url, dev_signer(1))
            .await
            .unwrap(),
        fleet.contract,
    );
    let payer = Payer::new(chain, payer_key(), policy(fleet.chain_id, fleet.payee()));
    let challenge = fetch_challenge(&format!("{url}/tokens")).await.unwrap();
    let mut out = Vec::new();
    for i in 0..n {
        let salt = B256::left_padding_from(&[salt0, i as u8]);
        out.push(payer.start(&challenge, salt, 2_000).await.unwrap());
    }
    out
}

/// The most a crash can forget of a stream's consumption here (docs/STORE.md): what was
/// delivered since the last save, one usage interval at the stream's rate, plus the units of
/// one delivery batch (the timer is looked at between batches).
fn forget_bound() -> u128 {
    u128::from(RATE * USAGE_INTERVAL_MS / 1_000 + BATCH_UNITS)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_paid_streams_survive_their_server_being_killed_and_restarted() {
    const STREAMS: usize = 50;
    const TOTAL: u64 = 200;
    let fleet = Fleet::start().await;
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut server = fleet.serve(port, &url, FAST);
    let (progress_tx, mut progress) = mpsc::channel(STREAMS);
    let mut acked = Vec::new();
    let mut tasks = Vec::new();
    for session in sessions(&fleet, &url, STREAMS, 1).await {
        let a = Arc::new(AtomicU64::new(0));
        acked.push((session.channel_id(), a.clone()));
        tasks.push(tokio::spawn(stream(
            session,
            TOTAL,
            RATE,
            progress_tx.clone(),
            a,
        )));
    }
    // Mid-stream: every client has a second of tokens; then the server dies at once.
    for _ in 0..STREAMS {
        progress.recv().await.unwrap();
    }
    server.kill();
    // Every voucher acknowledged before the kill is in Redis.
    let store = RedisStore::connect(&fleet.redis.url, "ps:").await.unwrap();
    for (channel, nonce) in &acked {
        let stored = store.load(*channel).await.unwrap().unwrap();
        let seen = nonce.load(Ordering::SeqCst);
        assert!(
            stored.voucher.nonce >= seen,
            "{channel}: acknowledged nonce {seen}, stored {}",
            stored.voucher.nonce
        );
    }
    // Started again on the same Redis and port: the clients come back by themselves.
    let restarted = Instant::now();
    let server = fleet.serve(port, &url, FAST);
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(
            tokio::time::timeout(Duration::from_secs(120), task)
                .await
                .expect("every stream ends")
                .unwrap(),
        );
    }
    let took = restarted.elapsed();
    for o in &outcomes {
        let c = o.channel;
        assert!(o.resumed, "{c}: resumed with its token");
        assert!(o.reconnects >= 1, "{c}");
        assert_eq!(o.interrupted, 1, "{c}: the cut request ended `interrupted`");
        assert_eq!(o.tokens, TOTAL, "{c}: the rest came as a new request");
        let received = u128::from(o.tokens); // one base unit a token
        let r = o.receipt;
        // Nothing beyond what the client signed is claimed, nor beyond what it received.
        assert!(
            r.settled <= r.cumulative && r.settled <= received,
            "{c}: {r:?}"
        );
        assert_eq!(r.settled, r.consumed.min(r.cumulative), "{c}: {r:?}");
        // What the crash forgot is the client's, and bounded.
        let forgotten = received - r.consumed;
        assert!(
            forgotten <= forget_bound(),
            "{c}: forgot {forgotten} > {}",
            forget_bound()
        );
        // Units beyond the signed credit: only what the crash forgot.
        assert!(
            received <= o.acked.1 + forgotten,
            "{c}: received {received}, acknowledged {:?}",
            o.acked
        );
        // Every acknowledged voucher is stored; the claim queued is the receipt's.
        let stored = store.load(c).await.unwrap().unwrap();
        assert!(stored.voucher.nonce >= o.acked.0, "{c}");
        assert_eq!(stored.consumed.ceil(), r.consumed, "{c}");
    }
    let forgotten: Vec<u128> = outcomes
        .iter()
        .map(|o| u128::from(o.tokens) - o.receipt.consumed)
        .collect();
    eprintln!(
        "{STREAMS} streams resumed {:.1} s after the restart; forgotten per stream: max {}, total {}",
        took.as_secs_f64(),
        forgotten.iter().max().unwrap(),
        forgotten.iter().sum::<u128>()
    );
    assert_eq!(
        server
            .metric("paystream_sessions_resumed_total{from=\"remote\"}")
            .await,
        STREAMS as u64,
        "every session was taken over from the killed process"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_killed_server_resume_on_the_other_one() {
    const STREAMS: usize = 10;
    const TOTAL: u64 = 120;
    let fleet = Fleet::start().await;
    let (pa, pb) = (free_port(), free_port());
    let lb = Balancer::start(vec![pa, pb]).await;
    let mut a = fleet.serve(pa, &lb.url, FAST);
    let b = fleet.serve(pb, &lb.url, FAST);
    let (progress_tx, mut progress) = mpsc::channel(STREAMS);
    let mut tasks = Vec::new();
    for session in sessions(&fleet, &lb.url, STREAMS, 2).await {
        tasks.push(tokio::spawn(stream(
            session,
            TOTAL,
            RATE / 2,
            progress_tx.clone(),
            Arc::default(),
        )));
    }
    for _ in 0..STREAMS {
        progress.recv().await.unwrap();
    }
    assert_eq!(a.metric("paystream_sessions_active").await, STREAMS as u64);
    assert_eq!(b.metric("paystream_sessions_active").await, 0);
    a.kill();
    for task in tasks {
        let o = tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .expect("every stream ends")
            .unwrap();
        assert!(o.resumed && o.interrupted == 1 && o.tokens == TOTAL);
        assert!(u128::from(o.tokens) - o.receipt.consumed <= forget_bound());
    }
    assert_eq!(
        b.metric("paystream_sessions_resumed_total{from=\"remote\"}")
            .await,
        STREAMS as u64
    );
    assert_eq!(
        b.metric("paystream_leases_taken_over_total").await,
        STREAMS as u64
    );
}

/// Reads a client's frames in the background, each with the instant it arrived, until the
/// server closes.
async fn record(mut client: Client) -> (Vec<(Instant, ServerMessage)>, Option<u16>) {
    let mut seen = Vec::new();
    while let Some(m) = client.recv().await {
        seen.push((Instant::now(), m));
    }
    (seen, client.close_code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_lease_holder_is_fenced_once_its_channel_moved_on() {
    let fleet = Fleet::start().await;
    let (pa, pb) = (free_port(), free_port());
    let a = fleet.serve(pa, &format!("http://127.0.0.1:{pa}"), FAST);
    let b = fleet.serve(pb, &format!("http://127.0.0.1:{pb}"), FAST);
    let chain = Channels::at(
        RpcBackend::connect(&fleet.anvil.url, dev_signer(1))
            .await
            .unwrap(),
        fleet.contract,
    );
    let channel = chain
        .open(
            fleet.payee(),
            Address::ZERO,
            B256::repeat_byte(3),
            10_000,
            3_600,
        )
        .await
        .unwrap()
        .0;
    let domain = ChannelDomain::new(fleet.chain_id, fleet.contract);
    // A session on A, streaming.
    let mut on_a = Client::connect(&a.url, domain, channel).await;
    let ServerMessage::Session { resume_token, .. } = on_a.open(1, 1_000).await else {
        panic!("no session");
    };
    on_a.send(&ClientMessage::Request {
        body: serde_json::json!({ "maxTokens": 1_000 }),
    })
    .await;
    on_a.recv_until(|m| matches!(m, ServerMessage::App { seq: 20, .. }))
        .await;
    let on_a = tokio::spawn(record(on_a));

    // A freezes with the lease; the session is resumed on B once the lease lapses.
    let frozen = Instant::now();
    a.freeze();
    let mut busy = 0;
    let (taken, mut on_b) = loop {
        // A connection per attempt, as the client library does.
        let mut on_b = Client::connect(&b.url, domain, channel).await;
        on_b.send(&ClientMessage::Resume {
            token: resume_token.clone(),
        })
        .await;
        let m = on_b
            .recv_until(|m| {
                matches!(
                    m,
                    ServerMessage::Session { .. } | ServerMessage::Error { .. }
                )
            })
            .await
            .pop()
            .unwrap();
        match m {
            ServerMessage::Session { .. } => break (Instant::now(), on_b),
            ServerMessage::Error { code, .. } if code == "channel_busy" => {
                busy += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("{other:?}"),
        }
    };
    assert!(busy > 0, "B waited for A's lease");
    assert!(
        taken.duration_since(frozen) >= Duration::from_millis(1_000),
        "not before the lease (1.5 s, renewed every 0.5 s) could lapse"
    );
    on_b.send(&ClientMessage::Request {
        body: serde_json::json!({ "maxTokens": 20 }),
    })
    .await;
    on_b.recv_until(|m| matches!(m, ServerMessage::End { .. }))
        .await;

    // A wakes up: it delivers nothing more, learns the channel is gone, and what it tries to
    // write is refused.
    let thawed = Instant::now();
    a.thaw();
    let (seen, code) = tokio::time::timeout(Duration::from_secs(30), on_a)
        .await
        .expect("A lets the session go")
        .unwrap();
    let late: Vec<_> = seen
        .iter()
        .filter(|(at, m)| *at > thawed && matches!(m, ServerMessage::App { .. }))
        .collect();
    assert!(late.is_empty(), "A delivered after thawing: {late:?}");
    assert!(
        seen.iter().any(
            |(_, m)| matches!(m, ServerMessage::Error { code, .. } if code == "session_superseded")
        ),
        "{seen:?}"
    );
    assert_eq!(code, Some(4409));
    assert!(a.wait_metric("paystream_fencing_refusals_total", 1).await >= 1);
    assert_eq!(a.metric("paystream_leases_lost_total").await, 1);
    // B's session goes on: its voucher is stored and acknowledged.
    let v = on_b.voucher(2, 2_000);
    on_b.send(&ClientMessage::Voucher(v)).await;
    on_b.recv_until(|m| matches!(m, ServerMessage::VoucherAck { nonce: 2, .. }))
        .await;
    drop(b);
}

/// The same guarantee when the lease holder is not frozen but cut off from Redis: it stops
/// delivering at its lease's deadline, the session moves to another server, and when Redis is
/// reachable again the first holder's store probe does not let it deliver again (it waits for a
/// lease renewal, which finds the lease lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_cut_off_from_redis_never_delivers_beside_the_new_one() {
    let fleet = Fleet::start().await;
    let redis_addr: std::net::SocketAddr = fleet
        .redis
        .url
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let proxy = common::faults::Proxy::start(redis_addr).await;
    let (pa, pb) = (free_port(), free_port());
    let a = fleet.serve_on(
        pa,
        &format!("http://127.0.0.1:{pa}"),
        &format!("redis://{}/", proxy.addr),
        FAST,
    );
    let b = fleet.serve(pb, &format!("http://127.0.0.1:{pb}"), FAST);
    let chain = Channels::at(
        RpcBackend::connect(&fleet.anvil.url, dev_signer(1))
            .await
            .unwrap(),
        fleet.contract,
    );
    let channel = chain
        .open(
            fleet.payee(),
            Address::ZERO,
            B256::repeat_byte(4),
            10_000,
            3_600,
        )
        .await
        .unwrap()
        .0;
    let domain = ChannelDomain::new(fleet.chain_id, fleet.contract);
    let mut on_a = Client::connect(&a.url, domain, channel).await;
    let ServerMessage::Session { resume_token, .. } = on_a.open(1, 1_000).await else {
        panic!("no session");
    };
    on_a.send(&ClientMessage::Request {
        body: serde_json::json!({ "maxTokens": 1_000 }),
    })
    .await;
    on_a.recv_until(|m| matches!(m, ServerMessage::App { seq: 10, .. }))
        .await;

    // A loses Redis: a voucher it cannot store pauses it for the store (probed every second),
    // and its lease renewals fail.
    proxy.set(common::faults::Mode::Refuse).await;
    let v = on_a.voucher(2, 2_000);
    on_a.send(&ClientMessage::Voucher(v)).await;
    let on_a = tokio::spawn(record(on_a));

    // B takes the session once A's lease has lapsed in Redis.
    let (taken, mut on_b) = loop {
        let mut c = Client::connect(&b.url, domain, channel).await;
        c.send(&ClientMessage::Resume {
            token: resume_token.clone(),
        })
        .await;
        let m = c
            .recv_until(|m| {
                matches!(
                    m,
                    ServerMessage::Session { .. } | ServerMessage::Error { .. }
                )
            })
            .await
            .pop()
            .unwrap();
        match m {
            ServerMessage::Session { .. } => break (Instant::now(), c),
            ServerMessage::Error { code, .. } if code == "channel_busy" => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("{other:?}"),
        }
    };
    on_b.send(&ClientMessage::Request {
        body: serde_json::json!({ "maxTokens": 40 }),
    })
    .await;
    on_b.recv_until(|m| matches!(m, ServerMessage::App { .. }))
        .await;

    // Redis is back for A: its probe answers, but only a lease renewal could let it deliver,
    // and the renewal finds the lease lost.
    proxy.set(common::faults::Mode::Forward).await;
    on_b.recv_until(|m| matches!(m, ServerMessage::End { .. }))
        .await;
    let (seen, code) = tokio::time::timeout(Duration::from_secs(30), on_a)
        .await
        .expect("A lets the session go")
        .unwrap();
    let late: Vec<_> = seen
        .iter()
        .filter(|(at, m)| *at >= taken && matches!(m, ServerMessage::App { .. }))
        .collect();
    assert!(
        late.is_empty(),
        "A delivered after B took the session: {late:?}"
    );
    assert!(
        seen.iter().any(
            |(_, m)| matches!(m, ServerMessage::Error { code, .. } if code == "session_superseded")
        ),
        "{:?}",
        seen.iter().map(|(_, m)| m).collect::<Vec<_>>()
    );
    assert_eq!(code, Some(4409));
    assert_eq!(a.wait_metric("paystream_leases_lost_total", 1).await, 1);
}
