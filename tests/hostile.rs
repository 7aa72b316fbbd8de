//! Hostile traffic (issue 13), each attack against a real `paystream serve` process on a real
//! anvil and redis-server, with a well-behaved paid session streaming beside it: its vouchers
//! are acknowledged promptly, its stream keeps its pace, and the server's memory stays bounded.
//!
//! The attacks: a slowloris handshake, idle sockets that never upgrade, a flood of bad
//! signatures from many connections, frames at and over the size limits, invalid UTF-8 and
//! deeply nested JSON, a client that never reads, resume-token guessing, and many parked
//! sessions.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256};
use common::anvil::dev_signer;
use common::raw::Raw;
use common::serve::{Fleet, Server, free_port};
use common::stack::Client;
use paystream::chain::Channels;
use paystream::chain::rpc::RpcBackend;
use paystream::channel::ChannelDomain;
use paystream::protocol::{ClientMessage, ServerMessage};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The honest stream asks for 50 tokens a second (the fleet's generator gives 40), a voucher
/// every 10 tokens.
const HONEST_RATE: u64 = 50;

const CONFIG: &str = r#"
[session]
credit_window = "10"
heartbeat_ms = 1000
[limits]
max_connections = 2048
max_unauthenticated_per_ip = 4096
handshake_timeout_ms = 3000
send_timeout_ms = 2000
idle_timeout_ms = 4000
"#;

/// The server, the chain, and channels to open sessions on.
struct Field {
    fleet: Fleet,
    server: Server,
    domain: ChannelDomain,
    chain: Channels<RpcBackend>,
    next_salt: AtomicU64,
}

impl Field {
    async fn start() -> Self {
        let fleet = Fleet::start().await;
        let port = free_port();
        let server = fleet.serve(port, &format!("http://127.0.0.1:{port}"), CONFIG);
        let chain = Channels::at(
            RpcBackend::connect(&fleet.anvil.url, dev_signer(1))
                .await
                .unwrap(),
            fleet.contract,
        );
        let domain = ChannelDomain::new(fleet.chain_id, fleet.contract);
        Self {
            fleet,
            server,
            domain,
            chain,
            next_salt: AtomicU64::new(1),
        }
    }

    async fn channel(&self) -> B256 {
        let salt = self.next_salt.fetch_add(1, Ordering::Relaxed);
        self.chain
            .open(
                self.fleet.payee(),
                Address::ZERO,
                B256::from(alloy::primitives::U256::from(salt)),
                1_000_000,
                3_600,
            )
            .await
            .unwrap()
            .0
    }

    async fn client(&self, channel: B256) -> Client {
        Client::connect(&self.server.url, self.domain, channel).await
    }

    /// The server's resident memory, KiB.
    fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.server.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    }
}

/// How the honest session fared.
#[derive(Debug)]
struct Fared {
    /// When each token arrived.
    tokens: Vec<Instant>,
    vouchers: u64,
    slowest_ack: Duration,
    errors: Vec<String>,
    /// When the session's window ended.
    until: Instant,
}

impl Fared {
    /// Tokens a second between `from` and `to`.
    fn pace(&self, from: Instant, to: Instant) -> f64 {
        let n = self
            .tokens
            .iter()
            .filter(|t| **t >= from && **t < to)
            .count();
        n as f64 / to.duration_since(from).as_secs_f64()
    }
}

/// How long the honest session streams alone before an attack starts: its own pace, on this
/// machine and this run, is what the attack is measured against.
const BASELINE: Duration = Duration::from_secs(2);

