//! The store's figures (DESIGN.md section 9), on a real redis-server on loopback that the bench
//! starts (`scripts/bench store` prints the ratios):
//!
//! - `store_voucher_commits`: durable voucher commits per second through `RedisStore` (the
//!   fenced compare-and-set script), Redis with `appendonly yes` and `appendfsync always`: one
//!   writer at a time against 512 sessions writing at once (their calls pipelined on the one
//!   multiplexed connection, and Redis group-committing each batch with one fsync), beside plain
//!   `SET`s at the same concurrency (what the connection carries without the script).
//! - `store_restart_to_resume`: a restarted server's first resumed session, from its first
//!   accepted connection to the `session` message, with none and with 100,000 channels (and
//!   their session records) in the store: nothing is scanned or replayed at start, so the two
//!   are the same. Also the start itself (store connection, scripts, server state).
//!
//! Run once as a smoke test by `cargo test --all-targets` (with 1,000 channels stored then).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
    ClientMessage, ServerMessage, SignedStateMsg, decode_server, encode_client,
};
use paystream::server::resource::{Resource, Resources, TokenGenerator};
use paystream::server::{self, ServerState};
use paystream::session::SessionParams;
use paystream::store::redis::RedisStore;
use paystream::store::{ChannelStore, Fence, StoredVoucher};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio_tungstenite::tungstenite::Message;

const PAYER: [u8; 32] = [0x31; 32];
const PAYEE: [u8; 32] = [0x32; 32];
/// Commits per measured iteration.
const COMMITS: u64 = 20_000;
const WRITERS: u64 = 512;

/// A redis-server on a free port, stopped on drop, with a data directory of its own (also
/// removed on drop). The directory used to be named by the port alone and kept: a later run that
/// drew the same port loaded the old append-only file, and its first write was refused for a
/// stale nonce (`StaleNonce { got: 1, stored: 20039 }`, seen in `scripts/test`).
struct Redis {
    child: Child,
    url: String,
    dir: std::path::PathBuf,
}

fn tool(name: &str) -> String {
    let cached = std::env::var_os("HOME").map(|h| {
        std::path::PathBuf::from(h)
            .join(".cache/paystream/tools/bin")
            .join(name)
    });
    match cached {
        Some(p) if p.exists() => p.to_string_lossy().into_owned(),
        _ => name.to_string(),
    }
}

