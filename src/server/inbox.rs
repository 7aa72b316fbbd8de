//! What other tasks tell the connection serving a session: another connection resumed it (let
//! it go), the chain's news of its channel, and the lease keeper's news (through [`Held`]).
//!
//! One small allocation a session with one waker, in place of a oneshot channel and two watch
//! channels (each watch channel is about 450 bytes: tokio gives it eight `Notify`s): an idle
//! session's memory is mostly such handles (docs/SERVER.md, "Memory of an idle session").
//!
//! Nothing is lost between a wake and the connection's next wait: [`Notify::notify_one`] keeps
//! a permit when the connection is not waiting, and the connection takes everything that was
//! said each time it wakes. A wake with nothing new (the permit of news already taken) is
//! harmless.
//!
//! [`Held`]: super::lease::Held

use std::sync::Mutex;

use tokio::sync::Notify;
use tokio::sync::futures::Notified;

use super::registry::ChainView;
use crate::session::ChainUpdate;

/// News for one session's connection, issued with its registry ticket.
#[derive(Debug, Default)]
pub(super) struct Inbox {
    news: Mutex<News>,
    wake: Notify,
}

#[derive(Debug, Default)]
struct News {
    /// Another connection of this process resumed the session.
    kicked: bool,
    /// What the chain showed of the channel so far.
    view: ChainView,
    /// `view` changed since the connection last took it.
    view_changed: bool,
}

/// What the connection had not yet taken from its inbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Taken {
    /// Another connection resumed the session: let it go.
    pub kicked: bool,
    /// The chain's view of the channel, when it changed.
    pub view: Option<ChainView>,
}

impl Inbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, News> {
        self.news.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the connection to let the session go (close 4409).
    pub fn kick(&self) {
        self.lock().kicked = true;
        self.wake.notify_one();
    }

    /// The chain's news of the channel: a top-up raises the deposit seen (never lowers it), a
    /// withdrawal request or a close is kept.
    pub fn chain(&self, update: ChainUpdate) {
        {
            let mut news = self.lock();
            match update {
                ChainUpdate::ToppedUp { deposit } => {
                    news.view.deposit = Some(news.view.deposit.unwrap_or(0).max(deposit));
                }
                closing => news.view.closing = Some(closing),
            }
            news.view_changed = true;
        }
        self.wake.notify_one();
    }

    /// Wakes the connection to look at its lease's news.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Completes once something was said since the last wait completed (at once if it was
    /// said while the connection was not waiting).
    pub fn notified(&self) -> Notified<'_> {
        self.wake.notified()
    }

    /// Takes what was said since the last take.
    pub fn take(&self) -> Taken {
        let mut news = self.lock();
        Taken {
            kicked: std::mem::take(&mut news.kicked),
            view: std::mem::take(&mut news.view_changed).then_some(news.view),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn news_said_before_the_wait_is_not_lost_and_is_taken_once() {
        let inbox = Inbox::default();
        inbox.chain(ChainUpdate::ToppedUp { deposit: 5 });
        inbox.chain(ChainUpdate::ToppedUp { deposit: 3 });
        // Said while nobody waited: the wait returns at once.
        inbox.notified().await;
        assert_eq!(
            inbox.take(),
            Taken {
                kicked: false,
                view: Some(ChainView {
                    deposit: Some(5),
                    closing: None
                })
            },
            "the deposit seen never goes down"
        );
        assert_eq!(inbox.take(), Taken::default(), "taken once");
        inbox.kick();
        inbox.chain(ChainUpdate::WithdrawRequested);
        inbox.notified().await;
        let taken = inbox.take();
        assert!(taken.kicked);
        assert_eq!(
            taken.view,
            Some(ChainView {
                deposit: Some(5),
                closing: Some(ChainUpdate::WithdrawRequested)
            })
        );
    }
}
