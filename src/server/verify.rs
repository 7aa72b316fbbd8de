//! Signature checks off the async reactor: the costly step of accepting a voucher (about
//! 100 µs of elliptic-curve work) runs on Tokio's blocking threads, at most one per core at a
//! time, against the shared key cache ([`PayerKeys`], whose locks are never held across the
//! curve arithmetic). A connection waiting for its check holds no reactor thread, so one
//! connection's checks cannot starve the others' delivery.

use std::sync::Arc;

use alloy::primitives::Address;
use tokio::sync::Semaphore;

use crate::channel::{ChannelDomain, ChannelError, PayerKeys, SignedState, VerifiedState};

/// The server's signature checker.
#[derive(Clone)]
pub struct Verifier {
    keys: Arc<PayerKeys>,
    /// One permit per core: more checks at once than cores would only queue on the CPU.
    permits: Arc<Semaphore>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("keys", &self.keys)
            .field("free", &self.permits.available_permits())
            .finish()
    }
}

impl Default for Verifier {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::new(PayerKeys::default(), cores)
    }
}

impl Verifier {
    /// A checker over `keys` running at most `parallel` checks at once.
    pub fn new(keys: PayerKeys, parallel: usize) -> Self {
        Self {
            keys: Arc::new(keys),
            permits: Arc::new(Semaphore::new(parallel.max(1))),
        }
    }

    /// Checks that `payer` signed `voucher` under `domain`.
    pub async fn verify(
        &self,
        domain: ChannelDomain,
        payer: Address,
        voucher: SignedState,
    ) -> Result<VerifiedState, ChannelError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let keys = self.keys.clone();
        match tokio::task::spawn_blocking(move || keys.verify_state(&domain, payer, &voucher)).await
        {
            Ok(result) => result,
            // The check panicked (it does not): treat the voucher as unverified.
            Err(_) => Err(ChannelError::InvalidSignature(
                crate::channel::SignatureError::Unrecoverable,
            )),
        }
    }
}