impl Redis {
    fn start(durable: bool) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!(
            "paystream-bench-redis-{}-{port}",
            std::process::id()
        ));
        // Nothing of an earlier server: the store starts empty.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut args = vec![
            "--port".to_string(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            String::new(),
            "--dir".into(),
            dir.to_string_lossy().into_owned(),
        ];
        if durable {
            args.extend(["--appendonly", "yes", "--appendfsync", "always"].map(String::from));
        } else {
            args.extend(["--appendonly", "no"].map(String::from));
        }
        let mut child = Command::new(tool("redis-server"))
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/install-tools installs it)");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        for line in lines.by_ref() {
            if line.unwrap().contains("Ready to accept connections") {
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Self {
            child,
            url: format!("redis://127.0.0.1:{port}/"),
            dir,
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn smoke_test() -> bool {
    !std::env::args().any(|a| a == "--bench")
}

fn sig() -> alloy::primitives::Signature {
    let key = SigningKey::from_slice(&PAYER).unwrap();
    signature::sign_digest(&key, &B256::repeat_byte(7))
}

/// `COMMITS` voucher commits spread over `writers` sessions writing at once, each on its own
/// channel under its lease; returns the time they took.
async fn commits(
    store: &RedisStore,
    leases: &[(B256, Fence)],
    nonce: &AtomicU64,
    writers: u64,
) -> Duration {
    let per = COMMITS / writers;
    let base = nonce.fetch_add(per, Ordering::Relaxed);
    let signature = sig();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (channel, fence) in leases.iter().take(writers as usize).copied() {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 1..=per {
                let n = base + i;
                let voucher = StoredVoucher {
                    nonce: n,
                    cumulative: u128::from(n),
                    signature,
                };
                store.save_voucher(channel, voucher, fence).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    started.elapsed()
}

/// The same number of plain `SET`s at the same concurrency, on a connection of its own.
async fn sets(url: &str, writers: u64) -> Duration {
    let client = redis::Client::open(url).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    let per = COMMITS / writers;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut conn = conn.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per {
                let _: () = redis::cmd("SET")
                    .arg(format!("bench:{w}"))
                    .arg(i)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    started.elapsed()
}

fn voucher_commits(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let redis = Redis::start(true);
    let store = rt.block_on(RedisStore::connect(&redis.url, "ps:")).unwrap();
    let leases: Vec<(B256, Fence)> = rt.block_on(async {
        let mut out = Vec::new();
        for i in 0..WRITERS {
            let channel = B256::from(U256::from(i + 1));
            let fence = store
                .take_lease(channel, "bench", Duration::from_secs(3_600))
                .await
                .unwrap()
                .0;
            out.push((channel, fence));
        }
        out
    });
    let nonce = AtomicU64::new(0);
    let mut group = c.benchmark_group("store_voucher_commits");
    group.throughput(Throughput::Elements(COMMITS));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    for writers in [1, WRITERS] {
        group.bench_function(format!("save_voucher/{writers}_sessions"), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| rt.block_on(commits(&store, &leases, &nonce, writers)))
                    .sum()
            })
        });
    }
    group.bench_function(format!("plain_set/{WRITERS}_writers"), |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| rt.block_on(sets(&redis.url, WRITERS)))
                .sum()
        })
    });
    group.finish();
}

/// The chain (the in-process EVM: the resume reads the channel from it) and the channel.
struct Chain {
    contract: Channels<EvmBackend>,
    payee_chain: Channels<EvmBackend>,
    channel: B256,
    domain: ChannelDomain,
}

async fn chain() -> Chain {
    let payer_key = SigningKey::from_slice(&PAYER).unwrap();
    let payee_key = SigningKey::from_slice(&PAYEE).unwrap();
    let payer = signature::address_of(payer_key.verifying_key());
    let payee = signature::address_of(payee_key.verifying_key());
    let node = EvmNode::default();
    node.fund(payer, U256::from(10u128.pow(24)));
    let contract: Channels<EvmBackend> = Channels::deploy(node.backend(payer)).await.unwrap();
    let (channel, _) = contract
        .open(payee, Address::ZERO, B256::ZERO, 10u128.pow(20), 3_600)
        .await
        .unwrap();
    let domain = ChannelDomain::new(31337, contract.address());
    let payee_chain = contract.with_backend(node.backend(payee));
    Chain {
        contract,
        payee_chain,
        channel,
        domain,
    }
}

/// A server process's start on the store: connect (scripts loaded, layout checked), state.
async fn start_server(
    redis: &str,
    chain: &Chain,
) -> (
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let payee_key = SigningKey::from_slice(&PAYEE).unwrap();
    let payee = signature::address_of(payee_key.verifying_key());
    let store = RedisStore::connect(redis, "ps:").await.unwrap();
    let params = SessionParams::new(
        chain.domain,
        payee,
        Address::ZERO,
        Tariff::from_json(r#"{"perMessage":{"amount":"1","per":"1"}}"#).unwrap(),
        1_000,
    );
    let mut resources = Resources::new();
    let tokens: Arc<dyn Resource> = Arc::new(TokenGenerator {
        tokens_per_sec: 0,
        default_max_tokens: 10,
    });
    resources.insert("tokens".into(), tokens);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws/tokens", listener.local_addr().unwrap());
    let mut state = ServerState::new(
        params,
        chain.payee_chain.clone(),
        store,
        resources,
        Some(payee_key),
        "http://bench".into(),
    );
    state.set_resume(b"the bench's shared secret, 32 bytes+", 300);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server::run(listener, Arc::new(state), async move {
        let _ = stopped.await;
    }));
    (url, stop, task)
}