/// A well-behaved paid session: streams at [`HONEST_RATE`], answers every `need_voucher` at
/// once, for `secs`.
async fn honest(field: &Field, secs: u64) -> (tokio::task::JoinHandle<Fared>, Instant, Instant) {
    let channel = field.channel().await;
    let mut c = field.client(channel).await;
    let ServerMessage::Session { .. } = c.open(1, 10).await else {
        panic!("the honest session opens");
    };
    c.send(&ClientMessage::Request {
        body: serde_json::json!({ "maxTokens": 1_000_000, "tokensPerSec": HONEST_RATE }),
    })
    .await;
    let started = Instant::now();
    let task = tokio::spawn(async move {
        let (mut nonce, mut cumulative) = (1u64, 10u128);
        let mut fared = Fared {
            tokens: Vec::new(),
            vouchers: 0,
            slowest_ack: Duration::ZERO,
            errors: Vec::new(),
            until: Instant::now() + Duration::from_secs(secs),
        };
        let mut sent: Option<Instant> = None;
        let until = fared.until;
        while Instant::now() < until {
            let Ok(next) = tokio::time::timeout_at(until.into(), c.recv()).await else {
                break;
            };
            match next {
                Some(ServerMessage::App { .. }) => fared.tokens.push(Instant::now()),
                Some(ServerMessage::NeedVoucher { suggested, .. }) if sent.is_none() => {
                    nonce += 1;
                    cumulative = suggested.max(cumulative + 1);
                    let v = c.voucher(nonce, cumulative);
                    c.send(&ClientMessage::Voucher(v)).await;
                    sent = Some(Instant::now());
                }
                Some(ServerMessage::VoucherAck { .. }) => {
                    if let Some(at) = sent.take() {
                        fared.slowest_ack = fared.slowest_ack.max(at.elapsed());
                        fared.vouchers += 1;
                    }
                }
                Some(ServerMessage::Error { code, .. }) => fared.errors.push(code),
                Some(_) => {}
                None => {
                    fared.errors.push(format!("closed {:?}", c.close_code));
                    break;
                }
            }
        }
        // A voucher still waiting for its ack at the end has waited at least this long.
        if let Some(at) = sent {
            fared.slowest_ack = fared.slowest_ack.max(at.elapsed());
        }
        fared
    });
    // Alone first, for its own pace; then the attack.
    tokio::time::sleep(BASELINE).await;
    (task, started, Instant::now())
}

/// The honest session kept its pace under attack (from `attack` on, at least 80% of its pace
/// before), every voucher was acknowledged within a second (one still unanswered at the end
/// counts), nothing was refused, and no token waited more than a second after the one before,
/// up to the window's end.
fn unaffected(fared: &Fared, started: Instant, attack: Instant) {
    let last = *fared.tokens.last().expect("tokens arrived");
    assert!(
        fared.until.saturating_duration_since(last) < Duration::from_secs(1),
        "the stream stopped {:?} before the window's end",
        fared.until.saturating_duration_since(last)
    );
    let end = fared.until;
    let before = fared.pace(started + Duration::from_millis(500), attack);
    let during = fared.pace(attack, end);
    let longest_gap = fared
        .tokens
        .windows(2)
        .map(|w| w[1].duration_since(w[0]))
        .max()
        .unwrap_or_default();
    eprintln!(
        "honest session: {before:.1} tokens/s before the attack, {during:.1} during; slowest voucher ack {:?}; longest gap {longest_gap:?}",
        fared.slowest_ack
    );
    assert!(
        during >= before * 0.8,
        "the honest stream slowed from {before:.1} to {during:.1} tokens/s"
    );
    assert!(fared.vouchers >= 2, "{} vouchers", fared.vouchers);
    assert!(
        fared.slowest_ack < Duration::from_secs(1),
        "a voucher waited {:?}",
        fared.slowest_ack
    );
    assert!(
        longest_gap < Duration::from_secs(1),
        "the stream stopped for {longest_gap:?}"
    );
    assert!(fared.errors.is_empty(), "{:?}", fared.errors);
}

