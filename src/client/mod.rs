//! The paying client (DESIGN.md sections 4 and 8), used by `paystream pay`, the demo and the
//! tests: fetch the 402 challenge, check its terms against a budget [`Policy`], open or reuse a
//! channel, stream, answer `need_voucher` within the policy, and check the receipt.
//!
//! The client keeps its own count of what it received (messages, bytes, time connected) and
//! prices it with the tariff it accepted. It never signs a cumulative above that count plus one
//! credit window, and it stops (`ServerOverclaims`) if the server claims more consumption than
//! that: the server cannot take more than the client saw, plus one window.
//!
//! It reconnects by itself (DESIGN.md section 6) when the connection drops, when the server goes
//! silent for three heartbeats, or when it closes with 1001, 1011 or 1012: exponential backoff
//! with jitter, a resume with the session's token (any process behind the same URL and store
//! takes it), and once the token is refused (the resume window passed, or the server lost the
//! session) a fresh `open` on the same channel with a newly signed voucher; no new deposit. It
//! gives up with [`ClientError::Reconnect`] after [`Reconnect::max_wait`] or
//! [`Reconnect::max_attempts`].

mod policy;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256, U256};
use futures_util::{SinkExt, StreamExt};
use k256::ecdsa::SigningKey;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub use policy::Policy;

use crate::chain::{Backend, ChainError, ChannelChain, Channels};
use crate::channel::{ChannelDomain, ChannelKey, ChannelState, signature};
use crate::meter::{NANOS_PER_SEC, Tariff};
use crate::protocol::{
    ClientMessage, PAYMENT_REQUIRED_HEADER, PaymentRequired, PaymentRequirements, ServerMessage,
    SignedStateMsg, decode_server, encode_client,
};

/// What went wrong, and what the caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server's terms are outside the policy: nothing was paid. Loosen the policy or go
    /// elsewhere.
    #[error("terms refused: {0}")]
    Terms(String),
    /// The HTTP request for the challenge failed, or did not answer 402.
    #[error("challenge: {0}")]
    Challenge(String),
    /// The chain refused or could not be reached (opening the channel). Retry, or fund the key.
    #[error("chain: {0}")]
    Chain(#[from] ChainError),
    /// The WebSocket failed or the server broke the protocol. Reconnect.
    #[error("connection: {0}")]
    Connection(String),
    /// The server claims more consumption than this client received plus one credit window:
    /// the client stopped paying. Nothing more is signed; the channel's exposure is bounded.
    #[error(
        "the server claims {claimed} base units; this client received {received} worth (plus a {window} window)"
    )]
    ServerOverclaims {
        /// What the server says was consumed.
        claimed: u128,
        /// What the client's own count is worth, rounded up.
        received: u128,
        /// The policy's credit window.
        window: u128,
    },
    /// The server refused something with an error code (see docs/SERVER.md).
    #[error("server error {code}: {message}")]
    Server {
        /// The code.
        code: String,
        /// The explanation.
        message: String,
    },
    /// The server says the channel was signed up to `cumulative` (at `nonce`), and this client
    /// finds no signature of its own over that: nothing was signed for it. A server that lost
    /// its state, or lies; open another channel or check the server.
    #[error(
        "the server says this channel is at cumulative {cumulative} (nonce {nonce}), which this client never signed"
    )]
    UnprovenState {
        /// The nonce the server claims.
        nonce: u64,
        /// The cumulative the server claims.
        cumulative: u128,
    },
    /// The session ended without a receipt (close code, if any).
    #[error("the session closed (code {0:?})")]
    Closed(Option<u16>),
    /// The receipt does not match the client's own count.
    #[error("bad receipt: {0}")]
    Receipt(String),
    /// The connection was lost and could not be resumed or re-opened in time: the session's
    /// consumption is in the server's store and its claim is queued; the channel stays open for
    /// a later session (or a withdrawal).
    #[error("could not reconnect after {attempts} attempts in {secs} s: {last}")]
    Reconnect {
        /// Connection attempts made.
        attempts: u32,
        /// Seconds spent trying.
        secs: u64,
        /// The last failure.
        last: String,
    },
}

impl ClientError {
    /// Whether the session's connection is gone in a way a reconnect can mend: the socket
    /// dropped or went silent, or the server closed with 1001 (going away), 1011 (internal
    /// error), 1012 (restarting), or 1008 (to a session, that is the idle close: the client
    /// answered no heartbeat for 30 s, its session was parked and can be resumed).
    pub fn reconnectable(&self) -> bool {
        match self {
            Self::Connection(_) | Self::Closed(None) => true,
            Self::Closed(Some(code)) => matches!(code, 1001 | 1006 | 1008 | 1011 | 1012),
            _ => false,
        }
    }
}

/// How the client reconnects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reconnect {
    /// The first wait before reconnecting; doubled on each failed attempt.
    pub first_delay: Duration,
    /// The longest wait between attempts.
    pub max_delay: Duration,
    /// Give up after this long (by default the server's resume window).
    pub max_wait: Duration,
    /// Give up after this many attempts.
    pub max_attempts: u32,
}

