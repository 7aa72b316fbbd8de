//! The channels this process serves, and the sessions it can resume (DESIGN.md section 6).
//!
//! One session per channel: a channel's slot holds its session `Active` on one connection, or
//! `Parked` after a disconnect for the resume window, and at most one `open` being checked and
//! stored. Every operation finds its slot by channel (a resume token names its channel) under
//! one short lock: nothing scans the sessions, and no lock is held across I/O.
//!
//! An `open` reserves the channel only after its voucher's signature was checked, and takes a
//! parked session over only once its own voucher is stored ([`Registry::activate`]): a bad
//! `open` can neither evict a parked session nor hold a live one's channel.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use alloy::primitives::B256;
use lru::LruCache;
use tokio::sync::{Notify, oneshot, watch};

use crate::meter::{Exact, Nanos};
use crate::session::resume::{ResumeError, ResumeKeys};
use crate::session::{ChainUpdate, Session};

/// Channels remembered as closing after the chain showed it (about 4 MiB): an `open` whose
/// chain read predates the event finds it here.
const CLOSING_MEMORY: usize = 65_536;

/// How long a resume waits for the connection it supersedes to park the session: longer than
/// that connection can be blocked in a write (the 10 s send timeout) plus its suspend.
const TAKEOVER: Duration = Duration::from_secs(15);

/// What the chain last said of a channel, for the connection serving it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChainView {
    /// The deposit after the latest top-up seen, if any.
    pub deposit: Option<u128>,
    /// A withdrawal request or a close, if one was seen.
    pub closing: Option<ChainUpdate>,
}

enum State {
    /// No session (only an `open` in progress, if any).
    Free,
    /// On a connection; sending on `kick` asks it to park the session and close with 4409.
    Active {
        sid: String,
        /// The only `jti` the next resume may present.
        jti: String,
        kick: Option<oneshot::Sender<()>>,
        updates: watch::Sender<ChainView>,
    },
    /// Waiting for a resume since `since`.
    Parked {
        sid: String,
        jti: String,
        session: Box<Session>,
        since: Instant,
    },
}

/// An `open` being checked and stored.
struct Opening {
    sid: String,
    jti: String,
    kick: oneshot::Sender<()>,
    updates: watch::Sender<ChainView>,
}

struct Slot {
    state: State,
    opening: Option<Opening>,
}

struct Inner {
    channels: HashMap<B256, Slot>,
    /// Parked sessions in the order they were parked. The window is the same for all, so the
    /// first is the first to expire; entries of sessions resumed since are skipped.
    parked_order: VecDeque<(Instant, B256, String)>,
    parked: usize,
    closing: LruCache<B256, ChainUpdate>,
}

/// The sessions of this process by channel.
pub struct Registry {
    inner: Mutex<Inner>,
    parked_notify: Notify,
    keys: ResumeKeys,
    window: Duration,
    capacity: usize,
}

/// What a connection gets with its session: the token to give the client, the receiver that
/// tells it it was superseded, and the chain's news of its channel.
pub struct Ticket {
    /// The resume token.
    pub token: String,
    /// Fires when another connection resumes this session.
    pub kick: oneshot::Receiver<()>,
    /// The chain's view of the channel, as the watcher updates it.
    pub updates: watch::Receiver<ChainView>,
}

/// A parked session handed to a resuming connection.
pub struct Claimed {
    /// The session.
    pub session: Session,
    /// Its token and receivers.
    pub ticket: Ticket,
}

/// Why a channel cannot be reserved for an `open`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A live session, or another `open`, holds it (`channel_busy`).
    Busy,
    /// The chain showed it closing (`channel_not_open`).
    Closing(ChainUpdate),
}

fn random_id() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the OS provides randomness");
    alloy::hex::encode(bytes)
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Inner {
    /// Drops parked sessions past the window (their consumption was saved and their claim
    /// queued when they were parked).
    fn reap(&mut self, window: Duration) {
        while let Some((since, channel, sid)) = self.parked_order.front().cloned() {
            if since.elapsed() <= window {
                break;
            }
            self.parked_order.pop_front();
            let expired = self.channels.get(&channel).is_some_and(|slot| {
                matches!(&slot.state, State::Parked { sid: s, since: t, .. } if *s == sid && *t == since)
            });
            if expired {
                self.parked -= 1;
                let slot = self.channels.get_mut(&channel).expect("checked");
                slot.state = State::Free;
                if slot.opening.is_none() {
                    self.channels.remove(&channel);
                }
            }
        }
    }
}