/// Memory grew by at most `kib` over the attack.
fn bounded(before: u64, after: u64, kib: u64) {
    eprintln!("server memory: {before} KiB at the attack's start, {after} KiB after it");
    assert!(
        after <= before + kib,
        "server memory grew from {before} KiB to {after} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_handshakes_are_cut_and_an_honest_session_goes_on() {
    let field = Field::start().await;
    let (task, started, attack) = honest(&field, 8).await;
    // After the honest session's start: its verifier threads and tables are the baseline.
    let before = field.rss_kib();
    // 300 connections sending their request headers a byte at a time, slowly.
    let addr = field.server.url.trim_start_matches("http://").to_string();
    let mut slow = Vec::new();
    for _ in 0..300 {
        slow.push(TcpStream::connect(&addr).await.unwrap());
    }
    let drip = tokio::spawn(async move {
        let start = Instant::now();
        let mut cut = 0;
        for byte in b"GET /ws/tokens HTTP/1.1\r\nHost: x\r\nX-Slow: "
            .iter()
            .cycle()
        {
            if start.elapsed() > Duration::from_secs(15) || slow.is_empty() {
                break;
            }
            let mut alive = Vec::new();
            for mut s in slow.drain(..) {
                if s.write_all(&[*byte]).await.is_ok() {
                    alive.push(s);
                } else {
                    cut += 1;
                }
            }
            slow = alive;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        (cut, slow.len())
    });
    unaffected(&task.await.unwrap(), started, attack);
    let (cut, left) = drip.await.unwrap();
    assert_eq!(
        left, 0,
        "the server cut every slow handshake (header timeout)"
    );
    assert!(cut >= 300);
    bounded(before, field.rss_kib(), 16 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_that_never_upgrade_cost_nothing_lasting() {
    let field = Field::start().await;
    let (task, started, attack) = honest(&field, 7).await;
    // After the honest session's start: its verifier threads and tables are the baseline.
    let before = field.rss_kib();
    let addr = field.server.url.trim_start_matches("http://").to_string();
    let mut idle = Vec::new();
    for _ in 0..1_000 {
        idle.push(TcpStream::connect(&addr).await.unwrap());
    }
    unaffected(&task.await.unwrap(), started, attack);
    // A new honest client still gets in beside them.
    let channel = field.channel().await;
    let mut late = field.client(channel).await;
    assert!(matches!(
        late.open(1, 10).await,
        ServerMessage::Session { .. }
    ));
    bounded(before, field.rss_kib(), 24 * 1024);
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_signatures_does_not_slow_an_honest_voucher() {
    let field = Field::start().await;
    let (task, started, attack) = honest(&field, 8).await;
    // After the honest session's start: its verifier threads and tables are the baseline.
    let before = field.rss_kib();
    let victim = field.channel().await;
    let domain = field.domain;
    let url = field.server.url.clone();
    // 64 connections, each sending opens signed by the wrong key until the server cuts it off.
    let mut flood = Vec::new();
    for i in 0..64u8 {
        let url = url.clone();
        flood.push(tokio::spawn(async move {
            let mut c = Client::connect(&url, domain, victim).await;
            c.key = k256::ecdsa::SigningKey::from_slice(&[i + 1; 32]).unwrap();
            let mut refused = 0;
            for n in 1..50 {
                let v = c.voucher(n, 10);
                if !c.try_send(&ClientMessage::Open(v)).await {
                    break;
                }
                match c.recv().await {
                    Some(ServerMessage::Error { .. }) => refused += 1,
                    Some(_) => {}
                    None => break,
                }
            }
            (refused, c.close_code)
        }));
    }
    let mut closed = 0;
    for f in flood {
        let (_, code) = f.await.unwrap();
        if code == Some(4429) {
            closed += 1;
        }
    }
    assert!(
        closed >= 60,
        "the flooding connections are cut off (4429): {closed}"
    );
    unaffected(&task.await.unwrap(), started, attack);
    bounded(before, field.rss_kib(), 16 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_invalid_utf8_and_deep_json_are_refused() {
    let field = Field::start().await;
    let (task, started, attack) = honest(&field, 7).await;
    // After the honest session's start: its verifier threads and tables are the baseline.
    let before = field.rss_kib();
    // A frame just under the limit that is no message: refused, the connection stays.
    let mut at_limit = Raw::connect(&field.server.url).await;
    let big = format!(
        "{{\"type\":\"request\",\"body\":\"{}\"}}",
        "x".repeat(65_000)
    );
    assert!(at_limit.send_text(&big).await);
    let m = at_limit.recv().await;
    assert!(
        matches!(&m, Some(ServerMessage::Error { code, .. }) if code == "no_session"),
        "{m:?}"
    );
    // Over the limit: 1009.
    let mut over = Raw::connect(&field.server.url).await;
    let _ = over.send_text(&"x".repeat(70_000)).await;
    while over.recv().await.is_some() {}
    assert_eq!(over.close_code, Some(1009));
    // Deeply nested JSON (no stack overflow: the parser's depth limit) and invalid UTF-8.
    let mut deep = Raw::connect(&field.server.url).await;
    let nested = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000));
    assert!(deep.send_text(&nested).await);
    let m = deep.recv().await;
    assert!(
        matches!(&m, Some(ServerMessage::Error { code, .. }) if code == "malformed_message"),
        "{m:?}"
    );
    let mut bad_utf8 = Raw::connect(&field.server.url).await;
    let _ = bad_utf8.send_bytes_as_text(&[0x7b, 0xff, 0xfe, 0x7d]).await;
    while bad_utf8.recv().await.is_some() {}
    assert!(
        matches!(bad_utf8.close_code, Some(1007) | None),
        "invalid UTF-8 in a text frame ends that connection: {:?}",
        bad_utf8.close_code
    );
    unaffected(&task.await.unwrap(), started, attack);
    bounded(before, field.rss_kib(), 16 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_cut_off_and_others_go_on() {
    let field = Field::start().await;
    let (task, started, attack) = honest(&field, 10).await;
    // After the honest session's start: its verifier threads and tables are the baseline.
    let before = field.rss_kib();
    // Opens a fast stream and never reads again.
    let channel = field.channel().await;
    let mut sink = Raw::connect(&field.server.url).await;
    let key = common::stack::payer_key();
    let open = common::stack::sign_voucher(&field.domain, &key, channel, 1, 1_000_000);
    assert!(sink.send(&ClientMessage::Open(open)).await);
    let m = sink.recv().await;
    assert!(matches!(m, Some(ServerMessage::Session { .. })), "{m:?}");
    assert!(
        sink.send(&ClientMessage::Request {
            body: serde_json::json!({ "maxTokens": 10_000_000 }),
        })
        .await
    );
    // It answers no heartbeat either: its delivery pauses once its liveness lapses, and the
    // server closes it once nothing has come from it for the idle timeout (4 s here).
    let cut = tokio::time::timeout(Duration::from_secs(20), async {
        while sink.recv().await.is_some() {}
        sink.close_code
    })
    .await
    .expect("the server cuts it off");
    assert_eq!(cut, Some(1008));
    unaffected(&task.await.unwrap(), started, attack);
    bounded(before, field.rss_kib(), 16 * 1024);
    drop(sink);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_resume_tokens_gets_nothing() {
    let field = Field::start().await;
    let (task, started, attack) = honest(&field, 7).await;
    let before = field.rss_kib();
    let channel = field.channel().await;
    let mut victim = field.client(channel).await;
    let ServerMessage::Session { resume_token, .. } = victim.open(1, 10).await else {
        panic!("no session");
    };
    // 500 guesses: the victim's token with its signature tampered, and random strings.
    let mut refused = 0;
    for i in 0..500 {
        let guess = if i % 2 == 0 {
            let mut t = resume_token.clone();
            t.pop();
            t.push(if resume_token.ends_with('A') {
                'B'
            } else {
                'A'
            });
            t
        } else {
            format!("eyJ{i}.eyJ{i}.{i}")
        };
        let mut c = field.client(channel).await;
        c.send(&ClientMessage::Resume { token: guess }).await;
        let (seen, code) = c.drain().await;
        assert!(
            seen.iter()
                .all(|m| !matches!(m, ServerMessage::Session { .. })),
            "a guess resumed a session"
        );
        if code == Some(4401) {
            refused += 1;
        }
    }
    assert_eq!(refused, 500);
    // The victim's session is untouched.
    let v = victim.voucher(2, 20);
    victim.send(&ClientMessage::Voucher(v)).await;
    victim
        .recv_until(|m| matches!(m, ServerMessage::VoucherAck { nonce: 2, .. }))
        .await;
    unaffected(&task.await.unwrap(), started, attack);
    bounded(before, field.rss_kib(), 16 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_parked_sessions_cost_the_server_nothing() {
    let field = Field::start().await;
    // 300 sessions opened, then dropped: parked in the store (their records expire with the
    // resume window), not in the server.
    let mut channels = Vec::new();
    for _ in 0..300 {
        channels.push(field.channel().await);
    }
    // The honest session streams while the 300 open and park beside it.
    let (task, started, attack) = honest(&field, 12).await;
    let baseline = field.rss_kib();
    for chunk in channels.chunks(50) {
        let mut open = Vec::new();
        for channel in chunk {
            let mut c = field.client(*channel).await;
            assert!(matches!(c.open(1, 10).await, ServerMessage::Session { .. }));
            open.push(c);
        }
        drop(open);
    }
    field
        .server
        .wait_metric_until("paystream_leases_held", |held| held <= 1)
        .await;
    unaffected(&task.await.unwrap(), started, attack);
    bounded(baseline, field.rss_kib(), 8 * 1024);
    let parked: usize = {
        let client = redis::Client::open(field.fleet.redis.url.as_str()).unwrap();
        let mut conn = client.get_connection().unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("ps:sess:*")
            .query(&mut conn)
            .unwrap();
        keys.len()
    };
    assert!(
        parked >= 300,
        "the sessions are parked in the store: {parked}"
    );
}
