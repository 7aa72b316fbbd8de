//! One WebSocket connection: the only place a session meets the socket, the store, the chain
//! and the resource. It feeds the session messages, time and I/O results, and performs the
//! effects the session returns, in order.
//!
//! Nothing here waits unbounded: every socket write has a timeout that closes the connection
//! (a client that stops reading cannot freeze its connection's timers, its 4409 takeover or
//! the shutdown), and a connection without a session is closed after a few errors.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::future::{BoxFuture, OptionFuture};
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{
    CloseCode as WsCloseCode, Data, OpCode,
};
use tracing::{debug, warn};

use super::guard::Unauthenticated;
use super::inbox::Inbox;
use super::lease::{Held, LeaseNews};
use super::metrics::Metrics;
use super::registry::{ChainView, Refusal, Ticket};
use super::resource::{Ended, Resource, Unit};
use super::{ServerState, Shutdown};
use crate::chain::{ChannelChain, Claim};
use crate::channel::{ChannelError, Close, signature};
use crate::meter::Nanos;
use crate::protocol::{
    ClientMessage, CloseCode, EndReason, ProtocolError, ServerMessage, SignedStateMsg,
    decode_client, encode_app, encode_server,
};
use crate::session::resume::{ResumeClaims, ResumeError};
use crate::session::{ChainUpdate, Effect, Opening, Session, parse_voucher};
use crate::store::{
    ChannelStore, Fence, PendingClaim, Resumed, SessionRecord, SessionWrite, SettlementStore,
    StoreError,
};

type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Units delivered back to back before the loop looks at the socket and timers again: enough
/// to amortize the loop, few enough that a voucher never waits behind a long burst.
const BATCH_UNITS: usize = 32;

/// The longest frame a protocol message goes out in, its 4-byte header included: a longer
/// message (the `session` message, about 630 bytes with its resume token) is sent in fragments
/// (RFC 6455 5.4; every client library reassembles them). tungstenite's write buffer keeps the
/// capacity of the largest frame written for the connection's life, so this keeps an idle
/// session's at 320 bytes instead of 640. `app` frames are not fragmented: they are the
/// resource's, and a large one written whole costs one write instead of several.
const MAX_PROTOCOL_FRAME: usize = 320;

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
    producer: Option<JoinHandle<Ended>>,
    /// A unit taken from the queue that could not be paid for yet.
    held: Option<Box<Unit>>,
    last_inbound: Nanos,
    /// The session's news: another connection resumed it (close with 4409), the chain's news
    /// of its channel, the lease keeper's (taken from `lease`).
    inbox: Option<Arc<Inbox>>,
    /// Counts this connection against its address until it has a session (and knows the
    /// address).
    unauthenticated: Arc<Unauthenticated>,
    /// `open`s of this connection refused after their signature was checked.
    failed_opens: u32,
    /// `error`s sent while the connection had no session.
    errors_without_session: u32,
    /// The session was counted in `sessions_active`.
    counted_active: bool,
    /// The session's lease on its channel (renewed by the process's keeper): every money write
    /// carries its fence, and nothing is delivered past its deadline.
    lease: Option<Arc<Held>>,
    /// Delivery is paused because the lease's deadline passed unrenewed.
    lapsed: bool,
    /// The store refused a write of this session for a stale fence: another process has the
    /// channel, and this connection lets the session go.
    lost: bool,
    /// The one-time id of the session's current resume token (its store record's).
    jti: String,
    /// What the session record holds of the session's progress (`seq`, request), as last
    /// written.
    recorded: (u64, Option<u64>),
    /// A connection without a session by then is closed (1008 "open timeout").
    opened_by: Nanos,
    /// The server's stop.
    stop: Arc<Shutdown>,
    /// The connection's slot, held until it ends.
    _permit: Arc<tokio::sync::OwnedSemaphorePermit>,
}

/// The connection, to run until it closes: built here, outside its future, so that the
/// future holds the connection once (its arguments are not kept beside it for its life).
pub(super) fn run<C: ChannelChain, S: ChannelStore + SettlementStore>(
    state: Arc<ServerState<C, S>>,
    ws: Ws,
    resource: Arc<dyn Resource>,
    unauthenticated: Arc<Unauthenticated>,
    stop: Arc<Shutdown>,
    permit: Arc<tokio::sync::OwnedSemaphorePermit>,
) -> impl std::future::Future<Output = ()> + Send {
    let now = state.now();
    let opened_by = now + state.limits.handshake_timeout_ms * 1_000_000;
    let conn = Connection {
        state,
        ws,
        resource,
        session: None,
        units: None,
        producer: None,
        held: None,
        last_inbound: now,
        inbox: None,
        unauthenticated,
        failed_opens: 0,
        errors_without_session: 0,
        counted_active: false,
        lease: None,
        lapsed: false,
        lost: false,
        jti: String::new(),
        recorded: (0, None),
        opened_by,
        stop,
        _permit: permit,
    };
    let mut conn = conn;
    // The block holds the connection; its loop borrows it there (an `async fn` taking `self`
    // would keep it twice: the argument and the local it is moved into).
    async move { conn.serve().await }
}