/// 100 ms first: a restarted server is often back within a second.
pub const DEFAULT_RECONNECT_FIRST_DELAY_MS: u64 = 100;
/// 5 s at most between attempts: a server that is back is found within 5 s.
pub const DEFAULT_RECONNECT_MAX_DELAY_MS: u64 = 5_000;
/// 100 attempts: with 5 s between the later ones, past a 5-minute resume window.
pub const DEFAULT_RECONNECT_MAX_ATTEMPTS: u32 = 100;
/// A connection attempt (TCP, TLS and the upgrade) that takes longer than 10 s is given up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `close` waits for the receipt: the server's transaction timeout (2 min) for a
/// cooperative close, and some.
const CLOSE_WAIT: Duration = Duration::from_secs(150);

impl Reconnect {
    /// The defaults, giving up after `max_wait`.
    pub fn within(max_wait: Duration) -> Self {
        Self {
            first_delay: Duration::from_millis(DEFAULT_RECONNECT_FIRST_DELAY_MS),
            max_delay: Duration::from_millis(DEFAULT_RECONNECT_MAX_DELAY_MS),
            max_wait,
            max_attempts: DEFAULT_RECONNECT_MAX_ATTEMPTS,
        }
    }

    /// Never reconnect: a lost connection ends the session with its error.
    pub fn never() -> Self {
        Self {
            max_attempts: 0,
            ..Self::within(Duration::ZERO)
        }
    }

    /// The wait before attempt `attempt` (1-based): exponential, capped, with full jitter in
    /// its upper half (so many clients cut off at once do not come back at once).
    fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .first_delay
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(self.max_delay);
        let mut byte = [0u8; 2];
        let _ = getrandom::fill(&mut byte);
        let jitter = f64::from(u16::from_le_bytes(byte)) / f64::from(u16::MAX);
        exp.mul_f64(0.5 + 0.5 * jitter)
    }
}

/// A channel this client opens gives the payee an hour to claim after a withdrawal request
/// (more if the server asks for more): the payer can always leave, after that.
pub const DEFAULT_WITHDRAW_DELAY_SECS: u32 = 3_600;

/// Fetches the 402 challenge of a resource URL (http or https): the `PAYMENT-REQUIRED` header
/// and the body must agree.
pub async fn fetch_challenge(url: &str) -> Result<PaymentRequired, ClientError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let response = reqwest::get(url)
        .await
        .map_err(|e| ClientError::Challenge(e.to_string()))?;
    if response.status().as_u16() != 402 {
        return Err(ClientError::Challenge(format!(
            "expected 402 Payment Required, got {}",
            response.status()
        )));
    }
    let header = response
        .headers()
        .get(PAYMENT_REQUIRED_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .ok_or_else(|| ClientError::Challenge("no PAYMENT-REQUIRED header".into()))?;
    let from_header =
        PaymentRequired::from_header(&header).map_err(|e| ClientError::Challenge(e.to_string()))?;
    let body = response
        .text()
        .await
        .map_err(|e| ClientError::Challenge(e.to_string()))?;
    let from_body: PaymentRequired =
        serde_json::from_str(&body).map_err(|e| ClientError::Challenge(format!("body: {e}")))?;
    if from_header != from_body {
        return Err(ClientError::Challenge(
            "the PAYMENT-REQUIRED header and the body differ".into(),
        ));
    }
    Ok(from_body)
}

/// A payer: a key, a policy, and the contract reached through a chain backend.
pub struct Payer<B> {
    chain: Channels<B>,
    key: SigningKey,
    policy: Policy,
}

/// Something that happened on a paid stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// One unit (e.g. one AI token).
    App {
        /// Sequence number.
        seq: u64,
        /// The unit.
        data: serde_json::Value,
    },
    /// A binary unit.
    Binary(Vec<u8>),
    /// A voucher was signed and sent.
    VoucherSigned {
        /// Its nonce.
        nonce: u64,
        /// Its cumulative.
        cumulative: u128,
    },
    /// The server's periodic usage.
    Usage {
        /// Consumption so far.
        consumed: u128,
        /// Credit left.
        remaining: u128,
    },
    /// Delivery paused (credit, store).
    Paused(String),
    /// Delivery resumed.
    Resumed,
    /// The stream of the last request ended (`reason`: `completed`, `max_tokens`,
    /// `upstream_failed`, `cancelled`, `interrupted`).
    End {
        /// The `seq` of its last unit, if it delivered any.
        seq: Option<u64>,
        /// Why it ended.
        reason: String,
    },
    /// The connection was lost and the session goes on over a new one: `resumed` with its
    /// token (balance, credit and consumption kept), or re-opened on the same channel with a
    /// fresh voucher when the token was refused. A request the loss cut ends with
    /// `End { reason: "interrupted" }` after this (it is not replayed, nor billed twice).
    Reconnected {
        /// Resumed (`true`) or re-opened (`false`).
        resumed: bool,
        /// Connection attempts it took.
        attempts: u32,
    },
    /// A non-fatal error from the server.
    Error {
        /// The code.
        code: String,
        /// The explanation.
        message: String,
    },
}

