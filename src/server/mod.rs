//! The only tokio, WebSocket and HTTP code (DESIGN.md sections 4 and 8): one port serves the
//! 402 challenge, the WebSocket upgrade, `/healthz` and `/metrics`.
//!
//! [`run`] is the entry point, with shutdown as a parameter: tests pass
//! `std::future::pending()`, `main` passes a SIGINT/SIGTERM future. Shutdown is ordered: stop
//! accepting, tell sessions (close 1001, resumable, after saving consumption and queuing
//! claims), wait for them to drain.

mod connection;
pub mod flusher;
pub mod guard;
mod inbox;
mod lease;
pub mod metrics;
pub mod openai;
mod registry;
pub mod resource;
pub mod verify;
pub mod watcher;

use std::convert::Infallible;
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alloy::primitives::{B256, keccak256};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONNECTION, CONTENT_TYPE, HeaderValue, UPGRADE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k256::ecdsa::SigningKey;
use lru::LruCache;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tracing::{debug, info, warn};

use crate::chain::{ChainError, ChannelChain};
use crate::channel::ChannelInfo;
use crate::meter::Nanos;
use crate::protocol::{
    ChannelStreamTerms, DomainTerms, PAYMENT_REQUIRED_HEADER, PROTOCOL, PaymentRequired,
};
use crate::session::SessionParams;
use crate::session::resume::ResumeKeys;
use crate::store::{ChannelStore, SettlementStore};
use metrics::Metrics;
use resource::{Resource, Resources};
use verify::Verifier;

/// 1,024 connections at once: each costs a task, a socket and a few kilobytes of buffers. A
/// connection over it is answered at once (503 with `Retry-After`; `/healthz` and `/metrics`
/// as usual), never left in the kernel's queue.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1_024;
/// The WebSocket read buffer of a session. tungstenite reserves a frame's whole length again
/// once it has its header, even when the frame was read with it: an `open` or a `voucher` (about
/// 280 bytes with its header) needs 560 bytes, and a 512-byte buffer doubled to 1,024 on the
/// first one (measured with heaptrack: 1,014 bytes a session). 640 bytes hold them without
/// growing; a longer frame is read in several chunks, and the buffer grows for it.
pub const WS_READ_BUFFER_BYTES: usize = 640;
/// Units a resource may produce ahead of delivery (the per-session outbound queue).
pub const DEFAULT_QUEUE_CAPACITY: usize = 64;
/// A client must send `open` within 10 s of connecting.
pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// A connection with no inbound frame (not even a Pong) for 30 s is closed: three missed
/// heartbeats.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 30_000;
/// Channel reads are cached for 2 s: an `open` storm on one channel costs one RPC call, and a
/// withdrawal request is seen within two seconds.
pub const DEFAULT_CHANNEL_CACHE_MS: u64 = 2_000;
/// How long a channel seen opening in the contract's events is served from the watcher's
/// account of it: the watcher drops it on any later event about the channel (a top-up, a claim
/// paid, a withdrawal request, a close), so this only bounds how long a missed event could
/// matter.
pub const OPENED_CHANNEL_CACHE: Duration = Duration::from_secs(600);
/// Channel reads in flight at once: each holds a connection to the node (a descriptor and its
/// buffers) until it answers; a burst of opens beyond this waits its turn.
pub const DEFAULT_MAX_CHAIN_READS: usize = 32;
/// A disconnected session can be resumed for 5 minutes (DESIGN.md section 6).
pub const DEFAULT_RESUME_WINDOW_SECS: u64 = 300;
/// How long shutdown waits for sessions to close.
pub const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 10_000;
/// A frame the client's socket has not taken in 10 s closes the connection (its session is
/// parked, resumable): a client that stops reading cannot freeze its connection's timers, and
/// by then it has also missed two heartbeats.
pub const DEFAULT_SEND_TIMEOUT_MS: u64 = 10_000;
/// WebSocket connections one address may hold before any of them opens a session: generous for
/// a NAT, and a sixteenth of the connection slots, so one host cannot take them all with
/// sockets that never pay.
pub const DEFAULT_MAX_UNAUTHENTICATED_PER_IP: usize = 64;
/// `error`s a connection without a session gets before it is closed (1008).
pub const DEFAULT_MAX_ERRORS_BEFORE_OPEN: u32 = 8;
/// `open`s one connection may have refused after their signature was checked (then 4429).
pub const DEFAULT_MAX_FAILED_OPENS_PER_CONNECTION: u32 = 3;
/// A channel's lease lives 10 s unless renewed: a process that crashed frees its channels for
/// their clients' resumes within 10 s, while renewals (every third of it) cost a session one
/// store call per 3.3 s and two of them can fail (a Redis failover) before delivery pauses.
pub const DEFAULT_LEASE_TTL_MS: u64 = 10_000;
/// `open`s one address may have refused per minute (each costs a signature check, a key
/// recovery on a cold cache); above it, its `open`s are refused before any (then 4429).
pub const DEFAULT_MAX_FAILED_OPENS_PER_IP_PER_MIN: u32 = 30;

