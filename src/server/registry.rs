//! The channels this process serves (DESIGN.md section 6).
//!
//! One live session per channel in a process: a channel's slot holds its session `Active` on one
//! connection, and at most one `open` or resume being checked and stored. Across processes the
//! channel's lease in the store decides (docs/STORE.md); this registry keeps a process from
//! asking the store for a lease it already holds on another connection, and tells a live
//! connection what happens to its channel (a resume elsewhere, the chain's news).
//!
//! A disconnected session is not kept here: what a resume needs is in the store (the session
//! record and the channel's state), so any process on the store resumes it, and this one after a
//! restart. Every operation finds its slot by channel (a resume token names its channel) under
//! one short lock: nothing scans the sessions, and no lock is held across I/O.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use alloy::primitives::B256;
use lru::LruCache;
use tokio::sync::Notify;

use super::inbox::Inbox;

use crate::session::ChainUpdate;
use crate::session::resume::{ResumeClaims, ResumeError, ResumeKeys};

/// Channels remembered as closing after the chain showed it (about 4 MiB): an `open` whose
/// chain read predates the event finds it here.
const CLOSING_MEMORY: usize = 65_536;

/// How long a resume waits for the connection it supersedes to let the session go: longer than
/// that connection can be blocked in a write (the 10 s send timeout) plus its last writes.
const TAKEOVER: Duration = Duration::from_secs(15);

/// What the chain last said of a channel, for the connection serving it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChainView {
    /// The deposit after the latest top-up seen, if any.
    pub deposit: Option<u128>,
    /// A withdrawal request or a close, if one was seen.
    pub closing: Option<ChainUpdate>,
}

/// A session id or a token id as the registry keeps it: 16 bytes of its hash, in place of the
/// string and its allocation (the ids are unique: a token's is random, a session's a hash of a
/// counter, the time and the server's address; equal digests mean equal ids).
type Digest = [u8; 16];

fn digest(id: &str) -> Digest {
    let hash = alloy::primitives::keccak256(id.as_bytes());
    let mut d = [0u8; 16];
    d.copy_from_slice(&hash[..16]);
    d
}

/// A session on a connection, or being admitted to one.
struct Tenant {
    /// The session id's digest.
    sid: Digest,
    /// The digest of the one-time id of the session's current token: only it may take the
    /// session over.
    jti: Digest,
    /// The connection's news: a kick asks it to let the session go and close with 4409.
    inbox: Arc<Inbox>,
}

#[derive(Default)]
struct Slot {
    /// The live session.
    active: Option<Tenant>,
    /// An `open` or a resume being checked and stored.
    opening: Option<Tenant>,
}

struct Inner {
    channels: HashMap<B256, Slot>,
    closing: LruCache<B256, ChainUpdate>,
}

/// The live sessions of this process by channel.
pub struct Registry {
    inner: Mutex<Inner>,
    /// Wakes resumes waiting for a superseded connection to let its session go.
    released: Notify,
    keys: ResumeKeys,
}