async fn send(ws: &mut WsStream, message: &ClientMessage) {
    ws.send(Message::Text(encode_client(message).into()))
        .await
        .unwrap();
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The `session` message's token.
async fn session_token(ws: &mut WsStream) -> String {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => match decode_server(&t).unwrap() {
                ServerMessage::Session { resume_token, .. } => return resume_token,
                ServerMessage::Error { code, message, .. } => panic!("{code}: {message}"),
                _ => {}
            },
            Some(Ok(_)) => {}
            other => panic!("closed: {other:?}"),
        }
    }
}

/// Writes `n` other channels and their session records, as a store of a busy engine holds.
async fn populate(redis: &str, n: u64) {
    let client = redis::Client::open(redis).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let s = alloy::hex::encode_prefixed(signature::to_bytes(&sig()));
    for chunk in (0..n).collect::<Vec<_>>().chunks(5_000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            let id = B256::from(U256::from(1_000_000 + i));
            pipe.cmd("HSET")
                .arg(format!("ps:ch:{{{id}}}"))
                .arg(
                    &[
                        ("n", format!("{:020}", 3)),
                        ("c", format!("{:039}", 1_000)),
                        ("s", s.clone()),
                        ("u", format!("{:039}", 500)),
                        ("f", "1".into()),
                    ][..],
                )
                .ignore();
            pipe.cmd("HSET")
                .arg(format!("ps:sess:{{{id}}}"))
                .arg(
                    &[
                        ("sid", format!("s{i}")),
                        ("jti", format!("j{i}")),
                        ("seq", "7".into()),
                        ("h", "gone".into()),
                    ][..],
                )
                .ignore();
        }
        let _: () = pipe.query_async(&mut conn).await.unwrap();
    }
}

fn restart_to_resume(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let stored = if smoke_test() { 1_000 } else { 100_000 };
    let mut group = c.benchmark_group("store_restart_to_resume");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(10));
    for others in [0, stored] {
        let redis = Redis::start(false);
        let chain = rt.block_on(chain());
        rt.block_on(populate(&redis.url, others));
        // The session: opened on a first server, which then goes away (it parked it).
        let key = SigningKey::from_slice(&PAYER).unwrap();
        let token = rt.block_on(async {
            let (url, stop, task) = start_server(&redis.url, &chain).await;
            let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
            let open = SignedStateMsg::sign(&chain.domain, &key, chain.channel, 1, 1_000);
            send(&mut ws, &ClientMessage::Open(open)).await;
            let token = session_token(&mut ws).await;
            drop(ws);
            let _ = stop.send(());
            task.await.unwrap().unwrap();
            token
        });
        let token = std::cell::RefCell::new(token);
        group.bench_function(format!("first_resume/{others}_channels_stored"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += rt.block_on(async {
                        // A new process: a new holder, nothing in memory.
                        let (url, stop, task) = start_server(&redis.url, &chain).await;
                        let started = Instant::now();
                        let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
                        let t = token.borrow().clone();
                        send(&mut ws, &ClientMessage::Resume { token: t }).await;
                        let next = session_token(&mut ws).await;
                        let took = started.elapsed();
                        *token.borrow_mut() = next;
                        drop(ws);
                        let _ = stop.send(());
                        task.await.unwrap().unwrap();
                        took
                    });
                }
                total
            })
        });
        group.bench_function(format!("start/{others}_channels_stored"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += rt.block_on(async {
                        let started = Instant::now();
                        let (_url, stop, task) = start_server(&redis.url, &chain).await;
                        let took = started.elapsed();
                        let _ = stop.send(());
                        task.await.unwrap().unwrap();
                        took
                    });
                }
                total
            })
        });
        let _ = &chain.contract;
    }
    group.finish();
}

criterion_group!(benches, voucher_commits, restart_to_resume);
criterion_main!(benches);
