//! The chain's news of channels (issue 9, item 1). The chain is read at `open`; after that a
//! session learns what happens to its channel from the contract's events, which one task reads
//! for the whole process, in bounded block ranges (public nodes cap `eth_getLogs`), starting at
//! the block of the server's start (nothing is replayed), with a short window read again each
//! time for reorgs (its changes only: not the `Opened` events). A top-up raises the live session's
//! deposit; a withdrawal request, a withdrawal or a cooperative close ends it (the channel
//! takes no new credit, and nothing more is delivered that could not be claimed), and is
//! remembered so that a later `open` is refused. Every process on a chain runs its own watcher,
//! so an event reaches every live session on the channel, whichever process serves it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, warn};

use super::ServerState;
use crate::chain::{ChannelChain, ChannelEvent, Events};
use crate::session::ChainUpdate;
use crate::store::{ChannelStore, SettlementStore};

/// Blocks read per `eth_getLogs` call: within what public nodes allow.
pub const DEFAULT_LOG_RANGE_BLOCKS: u64 = 500;
/// The chain is polled every second: a withdrawal request reaches the live session within about
/// a second of its block, far inside the hour a channel's withdrawal delay gives.
pub const DEFAULT_WATCH_INTERVAL_MS: u64 = 1_000;

/// What a live session must hear of an event (nothing, for a channel's opening or a claim paid).
fn update_of(event: &ChannelEvent) -> Option<ChainUpdate> {
    match event {
        ChannelEvent::ToppedUp { deposit, .. } => Some(ChainUpdate::ToppedUp { deposit: *deposit }),
        ChannelEvent::WithdrawRequested(_) => Some(ChainUpdate::WithdrawRequested),
        ChannelEvent::Withdrawn { .. } | ChannelEvent::Closed { .. } => Some(ChainUpdate::Closed),
        ChannelEvent::Opened(_) | ChannelEvent::Settled { .. } => None,
    }
}

/// Each poll reads again the last 8 blocks before its cursor: an event a short reorg moved
/// into a later block, or a load-balanced node that was behind, is still seen (events applied
/// twice change nothing). Only the events that change a channel are read again: an `Opened`
/// missed would only cost its channel's first `open` a read of the node, and on a busy chain
/// `Opened` logs are most of the logs (10,000 channels opened in a few blocks made every poll
/// parse several megabytes, in nine polls, while the sessions were being set up).
const REORG_BLOCKS: u64 = 8;

/// Events remembered so that one read twice (the reorg window) is counted once.
const SEEN_EVENTS: usize = 4_096;

/// Channels remembered as changed since they opened (about 3 MiB): they are never served from
/// their `Opened` event again, only from the node.
const TOUCHED_CHANNELS: usize = 65_536;

/// What an event read again is, for telling a repeat from a new one; `None` for an `Opened`,
/// which is not read again (kept, it would push out the changes the table is there to
/// recognise). A top-up is told by the deposit after it too: two top-ups of a channel in one
/// block are two events (taken for one, the second was dropped and the live session kept the
/// lower deposit). Any other event twice in a block changes nothing more than once.
fn identity(event: &ChannelEvent, block: u64) -> Option<(u64, alloy::primitives::B256, u8, u128)> {
    let (kind, detail) = match event {
        ChannelEvent::ToppedUp { deposit, .. } => (0, *deposit),
        ChannelEvent::WithdrawRequested(_) => (1, 0),
        ChannelEvent::Withdrawn { .. } => (2, 0),
        ChannelEvent::Closed { .. } => (3, 0),
        ChannelEvent::Settled { .. } => (4, 0),
        ChannelEvent::Opened(_) => return None,
    };
    Some((block, event.channel_id(), kind, detail))
}

/// Reads the contract's channel events from block `start` (the latest block when the server
/// started, read before it accepted any connection) until `stop` turns true. A range the node
/// refuses (too many logs) is halved until it passes, down to one block.
pub async fn run<C: ChannelChain, S: ChannelStore + SettlementStore>(
    state: Arc<ServerState<C, S>>,
    start: Option<u64>,
    mut stop: watch::Receiver<bool>,
) {
    let interval = Duration::from_millis(state.limits.watch_interval_ms.max(10));
    let max_range = state.limits.log_range_blocks.max(1);
    let mut range = max_range;
    let mut next = start;
    let mut seen = lru::LruCache::new(std::num::NonZeroUsize::new(SEEN_EVENTS).expect("non-zero"));
    let mut touched =
        lru::LruCache::new(std::num::NonZeroUsize::new(TOUCHED_CHANNELS).expect("non-zero"));
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
        let latest = match state.chain.block_number().await {
            Ok(latest) => latest,
            Err(e) => {
                warn!("chain watcher: {e}");
                continue;
            }
        };
        // The first block not read yet; those before it are read again for changes only.
        let fresh = next.unwrap_or(latest);
        let mut from = fresh.saturating_sub(REORG_BLOCKS);
        while from <= latest {
            let (last, kinds) = if from < fresh {
                // (A node behind the cursor is asked for no block past its head.)
                (latest.min(fresh - 1), Events::Changes)
            } else {
                (latest, Events::All)
            };
            let to = last.min(from.saturating_add(range - 1));
            let events = match state.chain.channel_events(from, to, kinds).await {
                Ok(events) => events,
                Err(e) if range > 1 => {
                    debug!(from, to, "chain watcher: {e}; halving the range");
                    range /= 2;
                    continue;
                }
                Err(e) => {
                    warn!(from, to, "chain watcher: {e}");
                    break;
                }
            };
            for (event, block) in &events {
                if let Some(id) = identity(event, *block)
                    && seen.put(id, ()).is_some()
                {
                    continue;
                }
                let channel = event.channel_id();
                debug!(%channel, ?event, "channel event");
                match event {
                    // A new channel as the contract holds it: its first `open` reads no node.
                    // Not once anything else happened to it (an `Opened` read again, from a
                    // node that was behind, must not bring back what a later event changed).
                    ChannelEvent::Opened(info) => {
                        if !touched.contains(&channel) {
                            state.seed_channel(*info);
                        }
                    }
                    // Anything else changes what the chain holds: read it again.
                    _ => {
                        touched.put(channel, ());
                        state.forget_channel(channel);
                    }
                }
                if let Some(update) = update_of(event) {
                    state.registry.chain_update(channel, update);
                }
                state.metrics.chain_events.fetch_add(1, Ordering::Relaxed);
            }
            from = to + 1;
            next = Some(next.map_or(from, |n| n.max(from)));
            range = range.saturating_mul(2).min(max_range);
        }
    }
}