/// Bounds on what a server holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Connections at once; one over it is answered 503 with `Retry-After`.
    pub max_connections: usize,
    /// Units buffered per session.
    pub queue_capacity: usize,
    /// Largest client frame or message (bytes).
    pub max_message_bytes: usize,
    /// Time to send `open` after connecting.
    pub handshake_timeout_ms: u64,
    /// Time without any inbound frame before the connection closes.
    pub idle_timeout_ms: u64,
    /// How long a channel read is reused.
    pub channel_cache_ms: u64,
    /// How long shutdown waits for sessions.
    pub drain_timeout_ms: u64,
    /// How long a frame may wait for the client's socket before the connection closes.
    pub send_timeout_ms: u64,
    /// WebSocket connections per address before one of them opens a session.
    pub max_unauthenticated_per_ip: usize,
    /// The header a trusted reverse proxy puts the client's address in (`X-Forwarded-For`);
    /// `None` when clients connect directly (the TCP peer is the client). Behind a proxy
    /// without it, every client counts as the proxy's one address.
    pub client_ip_header: Option<String>,
    /// Errors a connection without a session gets before it is closed.
    pub max_errors_before_open: u32,
    /// Refused opens per connection.
    pub max_failed_opens_per_connection: u32,
    /// Refused opens per address per minute.
    pub max_failed_opens_per_ip_per_min: u32,
    /// How often the chain watcher polls for channel events.
    pub watch_interval_ms: u64,
    /// Blocks per `eth_getLogs` call of the chain watcher.
    pub log_range_blocks: u64,
    /// How long a channel's lease lives in the store unless renewed (docs/STORE.md, "Leases").
    pub lease_ttl_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            max_message_bytes: crate::protocol::MAX_MESSAGE_BYTES,
            handshake_timeout_ms: DEFAULT_HANDSHAKE_TIMEOUT_MS,
            idle_timeout_ms: DEFAULT_IDLE_TIMEOUT_MS,
            channel_cache_ms: DEFAULT_CHANNEL_CACHE_MS,
            drain_timeout_ms: DEFAULT_DRAIN_TIMEOUT_MS,
            send_timeout_ms: DEFAULT_SEND_TIMEOUT_MS,
            max_unauthenticated_per_ip: DEFAULT_MAX_UNAUTHENTICATED_PER_IP,
            client_ip_header: None,
            max_errors_before_open: DEFAULT_MAX_ERRORS_BEFORE_OPEN,
            max_failed_opens_per_connection: DEFAULT_MAX_FAILED_OPENS_PER_CONNECTION,
            max_failed_opens_per_ip_per_min: DEFAULT_MAX_FAILED_OPENS_PER_IP_PER_MIN,
            watch_interval_ms: watcher::DEFAULT_WATCH_INTERVAL_MS,
            log_range_blocks: watcher::DEFAULT_LOG_RANGE_BLOCKS,
            lease_ttl_ms: DEFAULT_LEASE_TTL_MS,
        }
    }
}