/// What a connection gets with its session: the token to give the client (and its one-time
/// id, recorded in the store), and the inbox that tells it another connection wants the
/// session and the chain's news of its channel.
pub struct Ticket {
    /// The resume token.
    pub token: String,
    /// The token's one-time id.
    pub jti: String,
    /// Kicked when another connection of this process resumes this session; the chain's view
    /// of the channel, as the watcher updates it.
    pub(super) inbox: Arc<Inbox>,
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

impl Registry {
    /// A registry issuing resume tokens with `keys`.
    pub fn new(keys: ResumeKeys) -> Self {
        Self {
            inner: Mutex::new(Inner {
                channels: HashMap::new(),
                closing: LruCache::new(NonZeroUsize::new(CLOSING_MEMORY).expect("non-zero")),
            }),
            released: Notify::new(),
            keys,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ticket(&self, sid: &str, channel: B256) -> (Tenant, Ticket) {
        let jti = random_id();
        let token = self.keys.issue(sid, channel, &jti, unix_secs());
        let inbox = Arc::new(Inbox::default());
        (
            Tenant {
                sid: digest(sid),
                jti: digest(&jti),
                inbox: inbox.clone(),
            },
            Ticket { token, jti, inbox },
        )
    }

    /// Reserves `channel` for the `open` of session `sid`, whose voucher's signature has been
    /// checked: refused while a live session or another `open` holds the channel here, or when
    /// the chain showed it closing. (Another process's session is refused by the lease.)
    pub fn reserve(&self, channel: B256, sid: &str) -> Result<Ticket, Refusal> {
        let mut inner = self.lock();
        if let Some(update) = inner.closing.get(&channel) {
            return Err(Refusal::Closing(*update));
        }
        let slot = inner.channels.entry(channel).or_default();
        if slot.opening.is_some() || slot.active.is_some() {
            return Err(Refusal::Busy);
        }
        let (tenant, ticket) = self.ticket(sid, channel);
        slot.opening = Some(tenant);
        Ok(ticket)
    }

    /// Reserves the channel a resume token names, for its session: the token's signature and
    /// expiry are checked here, its one-time id by the store. If the session is live on another
    /// connection of this process, that connection is told to let it go (close 4409), and this
    /// waits until it has. The ticket carries the next token.
    pub async fn reserve_resume(&self, token: &str) -> Result<(ResumeClaims, Ticket), ResumeError> {
        let claims = self.keys.verify(token)?;
        let (sid, jti) = (digest(&claims.sid), digest(&claims.jti));
        let deadline = tokio::time::Instant::now() + TAKEOVER;
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            {
                let mut inner = self.lock();
                let slot = inner.channels.entry(claims.ch).or_default();
                match &mut slot.active {
                    Some(active) if active.sid == sid && active.jti == jti => {
                        active.inbox.kick();
                    }
                    Some(active) if active.sid == sid => {
                        // An older token of the live session: it must not disturb it.
                        return Err(ResumeError::BadToken("token already used"));
                    }
                    Some(_) => {
                        // A newer session was opened on the channel here: the token's is gone.
                        return Err(ResumeError::BadToken(
                            "unknown session, or past the resume window",
                        ));
                    }
                    None if slot.opening.is_some() => return Err(ResumeError::Busy),
                    None => {
                        let (tenant, ticket) = self.ticket(&claims.sid, claims.ch);
                        slot.opening = Some(tenant);
                        return Ok((claims, ticket));
                    }
                }
            }
            // Wait for the superseded connection to let go (any release wakes this; the slot
            // is looked at again).
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                // The old connection is still letting go: the token stays good, try again.
                return Err(ResumeError::Busy);
            }
        }
    }

    /// The `open` or resume of `sid` failed: the channel is as it was.
    pub fn cancel(&self, channel: B256, sid: &str) {
        let mut inner = self.lock();
        let Some(slot) = inner.channels.get_mut(&channel) else {
            return;
        };
        let sid = digest(sid);
        if slot.opening.as_ref().is_some_and(|o| o.sid == sid) {
            slot.opening = None;
            if slot.active.is_none() {
                inner.channels.remove(&channel);
            }
        }
    }

    /// The `open` or resume of `sid` is stored: its session is the channel's, live.
    pub fn activate(&self, channel: B256, sid: &str) {
        let mut inner = self.lock();
        let Some(slot) = inner.channels.get_mut(&channel) else {
            return;
        };
        let sid = digest(sid);
        if let Some(opening) = slot.opening.take_if(|o| o.sid == sid) {
            slot.active = Some(opening);
        }
    }

    /// The session `sid` left its connection (parked in the store, or ended, or its opening
    /// failed): the channel is free here. An opening that ended with its connection (its
    /// voucher not stored, the connection closed 1011) gives back its reservation here too.
    pub fn release(&self, channel: B256, sid: &str) {
        let mut inner = self.lock();
        let Some(slot) = inner.channels.get_mut(&channel) else {
            return;
        };
        let sid = digest(sid);
        if slot.active.as_ref().is_some_and(|a| a.sid == sid) {
            slot.active = None;
        }
        if slot.opening.as_ref().is_some_and(|o| o.sid == sid) {
            slot.opening = None;
        }
        if slot.active.is_none() && slot.opening.is_none() {
            inner.channels.remove(&channel);
        }
        drop(inner);
        self.released.notify_waiters();
    }

    /// What the chain showed of `channel` closing, if anything (for a session resumed here).
    pub fn closing(&self, channel: B256) -> Option<ChainUpdate> {
        self.lock().closing.peek(&channel).copied()
    }

    /// The chain's news of a channel: a live session's connection hears it at once; a
    /// withdrawal request or a close is remembered so that an `open` whose chain read predates
    /// it is refused, and a resumed session ends.
    pub fn chain_update(&self, channel: B256, update: ChainUpdate) {
        let mut inner = self.lock();
        if !matches!(update, ChainUpdate::ToppedUp { .. }) {
            inner.closing.put(channel, update);
        }
        let Some(slot) = inner.channels.get_mut(&channel) else {
            return;
        };
        for tenant in [&slot.opening, &slot.active].into_iter().flatten() {
            tenant.inbox.chain(update);
        }
    }
}