impl Registry {
    /// A registry issuing tokens with `keys`, parking sessions for `window`, holding at most
    /// `capacity` parked sessions.
    pub fn new(keys: ResumeKeys, window: Duration, capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                channels: HashMap::new(),
                parked_order: VecDeque::new(),
                parked: 0,
                closing: LruCache::new(NonZeroUsize::new(CLOSING_MEMORY).expect("non-zero")),
            }),
            parked_notify: Notify::new(),
            keys,
            window,
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ticket(&self, sid: &str, channel: B256) -> (Opening, Ticket) {
        let jti = random_id();
        let token = self.keys.issue(sid, channel, &jti, unix_secs());
        let (kick_tx, kick_rx) = oneshot::channel();
        let (updates_tx, updates_rx) = watch::channel(ChainView::default());
        (
            Opening {
                sid: sid.to_string(),
                jti,
                kick: kick_tx,
                updates: updates_tx,
            },
            Ticket {
                token,
                kick: kick_rx,
                updates: updates_rx,
            },
        )
    }

    /// Reserves `channel` for the `open` of session `sid`, whose voucher's signature has been
    /// checked: refused while a live session or another `open` holds the channel, or when the
    /// chain showed it closing. Returns the session's ticket and the exact consumption of a
    /// parked session on the channel (the new one carries it over if its voucher is stored).
    pub fn reserve(&self, channel: B256, sid: &str) -> Result<(Ticket, Option<Exact>), Refusal> {
        let mut inner = self.lock();
        inner.reap(self.window);
        if let Some(update) = inner.closing.get(&channel) {
            return Err(Refusal::Closing(*update));
        }
        let (opening, ticket) = self.ticket(sid, channel);
        let slot = inner.channels.entry(channel).or_insert(Slot {
            state: State::Free,
            opening: None,
        });
        if slot.opening.is_some() || matches!(slot.state, State::Active { .. }) {
            return Err(Refusal::Busy);
        }
        let carried = match &slot.state {
            State::Parked { session, .. } => Some(session.meter().exact_consumed()),
            _ => None,
        };
        slot.opening = Some(opening);
        Ok((ticket, carried))
    }

    /// The `open` of `sid` failed: the channel is as it was (a parked session stays parked).
    pub fn cancel(&self, channel: B256, sid: &str) {
        let mut inner = self.lock();
        let Some(slot) = inner.channels.get_mut(&channel) else {
            return;
        };
        if slot.opening.as_ref().is_some_and(|o| o.sid == sid) {
            slot.opening = None;
            if matches!(slot.state, State::Free) {
                inner.channels.remove(&channel);
            }
        }
    }

    /// The `open` of `sid` is stored: its session is the channel's, live. A parked session on
    /// the channel is dropped (its consumption went into the new one; its token is dead).
    pub fn activate(&self, channel: B256, sid: &str) {
        let mut inner = self.lock();
        let Some(slot) = inner.channels.get_mut(&channel) else {
            return;
        };
        let Some(opening) = slot.opening.take_if(|o| o.sid == sid) else {
            return;
        };
        let was_parked = matches!(slot.state, State::Parked { .. });
        slot.state = State::Active {
            sid: opening.sid,
            jti: opening.jti,
            kick: Some(opening.kick),
            updates: opening.updates,
        };
        if was_parked {
            inner.parked -= 1;
        }
    }

    /// Parks a session after its connection dropped. Returns it back if it cannot be parked
    /// (the parked sessions are at capacity, or the slot is no longer its own), in which case
    /// the caller finishes it.
    pub fn park(&self, session: Session) -> Option<Session> {
        let mut inner = self.lock();
        inner.reap(self.window);
        let full = inner.parked >= self.capacity;
        let channel = session.channel_id();
        let Some(slot) = inner.channels.get_mut(&channel) else {
            return Some(session);
        };
        let State::Active { sid, jti, .. } = &slot.state else {
            return Some(session);
        };
        if full || sid != session.id() {
            return Some(session);
        }
        let (sid, jti) = (sid.clone(), jti.clone());
        let since = Instant::now();
        let mut session = Box::new(session);
        if let Some(update) = inner.closing.peek(&channel) {
            // The chain's news may have reached the connection's watch after its last look:
            // the parked session records it, and ends when resumed.
            let _ = session.chain_update(*update, 0);
        }
        let slot = inner.channels.get_mut(&channel).expect("checked above");
        slot.state = State::Parked {
            sid: sid.clone(),
            jti,
            session,
            since,
        };
        inner.parked += 1;
        inner.parked_order.push_back((since, channel, sid));
        drop(inner);
        self.parked_notify.notify_waiters();
        None
    }

    /// The session ended for good (`close`, or a fatal error).
    pub fn remove(&self, channel: B256, sid: &str) {
        let mut inner = self.lock();
        let Some(slot) = inner.channels.get_mut(&channel) else {
            return;
        };
        let ours = match &slot.state {
            State::Active { sid: s, .. } => s == sid,
            _ => false,
        };
        if ours {
            slot.state = State::Free;
            if slot.opening.is_none() {
                inner.channels.remove(&channel);
            }
        }
    }

    /// The chain's news of a channel: a live session's connection hears it at once; a parked
    /// session records it (it ends when resumed); a withdrawal request or a close is remembered
    /// so that an `open` whose chain read predates it is refused.
    pub fn chain_update(&self, channel: B256, update: ChainUpdate, now: Nanos) {
        let mut inner = self.lock();
        if !matches!(update, ChainUpdate::ToppedUp { .. }) {
            inner.closing.put(channel, update);
        }
        let Some(slot) = inner.channels.get_mut(&channel) else {
            return;
        };
        let tell = |updates: &watch::Sender<ChainView>| {
            updates.send_modify(|view| match update {
                ChainUpdate::ToppedUp { deposit } => {
                    view.deposit = Some(view.deposit.unwrap_or(0).max(deposit));
                }
                closing => view.closing = Some(closing),
            });
        };
        if let Some(opening) = &slot.opening {
            tell(&opening.updates);
        }
        match &mut slot.state {
            State::Active { updates, .. } => tell(updates),
            State::Parked { session, .. } => {
                let _ = session.chain_update(update, now);
            }
            State::Free => {}
        }
    }

    /// Takes the session a token names: the token must be the latest issued for it, and the
    /// session parked within the window. If it is still active on another connection, that
    /// connection is told to close with 4409 and the session moves here.
    pub async fn resume(&self, token: &str) -> Result<Claimed, ResumeError> {
        let claims = self.keys.verify(token)?;
        let deadline = tokio::time::Instant::now() + TAKEOVER;
        loop {
            let notified = self.parked_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut inner = self.lock();
                inner.reap(self.window);
                let mut parked = inner.parked;
                let Some(slot) = inner.channels.get_mut(&claims.ch) else {
                    return Err(ResumeError::BadToken(
                        "unknown session, or past the resume window",
                    ));
                };
                match &mut slot.state {
                    State::Active { sid, jti, kick, .. }
                        if *sid == claims.sid && *jti == claims.jti =>
                    {
                        if let Some(kick) = kick.take() {
                            let _ = kick.send(());
                        }
                    }
                    State::Parked { sid, jti, .. } if *sid == claims.sid && *jti == claims.jti => {
                        if slot.opening.is_some() {
                            return Err(ResumeError::Busy);
                        }
                        let (opening, ticket) = self.ticket(&claims.sid, claims.ch);
                        let state = std::mem::replace(
                            &mut slot.state,
                            State::Active {
                                sid: opening.sid,
                                jti: opening.jti,
                                kick: Some(opening.kick),
                                updates: opening.updates,
                            },
                        );
                        let State::Parked { mut session, .. } = state else {
                            unreachable!("matched above")
                        };
                        parked -= 1;
                        inner.parked = parked;
                        if let Some(update) = inner.closing.peek(&claims.ch) {
                            // Closing since it was parked: it ends when resumed.
                            let _ = session.chain_update(*update, 0);
                        }
                        return Ok(Claimed {
                            session: *session,
                            ticket,
                        });
                    }
                    State::Active { sid, .. } | State::Parked { sid, .. } if *sid == claims.sid => {
                        return Err(ResumeError::BadToken("token already used"));
                    }
                    _ => {
                        return Err(ResumeError::BadToken(
                            "unknown session, or past the resume window",
                        ));
                    }
                }
            }
            // Wait for the superseded connection to park the session (any park wakes this;
            // the slot is looked at again).
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                // The old connection is still letting go: the token stays good, try again.
                return Err(ResumeError::Busy);
            }
        }
    }
}