/// Everything the connections share.
pub struct ServerState<C, S> {
    /// Session parameters (domain, payee, tariff, thresholds).
    pub params: Arc<SessionParams>,
    /// The chain boundary.
    pub chain: C,
    /// The store.
    pub store: S,
    /// The resources, by name.
    pub resources: Resources,
    /// Counters for `/metrics`.
    pub metrics: Metrics,
    /// The payee's key: signs `Close` for cooperative closes. `None` when a separate settler
    /// holds it (`paystream settle`): closes are handed to it through the store.
    pub payee_key: Option<SigningKey>,
    /// Held while this process sends a transaction with the payee's key, by the server's
    /// cooperative closes and the in-process settler, so the two never take one nonce.
    pub send_lock: Arc<tokio::sync::Mutex<()>>,
    /// The in-process settler's counters, appended to `/metrics`.
    pub settle_metrics: Option<Arc<crate::settle::SettleMetrics>>,
    /// Bounds.
    pub limits: Limits,
    /// Base URL clients reach this server at (`http://host:port`), for the 402 challenge.
    pub public_url: String,
    /// Resume window advertised in the challenge.
    pub resume_window_secs: u64,
    /// The live sessions of this process.
    pub registry: registry::Registry,
    /// This process's name as a lease holder: random at every start, so a restarted process
    /// never mistakes a lease of its previous life (whose sessions it does not have) for its
    /// own.
    pub instance: String,
    /// The leases of this process's sessions, renewed together.
    leases: lease::LeaseKeeper,
    /// Signature checks, off the reactor.
    pub verifier: Verifier,
    /// Per-address bounds.
    pub guards: Arc<guard::Guards>,
    /// Consumption and claims the store refused, retried until it takes them.
    pub flusher: flusher::Flusher,
    /// Channel reads, each with when it expires: a node's answer after
    /// [`Limits::channel_cache_ms`], a channel seen opening in the contract's events after
    /// [`OPENED_CHANNEL_CACHE`] (any later event about it drops it at once).
    channels: Mutex<LruCache<B256, (Instant, Option<ChannelInfo>)>>,
    /// Turns for channel reads ([`DEFAULT_MAX_CHAIN_READS`]).
    chain_reads: Semaphore,
    started: Instant,
    sessions: AtomicU64,
}

impl<C, S> std::fmt::Debug for ServerState<C, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerState")
            .field("public_url", &self.public_url)
            .finish_non_exhaustive()
    }
}

impl<C: ChannelChain, S: ChannelStore + SettlementStore> ServerState<C, S> {
    /// Server state with default limits.
    pub fn new(
        params: SessionParams,
        chain: C,
        store: S,
        resources: Resources,
        payee_key: Option<SigningKey>,
        public_url: String,
    ) -> Self {
        Self {
            params: Arc::new(params),
            chain,
            store,
            resources,
            metrics: Metrics::default(),
            payee_key,
            send_lock: Arc::default(),
            settle_metrics: None,
            limits: Limits::default(),
            public_url,
            resume_window_secs: DEFAULT_RESUME_WINDOW_SECS,
            registry: registry::Registry::new(ResumeKeys::new(&random_secret())),
            instance: alloy::hex::encode(&random_secret()[..8]),
            leases: lease::LeaseKeeper::default(),
            verifier: Verifier::default(),
            guards: Arc::default(),
            flusher: flusher::Flusher::default(),
            channels: Mutex::new(LruCache::new(NonZeroUsize::new(16_384).expect("non-zero"))),
            chain_reads: Semaphore::new(DEFAULT_MAX_CHAIN_READS),
            started: Instant::now(),
            sessions: AtomicU64::new(0),
        }
    }

    /// Sets the resume tokens' secret (shared by the processes behind one Redis) and the resume
    /// window. Without it, a random secret is used: tokens then do not survive a restart.
    pub fn set_resume(&mut self, secret: &[u8], window_secs: u64) {
        self.resume_window_secs = window_secs;
        self.registry = registry::Registry::new(ResumeKeys::new(secret));
    }

    /// How long a session record outlives its session's last write: the resume window.
    pub(crate) fn resume_window(&self) -> Duration {
        Duration::from_secs(self.resume_window_secs)
    }