/// The session's end, checked against the client's own count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    /// Consumption the server charged (rounded up).
    pub consumed: u128,
    /// What the channel's claimed total will be.
    pub settled: u128,
    /// What returns to the payer.
    pub refund: u128,
    /// The last accepted cumulative.
    pub cumulative: u128,
    /// A cooperative close was asked and is not done yet: the refund comes when it lands (a
    /// separate settler does it), or by withdrawing after the channel's delay.
    pub close_pending: bool,
}

impl<B: Backend> Payer<B> {
    /// A payer with `key` on the contract behind `chain`.
    pub fn new(chain: Channels<B>, key: SigningKey, policy: Policy) -> Self {
        Self { chain, key, policy }
    }

    /// The payer's address.
    pub fn address(&self) -> Address {
        signature::address_of(self.key.verifying_key())
    }

    /// Checks the challenge against the policy, opens (or reuses) the channel identified by
    /// `salt` with a deposit of `deposit` (at most the policy's total), connects, and opens the
    /// session with a first voucher of one credit window.
    pub async fn start(
        &self,
        challenge: &PaymentRequired,
        salt: B256,
        deposit: u128,
    ) -> Result<PaySession, ClientError> {
        let offer = self.policy.check(challenge)?.clone();
        if offer.extra.contract != self.chain.address() {
            return Err(ClientError::Terms(format!(
                "the server uses contract {}, this payer {}",
                offer.extra.contract,
                self.chain.address()
            )));
        }
        let deposit = deposit
            .min(self.policy.max_total)
            .max(offer.extra.min_deposit);
        let chain_id = self.chain.chain_id();
        let key = ChannelKey {
            chain_id,
            contract: self.chain.address(),
            payer: self.address(),
            payee: offer.pay_to,
            token: offer.asset,
            salt,
        };
        let channel = key.channel_id();
        let existing = self.chain.read_channel(channel).await?;
        let (deposit, claimed_nonce, claimed) = match existing {
            Some(info) if !info.closed && !info.withdraw_requested() => {
                (info.deposit, info.claimed_nonce, info.claimed)
            }
            Some(_) => {
                return Err(ClientError::Terms(
                    "the channel for this salt is closed; use another salt".into(),
                ));
            }
            None => {
                let delay = DEFAULT_WITHDRAW_DELAY_SECS.max(offer.extra.min_withdraw_delay_seconds);
                self.chain
                    .open(offer.pay_to, offer.asset, salt, deposit, delay)
                    .await?;
                (deposit, 0, 0)
            }
        };
        let url = offer.extra.ws_endpoint.clone();
        let ws = connect(&url).await?;
        let heartbeat = offer.extra.heartbeat_ms;
        let window_secs = offer.extra.resume_window_seconds;
        let window = self
            .policy
            .max_credit_window
            .min(offer.extra.credit_window.max(1));
        let mut session = PaySession {
            ws,
            url,
            liveness: (heartbeat > 0)
                .then(|| Duration::from_millis(heartbeat.saturating_mul(3).saturating_add(1_000))),
            // The window to resume, and as long again to open the channel afresh after it.
            reconnect: Reconnect::within(Duration::from_secs(window_secs.max(1).saturating_mul(2))),
            reconnects: 0,
            total: Count::default(),
            acked: (0, 0),
            request_open: false,
            awaiting_end: false,
            earned: None,
            reconnecting: None,
            domain: ChannelDomain::new(chain_id, self.chain.address()),
            key: self.key.clone(),
            channel,
            offer,
            window,
            deposit,
            nonce: claimed_nonce,
            cumulative: claimed,
            proven: claimed,
            claimed,
            count: Count::default(),
            started: Instant::now(),
            consumed: 0,
            baseline: 0,
            vouchers: 0,
            session_id: None,
            resume_token: None,
            ask: None,
            unacked: None,
            queued: VecDeque::new(),
        };
        session.open().await?;
        Ok(session)
    }
}

async fn connect(url: &str) -> Result<Ws, ClientError> {
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| ClientError::Connection(format!("{url}: {e}")))?;
    Ok(ws)
}

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// A frame from the server.
enum Incoming {
    Server(ServerMessage),
    Binary(Vec<u8>),
}

/// What this client received, priced by its own count.
#[derive(Debug, Default, Clone, Copy)]
struct Count {
    messages: u64,
    bytes_out: u64,
    bytes_in: u64,
}