impl<C: ChannelChain, S: ChannelStore + SettlementStore> Connection<C, S> {
    /// The connection's loop, until it closes.
    async fn serve(&mut self) {
        let conn = self;
        let now = conn.last_inbound;
        let stop = conn.stop.clone();
        // The heartbeat's Ping is one more deadline of the connection's one timer (a timer of
        // its own would be another allocation and timer entry in every idle connection).
        // (Settings are read where they are used: every local kept across the loop's awaits
        // is in every connection's future.)
        let mut next_ping = now + conn.heartbeat_ns();
        // The connection's one timer, boxed: its 112 bytes in the future would put the task
        // (the future and tokio's 112 bytes around it) over 2,048 bytes, into the allocator's
        // next size class, 512 bytes larger.
        let mut sleep = Box::pin(tokio::time::sleep(Duration::ZERO));
        let mut armed: Nanos = 0;
        loop {
            // Made before the flag is read: a stop after the read wakes it.
            let stopped = stop.notified();
            tokio::pin!(stopped);
            if stop.stopping() {
                Box::pin(conn.shutdown()).await;
                break;
            }
            // Deliver what can be paid for before waiting on anything else (rare: a unit held
            // for want of credit, then paid for; boxed, so its state is not in every future).
            if conn.held.is_some()
                && conn.session.as_ref().is_some_and(Session::can_deliver)
                && let Flow::Closed = Box::pin(conn.deliver_ready()).await
            {
                break;
            }
            let now = conn.state.now();
            let wake = match &conn.session {
                Some(s) => s.next_wakeup(),
                None => Some(conn.opened_by),
            };
            // The lease's deadline (renewals move it later before it comes, in a healthy process).
            let lease_wake = conn
                .lease
                .as_ref()
                .filter(|_| !conn.lapsed)
                .map(|l| l.deadline());
            let wake = match (wake, lease_wake) {
                (Some(w), Some(l)) => Some(w.min(l)),
                (w, l) => w.or(l),
            };
            let idle_at = conn.last_inbound + conn.state.limits.idle_timeout_ms * 1_000_000;
            let wake = wake.map_or(idle_at, |w| w.min(idle_at)).min(next_ping);
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
            if conn.lost {
                // A write refused for its fence: the lease was lost (found here before the
                // keeper's renewal could say so).
                conn.lost = false;
                conn.metrics().leases_lost.fetch_add(1, Ordering::Relaxed);
                if let Flow::Closed =
                    Box::pin(conn.superseded("another server took this session's channel over"))
                        .await
                {
                    break;
                }
                continue;
            }
            let flow = tokio::select! {
                biased;
                // The rare paths are boxed: their state is allocated when they run, not kept in
                // every connection's future.
                () = &mut stopped => Box::pin(conn.shutdown()).await,
                Some(()) = OptionFuture::from(conn.inbox.as_deref().map(Inbox::notified)) => {
                    Box::pin(conn.on_news()).await
                }
                // A frame from the client (a voucher, a Pong: far rarer than units out).
                inbound = conn.ws.next() => match Box::pin(conn.on_inbound(inbound)).await {
                    // A client that sends frames without pause keeps the timer from its turn
                    // (its frames come first, and a poll's budget runs out on them): a deadline
                    // that had passed when the frame came is met here instead (the open
                    // deadline, the idle and voucher deadlines, the Ping).
                    Flow::Continue if armed != 0 && armed <= conn.last_inbound => {
                        armed = 0;
                        Box::pin(conn.on_wake(&mut next_ping)).await
                    }
                    flow => flow,
                },
                // The timer before the units: it is rarely ready, and a resource that keeps the
                // queue full must not starve the heartbeat (its lapse pauses delivery), the
                // usage saves or the deadlines.
                _ = &mut sleep => {
                    armed = 0;
                    Box::pin(conn.on_wake(&mut next_ping)).await
                }
                unit = recv(&mut conn.units), if can_take => Box::pin(conn.on_units(unit)).await,
            };
            if let Flow::Closed = flow {
                break;
            }
        }
        conn.stop_request();
        Box::pin(conn.release()).await;
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

/// `text` in pieces of at most `max` bytes (`max` at least 4), each ending on a character
/// boundary: the protocol allows a character split across fragments, but a client that checks
/// each fragment's UTF-8 alone would fail on one.
fn pieces(text: &str, max: usize) -> impl Iterator<Item = &str> {
    // Below 4 a piece could end up empty (a 4-byte character first) and the pieces never end.
    debug_assert!(max >= 4, "pieces of at least one character");
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = max.min(rest.len());
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let (piece, tail) = rest.split_at(end);
        rest = tail;
        Some(piece)
    })
}

fn frame_len(message: &Message) -> u64 {
    message.len() as u64
}

fn error_message(code: &str, message: impl Into<String>, retriable: bool) -> ServerMessage {
    ServerMessage::Error {
        code: code.into(),
        message: message.into(),
        retriable,
        data: None,
    }
}

impl<C: ChannelChain, S: ChannelStore + SettlementStore> Connection<C, S> {
    fn metrics(&self) -> &Metrics {
        &self.state.metrics
    }

    /// Sends a frame, within the send timeout: a client that does not read for that long is
    /// cut off (its session is parked and can be resumed), so a blocked write can never freeze
    /// the connection. If the socket does not take the frame at once, the client is reading
    /// slower than we write: the session's clock stops from the moment the send began until it
    /// completes, so the client is not charged for the wait. (No timer per message: the send
    /// is polled once, and only a pending send pays for the timer.)
    async fn send(&mut self, message: Message) -> Result<(), ()> {
        let timeout = Duration::from_millis(self.state.limits.send_timeout_ms);
        let mut send = self.ws.send(message);
        let result = match futures_util::poll!(&mut send) {
            std::task::Poll::Ready(r) => r,
            std::task::Poll::Pending => {
                let start = self.state.now();
                if let Some(s) = self.session.as_mut() {
                    s.backpressure(true, start);
                }
                // Boxed with its timer: only a pending send pays for them, and every
                // connection's future stays the smaller.
                let r = Box::pin(tokio::time::timeout(timeout, send)).await;
                let end = self.state.now();
                if let Some(s) = self.session.as_mut() {
                    s.backpressure(false, end);
                }
                match r {
                    Ok(r) => r,
                    Err(_) => {
                        debug!("send timed out: the client is not reading");
                        self.metrics().send_timeouts.fetch_add(1, Ordering::Relaxed);
                        return Err(());
                    }
                }
            }
        };
        result.map_err(|e| debug!("send failed: {e}"))
    }

