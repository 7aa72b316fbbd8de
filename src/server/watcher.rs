//! The chain's news of channels (issue 9, item 1). The chain is read at `open`; after that a
//! session learns what happens to its channel from the contract's events, which one task reads
//! for the whole process, in bounded block ranges (public nodes cap `eth_getLogs`), starting at
//! the block of the server's start (nothing is replayed). A top-up raises the live session's
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
use crate::chain::{ChannelChain, ChannelEvent};
use crate::session::ChainUpdate;
use crate::store::ChannelStore;

/// Blocks read per `eth_getLogs` call: within what public nodes allow.
pub const DEFAULT_LOG_RANGE_BLOCKS: u64 = 500;
/// The chain is polled every second: a withdrawal request reaches the live session within about
/// a second of its block, far inside the hour a channel's withdrawal delay gives.
pub const DEFAULT_WATCH_INTERVAL_MS: u64 = 1_000;

/// The update a session sees for an event.
fn update_of(event: &ChannelEvent) -> ChainUpdate {
    match event {
        ChannelEvent::ToppedUp { deposit, .. } => ChainUpdate::ToppedUp { deposit: *deposit },
        ChannelEvent::WithdrawRequested(_) => ChainUpdate::WithdrawRequested,
        ChannelEvent::Withdrawn { .. } | ChannelEvent::Closed { .. } => ChainUpdate::Closed,
    }
}

/// Reads the contract's channel events until `stop` turns true.
pub async fn run<C: ChannelChain, S: ChannelStore>(
    state: Arc<ServerState<C, S>>,
    mut stop: watch::Receiver<bool>,
) {
    let interval = Duration::from_millis(state.limits.watch_interval_ms.max(10));
    let range = state.limits.log_range_blocks.max(1);
    let mut next: Option<u64> = None;
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
        let mut from = *next.get_or_insert(latest);
        while from <= latest {
            let to = latest.min(from.saturating_add(range - 1));
            let events = match state.chain.channel_events(from, to).await {
                Ok(events) => events,
                Err(e) => {
                    warn!(from, to, "chain watcher: {e}");
                    break;
                }
            };
            for event in &events {
                let channel = event.channel_id();
                debug!(%channel, ?event, "channel event");
                state.forget_channel(channel);
                state
                    .registry
                    .chain_update(channel, update_of(event), state.now());
                state.metrics.chain_events.fetch_add(1, Ordering::Relaxed);
            }
            from = to + 1;
            next = Some(from);
        }
    }
}
