//! Sessions by id, so a client can resume after a disconnect (DESIGN.md section 6): a session
//! is `Active` on one connection or `Parked` after a disconnect, for the resume window.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use alloy::primitives::B256;
use tokio::sync::{Notify, oneshot};

use crate::session::Session;
use crate::session::resume::{ResumeError, ResumeKeys};

enum SlotState {
    /// On a connection; sending on `kick` asks it to park the session and close with 4409.
    Active { kick: Option<oneshot::Sender<()>> },
    /// Waiting for a resume since `since`.
    Parked {
        session: Box<Session>,
        since: Instant,
    },
}

struct Slot {
    /// The only `jti` the next resume may present.
    jti: String,
    channel: B256,
    state: SlotState,
}

/// The sessions of this process that can be resumed.
pub struct Registry {
    slots: Mutex<HashMap<String, Slot>>,
    parked: Notify,
    keys: ResumeKeys,
    window: Duration,
    capacity: usize,
}

/// A session handed to a connection, with the token to give the client and the receiver that
/// tells the connection it was superseded.
pub struct Claimed {
    /// The session.
    pub session: Session,
    /// The new resume token.
    pub token: String,
    /// Fires when another connection resumes this session.
    pub kick: oneshot::Receiver<()>,
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
    /// A registry issuing tokens with `keys`, parking sessions for `window`, holding at most
    /// `capacity` sessions (active and parked).
    pub fn new(keys: ResumeKeys, window: Duration, capacity: usize) -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
            parked: Notify::new(),
            keys,
            window,
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh token for a new session `sid` on `channel`, registered as active. One session
    /// per channel: a parked session on the channel is dropped (its consumption was saved when
    /// it was parked), and a channel with an active session is refused (`None`), since two
    /// sessions metering against the same credit could deliver it twice.
    pub fn admit(&self, sid: &str, channel: B256) -> Option<(String, oneshot::Receiver<()>)> {
        let mut slots = self.lock();
        Self::reap(&mut slots, self.window);
        if slots
            .values()
            .any(|s| s.channel == channel && matches!(s.state, SlotState::Active { .. }))
        {
            return None;
        }
        slots.retain(|_, s| s.channel != channel);
        let jti = random_id();
        let token = self.keys.issue(sid, channel, &jti, unix_secs());
        let (tx, rx) = oneshot::channel();
        slots.insert(
            sid.to_string(),
            Slot {
                jti,
                channel,
                state: SlotState::Active { kick: Some(tx) },
            },
        );
        Some((token, rx))
    }

    /// Parks a session after its connection dropped. Returns it back if it cannot be parked
    /// (full, or unknown), in which case the caller finishes it.
    pub fn park(&self, session: Session) -> Option<Session> {
        let mut slots = self.lock();
        Self::reap(&mut slots, self.window);
        let parked = slots
            .values()
            .filter(|s| matches!(s.state, SlotState::Parked { .. }))
            .count();
        let result = match slots.get_mut(session.id()) {
            Some(slot) if parked < self.capacity => {
                slot.state = SlotState::Parked {
                    session: Box::new(session),
                    since: Instant::now(),
                };
                None
            }
            _ => Some(session),
        };
        drop(slots);
        self.parked.notify_waiters();
        result
    }

    /// The session ended for good (`close`, or a fatal error).
    pub fn remove(&self, sid: &str) {
        self.lock().remove(sid);
    }

    fn reap(slots: &mut HashMap<String, Slot>, window: Duration) {
        slots.retain(
            |_, s| !matches!(&s.state, SlotState::Parked { since, .. } if since.elapsed() > window),
        );
    }

    /// Takes the session a token names: the token must be the latest issued for it, and the
    /// session parked within the window. If it is still active on another connection, that
    /// connection is told to close with 4409 and the session moves here.
    pub async fn resume(&self, token: &str) -> Result<Claimed, ResumeError> {
        let claims = self.keys.verify(token)?;
        for _ in 0..2 {
            let notified = self.parked.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut slots = self.lock();
                Self::reap(&mut slots, self.window);
                let Some(slot) = slots.get_mut(&claims.sid) else {
                    return Err(ResumeError::BadToken(
                        "unknown session, or past the resume window",
                    ));
                };
                if slot.jti != claims.jti || slot.channel != claims.ch {
                    return Err(ResumeError::BadToken("token already used"));
                }
                match &mut slot.state {
                    SlotState::Active { kick } => {
                        if let Some(kick) = kick.take() {
                            let _ = kick.send(());
                        }
                    }
                    SlotState::Parked { .. } => {
                        let jti = random_id();
                        let token = self.keys.issue(&claims.sid, claims.ch, &jti, unix_secs());
                        let (tx, rx) = oneshot::channel();
                        slot.jti = jti;
                        let state = std::mem::replace(
                            &mut slot.state,
                            SlotState::Active { kick: Some(tx) },
                        );
                        let SlotState::Parked { session, .. } = state else {
                            unreachable!("matched above")
                        };
                        return Ok(Claimed {
                            session: *session,
                            token,
                            kick: rx,
                        });
                    }
                }
            }
            // Wait for the superseded connection to park the session.
            if tokio::time::timeout(Duration::from_secs(5), notified)
                .await
                .is_err()
            {
                break;
            }
        }
        Err(ResumeError::BadToken("the session could not be taken over"))
    }
}