    /// Sends a protocol message: in one frame, or in fragments of at most
    /// [`MAX_PROTOCOL_FRAME`] bytes when it is longer.
    async fn send_protocol(&mut self, message: &ServerMessage) -> Result<(), ()> {
        const PAYLOAD: usize = MAX_PROTOCOL_FRAME - 4;
        let text = encode_server(message);
        if text.len() <= PAYLOAD {
            return self.send(Message::Text(text.into())).await;
        }
        let count = pieces(&text, PAYLOAD).count();
        for (i, piece) in pieces(&text, PAYLOAD).enumerate() {
            let opcode = if i == 0 {
                OpCode::Data(Data::Text)
            } else {
                OpCode::Data(Data::Continue)
            };
            let payload = tokio_tungstenite::tungstenite::Bytes::copy_from_slice(piece.as_bytes());
            self.send(Message::Frame(Frame::message(
                payload,
                opcode,
                i + 1 == count,
            )))
            .await?;
        }
        Ok(())
    }

    async fn close(&mut self, code: CloseCode, reason: &str) -> Flow {
        let frame = CloseFrame {
            code: WsCloseCode::from(code.as_u16()),
            reason: reason.to_string().into(),
        };
        // The session is over (or parked) before the client hears of it: once it has the Close
        // frame (or its receipt, before it) it can open or resume the channel again at once,
        // here or on another process, and is never refused `channel_busy` by its own past.
        self.release().await;
        // Bounded like every send: a client that does not read gets no closing handshake.
        if self.send(Message::Close(Some(frame))).await.is_err() {
            return Flow::Closed;
        }
        let _ = tokio::time::timeout(CLOSE_HANDSHAKE, self.ws.flush()).await;
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

    /// Performs effects in order; a `Verify` or a `Persist` is awaited and its outcome fed back
    /// before the next effect. Boxed: every path of the connection awaits it, and its state
    /// (store and chain calls) would otherwise be part of the connection's future at each of
    /// them, resident for the session's life.
    fn apply(&mut self, effects: Vec<Effect>) -> BoxFuture<'_, Flow> {
        Box::pin(self.apply_now(effects))
    }