/// A paid session in progress.
pub struct PaySession {
    ws: Ws,
    /// The WebSocket endpoint (reconnects go there).
    url: String,
    /// The server is taken for gone after this long without a frame (three heartbeats).
    liveness: Option<Duration>,
    reconnect: Reconnect,
    /// Reconnections so far.
    reconnects: u64,
    /// Everything received over the session's connections (the `count` restarts at a re-open).
    total: Count,
    /// The last state the server acknowledged as stored (`session` or `voucher_ack`).
    acked: (u64, u128),
    /// A request was sent and its `end` has not come.
    request_open: bool,
    /// Resumed with a request open: the server says `end {interrupted}` right after `session`
    /// if it recorded the request; if anything else comes first, it never started it (a crash
    /// between the request and its record), and the client ends it the same way itself.
    awaiting_end: bool,
    /// At a re-open within a session: what this client's own count says the session's earlier
    /// connections were worth. The server's word about earlier consumption counts only up to
    /// it (not up to the credit signed, which a server dropping connections could otherwise
    /// claim, a window at a time, without delivering anything).
    earned: Option<u128>,
    /// When the reconnects since the last progress (a unit or an acknowledged voucher) began,
    /// and how many attempts they made: a server that accepts every reconnect and fails at once
    /// is given up on after the same budget as one that never answers.
    reconnecting: Option<(Instant, u32)>,
    domain: ChannelDomain,
    key: SigningKey,
    channel: B256,
    offer: PaymentRequirements,
    window: u128,
    deposit: u128,
    nonce: u64,
    cumulative: u128,
    /// The most this client can prove the channel's earlier sessions authorized: a cumulative
    /// it finds its own signature over, or the contract's claimed amount. A server's word
    /// about earlier consumption counts only up to this.
    proven: u128,
    /// The contract's claimed amount when the session started: consumption it can prove.
    claimed: u128,
    count: Count,
    started: Instant,
    consumed: u128,
    /// The channel's consumption when this session opened.
    baseline: u128,
    vouchers: u64,
    session_id: Option<String>,
    resume_token: Option<String>,
    /// The `suggested` of a `need_voucher` not answered yet.
    ask: Option<u128>,
    /// The last voucher sent and not acknowledged yet, and whether the server said it could
    /// not store it.
    unacked: Option<(SignedStateMsg, bool)>,
    /// Events to hand out before reading more (a voucher signed on the way to another event).
    queued: VecDeque<Event>,
}

/// `ceil(sum(units * amount / per))` over the tariff's kinds.
fn price(tariff: &Tariff, count: Count, elapsed_ns: u128) -> u128 {
    let kinds = [
        (
            tariff.per_message,
            U256::from(count.messages),
            U256::from(1u8),
        ),
        (
            tariff.per_byte_out,
            U256::from(count.bytes_out),
            U256::from(1u8),
        ),
        (
            tariff.per_byte_in,
            U256::from(count.bytes_in),
            U256::from(1u8),
        ),
        (
            tariff.per_second,
            U256::from(elapsed_ns),
            U256::from(NANOS_PER_SEC),
        ),
    ];
    let mut total = U256::ZERO;
    for (p, units, scale) in kinds {
        if let Some(p) = p {
            let d = U256::from(p.per) * scale;
            total += (units * U256::from(p.amount)).div_ceil(d);
        }
    }
    total.saturating_to()
}

