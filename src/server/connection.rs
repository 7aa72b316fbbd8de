//! One WebSocket connection: the only place a session meets the socket, the store, the chain
//! and the resource. It feeds the session messages, time and I/O results, and performs the
//! effects the session returns, in order.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tracing::{debug, warn};

use super::ServerState;
use super::metrics::Metrics;
use super::resource::{Resource, Unit};
use crate::chain::{ChannelChain, Claim};
use crate::channel::{Close, signature};
use crate::meter::Nanos;
use crate::protocol::{
    ClientMessage, CloseCode, ProtocolError, ServerMessage, decode_client, encode_app,
    encode_server,
};
use crate::session::{Effect, Session};
use crate::store::ChannelStore;

type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Units delivered back to back before the loop looks at the socket and timers again: enough
/// to amortize the loop, few enough that a voucher never waits behind a long burst.
const BATCH_UNITS: usize = 32;

/// How long a closing connection waits for the client's Close frame.
const CLOSE_HANDSHAKE: Duration = Duration::from_secs(2);

/// What the loop does after applying effects.
enum Flow {
    Continue,
    Closed,
}

struct Connection<C, S> {
    state: Arc<ServerState<C, S>>,
    ws: Ws,
    resource: Arc<dyn Resource>,
    session: Option<Session>,
    /// Units produced and not yet delivered (the per-session outbound queue, bounded).
    units: Option<mpsc::Receiver<Unit>>,
    producer: Option<JoinHandle<()>>,
    /// A unit taken from the queue that could not be paid for yet.
    held: Option<Unit>,
    last_inbound: Nanos,
    /// Fires when another connection resumes this session (close with 4409).
    kick: Option<oneshot::Receiver<()>>,
}

/// Runs a connection until it closes.
pub(super) async fn run<C: ChannelChain, S: ChannelStore>(
    state: Arc<ServerState<C, S>>,
    ws: Ws,
    resource: Arc<dyn Resource>,
    mut stop: watch::Receiver<bool>,
) {
    let now = state.now();
    let mut conn = Connection {
        state,
        ws,
        resource,
        session: None,
        units: None,
        producer: None,
        held: None,
        last_inbound: now,
        kick: None,
    };
    let limits = conn.state.limits.clone();
    let heartbeat = Duration::from_millis(conn.state.params.heartbeat_ms.max(1));
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    let opened_by = now + limits.handshake_timeout_ms * 1_000_000;
    let sleep = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(sleep);
    let mut armed: Nanos = 0;
    loop {
        // Deliver what can be paid for before waiting on anything else.
        if let Flow::Closed = conn.deliver_ready().await {
            break;
        }
        let now = conn.state.now();
        let wake = match &conn.session {
            Some(s) => s.next_wakeup(),
            None => Some(opened_by),
        };
        let idle_at = conn.last_inbound + limits.idle_timeout_ms * 1_000_000;
        let wake = wake.map_or(idle_at, |w| w.min(idle_at));
        // One timer for the connection, moved only when the next deadline is earlier than the
        // armed one or the armed one has passed (waking early is harmless: tick does nothing).
        if wake < armed || armed <= now {
            armed = wake;
            sleep.as_mut().reset(
                tokio::time::Instant::now() + Duration::from_nanos(wake.saturating_sub(now)),
            );
        }
        let can_take =
            conn.held.is_none() && conn.session.as_ref().is_some_and(Session::can_deliver);
        let flow = tokio::select! {
            biased;
            _ = stop.changed() => conn.shutdown().await,
            _ = kicked(&mut conn.kick) => conn.superseded().await,
            inbound = conn.ws.next() => conn.on_inbound(inbound).await,
            unit = recv(&mut conn.units), if can_take => conn.on_units(unit).await,
            _ = ping.tick() => {
                let payload = conn.state.now().to_be_bytes().to_vec();
                match conn.ws.send(Message::Ping(payload.into())).await {
                    Ok(()) => Flow::Continue,
                    Err(_) => conn.disconnected().await,
                }
            }
            _ = &mut sleep => {
                armed = 0;
                conn.on_timer().await
            }
        };
        if let Flow::Closed = flow {
            break;
        }
    }
    if let Some(producer) = conn.producer.take() {
        producer.abort();
    }
    conn.release().await;
}