    async fn apply_now(&mut self, effects: Vec<Effect>) -> Flow {
        let mut queue: VecDeque<Effect> = effects.into();
        // Once the socket fails, the rest of the effects that do not need it still run (the
        // claim is queued), and the session is treated as disconnected.
        let mut broken = false;
        while let Some(effect) = queue.pop_front() {
            match effect {
                Effect::Send(_) | Effect::Close(..) if broken => {}
                Effect::Send(message) => {
                    if self.counted_active
                        && self.session.as_ref().is_some_and(Session::is_closed)
                        && !queue.iter().any(Effect::writes_money)
                    {
                        // The session ended and what it owed the store is written: the channel
                        // is let go before the client hears of the end (its receipt).
                        self.release().await;
                    }
                    let without_session = !self.session.as_ref().is_some_and(Session::is_open);
                    match &message {
                        ServerMessage::Error { code, .. } => {
                            self.metrics().rejected(code);
                            if without_session {
                                self.errors_without_session += 1;
                            }
                        }
                        ServerMessage::Paused { .. } => {
                            self.metrics().pauses_total.fetch_add(1, Ordering::Relaxed);
                        }
                        ServerMessage::VoucherAck { .. } => {
                            self.metrics()
                                .vouchers_accepted
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {}
                    }
                    let ended = matches!(message, ServerMessage::End { .. });
                    if self.send_protocol(&message).await.is_err() {
                        // The session is suspended and parked when the connection ends.
                        broken = true;
                    } else if ended {
                        self.record_progress().await;
                    } else if without_session
                        && self.errors_without_session >= self.state.limits.max_errors_before_open
                        && !queue.iter().any(|e| matches!(e, Effect::Close(..)))
                    {
                        // A connection that is nobody's session gets a few answers, not a
                        // stream of them (a flood of bad frames is cut off here).
                        return self.close(CloseCode::Policy, "too many errors").await;
                    }
                }
                Effect::Verify {
                    payer,
                    domain,
                    voucher,
                } => {
                    let started = std::time::Instant::now();
                    let result = self
                        .state
                        .verifier
                        .verify(domain, payer, voucher.clone())
                        .await;
                    self.metrics().signature_latency.observe_since(started);
                    if let Some(session) = self.session.as_mut() {
                        let more = session.verified(&voucher, result);
                        for e in more.into_iter().rev() {
                            queue.push_front(e);
                        }
                    }
                }
                Effect::Persist {
                    channel_id,
                    voucher,
                } => {
                    let fence = self.fence();
                    let started = std::time::Instant::now();
                    let result = self
                        .state
                        .store
                        .save_voucher(channel_id, voucher, fence)
                        .await;
                    self.metrics().store_latency.observe_since(started);
                    self.count_fenced(&result);
                    let now = self.state.now();
                    if let Some(session) = self.session.as_mut() {
                        let opening = !session.is_open();
                        let mut more = session.persisted(&voucher, result, now);
                        if opening && self.session.as_ref().is_some_and(Session::is_open) {
                            // The session's record, before the client gets its token: without
                            // it the token would resume nothing (or an older session), so the
                            // opening fails and the client opens again.
                            if self.write_record(SessionWrite::Fresh, false).await {
                                let sid = self.session.as_ref().map(|s| s.id().to_string());
                                self.opened(channel_id, &sid.unwrap_or_default());
                            } else {
                                let now = self.state.now();
                                if let Some(s) = self.session.as_mut() {
                                    s.abandon(now);
                                }
                                more = vec![
                                    Effect::Send(error_message(
                                        "store_unavailable",
                                        "the session could not be recorded; open again",
                                        true,
                                    )),
                                    Effect::Close(CloseCode::Internal, "store_unavailable".into()),
                                ];
                            }
                        }
                        for e in more.into_iter().rev() {
                            queue.push_front(e);
                        }
                    }
                }
                Effect::PersistConsumed {
                    channel_id,
                    consumed,
                } => {
                    let fence = self.fence();
                    let result = self
                        .state
                        .store
                        .save_consumed(channel_id, consumed, fence)
                        .await;
                    self.count_fenced(&result);
                    match result {
                        Ok(()) => self.record_progress().await,
                        Err(StoreError::Fenced { .. }) => {}
                        Err(e) => {
                            warn!(%channel_id, "consumption not saved, retrying in the background: {e}");
                            self.state
                                .flusher
                                .defer_consumed(channel_id, consumed, fence);
                        }
                    }
                }
                Effect::QueueClaim(claim) => self.queue_claim(claim).await,
                Effect::CloseChannel(claim) => {
                    if !self.close_channel(claim).await {
                        // The receipt (next) says the refund is not immediate.
                        if let Some(Effect::Send(ServerMessage::Receipt {
                            close_pending, ..
                        })) = queue
                            .iter_mut()
                            .find(|e| matches!(e, Effect::Send(ServerMessage::Receipt { .. })))
                        {
                            *close_pending = true;
                        }
                    }
                }
                Effect::Request(body) => {
                    self.stop_request();
                    // Recorded before it starts: a request cut by a crash ends `interrupted`
                    // on the resumed session, wherever it resumes.
                    self.record_progress().await;
                    let (tx, rx) = mpsc::channel(self.state.limits.queue_capacity);
                    self.producer = Some(self.resource.start(body, tx));
                    self.units = Some(rx);
                }
                Effect::CancelRequest => self.stop_request(),
                Effect::ProbeStore => {
                    let up = self.state.store.ping().await.is_ok();
                    let now = self.state.now();
                    if let Some(session) = self.session.as_mut() {
                        let more = session.store_probed(up, now);
                        for e in more.into_iter().rev() {
                            queue.push_front(e);
                        }
                    }
                }
                Effect::Account { consumed, queued } => {
                    Metrics::add_amount(&self.metrics().consumed_total, consumed);
                    Metrics::add_amount(&self.metrics().settled_total, queued);
                }
                Effect::Close(code, reason) => {
                    return self.close(code, &reason).await;
                }
            }
        }
        if broken { Flow::Closed } else { Flow::Continue }
    }

    /// Stops the running request's resource and drops what it had queued.
    fn stop_request(&mut self) {
        if let Some(p) = self.producer.take() {
            p.abort();
        }
        self.units = None;
        self.held = None;
    }

    async fn queue_claim(&mut self, claim: PendingClaim) {
        let fence = self.fence();
        let result = self.state.store.queue_claim(claim, fence).await;
        self.count_fenced(&result);
        match result {
            Ok(()) | Err(StoreError::Fenced { .. }) => {}
            Err(e) => {
                warn!(channel_id = %claim.channel_id, "claim not queued, retrying in the background: {e}");
                self.state.flusher.defer_claim(claim, fence);
            }
        }
    }

    /// The fencing token of the session's lease (every money write carries it).
    fn fence(&self) -> Fence {
        self.lease.as_ref().map_or(Fence::NONE, |l| l.fence)
    }

    /// Counts a write the store refused for a stale fence: this process lost the channel, and
    /// the connection lets the session go (at the top of its loop).
    fn count_fenced<T>(&mut self, result: &Result<T, StoreError>) {
        if let Err(e @ StoreError::Fenced { .. }) = result {
            warn!("a write of a session whose channel moved on was refused: {e}");
            self.metrics()
                .fencing_refusals
                .fetch_add(1, Ordering::Relaxed);
            self.lost = self.session.as_ref().is_some_and(Session::is_open);
        }
    }

    /// Writes the session's record (what a resume needs) under its lease; `parked` when the
    /// session leaves its connection (the record is then exact).
    async fn write_record(&mut self, write: SessionWrite, parked: bool) -> bool {
        let Some(session) = self.session.as_ref() else {
            return false;
        };
        let record = SessionRecord {
            sid: session.id().to_string(),
            jti: self.jti.clone(),
            next_seq: session.next_seq(),
            request: session.unended_request(),
            holder: self.state.instance.clone(),
            parked,
        };
        let channel = session.channel_id();
        let progress = (record.next_seq, record.request);
        let result = self
            .state
            .store
            .put_session(
                channel,
                &record,
                write,
                self.fence(),
                self.state.resume_window(),
            )
            .await;
        self.count_fenced(&result);
        match result {
            Ok(()) => {
                self.recorded = progress;
                true
            }
            // Not resumable from where it is now: a resume goes on from the record as it was
            // (a request it shows streaming ends `interrupted`), or the client opens again.
            Err(e) => {
                warn!(%channel, "the session record was not written: {e}");
                false
            }
        }
    }

    /// Records the session's progress if it moved since the record was last written.
    async fn record_progress(&mut self) {
        let Some(session) = self.session.as_ref() else {
            return;
        };
        if session.is_open() && (session.next_seq(), session.unended_request()) != self.recorded {
            let _ = self.write_record(SessionWrite::Progress, false).await;
        }
    }

    /// Closes the channel cooperatively: the payee's consent (`Close`) never expires on-chain,
    /// so the channel is first marked closing in the store (it takes no new session or
    /// voucher from then on, whatever happens to the transaction). With the payee's key the
    /// server signs and submits it; without (a separate settler holds the key), the close is
    /// handed to the settler through the store. Returns whether the channel is closed now; if
    /// not, the claim is queued (or the close handed over) and the receipt says so.
    async fn close_channel(&mut self, claim: PendingClaim) -> bool {
        let channel_id = claim.channel_id;
        let fence = self.fence();
        let marked = self
            .state
            .store
            .mark_closing(channel_id, claim.amount, fence)
            .await;
        self.count_fenced(&marked);
        if let Err(e) = marked {
            warn!(%channel_id, "could not record the close, queuing the claim instead: {e}");
            self.queue_claim(claim).await;
            return false;
        }
        let Some(key) = self.state.payee_key.clone() else {
            if let Err(e) = self.state.store.queue_close(claim).await {
                warn!(%channel_id, "could not hand the close to the settler, queuing the claim: {e}");
                self.queue_claim(claim).await;
            }
            return false;
        };
        let digest = self.state.params.domain.close_digest(&Close {
            channelId: channel_id,
            amount: claim.amount,
        });
        let payee_signature = signature::sign_digest(&key, &digest);
        let chain_claim = Claim {
            channel_id,
            nonce: claim.voucher.nonce,
            cumulative: claim.voucher.cumulative,
            amount: claim.amount,
            signature: claim.voucher.signature,
        };
        let result = {
            let _sending = self.state.send_lock.lock().await;
            self.state
                .chain
                .close_cooperative(&chain_claim, &payee_signature)
                .await
        };
        self.state.forget_channel(channel_id);
        match result {
            Ok(_) => true,
            Err(e) => {
                // The claim is not lost: the settler takes it instead.
                warn!(%channel_id, "cooperative close failed, queuing the claim: {e}");
                self.queue_claim(claim).await;
                false
            }
        }
    }

    /// The session's opening voucher is stored: the session is the channel's, live.
    fn opened(&mut self, channel: alloy::primitives::B256, sid: &str) {
        self.state.registry.activate(channel, sid);
        self.unauthenticated.release();
        self.metrics()
            .sessions_total
            .fetch_add(1, Ordering::Relaxed);
        // The opening voucher (a resume's `session` message stores none).
        self.metrics()
            .vouchers_accepted
            .fetch_add(1, Ordering::Relaxed);
        self.count_active(true);
    }

    fn count_active(&mut self, active: bool) {
        if active != self.counted_active {
            self.counted_active = active;
            if active {
                self.metrics()
                    .sessions_active
                    .fetch_add(1, Ordering::Relaxed);
            } else {
                self.metrics()
                    .sessions_active
                    .fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Delivers the held unit if it can now be paid for.
    async fn deliver_ready(&mut self) -> Flow {
        if self.held.is_none() || !self.session.as_ref().is_some_and(Session::can_deliver) {
            return Flow::Continue;
        }
        let unit = *self.held.take().expect("checked");
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
            return self.on_request_done().await;
        };
        let now = self.state.now();
        if let Flow::Closed = self.lease_gate(now).await {
            return Flow::Closed;
        }
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
                    return Flow::Closed;
                }
                if effects.is_empty() {
                    Flow::Continue
                } else {
                    self.apply(effects).await
                }
            }
            Err(effects) => {
                self.held = Some(Box::new(unit));
                self.apply(effects).await
            }
        }
    }