    /// How long a lease lives unless renewed.
    pub(crate) fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.limits.lease_ttl_ms.max(3))
    }

    fn lease_times(&self) -> lease::LeaseTimes {
        lease::LeaseTimes::new(self.lease_ttl())
    }

    /// Monotonic nanoseconds since the server started: the sessions' clock.
    pub fn now(&self) -> Nanos {
        self.started.elapsed().as_nanos() as Nanos
    }

    pub(crate) fn next_session_id(&self) -> String {
        let n = self.sessions.fetch_add(1, Ordering::Relaxed);
        let seed = [
            &n.to_be_bytes()[..],
            &self.now().to_be_bytes(),
            self.public_url.as_bytes(),
        ]
        .concat();
        alloy::hex::encode(&keccak256(seed)[..16])
    }

    /// The channel as the chain holds it, through a short cache (and what the contract's
    /// events said of channels opened since the server started).
    pub(crate) async fn read_channel(&self, id: B256) -> Result<Option<ChannelInfo>, ChainError> {
        let ttl = Duration::from_millis(self.limits.channel_cache_ms);
        if let Some((expires, info)) = self
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            && Instant::now() < *expires
        {
            return Ok(*info);
        }
        let _turn = self
            .chain_reads
            .acquire()
            .await
            .expect("the semaphore is never closed");
        // Read by another open while this one waited for its turn?
        if let Some((expires, info)) = self
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            && Instant::now() < *expires
        {
            return Ok(*info);
        }
        let info = self.chain.read_channel(id).await?;
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(id, (Instant::now() + ttl, info));
        Ok(info)
    }

    /// A channel the contract's events showed opening (the watcher): its first `open` needs
    /// no read of the node. Every later event about it drops it from the cache.
    pub(crate) fn seed_channel(&self, info: ChannelInfo) {
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(info.id, (Instant::now() + OPENED_CHANNEL_CACHE, Some(info)));
    }

    /// Drops a cached channel read (after the channel changed on-chain).
    pub(crate) fn forget_channel(&self, id: B256) {
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop(&id);
    }

    /// The 402 challenge for `name`.
    pub fn challenge(&self, name: &str, resource: &dyn Resource) -> PaymentRequired {
        let ws = self.public_url.replacen("http", "ws", 1);
        let terms = ChannelStreamTerms {
            protocol: PROTOCOL.into(),
            ws_endpoint: format!("{ws}/ws/{name}"),
            contract: self.params.domain.contract,
            domain: DomainTerms::default(),
            tariff: self.params.tariff,
            credit_window: self.params.meter.credit_window,
            min_deposit: self.params.min_deposit,
            heartbeat_ms: self.params.heartbeat_ms,
            resume_window_seconds: self.resume_window_secs,
            min_withdraw_delay_seconds: self.params.min_withdraw_delay_secs,
        };
        let resource = crate::protocol::Resource {
            url: format!("{}/{name}", self.public_url),
            description: resource.description(),
            mime_type: resource.mime_type(),
        };
        PaymentRequired::new(
            resource,
            self.params.domain.chain_id,
            self.params.token,
            self.params.payee,
            terms,
        )
    }
}

/// Connections the kernel queues for `accept` (the `listen` backlog; the kernel caps it at
/// `net.core.somaxconn`). tokio's `TcpListener::bind` asks for 128, which a burst of a few
/// hundred clients connecting at once overflows: the kernel then drops their SYNs, and each
/// waits a whole second to retry (the 1 s tail of setups under load).
pub const LISTEN_BACKLOG: u32 = 4_096;

/// A listener on `addr` with [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`, so a restarted server
/// binds its port again at once).
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// 32 random bytes from the OS.
fn random_secret() -> [u8; 32] {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).expect("the OS provides randomness");
    secret
}

type Body = Full<Bytes>;

fn text(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    let has = |name, value: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case(value)))
    };
    has(CONNECTION, "upgrade") && has(UPGRADE, "websocket")
}

/// The stop's `Notify`s: a connection registers with one (that of its thread) each time its
/// loop waits, so they are spread as tokio spreads a watch channel's.
const STOP_SHARDS: usize = 8;

/// The server's stop, as its connections wait on it: a flag and [`STOP_SHARDS`] `Notify`s. (A
/// watch receiver's `changed()` future is about twice a `Notified`'s size, and every
/// connection's future holds one.)
#[derive(Debug, Default)]
pub(crate) struct Shutdown {
    stopping: std::sync::atomic::AtomicBool,
    notify: [tokio::sync::Notify; STOP_SHARDS],
}

impl Shutdown {
    /// Stops: every connection sees it, waiting or not.
    fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for notify in &self.notify {
            notify.notify_waiters();
        }
    }

    /// Whether the server is stopping.
    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Completes at the stop, if it was made before it (then read [`Shutdown::stopping`]
    /// after making it: a stop in between is not missed).
    pub(crate) fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        thread_local! {
            static SHARD: usize = {
                static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
                NEXT.fetch_add(1, Ordering::Relaxed) % STOP_SHARDS
            };
        }
        self.notify[SHARD.with(|s| *s)].notified()
    }
}