async fn kicked(kick: &mut Option<oneshot::Receiver<()>>) {
    match kick {
        Some(rx) => {
            if rx.await.is_err() {
                // The registry dropped the sender (the slot was removed): never fires.
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

async fn recv(units: &mut Option<mpsc::Receiver<Unit>>) -> Option<Unit> {
    match units {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn unit_frame(seq: u64, unit: &Unit) -> Message {
    match unit {
        Unit::Json(data) => Message::Text(encode_app(seq, data).into()),
        Unit::Binary(bytes) => Message::Binary(bytes.clone().into()),
    }
}

fn frame_len(message: &Message) -> u64 {
    message.len() as u64
}

impl<C: ChannelChain, S: ChannelStore> Connection<C, S> {
    fn metrics(&self) -> &Metrics {
        &self.state.metrics
    }

    /// Sends a frame. If the socket does not take it at once, the client is reading slower
    /// than we write: the session's clock stops from the moment the send began until it
    /// completes, so the client is not charged for the wait. (No timer per message: the send
    /// is polled once, and only a pending send pays for the bookkeeping.)
    async fn send(&mut self, message: Message) -> Result<(), ()> {
        let send = self.ws.send(message);
        tokio::pin!(send);
        let result = match futures_util::poll!(send.as_mut()) {
            std::task::Poll::Ready(r) => r,
            std::task::Poll::Pending => {
                let start = self.state.now();
                if let Some(s) = self.session.as_mut() {
                    s.backpressure(true, start);
                }
                let r = send.await;
                let end = self.state.now();
                if let Some(s) = self.session.as_mut() {
                    s.backpressure(false, end);
                }
                r
            }
        };
        result.map_err(|e| debug!("send failed: {e}"))
    }

    async fn close(&mut self, code: CloseCode, reason: &str) -> Flow {
        let frame = CloseFrame {
            code: WsCloseCode::from(code.as_u16()),
            reason: reason.to_string().into(),
        };
        let _ = self.ws.send(Message::Close(Some(frame))).await;
        let _ = self.ws.flush().await;
        // The closing handshake: read (and drop) what the client still sends until its Close,
        // so the socket is not reset with unread data, which could discard the frames above
        // before the client reads them. Bounded: a client that never answers is cut off.
        let _ = tokio::time::timeout(CLOSE_HANDSHAKE, async {
            while let Some(Ok(message)) = self.ws.next().await {
                if message.is_close() {
                    break;
                }
            }
        })
        .await;
        Flow::Closed
    }

    /// Performs effects in order; a `Persist` is awaited and its outcome fed back before the
    /// next effect.
    async fn apply(&mut self, effects: Vec<Effect>) -> Flow {
        let mut queue: VecDeque<Effect> = effects.into();
        // Once the socket fails, the rest of the effects that do not need it still run (the
        // claim is queued), and the session is treated as disconnected.
        let mut broken = false;
        while let Some(effect) = queue.pop_front() {
            match effect {
                Effect::Send(_) | Effect::Close(..) if broken => {}
                Effect::Send(message) => {
                    match &message {
                        ServerMessage::Error { code, .. } => self.metrics().rejected(code),
                        ServerMessage::Paused { .. } => {
                            self.metrics().pauses_total.fetch_add(1, Ordering::Relaxed);
                        }
                        ServerMessage::VoucherAck { .. } => {
                            self.metrics()
                                .vouchers_accepted
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        ServerMessage::Session { .. } => {
                            self.metrics()
                                .vouchers_accepted
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {}
                    }
                    if self
                        .send(Message::Text(encode_server(&message).into()))
                        .await
                        .is_err()
                    {
                        // The session is suspended and parked when the connection ends.
                        broken = true;
                    }
                }
                Effect::Persist {
                    channel_id,
                    voucher,
                } => {
                    let result = self.state.store.save_voucher(channel_id, voucher).await;
                    let now = self.state.now();
                    if let Some(session) = self.session.as_mut() {
                        let more = session.persisted(result, now);
                        for e in more.into_iter().rev() {
                            queue.push_front(e);
                        }
                    }
                }
                Effect::PersistConsumed {
                    channel_id,
                    consumed,
                } => {
                    if let Err(e) = self.state.store.save_consumed(channel_id, consumed).await {
                        warn!(%channel_id, "could not save consumption: {e}");
                    }
                }
                Effect::QueueClaim(claim) => {
                    Metrics::add_amount(&self.metrics().settled_total, claim.amount);
                    if let Err(e) = self.state.store.queue_claim(claim).await {
                        warn!(channel_id = %claim.channel_id, "could not queue the final claim: {e}");
                    }
                }
                Effect::CloseChannel(claim) => {
                    Metrics::add_amount(&self.metrics().settled_total, claim.amount);
                    let digest = self.state.params.domain.close_digest(&Close {
                        channelId: claim.channel_id,
                        amount: claim.amount,
                    });
                    let payee_signature = signature::sign_digest(&self.state.payee_key, &digest);
                    let chain_claim = Claim {
                        channel_id: claim.channel_id,
                        nonce: claim.voucher.nonce,
                        cumulative: claim.voucher.cumulative,
                        amount: claim.amount,
                        signature: claim.voucher.signature,
                    };
                    if let Err(e) = self
                        .state
                        .chain
                        .close_cooperative(&chain_claim, &payee_signature)
                        .await
                    {
                        // The claim is not lost: the settler takes it instead.
                        warn!(channel_id = %claim.channel_id, "cooperative close failed, queuing the claim: {e}");
                        if let Err(e) = self.state.store.queue_claim(claim).await {
                            warn!(channel_id = %claim.channel_id, "could not queue the final claim: {e}");
                        }
                    }
                    self.state.forget_channel(claim.channel_id);
                }
                Effect::Request(body) => {
                    if let Some(p) = self.producer.take() {
                        p.abort();
                    }
                    let (tx, rx) = mpsc::channel(self.state.limits.queue_capacity);
                    self.producer = Some(self.resource.start(body, tx));
                    self.units = Some(rx);
                    self.held = None;
                }
                Effect::Close(code, reason) => {
                    if let Some(s) = &self.session {
                        Metrics::add_amount(&self.metrics().consumed_total, s.meter().consumed());
                    }
                    return self.close(code, &reason).await;
                }
            }
        }
        if broken { Flow::Closed } else { Flow::Continue }
    }

    /// Delivers the held unit if it can now be paid for.
    async fn deliver_ready(&mut self) -> Flow {
        if self.held.is_none() || !self.session.as_ref().is_some_and(Session::can_deliver) {
            return Flow::Continue;
        }
        let unit = self.held.take().expect("checked");
        self.on_unit(Some(unit)).await
    }

    /// Delivers `unit`, then up to [`BATCH_UNITS`] more that are already queued, before the
    /// loop looks at the socket and the timers again.
    async fn on_units(&mut self, unit: Option<Unit>) -> Flow {
        let mut next = unit;
        let mut delivered = 0;
        loop {
            let more = next.is_some();
            if let Flow::Closed = self.on_unit(next).await {
                return Flow::Closed;
            }
            delivered += 1;
            // Take another queued unit only if it will be delivered in this batch: a unit
            // taken from the queue is never dropped.
            if !more
                || delivered >= BATCH_UNITS
                || self.held.is_some()
                || !self.session.as_ref().is_some_and(Session::can_deliver)
            {
                return Flow::Continue;
            }
            next = match self.units.as_mut().map(mpsc::Receiver::try_recv) {
                Some(Ok(unit)) => Some(unit),
                _ => return Flow::Continue,
            };
        }
    }

    async fn on_unit(&mut self, unit: Option<Unit>) -> Flow {
        let Some(unit) = unit else {
            // The resource finished this request.
            self.units = None;
            return Flow::Continue;
        };
        let now = self.state.now();
        let Some(session) = self.session.as_mut() else {
            return Flow::Continue;
        };
        let frame = unit_frame(session.next_seq(), &unit);
        match session.deliver(frame_len(&frame), now) {
            Ok((_, effects)) => {
                self.metrics()
                    .messages_total
                    .fetch_add(1, Ordering::Relaxed);
                if self.send(frame).await.is_err() {
                    return self.disconnected().await;
                }
                if effects.is_empty() {
                    Flow::Continue
                } else {
                    self.apply(effects).await
                }
            }
            Err(effects) => {
                self.held = Some(unit);
                self.apply(effects).await
            }
        }
    }

    async fn on_inbound(
        &mut self,
        inbound: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    ) -> Flow {
        let now = self.state.now();
        self.last_inbound = now;
        let message = match inbound {
            None => return self.disconnected().await,
            Some(Err(tokio_tungstenite::tungstenite::Error::Capacity(e))) => {
                use tokio_tungstenite::tungstenite::error::CapacityError;
                let len = match e {
                    CapacityError::MessageTooLong { size, .. } => size,
                    CapacityError::TooManyHeaders => 0,
                };
                let error = ProtocolError::TooLarge {
                    len,
                    max: self.state.limits.max_message_bytes,
                };
                debug!("frame too large: {e}");
                return self.refuse(&error).await;
            }
            Some(Err(e)) => {
                debug!("websocket error: {e}");
                return self.disconnected().await;
            }
            Some(Ok(m)) => m,
        };
        match message {
            Message::Text(text) => match decode_client(&text) {
                Ok(message) => self.on_client_message(message, now).await,
                Err(error) => self.refuse(&error).await,
            },
            Message::Binary(_) => self.refuse(&ProtocolError::Binary).await,
            Message::Pong(payload) => {
                if let Some(session) = self.session.as_mut() {
                    if let Ok(sent) = <[u8; 8]>::try_from(payload.as_ref()) {
                        session.set_rtt(now.saturating_sub(u64::from_be_bytes(sent)));
                    }
                    session.pong(now);
                }
                Flow::Continue
            }
            Message::Ping(_) | Message::Frame(_) => Flow::Continue,
            Message::Close(_) => self.disconnected().await,
        }
    }

    /// Answers a frame that could not be decoded; the session is unchanged.
    async fn refuse(&mut self, error: &ProtocolError) -> Flow {
        let data = self.session.as_ref().map(|s| {
            let a = s.accepted();
            crate::protocol::ErrorData {
                nonce: a.nonce,
                cumulative: a.cumulative,
                consumed: s.meter().consumed(),
            }
        });
        let mut effects = vec![Effect::Send(ServerMessage::Error {
            code: error.code().into(),
            message: error.to_string(),
            retriable: error.close_code().is_none(),
            data,
        })];
        if let Some(code) = error.close_code() {
            let now = self.state.now();
            if let Some(s) = self.session.as_mut() {
                effects.extend(
                    s.disconnected(now)
                        .into_iter()
                        .filter(|e| !matches!(e, Effect::Close(..))),
                );
            }
            effects.push(Effect::Close(code, error.code().into()));
        }
        self.apply(effects).await
    }

    async fn on_client_message(&mut self, message: ClientMessage, now: Nanos) -> Flow {
        if let Some(session) = self.session.as_mut() {
            let is_voucher = matches!(message, ClientMessage::Voucher(_));
            let started = std::time::Instant::now();
            let effects = {
                let mut keys = self.state.keys.lock().unwrap_or_else(|p| p.into_inner());
                session.on_message(message, &mut keys, now)
            };
            let flow = self.apply(effects).await;
            if is_voucher {
                // Verification latency: the checks, the signature and the store write, up to
                // the acknowledgment (or the refusal).
                self.metrics()
                    .observe_verification(started.elapsed().as_micros() as u64);
            }
            return flow;
        }
        match message {
            ClientMessage::Open(msg) => {
                // Claim the channel first, so the state loaded below is not changing under
                // another session of this process.
                let id = self.state.next_session_id();
                let Some((token, kick)) = self.state.registry.admit(&id, msg.channel_id) else {
                    let effects = vec![Effect::Send(ServerMessage::Error {
                        code: "channel_busy".into(),
                        message:
                            "another session is open on this channel; resume it or close it first"
                                .into(),
                        retriable: true,
                        data: None,
                    })];
                    return self.apply(effects).await;
                };
                let info = match self.state.read_channel(msg.channel_id).await {
                    Ok(info) => info,
                    Err(e) => {
                        let effects = vec![Effect::Send(ServerMessage::Error {
                            code: "chain_unavailable".into(),
                            message: e.to_string(),
                            retriable: true,
                            data: None,
                        })];
                        self.state.registry.remove(&id);
                        return self.apply(effects).await;
                    }
                };
                let stored = match self.state.store.load(msg.channel_id).await {
                    Ok(stored) => stored,
                    Err(e) => {
                        // Nothing can be accepted without the store: close (1011) so the
                        // client retries later, possibly on another server.
                        let effects = vec![
                            Effect::Send(ServerMessage::Error {
                                code: e.code().into(),
                                message: e.to_string(),
                                retriable: true,
                                data: None,
                            }),
                            Effect::Close(CloseCode::Internal, e.code().into()),
                        ];
                        self.state.registry.remove(&id);
                        return self.apply(effects).await;
                    }
                };
                let now = self.state.now();
                let opened = {
                    let mut keys = self.state.keys.lock().unwrap_or_else(|p| p.into_inner());
                    Session::open(
                        self.state.params.clone(),
                        id.clone(),
                        token,
                        info,
                        stored,
                        &msg,
                        &mut keys,
                        now,
                    )
                };
                match opened {
                    Ok((session, effects)) => {
                        self.session = Some(session);
                        self.kick = Some(kick);
                        self.metrics()
                            .sessions_total
                            .fetch_add(1, Ordering::Relaxed);
                        self.metrics()
                            .sessions_active
                            .fetch_add(1, Ordering::Relaxed);
                        self.apply(effects).await
                    }
                    Err(effects) => {
                        self.state.registry.remove(&id);
                        self.apply(effects).await
                    }
                }
            }
            ClientMessage::Resume { token } => match self.state.registry.resume(&token).await {
                Ok(claimed) => {
                    let mut session = claimed.session;
                    let now = self.state.now();
                    let effects = session.resume(claimed.token, now);
                    self.session = Some(session);
                    self.kick = Some(claimed.kick);
                    self.metrics()
                        .sessions_active
                        .fetch_add(1, Ordering::Relaxed);
                    self.apply(effects).await
                }
                Err(e) => {
                    let effects = vec![
                        Effect::Send(ServerMessage::Error {
                            code: "bad_resume_token".into(),
                            message: e.to_string(),
                            retriable: false,
                            data: None,
                        }),
                        Effect::Close(CloseCode::BadResumeToken, "bad_resume_token".into()),
                    ];
                    self.apply(effects).await
                }
            },
            _ => {
                let effects = vec![Effect::Send(ServerMessage::Error {
                    code: "no_session".into(),
                    message: "send open (or resume) first".into(),
                    retriable: true,
                    data: None,
                })];
                self.apply(effects).await
            }
        }
    }

    async fn on_timer(&mut self) -> Flow {
        let now = self.state.now();
        if now >= self.last_inbound + self.state.limits.idle_timeout_ms * 1_000_000 {
            // Parked on release: the client can resume within the window.
            return self.close(CloseCode::Policy, "idle").await;
        }
        match self.session.as_mut() {
            Some(session) => {
                let effects = session.tick(now);
                self.apply(effects).await
            }
            None => self.close(CloseCode::Policy, "open timeout").await,
        }
    }

    /// The socket is gone: the session is suspended and parked when the loop ends.
    async fn disconnected(&mut self) -> Flow {
        Flow::Closed
    }

    /// Shutdown: the session is saved and parked (resumable), the client told 1001.
    async fn shutdown(&mut self) -> Flow {
        self.release().await;
        self.close(CloseCode::GoingAway, "server going away").await
    }

    /// Another connection resumed this session: save, and close with 4409.
    async fn superseded(&mut self) -> Flow {
        self.kick = None;
        // Park first, so the resuming connection gets the session without waiting for this
        // one's closing handshake.
        self.release().await;
        let error = ServerMessage::Error {
            code: "session_superseded".into(),
            message: "the session was resumed on another connection".into(),
            retriable: false,
            data: None,
        };
        let _ = self.send(Message::Text(encode_server(&error).into())).await;
        self.metrics().rejected("session_superseded");
        self.close(CloseCode::SessionSuperseded, "session superseded")
            .await
    }

    /// The connection ends: an open session is suspended and parked for resume (or finished
    /// if it cannot be parked); a closed one leaves the registry.
    async fn release(&mut self) {
        let Some(mut session) = self.session.take() else {
            return;
        };
        self.state
            .metrics
            .sessions_active
            .fetch_sub(1, Ordering::Relaxed);
        if !session.is_open() {
            self.state.registry.remove(session.id());
            return;
        }
        let now = self.state.now();
        let effects = session.suspend(now);
        let id = session.id().to_string();
        let _ = self.apply(effects).await;
        if let Some(mut unparked) = self.state.registry.park(session) {
            let effects: Vec<Effect> = unparked
                .disconnected(now)
                .into_iter()
                .filter(|e| !matches!(e, Effect::Send(_) | Effect::Close(..)))
                .collect();
            let _ = self.apply(effects).await;
            self.state.registry.remove(&id);
        }
    }
}