    /// The resource finished the request, and every unit it produced was delivered: `end`.
    async fn on_request_done(&mut self) -> Flow {
        self.units = None;
        let ended = match self.producer.take() {
            Some(producer) => producer.await.unwrap_or_else(|e| {
                Ended::failed(format!("the resource stopped unexpectedly: {e}"))
            }),
            None => Ended::because(EndReason::Completed),
        };
        let Some(session) = self.session.as_mut() else {
            return Flow::Continue;
        };
        let effects = session.request_ended(ended.reason, ended.failure);
        self.apply(effects).await
    }

    async fn on_chain(&mut self, view: ChainView) -> Flow {
        let now = self.state.now();
        let Some(session) = self.session.as_mut() else {
            return Flow::Continue;
        };
        let mut effects = Vec::new();
        if let Some(deposit) = view.deposit {
            effects.extend(session.chain_update(ChainUpdate::ToppedUp { deposit }, now));
        }
        if let Some(closing) = view.closing {
            effects.extend(session.chain_update(closing, now));
        }
        self.apply(effects).await
    }

    async fn on_inbound(
        &mut self,
        inbound: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    ) -> Flow {
        let now = self.state.now();
        self.last_inbound = now;
        let message = match inbound {
            None => return Flow::Closed,
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
                return Flow::Closed;
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
                let Some(session) = self.session.as_mut() else {
                    return Flow::Continue;
                };
                if let Ok(sent) = <[u8; 8]>::try_from(payload.as_ref()) {
                    session.set_rtt(now.saturating_sub(u64::from_be_bytes(sent)));
                }
                let effects = session.pong(now);
                self.apply(effects).await
            }
            Message::Ping(_) | Message::Frame(_) => Flow::Continue,
            Message::Close(_) => Flow::Closed,
        }
    }

    /// Answers a frame that could not be decoded; the session is unchanged.
    async fn refuse(&mut self, error: &ProtocolError) -> Flow {
        let data = self.session.as_ref().map(Session::error_data);
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
            let effects = session.on_message(message, now);
            let flow = self.apply(effects).await;
            if is_voucher {
                // Verification latency: the checks, the signature and the store write, up to
                // the acknowledgment (or the refusal).
                self.metrics().voucher_latency.observe_since(started);
            }
            return flow;
        }
        match message {
            ClientMessage::Open(msg) => Box::pin(self.on_open(msg)).await,
            ClientMessage::Resume { token } => Box::pin(self.on_resume(&token)).await,
            _ => {
                let error = error_message("no_session", "send open (or resume) first", true);
                self.apply(vec![Effect::Send(error)]).await
            }
        }
    }

    /// An `open` refused: counted against the connection, and against its address unless the
    /// payer signed it (a valid signature on a stale state is a client re-syncing after a
    /// restart, not an attack on the address's budget; the connection's own budget still
    /// bounds replays of a public voucher).
    fn failed_open(&mut self, against_address: bool) {
        self.failed_opens += 1;
        if against_address {
            self.state.guards.failed_open(self.unauthenticated.ip());
        }
    }

    /// Opens a session: the cheap checks of the channel first, then the voucher's signature
    /// (off the reactor), then the voucher against the stored state; only a voucher that can
    /// open a session reserves the channel, and it is stored before the session exists. A
    /// parked session on the channel is taken over once the new voucher is stored; a bad `open`
    /// changes nothing.
    async fn on_open(&mut self, msg: SignedStateMsg) -> Flow {
        let limits = &self.state.limits;
        if self.failed_opens >= limits.max_failed_opens_per_connection
            || !self.state.guards.may_open(
                self.unauthenticated.ip(),
                limits.max_failed_opens_per_ip_per_min,
            )
        {
            let effects = vec![
                Effect::Send(error_message(
                    "rate_limited",
                    "too many failed opens; retry later",
                    false,
                )),
                Effect::Close(CloseCode::RateLimited, "rate_limited".into()),
            ];
            return self.apply(effects).await;
        }
        let voucher = match parse_voucher(&msg) {
            Ok(v) => v,
            Err(e) => {
                self.failed_open(true);
                let error = error_message(e.code(), e.to_string(), e.retriable());
                return self.apply(vec![Effect::Send(error)]).await;
            }
        };
        let info = match self.state.read_channel(msg.channel_id).await {
            Ok(Some(info)) => info,
            Ok(None) => {
                // An unknown channel cost a chain read: counted against the address.
                self.failed_open(true);
                let e = ChannelError::ChannelNotOpen {
                    channel_id: msg.channel_id,
                    reason: "unknown channel",
                };
                let effects = vec![
                    Effect::Send(error_message(e.code(), e.to_string(), false)),
                    Effect::Close(CloseCode::PaymentRequired, e.code().into()),
                ];
                return self.apply(effects).await;
            }
            Err(e) => {
                let error = error_message("chain_unavailable", e.to_string(), true);
                return self.apply(vec![Effect::Send(error)]).await;
            }
        };
        if let Err(effects) = Session::precheck(&self.state.params, &info) {
            self.failed_open(true);
            return self.apply(effects).await;
        }
        let verified = match self
            .state
            .verifier
            .verify(self.state.params.domain, info.payer, voucher)
            .await
        {
            Ok(v) => v,
            Err(e) => {
                self.failed_open(true);
                let error = error_message(e.code(), e.to_string(), e.retriable());
                return self.apply(vec![Effect::Send(error)]).await;
            }
        };
        let stored = match self.state.store.load(msg.channel_id).await {
            Ok(stored) => stored,
            Err(e) => {
                // Nothing can be accepted without the store: close (1011) so the client
                // retries later, possibly on another server.
                let effects = vec![
                    Effect::Send(error_message(e.code(), e.to_string(), true)),
                    Effect::Close(CloseCode::Internal, e.code().into()),
                ];
                return self.apply(effects).await;
            }
        };
        let opening = Opening {
            info,
            stored,
            // A write of the channel's consumption that the store refused, being retried.
            carried: self.state.flusher.consumed(msg.channel_id),
            voucher: verified,
        };
        let sid = self.state.next_session_id();
        let now = self.state.now();
        // The voucher is checked against the stored state before the channel is reserved: a
        // replayed (public) voucher holds nothing, not even for a moment.
        let (mut session, mut effects) =
            match Session::open(self.state.params.clone(), sid.clone(), opening.clone(), now) {
                Ok(opened) => opened,
                Err(effects) => {
                    self.failed_open(false);
                    return self.apply(effects).await;
                }
            };
        let ticket = match self.state.registry.reserve(msg.channel_id, &sid) {
            Ok(ticket) => ticket,
            Err(Refusal::Busy) => return self.channel_busy().await,
            Err(Refusal::Closing(update)) => {
                let reason = match update {
                    ChainUpdate::WithdrawRequested => "the payer requested a withdrawal",
                    _ => "the channel was closed",
                };
                let effects = vec![
                    Effect::Send(error_message("channel_not_open", reason, false)),
                    Effect::Close(CloseCode::PaymentRequired, "channel_not_open".into()),
                ];
                return self.apply(effects).await;
            }
        };
        // The channel's lease: refused while another process serves it. The channel's state is
        // read again in the same step, and the voucher checked against it: what a process that
        // just let the channel go wrote before it did is in it.
        let sent = self.state.now();
        let taken = self
            .state
            .store
            .take_lease(msg.channel_id, &self.state.instance, self.state.lease_ttl())
            .await;
        let (fence, stored) = match taken {
            Ok(taken) => taken,
            Err(e) => {
                self.state.registry.cancel(msg.channel_id, &sid);
                return match e {
                    StoreError::LeaseHeld => self.channel_busy().await,
                    e => self.store_failed(&e).await,
                };
            }
        };
        self.hold_lease(msg.channel_id, fence, sent, ticket.inbox.clone());
        if stored != opening.stored {
            let now = self.state.now();
            let again = Opening { stored, ..opening };
            match Session::open(self.state.params.clone(), sid.clone(), again, now) {
                Ok(opened) => (session, effects) = opened,
                Err(effects) => {
                    self.drop_lease().await;
                    self.state.registry.cancel(msg.channel_id, &sid);
                    self.failed_open(false);
                    return self.apply(effects).await;
                }
            }
        }
        let Ticket { token, jti, inbox } = ticket;
        session.admitted(token);
        self.session = Some(session);
        self.jti = jti;
        self.inbox = Some(inbox);
        let flow = self.apply(effects).await;
        if self.session.as_ref().is_some_and(Session::is_closed) && !self.counted_active {
            // The opening voucher was not stored: no session, the channel as it was.
            self.session = None;
            self.inbox = None;
            // The lease first: once the slot is free, another open here may take a new one.
            self.drop_lease().await;
            self.state.registry.cancel(msg.channel_id, &sid);
            self.failed_open(false);
        }
        flow
    }

    /// `channel_busy`: another session (here, or on another process) holds the channel.
    async fn channel_busy(&mut self) -> Flow {
        let error = error_message(
            "channel_busy",
            "another session is live on this channel; resume it, close it, or retry in a moment",
            true,
        );
        self.apply(vec![Effect::Send(error)]).await
    }

    /// The store failed while a session was being set up: nothing can be accepted without it,
    /// so the connection closes (1011) and the client retries later, possibly elsewhere.
    async fn store_failed(&mut self, e: &StoreError) -> Flow {
        let effects = vec![
            Effect::Send(error_message(e.code(), e.to_string(), true)),
            Effect::Close(CloseCode::Internal, e.code().into()),
        ];
        self.apply(effects).await
    }

    /// Keeps the lease taken by a call sent at `sent`, and has the keeper renew it (its news
    /// wakes `inbox`, the session's).
    fn hold_lease(
        &mut self,
        channel: alloy::primitives::B256,
        fence: Fence,
        sent: Nanos,
        inbox: Arc<Inbox>,
    ) {
        let times = self.state.lease_times();
        let held = self.state.leases.hold(channel, fence, sent, times, inbox);
        self.lapsed = false;
        self.lost = false;
        if self.lease.replace(held).is_none() {
            self.metrics().leases_held.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Gives the lease back to the store (the session left this connection).
    async fn drop_lease(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        self.lapsed = false;
        self.state.leases.forget(&lease);
        self.metrics().leases_held.fetch_sub(1, Ordering::Relaxed);
        if let Err(e) = self
            .state
            .store
            .release_lease(lease.channel, &self.state.instance, lease.fence)
            .await
        {
            // It expires by itself within the lease's time.
            debug!(channel = %lease.channel, "lease not released: {e}");
        }
    }

    /// A resume: the token is checked (signature, expiry), then spent in the store, which
    /// gives this process the channel's lease and the session's state in one step; the session
    /// goes on from there, whichever process served it before. A request the disconnect (or a
    /// crash) cut ends `interrupted`.
    async fn on_resume(&mut self, token: &str) -> Flow {
        let (claims, ticket) = match self.state.registry.reserve_resume(token).await {
            Ok(reserved) => reserved,
            Err(ResumeError::Busy) => return self.channel_busy().await,
            Err(e) => return self.bad_token(&e.to_string()).await,
        };
        let channel = claims.ch;
        let flow = self.resume_reserved(&claims, ticket).await;
        if self.session.is_none() {
            self.state.registry.cancel(channel, &claims.sid);
        }
        flow
    }

    async fn bad_token(&mut self, why: &str) -> Flow {
        let effects = vec![
            Effect::Send(error_message("bad_resume_token", why, false)),
            Effect::Close(CloseCode::BadResumeToken, "bad_resume_token".into()),
        ];
        self.apply(effects).await
    }

    async fn resume_reserved(&mut self, claims: &ResumeClaims, ticket: Ticket) -> Flow {
        let channel = claims.ch;
        // Read before the token is spent: a chain outage leaves it good for a retry.
        let info = match self.state.read_channel(channel).await {
            Ok(Some(info)) => info,
            Ok(None) => return self.bad_token("unknown channel").await,
            Err(e) => {
                let error = error_message("chain_unavailable", e.to_string(), true);
                return self.apply(vec![Effect::Send(error)]).await;
            }
        };
        let sent = self.state.now();
        let resumed = self
            .state
            .store
            .resume_session(
                channel,
                &claims.sid,
                &claims.jti,
                &ticket.jti,
                &self.state.instance,
                self.state.lease_ttl(),
                self.state.resume_window(),
            )
            .await;
        let (record, fence, stored) = match resumed {
            Ok(Resumed::Taken {
                record,
                fence,
                stored,
            }) => (record, fence, stored),
            Ok(Resumed::Unknown) => {
                return self
                    .bad_token("unknown session, or past the resume window")
                    .await;
            }
            Ok(Resumed::Used) => return self.bad_token("token already used").await,
            Ok(Resumed::Busy) => {
                let error = error_message(
                    "channel_busy",
                    "the session is live on another server, which has been asked to let it go; retry the resume in a moment",
                    true,
                );
                return self.apply(vec![Effect::Send(error)]).await;
            }
            Err(e) => return self.store_failed(&e).await,
        };
        self.hold_lease(channel, fence, sent, ticket.inbox.clone());
        let from_elsewhere = record.holder != self.state.instance;
        let restored = match *stored {
            Some(stored) => Session::restore(
                self.state.params.clone(),
                &record,
                info,
                stored,
                self.state.flusher.consumed(channel),
                self.state.now(),
            ),
            None => Err(vec![
                Effect::Send(error_message(
                    "store_unavailable",
                    "the channel's record is missing from the store",
                    false,
                )),
                Effect::Close(CloseCode::Internal, "store_unavailable".into()),
            ]),
        };
        let mut session = match restored {
            Ok(session) => session,
            Err(effects) => {
                // The channel cannot be served any more (closing, closed): the session ends.
                self.jti = ticket.jti;
                self.end_record(channel, &record.sid).await;
                self.drop_lease().await;
                return self.apply(effects).await;
            }
        };
        let now = self.state.now();
        if let Some(update) = self.state.registry.closing(channel) {
            // Closing since it was parked: it ends when resumed.
            let _ = session.chain_update(update, now);
        }
        let Ticket { token, jti, inbox } = ticket;
        let effects = session.resume(token, now);
        self.state.registry.activate(channel, &record.sid);
        self.session = Some(session);
        self.jti = jti;
        self.recorded = (record.next_seq, record.request);
        self.inbox = Some(inbox);
        self.unauthenticated.release();
        self.count_active(true);
        let m = self.metrics();
        if from_elsewhere {
            m.resumed_remote.fetch_add(1, Ordering::Relaxed);
            m.leases_taken_over.fetch_add(1, Ordering::Relaxed);
        } else {
            m.resumed_local.fetch_add(1, Ordering::Relaxed);
        }
        self.apply(effects).await
    }

    /// Deletes the record of session `sid` (it ended): none of its tokens resumes anything.
    async fn end_record(&mut self, channel: alloy::primitives::B256, sid: &str) {
        let record = SessionRecord {
            sid: sid.to_string(),
            jti: String::new(),
            next_seq: 0,
            request: None,
            holder: self.state.instance.clone(),
            parked: false,
        };
        let result = self
            .state
            .store
            .put_session(
                channel,
                &record,
                SessionWrite::End,
                self.fence(),
                self.state.resume_window(),
            )
            .await;
        self.count_fenced(&result);
        if let Err(e) = result {
            // It expires with the resume window; a resume before then finds the channel's
            // state as it is (and a closed channel refuses it).
            debug!(%channel, "the ended session's record was not deleted: {e}");
        }
    }

    /// What other tasks said of the session since the connection last looked, in the order the
    /// loop used to give them: the lease keeper's news, a resume elsewhere, the chain's news.
    async fn on_news(&mut self) -> Flow {
        if let Some(news) = self.lease.as_ref().and_then(|l| l.take_news())
            && let Flow::Closed = self.on_lease_news(news).await
        {
            return Flow::Closed;
        }
        let Some(taken) = self.inbox.as_ref().map(|inbox| inbox.take()) else {
            return Flow::Continue;
        };
        if taken.kicked {
            return self
                .superseded("the session was resumed on another connection")
                .await;
        }
        match taken.view {
            Some(view) => self.on_chain(view).await,
            None => Flow::Continue,
        }
    }

    /// The keeper's news of the lease: renewed after a lapse (delivery goes on), wanted by a
    /// resume on another process (the session is let go, 4409), or lost (stop at once, 4409).
    async fn on_lease_news(&mut self, news: LeaseNews) -> Flow {
        match news {
            LeaseNews::Held => {
                let now = self.state.now();
                self.lease_gate(now).await
            }
            LeaseNews::Wanted => {
                self.metrics()
                    .leases_handed_over
                    .fetch_add(1, Ordering::Relaxed);
                self.superseded("the session was resumed on another server")
                    .await
            }
            LeaseNews::Lost => {
                self.metrics().leases_lost.fetch_add(1, Ordering::Relaxed);
                if let Some(lease) = &self.lease {
                    warn!(channel = %lease.channel, "lease lost: another process serves the channel");
                }
                self.superseded("another server took this session's channel over")
                    .await
            }
        }
    }

    /// Delivery (and the clock) stops once the lease's deadline has passed unrenewed, and goes
    /// on once it is renewed; looked at before every unit and at every timer.
    async fn lease_gate(&mut self, now: Nanos) -> Flow {
        let Some(lease) = self.lease.as_ref() else {
            return Flow::Continue;
        };
        let valid = lease.valid(now);
        if valid != self.lapsed {
            return Flow::Continue;
        }
        self.lapsed = !valid;
        let effects = self
            .session
            .as_mut()
            .map(|s| {
                if valid {
                    s.lease_renewed(now)
                } else {
                    s.lease_lapsed(now)
                }
            })
            .unwrap_or_default();
        self.apply(effects).await
    }

    /// The time between the heartbeat's Pings.
    fn heartbeat_ns(&self) -> Nanos {
        self.state.params.heartbeat_ms.max(1) * 1_000_000
    }

    /// The timer's turn: the heartbeat's Ping when it is due, then the deadlines.
    async fn on_wake(&mut self, next_ping: &mut Nanos) -> Flow {
        let now = self.state.now();
        if now < *next_ping {
            self.metrics().wakeups_total.fetch_add(1, Ordering::Relaxed);
            return self.on_timer().await;
        }
        *next_ping = now + self.heartbeat_ns();
        let payload = now.to_be_bytes().to_vec();
        match self.send(Message::Ping(payload.into())).await {
            Ok(()) => self.on_timer().await,
            Err(()) => Flow::Closed,
        }
    }

    async fn on_timer(&mut self) -> Flow {
        let now = self.state.now();
        if now >= self.last_inbound + self.state.limits.idle_timeout_ms * 1_000_000 {
            // Parked on release: the client can resume within the window.
            return self.close(CloseCode::Policy, "idle").await;
        }
        if self.session.is_none() {
            // The timer also wakes for the heartbeat: the deadline is checked, not assumed.
            if now >= self.opened_by {
                return self.close(CloseCode::Policy, "open timeout").await;
            }
            return Flow::Continue;
        }
        if let Flow::Closed = self.lease_gate(now).await {
            return Flow::Closed;
        }
        let now = self.state.now();
        match self.session.as_mut() {
            Some(session) => {
                let effects = session.tick(now);
                self.apply(effects).await
            }
            None => Flow::Continue,
        }
    }

    /// Shutdown: the session is saved and parked (resumable), the client told 1001.
    async fn shutdown(&mut self) -> Flow {
        self.stop_request();
        self.release().await;
        self.close(CloseCode::GoingAway, "server going away").await
    }

    /// Another connection (here, or on another process) resumed this session, or another
    /// process took its channel: save what is this session's to save, let the session go, and
    /// close with 4409.
    async fn superseded(&mut self, why: &str) -> Flow {
        self.inbox = None;
        self.stop_request();
        // Park first, so the resuming connection gets the session without waiting for this
        // one's closing handshake.
        self.release().await;
        let error = error_message("session_superseded", why, false);
        self.metrics().rejected("session_superseded");
        if self.send_protocol(&error).await.is_err() {
            return Flow::Closed;
        }
        self.close(CloseCode::SessionSuperseded, "session superseded")
            .await
    }

    /// The connection ends: an open session is suspended and parked in the store for a resume
    /// (its consumption saved, its claim queued, its record's progress written, its lease given
    /// back, so any process can resume it at once); an ended one's record is deleted.
    async fn release(&mut self) {
        let Some(mut session) = self.session.take() else {
            self.drop_lease().await;
            return;
        };
        self.count_active(false);
        self.inbox = None;
        let channel = session.channel_id();
        let sid = session.id().to_string();
        if session.is_open() {
            let now = self.state.now();
            let effects = session.suspend(now);
            let _ = self.apply(effects).await;
            self.session = Some(session);
            let _ = self.write_record(SessionWrite::Progress, true).await;
            self.session = None;
        } else {
            self.end_record(channel, &sid).await;
        }
        self.drop_lease().await;
        self.state.registry.release(channel, &sid);
    }
}

#[cfg(test)]
mod tests {
    use super::pieces;

    #[test]
    fn fragments_end_on_character_boundaries_and_add_up_to_the_message() {
        // 'é' is 2 bytes, '€' 3, '𝄞' 4: every offset of a boundary falls inside one somewhere.
        for text in [
            "",
            "a",
            &"é".repeat(400),
            &"a€𝄞é".repeat(120),
            &"x".repeat(316 * 2),
        ] {
            for max in [4, 5, 7, 316] {
                let parts: Vec<&str> = pieces(text, max).collect();
                assert_eq!(parts.concat(), text);
                assert!(parts.iter().all(|p| !p.is_empty() && p.len() <= max));
                // Each piece is a `&str` of its own (`split_at` panics off a boundary), and
                // gives back at most 3 bytes to end on one: no more pieces than that allows.
                assert!(parts.len() <= text.len().div_ceil(max - 3).max(1));
            }
        }
    }
}