async fn handle<C: ChannelChain, S: ChannelStore + SettlementStore>(
    mut req: Request<Incoming>,
    state: Arc<ServerState<C, S>>,
    stop: Arc<Shutdown>,
    permit: Arc<tokio::sync::OwnedSemaphorePermit>,
    peer: std::net::SocketAddr,
) -> Result<Response<Body>, Infallible> {
    if req.method() != Method::GET {
        return Ok(text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n",
        ));
    }
    let path = req.uri().path().to_string();
    if matches!(path.as_str(), "/healthz" | "/metrics") {
        return handle_ops(&path, &state).await;
    }
    let name = path
        .strip_prefix("/ws/")
        .or_else(|| path.strip_prefix('/'))
        .unwrap_or_default()
        .to_string();
    let Some(resource) = state.resources.get(&name).cloned() else {
        return Ok(text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "no such resource\n",
        ));
    };
    if !(path.starts_with("/ws/") && is_upgrade(&req)) {
        let challenge = state.challenge(&name, resource.as_ref());
        let mut response = text(
            StatusCode::PAYMENT_REQUIRED,
            "application/json",
            challenge.to_json(),
        );
        if let Ok(value) = HeaderValue::from_str(&challenge.header_value()) {
            response
                .headers_mut()
                .insert(PAYMENT_REQUIRED_HEADER, value);
        }
        return Ok(response);
    }
    let Some(key) = req
        .headers()
        .get("sec-websocket-key")
        .map(|k| derive_accept_key(k.as_bytes()))
    else {
        return Ok(text(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "missing Sec-WebSocket-Key\n",
        ));
    };
    // The client's address: the TCP peer, or what the trusted proxy says.
    let ip = match &state.limits.client_ip_header {
        Some(header) => req
            .headers()
            .get(header.as_str())
            .and_then(|v| v.to_str().ok())
            .and_then(guard::forwarded_ip)
            .unwrap_or(peer.ip()),
        None => peer.ip(),
    };
    let Some(unauthenticated) = state.guards.admit(
        guard::client_key(ip),
        state.limits.max_unauthenticated_per_ip,
    ) else {
        debug!(%ip, "refused: too many connections without a session from this address");
        let mut response = text(
            StatusCode::TOO_MANY_REQUESTS,
            "text/plain",
            "too many connections without a session from this address\n",
        );
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from_static("10"));
        return Ok(response);
    };
    let unauthenticated = Arc::new(unauthenticated);
    let config = WebSocketConfig::default()
        .max_message_size(Some(state.limits.max_message_bytes))
        .max_frame_size(Some(state.limits.max_message_bytes))
        // An idle session's biggest cost was tungstenite's default 128 KiB read buffer, all of
        // it resident once zero-filled by the first read: client frames are small (vouchers,
        // requests), and a larger one is read in several chunks.
        .read_buffer_size(WS_READ_BUFFER_BYTES)
        // Frames go out as they are sent (the connection flushes each one anyway), so the
        // write buffer holds one frame, not 128 KiB.
        .write_buffer_size(0)
        .max_write_buffer_size(4 * 1024 * 1024);
    // The request (its headers, hyper's buffers) is not kept for the session's life: only the
    // upgrade is.
    let upgrade = hyper::upgrade::on(&mut req);
    drop(req);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config),
                )
                .await;
                let metrics = state.clone();
                let session = connection::run(state, ws, resource, unauthenticated, stop, permit);
                // What a session's task holds across its awaits (docs/SERVER.md, "Memory").
                metrics
                    .metrics
                    .connection_future_bytes
                    .store(std::mem::size_of_val(&session) as u64, Ordering::Relaxed);
                // A task of its own, sized to the session's future: this one (the upgrade's
                // state included) ends here rather than live as long as the session.
                tokio::spawn(session);
            }
            Err(e) => debug!("upgrade failed: {e}"),
        }
    });
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&key) {
        headers.insert("sec-websocket-accept", v);
    }
    Ok(response)
}

/// Connections over `max_connections` being answered at once (each for a few milliseconds).
const MAX_REFUSALS_AT_ONCE: usize = 256;

