//! Configuration sections and their defaults, each with its unit in the name and the reason
//! beside it. The sections grow with the server issue (listen address, RPC, store, tariff).

use std::num::NonZeroUsize;

/// 65,536 payer keys take about 8 MiB and cover far more channels than one node serves at
/// once; a miss costs one signature recovery, never an error.
pub const DEFAULT_PAYER_KEY_CACHE_ENTRIES: usize = 65_536;

/// How the engine checks vouchers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelConfig {
    /// Size of the LRU cache of payers' public keys
    /// ([`PayerKeys`](crate::channel::PayerKeys)).
    pub payer_key_cache_entries: NonZeroUsize,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        Self {
            payer_key_cache_entries: NonZeroUsize::new(DEFAULT_PAYER_KEY_CACHE_ENTRIES)
                .expect("the default is non-zero"),
        }
    }
}