impl PaySession {
    fn send_json(
        &mut self,
        message: &ClientMessage,
    ) -> impl std::future::Future<Output = Result<(), ClientError>> + '_ {
        let text = encode_client(message);
        async move {
            self.ws
                .send(Message::Text(text.into()))
                .await
                .map_err(|e| ClientError::Connection(e.to_string()))
        }
    }

    fn voucher(&self, nonce: u64, cumulative: u128) -> SignedStateMsg {
        SignedStateMsg::sign(&self.domain, &self.key, self.channel, nonce, cumulative)
    }

    /// What the channel's consumption may rightly be: what was consumed before this session
    /// (as the server said at `open`, never more than the accepted cumulative) plus this
    /// client's own count, rounded up (time counted as the whole wall time since it opened).
    pub fn received_worth(&self) -> u128 {
        let own = price(
            &self.offer.extra.tariff,
            self.count,
            self.started.elapsed().as_nanos(),
        );
        self.baseline.saturating_add(own)
    }

    /// The channel.
    pub fn channel_id(&self) -> B256 {
        self.channel
    }

    /// The deposit.
    pub fn deposit(&self) -> u128 {
        self.deposit
    }

    /// Consumption as the server last reported it.
    pub fn spent(&self) -> u128 {
        self.consumed
    }

    /// The accepted cumulative.
    pub fn cumulative(&self) -> u128 {
        self.cumulative
    }

    /// Vouchers signed in this session.
    pub fn vouchers_signed(&self) -> u64 {
        self.vouchers
    }

    /// Messages received, over every connection of the session.
    pub fn messages(&self) -> u64 {
        self.total.messages
    }

    /// The last state (nonce, cumulative) the server acknowledged as stored.
    pub fn acknowledged(&self) -> (u64, u128) {
        self.acked
    }

    /// Times the session reconnected.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// Sets how the session reconnects ([`Reconnect::never`] to end it on a lost connection).
    pub fn set_reconnect(&mut self, reconnect: Reconnect) {
        self.reconnect = reconnect;
    }

    /// The resume token of the session, if any.
    pub fn resume_token(&self) -> Option<&str> {
        self.resume_token.as_deref()
    }

    /// The session id.
    pub fn session_id(&self) -> Option<&str> {
        self.session_id.as_deref()
    }

    /// Whether `signature` is this client's own over (`nonce`, `cumulative`) on its channel.
    fn signed_by_me(&self, nonce: u64, cumulative: u128, sig: &[u8]) -> bool {
        let Ok(sig) = signature::parse_signature(sig) else {
            return false;
        };
        let state = ChannelState {
            channelId: self.channel,
            nonce,
            cumulative,
        };
        let digest = self.domain.state_digest(&state);
        signature::recover_address(&digest, &sig)
            .is_ok_and(|a| a == signature::address_of(self.key.verifying_key()))
    }

    /// Opens the session with a freshly signed state: the next nonce, and one window above what
    /// the client can prove was consumed (never below a cumulative it already signed). A
    /// server that says the channel is further along is believed about the nonce (nonces cost
    /// nothing), and about the cumulative only with this client's own signature over it.
    async fn open(&mut self) -> Result<(), ClientError> {
        for _ in 0..3 {
            let nonce = self.nonce.checked_add(1).ok_or_else(|| {
                ClientError::Connection(
                    "the channel's nonce is exhausted; open another channel".into(),
                )
            })?;
            let cumulative = self
                .claimed
                .saturating_add(self.window)
                .max(self.cumulative)
                .min(self.deposit);
            let open = self.voucher(nonce, cumulative);
            // The client's clock starts before the server's can: its time bound is an upper one.
            self.started = Instant::now();
            self.send_json(&ClientMessage::Open(open)).await?;
            loop {
                let message = match self.recv().await? {
                    Some(Incoming::Server(m)) => Some(m),
                    Some(Incoming::Binary(_)) => continue,
                    None => None,
                };
                match message {
                    Some(ServerMessage::Session {
                        session_id,
                        resume_token,
                        nonce: accepted_nonce,
                        cumulative: accepted,
                        consumed,
                        ..
                    }) => {
                        if (accepted_nonce, accepted) != (nonce, cumulative) {
                            return Err(ClientError::Connection(format!(
                                "the server opened the session at ({accepted_nonce}, {accepted}), not at the ({nonce}, {cumulative}) this client signed"
                            )));
                        }
                        // The channel's earlier consumption can never exceed what was
                        // authorized before this session, nor (at a re-open) what this client
                        // received on it plus one window.
                        let limit = match self.earned {
                            Some(earned) => cumulative.min(earned.saturating_add(self.window)),
                            None => cumulative,
                        };
                        if consumed > limit {
                            return Err(ClientError::ServerOverclaims {
                                claimed: consumed,
                                received: self.earned.unwrap_or(cumulative),
                                window: self.window,
                            });
                        }
                        self.session_id = Some(session_id);
                        self.resume_token = Some(resume_token);
                        self.nonce = nonce;
                        self.cumulative = cumulative;
                        self.acked = self.acked.max((nonce, cumulative));
                        self.consumed = consumed;
                        // What earlier sessions consumed counts only up to what this client
                        // can prove they authorized: a server that overstates it gains no
                        // credit from it.
                        self.baseline = consumed.min(self.proven);
                        if let Some(earned) = self.earned {
                            self.baseline = self.baseline.min(earned);
                        }
                        self.vouchers += 1;
                        return Ok(());
                    }
                    // The channel was used before (another device, a lost client state).
                    Some(ServerMessage::Error {
                        code,
                        data: Some(d),
                        ..
                    }) if code == "stale_nonce" || code == "cumulative_decreased" => {
                        self.nonce = self.nonce.max(d.nonce);
                        if d.cumulative > self.cumulative {
                            let proven = d.cumulative <= self.claimed
                                || d.signature.as_ref().is_some_and(|sig| {
                                    self.signed_by_me(d.nonce, d.cumulative, sig)
                                });
                            if !proven {
                                return Err(ClientError::UnprovenState {
                                    nonce: d.nonce,
                                    cumulative: d.cumulative,
                                });
                            }
                            self.cumulative = d.cumulative;
                            self.proven = self.proven.max(d.cumulative);
                        }
                        break;
                    }
                    Some(ServerMessage::Error { code, message, .. }) => {
                        return Err(ClientError::Server { code, message });
                    }
                    Some(_) => continue,
                    None => return Err(ClientError::Closed(None)),
                }
            }
        }
        Err(ClientError::Connection(
            "could not re-sync the channel state".into(),
        ))
    }

    /// The next frame; a server silent for three heartbeats counts as a lost connection.
    async fn recv(&mut self) -> Result<Option<Incoming>, ClientError> {
        loop {
            let frame = match self.liveness {
                Some(limit) => tokio::time::timeout(limit, self.ws.next())
                    .await
                    .map_err(|_| {
                        ClientError::Connection(format!(
                            "no frame from the server in {} ms",
                            limit.as_millis()
                        ))
                    })?,
                None => self.ws.next().await,
            };
            match frame {
                Some(Ok(Message::Text(text))) => {
                    let message =
                        decode_server(&text).map_err(|e| ClientError::Connection(e.to_string()))?;
                    if let ServerMessage::App { .. } = message {
                        self.count.messages += 1;
                        self.count.bytes_out += text.len() as u64;
                        self.total.messages += 1;
                        self.total.bytes_out += text.len() as u64;
                    }
                    return Ok(Some(Incoming::Server(message)));
                }
                Some(Ok(Message::Binary(bytes))) => {
                    self.count.messages += 1;
                    self.count.bytes_out += bytes.len() as u64;
                    self.total.messages += 1;
                    self.total.bytes_out += bytes.len() as u64;
                    return Ok(Some(Incoming::Binary(bytes.to_vec())));
                }
                Some(Ok(Message::Close(frame))) => {
                    let _ = self.ws.flush().await;
                    return Err(ClientError::Closed(frame.map(|f| u16::from(f.code))));
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(ClientError::Connection(e.to_string())),
                None => return Ok(None),
            }
        }
    }

    /// Sends an application request (e.g. a prompt).
    /// A connection found lost on the way is reconnected first (the `Reconnected` event comes
    /// with the next [`PaySession::next`]).
    pub async fn request(&mut self, body: serde_json::Value) -> Result<(), ClientError> {
        let bytes = serde_json::to_vec(&body).map_or(0, |b| b.len() as u64);
        self.count.bytes_in += bytes;
        self.total.bytes_in += bytes;
        let message = ClientMessage::Request { body };
        match self.send_json(&message).await {
            Err(e) if e.reconnectable() && self.reconnect.max_attempts > 0 => {
                let event = self.reconnect_after(e).await?;
                self.queued.push_back(event);
                self.request_open = true;
                self.send_json(&message).await
            }
            sent => {
                self.request_open = true;
                sent
            }
        }
    }

    /// Checks a claimed consumption against the client's count plus one window.
    fn check_claim(&self, claimed: u128) -> Result<u128, ClientError> {
        let received = self.received_worth();
        if claimed > received.saturating_add(self.window) {
            return Err(ClientError::ServerOverclaims {
                claimed,
                received,
                window: self.window,
            });
        }
        Ok(received)
    }

    /// The next event, answering `need_voucher` on the way; `None` when the stream ended.
    ///
    /// An ask the client cannot honour yet (the server counts units still in flight, so the
    /// client's own count plus its window does not exceed the credit it already signed) is
    /// kept, and answered as soon as the client's count allows it: the client never drops an
    /// ask, so credit never runs dry for want of an answer.
    pub async fn next(&mut self) -> Result<Option<Event>, ClientError> {
        if let Some(event) = self.queued.pop_front() {
            return Ok(Some(event));
        }
        loop {
            let received = match self.recv().await {
                Ok(None) => Err(ClientError::Closed(None)),
                other => other,
            };
            let event = match received {
                Ok(None) => unreachable!("mapped above"),
                Ok(Some(Incoming::Binary(bytes))) => Some(Event::Binary(bytes)),
                Ok(Some(Incoming::Server(message))) => {
                    if std::mem::take(&mut self.awaiting_end)
                        && !matches!(message, ServerMessage::End { .. })
                    {
                        // The request was lost with the old connection before it started.
                        self.request_open = false;
                        let then = self.on_server_message(message)?;
                        self.queued.extend(then);
                        return Ok(Some(Event::End {
                            seq: None,
                            reason: "interrupted".into(),
                        }));
                    }
                    self.on_server_message(message)?
                }
                Err(e) if e.reconnectable() && self.reconnect.max_attempts > 0 => {
                    Some(self.reconnect_after(e).await?)
                }
                Err(ClientError::Closed(None)) => return Ok(None),
                Err(e) => return Err(e),
            };
            let signed = match self.answer_ask().await {
                Ok(signed) => signed,
                // Lost while answering: the next read finds out and reconnects.
                Err(e) if e.reconnectable() && self.reconnect.max_attempts > 0 => None,
                Err(e) => return Err(e),
            };
            match (event, signed) {
                (Some(event), Some(signed)) => {
                    self.queued.push_back(signed);
                    return Ok(Some(event));
                }
                (Some(event), None) | (None, Some(event)) => return Ok(Some(event)),
                (None, None) => {}
            }
        }
    }

    /// Reconnects after losing the connection with `lost`: resumes with the session's token,
    /// or, once the token is refused, opens the channel again with a fresh voucher. Retries with
    /// backoff while the server is unreachable, restarting, or still letting the session go
    /// elsewhere (`channel_busy`).
    async fn reconnect_after(&mut self, lost: ClientError) -> Result<Event, ClientError> {
        // The budget runs from the first loss since the last progress, across reconnects that
        // came back and failed again at once.
        let (started, mut attempts) = *self.reconnecting.get_or_insert((Instant::now(), 0));
        let mut last = lost.to_string();
        loop {
            if attempts >= self.reconnect.max_attempts
                || started.elapsed() >= self.reconnect.max_wait
            {
                self.reconnecting = None;
                return Err(ClientError::Reconnect {
                    attempts,
                    secs: started.elapsed().as_secs(),
                    last,
                });
            }
            attempts += 1;
            self.reconnecting = Some((started, attempts));
            tokio::time::sleep(self.reconnect.delay(attempts)).await;
            // A server that takes the TCP connection and never answers the upgrade (frozen, or
            // a balancer's dead backend) costs one attempt, not the session.
            let limit = self
                .liveness
                .unwrap_or(CONNECT_TIMEOUT)
                .min(CONNECT_TIMEOUT);
            match tokio::time::timeout(limit, connect(&self.url)).await {
                Ok(Ok(ws)) => self.ws = ws,
                Ok(Err(e)) => {
                    last = e.to_string();
                    continue;
                }
                Err(_) => {
                    last = format!("{}: no upgrade within {} ms", self.url, limit.as_millis());
                    continue;
                }
            }
            let resumed = self.resume_token.is_some();
            let result = match self.resume_token.clone() {
                Some(token) => self.resume(token).await,
                None => self.reopen().await,
            };
            match result {
                Ok(()) => {
                    self.reconnects += 1;
                    if resumed {
                        self.awaiting_end = self.request_open;
                    } else if std::mem::take(&mut self.request_open) {
                        self.awaiting_end = false;
                        // A new session: the old one's request ended with it.
                        self.queued.push_back(Event::End {
                            seq: None,
                            reason: "interrupted".into(),
                        });
                    }
                    return Ok(Event::Reconnected { resumed, attempts });
                }
                Err(e) if e.reconnectable() => last = e.to_string(),
                Err(ClientError::Server { code, message })
                    if matches!(
                        code.as_str(),
                        "channel_busy" | "store_unavailable" | "chain_unavailable"
                    ) =>
                {
                    last = format!("{code}: {message}");
                }
                Err(ClientError::Server { code, message }) if code == "bad_resume_token" => {
                    // Past the window, or the session is gone: the channel is opened again.
                    self.resume_token = None;
                    last = format!("{code}: {message}");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Resumes the session on the new connection with its token.
    async fn resume(&mut self, token: String) -> Result<(), ClientError> {
        self.send_json(&ClientMessage::Resume { token }).await?;
        loop {
            let message = match self.recv().await {
                Ok(Some(Incoming::Server(m))) => m,
                Ok(Some(Incoming::Binary(_))) => continue,
                Ok(None) => return Err(ClientError::Closed(None)),
                Err(ClientError::Closed(Some(4401))) => {
                    return Err(ClientError::Server {
                        code: "bad_resume_token".into(),
                        message: "closed 4401".into(),
                    });
                }
                Err(e) => return Err(e),
            };
            match message {
                ServerMessage::Session {
                    session_id,
                    resume_token,
                    nonce,
                    cumulative,
                    consumed,
                    ..
                } => {
                    // The state is one this client signed, and the consumption within its count.
                    if nonce > self.nonce || cumulative > self.cumulative {
                        return Err(ClientError::UnprovenState { nonce, cumulative });
                    }
                    self.check_claim(consumed)?;
                    self.session_id = Some(session_id);
                    self.resume_token = Some(resume_token);
                    self.consumed = consumed;
                    self.acked = self.acked.max((nonce, cumulative));
                    self.ask = None;
                    // A voucher the server did not store before the loss (it crashed, or the
                    // store lost it) is sent again: the same signed state.
                    match self.unacked.clone() {
                        Some((voucher, _)) if voucher.nonce > nonce => {
                            self.unacked = Some((voucher.clone(), false));
                            // Kept as unacknowledged whatever happens to this send: the next
                            // resume sends it again.
                            self.send_json(&ClientMessage::Voucher(voucher)).await?;
                        }
                        _ => self.unacked = None,
                    }
                    return Ok(());
                }
                ServerMessage::Error { code, message, .. } => {
                    return Err(ClientError::Server { code, message });
                }
                _ => continue,
            }
        }
    }

    /// Opens the channel again on the new connection, with a fresh voucher: the next nonce, at
    /// least the cumulative already signed. The count starts again from the server's word about
    /// what was consumed before, believed only up to what this client's own count says it
    /// received (a server claiming more than that plus one window is refused).
    async fn reopen(&mut self) -> Result<(), ClientError> {
        let earned = self.received_worth();
        self.earned = Some(self.earned.map_or(earned, |e| e.max(earned)));
        self.proven = self.proven.max(earned);
        self.count = Count::default();
        self.baseline = 0;
        self.ask = None;
        self.unacked = None;
        self.open().await
    }

    /// What a server message means to the caller, if anything; checks every consumption the
    /// server states against the client's own count.
    fn on_server_message(&mut self, message: ServerMessage) -> Result<Option<Event>, ClientError> {
        Ok(match message {
            ServerMessage::App { seq, data } => {
                self.reconnecting = None;
                Some(Event::App { seq, data })
            }
            ServerMessage::NeedVoucher {
                consumed,
                suggested,
                ..
            } => {
                self.check_claim(consumed)?;
                self.ask = Some(suggested);
                None
            }
            ServerMessage::VoucherAck {
                nonce,
                cumulative,
                consumed,
            } => {
                self.check_claim(consumed)?;
                self.consumed = consumed;
                self.acked = self.acked.max((nonce, cumulative));
                self.reconnecting = None;
                if self.unacked.as_ref().is_some_and(|(v, _)| v.nonce <= nonce) {
                    self.unacked = None;
                }
                None
            }
            ServerMessage::Usage {
                consumed,
                remaining,
                ..
            } => {
                self.check_claim(consumed)?;
                self.consumed = consumed;
                Some(Event::Usage {
                    consumed,
                    remaining,
                })
            }
            ServerMessage::Paused { reason } => Some(Event::Paused(reason)),
            ServerMessage::Resumed {} => Some(Event::Resumed),
            ServerMessage::Error { code, message, .. } => {
                if code == "store_unavailable"
                    && let Some((_, refused)) = &mut self.unacked
                {
                    // Not stored: sent again when the server next asks for credit.
                    *refused = true;
                }
                Some(Event::Error { code, message })
            }
            ServerMessage::End { seq, reason } => {
                self.request_open = false;
                Some(Event::End { seq, reason })
            }
            ServerMessage::Session { .. } | ServerMessage::Receipt { .. } => None,
        })
    }

    /// Signs the voucher the server asked for, if the client's own count allows more credit
    /// than it already signed: never more than what it received plus one window.
    async fn answer_ask(&mut self) -> Result<Option<Event>, ClientError> {
        let Some(suggested) = self.ask else {
            return Ok(None);
        };
        // The server asks while it still lacks the last voucher: the store refused it (an
        // outage). The same signed state is sent again, nothing new is signed.
        if let Some((voucher, refused @ true)) = &mut self.unacked {
            *refused = false;
            let again = ClientMessage::Voucher(voucher.clone());
            self.ask = None;
            self.send_json(&again).await?;
            return Ok(None);
        }
        let target = suggested
            .min(self.received_worth().saturating_add(self.window))
            .min(self.deposit);
        if target <= self.cumulative {
            return Ok(None);
        }
        let nonce = self.nonce.checked_add(1).ok_or_else(|| {
            ClientError::Connection("the channel's nonce is exhausted; open another channel".into())
        })?;
        let v = self.voucher(nonce, target);
        // Signed is signed: the state is the client's before the send (which may fail after the
        // frame left), so a later resume finds it and sends it again.
        self.unacked = Some((v.clone(), false));
        self.ask = None;
        self.nonce = nonce;
        self.cumulative = target;
        self.vouchers += 1;
        self.send_json(&ClientMessage::Voucher(v)).await?;
        Ok(Some(Event::VoucherSigned {
            nonce,
            cumulative: target,
        }))
    }

    /// The channel's deposit grew (the caller topped it up): vouchers may authorize up to it.
    pub fn topped_up(&mut self, deposit: u128) {
        self.deposit = self.deposit.max(deposit);
    }

    /// Ends the session (closing the channel cooperatively when asked) and checks the receipt
    /// against the client's own count. A connection lost on the way is reconnected first.
    pub async fn close(mut self, close_channel: bool) -> Result<Receipt, ClientError> {
        // A cooperative close waits for its transaction on the server, heartbeats included:
        // give it the server's transaction timeout (2 min) before calling the server gone.
        self.liveness = self.liveness.map(|l| l.max(CLOSE_WAIT));
        let mut sent = self
            .send_json(&ClientMessage::Close { close_channel })
            .await;
        loop {
            let received = match sent {
                Ok(()) => self.recv().await,
                Err(e) => Err(e),
            };
            sent = Ok(());
            match received {
                Err(e) if e.reconnectable() && self.reconnect.max_attempts > 0 => {
                    self.reconnect_after(e).await?;
                    sent = self
                        .send_json(&ClientMessage::Close { close_channel })
                        .await;
                }
                Ok(Some(Incoming::Server(ServerMessage::Receipt {
                    consumed,
                    settled_amount,
                    refund,
                    cumulative,
                    close_pending,
                    ..
                }))) => {
                    let received = self.received_worth();
                    if consumed > received {
                        return Err(ClientError::Receipt(format!(
                            "charged {consumed}, received {received} worth"
                        )));
                    }
                    if settled_amount > cumulative
                        || refund != self.deposit.saturating_sub(settled_amount)
                    {
                        return Err(ClientError::Receipt(format!(
                            "settled {settled_amount} of cumulative {cumulative}, refund {refund} of deposit {}",
                            self.deposit
                        )));
                    }
                    let _ = self.ws.close(None).await;
                    return Ok(Receipt {
                        consumed,
                        settled: settled_amount,
                        refund,
                        cumulative,
                        close_pending,
                    });
                }
                Ok(Some(_)) => continue,
                Ok(None) => return Err(ClientError::Closed(None)),
                Err(e) => return Err(e),
            }
        }
    }
}