/// A connection over `max_connections`: `/healthz` and `/metrics` are answered as ever (an
/// operator looks at a full server through them), anything else gets 503 with `Retry-After`,
/// and the connection closes after one request.
async fn refuse_at_capacity<C: ChannelChain, S: ChannelStore + SettlementStore>(
    state: Arc<ServerState<C, S>>,
    stream: tokio::net::TcpStream,
    _slot: tokio::sync::OwnedSemaphorePermit,
) {
    let service = service_fn(move |req: Request<Incoming>| {
        let state = state.clone();
        async move {
            let response = match req.uri().path() {
                "/healthz" | "/metrics" => {
                    return handle_ops(req.uri().path(), &state).await;
                }
                _ => {
                    let mut response = text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "the server is at its connection limit; retry shortly\n",
                    );
                    response
                        .headers_mut()
                        .insert("retry-after", HeaderValue::from_static("5"));
                    response
                }
            };
            Ok::<_, Infallible>(response)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(5))
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
}

/// `/healthz` and `/metrics`.
async fn handle_ops<C: ChannelChain, S: ChannelStore + SettlementStore>(
    path: &str,
    state: &ServerState<C, S>,
) -> Result<Response<Body>, Infallible> {
    if path == "/healthz" {
        return Ok(match state.store.ping().await {
            Ok(()) => text(StatusCode::OK, "application/json", r#"{"status":"ok"}"#),
            Err(e) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "application/json",
                serde_json::json!({"status": "degraded", "store": e.to_string()}).to_string(),
            ),
        });
    }
    let mut body = state.metrics.render();
    if let Some(settle) = &state.settle_metrics {
        body.push_str(&settle.render());
    }
    Ok(text(StatusCode::OK, "text/plain; version=0.0.4", body))
}

/// Serves HTTP and WebSocket on `listener` until `shutdown` completes, then closes every
/// session with 1001 and waits (up to the drain timeout) for them to finish.
pub async fn run<C: ChannelChain + 'static, S: ChannelStore + SettlementStore>(
    listener: TcpListener,
    state: Arc<ServerState<C, S>>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let connections = Arc::new(Semaphore::new(state.limits.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopping = Arc::new(Shutdown::default());
    let mut tasks = JoinSet::new();
    // The chain's news is read from the block the server starts at, before any `open`'s chain
    // read: no event between the two is missed.
    let start = state.chain.block_number().await.ok();
    let chain_watcher = tokio::spawn(watcher::run(state.clone(), start, stop_rx.clone()));
    // The leases of the sessions, renewed together, apart from the connections; until the
    // sessions have drained at shutdown (they park, under their leases, on the way out).
    let (keeper_stop, keeper_rx) = watch::channel(false);
    let keeper = {
        let state = state.clone();
        let stop = keeper_rx;
        tokio::spawn(async move {
            let clock = state.clone();
            state
                .leases
                .run(
                    &state.store,
                    &state.instance,
                    state.lease_times(),
                    state.resume_window(),
                    move || clock.now(),
                    stop,
                )
                .await;
        })
    };
    let (flusher_stop, flusher_rx) = watch::channel(false);
    let flusher = {
        let state = state.clone();
        tokio::spawn(async move { state.flusher.run(&state.store, flusher_rx).await })
    };
    tokio::pin!(shutdown);
    info!(addr = %listener.local_addr()?, "serving");
    // Connections over `max_connections` are still accepted, and answered at once: 503 with
    // Retry-After (and /healthz, /metrics as usual), never left hanging in the kernel's queue.
    // These answers are bounded too; beyond them a connection is closed unanswered.
    let overflow = Arc::new(Semaphore::new(MAX_REFUSALS_AT_ONCE));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            state
                .metrics
                .refused_at_capacity
                .fetch_add(1, Ordering::Relaxed);
            if let Ok(slot) = overflow.clone().try_acquire_owned() {
                tasks.spawn(refuse_at_capacity(state, stream, slot));
            }
            continue;
        };
        let stop = stopping.clone();
        let permit = Arc::new(permit);
        tasks.spawn(async move {
            let service = service_fn(move |req| {
                handle(req, state.clone(), stop.clone(), permit.clone(), peer)
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            if let Err(e) = conn.await {
                debug!(%peer, "connection ended: {e}");
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    info!("shutting down: closing sessions with 1001");
    let _ = stop_tx.send(true);
    stopping.stop();
    let drain = Duration::from_millis(state.limits.drain_timeout_ms);
    // Sessions hold a connection permit each; all permits back means all sessions closed.
    let all = u32::try_from(state.limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(drain, connections.acquire_many(all))
        .await
        .is_err()
    {
        warn!("drain timeout: some sessions did not close in time");
    }
    tasks.abort_all();
    chain_watcher.abort();
    let _ = keeper_stop.send(true);
    let _ = keeper.await;
    // The sessions' last writes are in; what the store refused is tried once more.
    let _ = flusher_stop.send(true);
    let _ = flusher.await;
    Ok(())
}
