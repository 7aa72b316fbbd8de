//! The acceptance rules of DESIGN.md section 2, as a pure state machine on an open channel.

use std::convert::Infallible;
use std::sync::Arc;

use alloy::primitives::{Address, B256, Signature};

use super::error::ChannelError;
use super::signature::{PayerKeys, SignatureCheck, SignatureError};
use super::state::{ChannelDomain, ChannelState};
use crate::shared::SharedTable;

/// A channel state with the payer's signature over it: a voucher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedState {
    /// The signed fields.
    pub state: ChannelState,
    /// The payer's signature, already parsed (low-s, scalars in range).
    pub signature: Signature,
}

/// A voucher whose signature was checked: `payer` signed it under `domain`. Made only by
/// [`PayerKeys::verify_state`], so holding one proves the (costly) check was done; the cheap
/// rules are checked again where it is applied ([`OpenChannel::check_verified`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedState {
    signed: SignedState,
    payer: Address,
    domain: ChannelDomain,
}

impl VerifiedState {
    /// The voucher.
    pub fn signed(&self) -> &SignedState {
        &self.signed
    }

    /// Who signed it.
    pub fn payer(&self) -> Address {
        self.payer
    }
}

impl PayerKeys {
    /// Checks that `payer` signed `signed` under `domain` (the costly part of accepting a
    /// voucher: run it off the async reactor). The rules on nonce, cumulative and deposit are
    /// not checked here.
    pub fn verify_state(
        &self,
        domain: &ChannelDomain,
        payer: Address,
        signed: &SignedState,
    ) -> Result<VerifiedState, ChannelError> {
        let digest = domain.state_digest(&signed.state);
        self.verify(payer, &digest, &signed.signature)?;
        Ok(VerifiedState {
            signed: signed.clone(),
            payer,
            domain: *domain,
        })
    }

    /// [`PayerKeys::verify_state`] for many vouchers at once, with one batch equation for
    /// those whose payer has a table ([`PayerKeys::verify_batch`]). Returns one result per
    /// voucher, in order, and whether the batch equation failed (each voucher was then checked
    /// alone, so the results still name the bad ones).
    pub fn verify_states(
        &self,
        vouchers: &[(ChannelDomain, Address, SignedState)],
    ) -> (Vec<Result<VerifiedState, ChannelError>>, bool) {
        let digests: Vec<B256> = vouchers
            .iter()
            .map(|(domain, _, signed)| domain.state_digest(&signed.state))
            .collect();
        let checks: Vec<SignatureCheck<'_>> = vouchers
            .iter()
            .zip(&digests)
            .map(|((_, payer, signed), digest)| SignatureCheck {
                payer: *payer,
                digest: *digest,
                signature: &signed.signature,
            })
            .collect();
        let outcome = self.verify_batch(&checks);
        let results = outcome
            .results
            .into_iter()
            .zip(vouchers)
            .map(|(result, (domain, payer, signed))| {
                result?;
                Ok(VerifiedState {
                    signed: signed.clone(),
                    payer: *payer,
                    domain: *domain,
                })
            })
            .collect();
        (results, outcome.fell_back)
    }
}

/// What the contract says about a channel, read through the chain boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelInfo {
    /// The channel id.
    pub id: B256,
    /// Who deposited and signs states.
    pub payer: Address,
    /// Who is paid.
    pub payee: Address,
    /// ERC-20 token, or the zero address for native ETH.
    pub token: Address,
    /// Total deposited, top-ups included (claims do not lower it).
    pub deposit: u128,
    /// Total already paid to the payee on-chain.
    pub claimed: u128,
    /// Nonce of the last state claimed on-chain (0 if none).
    pub claimed_nonce: u64,
    /// The payer's withdrawal delay (seconds): how long the payee has to claim after a
    /// withdrawal request.
    pub withdraw_delay: u32,
    /// When the payer may withdraw (unix seconds), or 0 when no withdrawal was requested.
    pub withdraw_at: u64,
    /// The channel was withdrawn or closed cooperatively (or never opened).
    pub closed: bool,
}

impl ChannelInfo {
    /// The payer asked to withdraw: the channel is closing and takes no new credit.
    pub fn withdraw_requested(&self) -> bool {
        self.withdraw_at != 0
    }
}

/// The last state the engine accepted for a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptedState {
    /// Its nonce; the next state must have a greater one.
    pub nonce: u64,
    /// What the payer has authorized so far; the next state may not be lower.
    pub cumulative: u128,
    /// The payer's signature, kept to settle with. `None` when the state comes from the
    /// chain's claimed values and no voucher has been accepted since.
    pub signature: Option<Signature>,
}

/// `domain`, shared by every open channel under it: an idle session keeps a pointer instead of
/// 64 bytes (a server signs under one domain).
fn shared_domain(domain: ChannelDomain) -> Arc<ChannelDomain> {
    static SHARED: SharedTable<ChannelDomain, ChannelDomain, 16> = SharedTable::new();
    let Ok(shared) = SHARED.get_or_try_make(domain, || Ok::<_, Infallible>(domain));
    shared
}

/// An open channel, for this server's payee and token, and the last state accepted on it.
///
/// [`OpenChannel::accept`] is the only way the accepted state moves, and it moves only forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenChannel {
    /// Shared by the channels under one domain.
    domain: Arc<ChannelDomain>,
    info: ChannelInfo,
    accepted: AcceptedState,
}

impl OpenChannel {
    /// Checks that the chain's view of the channel lets this server take vouchers on it: open,
    /// not closing, for `payee` and `token`. Starts from the on-chain claimed state.
    pub fn open(
        domain: ChannelDomain,
        info: ChannelInfo,
        payee: Address,
        token: Address,
    ) -> Result<Self, ChannelError> {
        if info.closed {
            return Err(ChannelError::ChannelNotOpen {
                channel_id: info.id,
                reason: "closed",
            });
        }
        if info.withdraw_requested() {
            return Err(ChannelError::ChannelNotOpen {
                channel_id: info.id,
                reason: "withdrawal requested",
            });
        }
        if info.payee != payee {
            return Err(ChannelError::WrongPayee {
                got: info.payee,
                expected: payee,
            });
        }
        if info.token != token {
            return Err(ChannelError::WrongToken {
                got: info.token,
                expected: token,
            });
        }
        let accepted = AcceptedState {
            nonce: info.claimed_nonce,
            cumulative: info.claimed,
            signature: None,
        };
        Ok(Self {
            domain: shared_domain(domain),
            info,
            accepted,
        })
    }

    /// Restores the state a store had accepted. It must not be behind the chain's claimed
    /// state (that would let an old voucher be re-accepted).
    pub fn restore(mut self, stored: AcceptedState) -> Result<Self, ChannelError> {
        if stored.nonce < self.accepted.nonce {
            return Err(ChannelError::StaleNonce {
                got: stored.nonce,
                current: self.accepted.nonce,
            });
        }
        if stored.cumulative < self.accepted.cumulative {
            return Err(ChannelError::CumulativeDecreased {
                got: stored.cumulative,
                current: self.accepted.cumulative,
            });
        }
        self.accepted = stored;
        Ok(self)
    }

    /// What a new session on the channel starts from, given the state a store holds: the
    /// stored state where it is not behind the chain's claimed one. If the chain claimed more
    /// than the stored state authorizes (a claim under a state this store never held), the
    /// chain's claimed amount, with the stored nonce as the floor (the store refuses lower
    /// nonces) and no signature (nothing above the chain's claim is claimable under it). A
    /// stored nonce below the chain's is obsolete and ignored.
    pub fn restore_floor(mut self, stored: AcceptedState) -> Self {
        if stored.nonce < self.accepted.nonce {
            return self;
        }
        if stored.cumulative >= self.accepted.cumulative {
            self.accepted = stored;
        } else {
            self.accepted.nonce = stored.nonce;
            self.accepted.signature = None;
        }
        self
    }

    /// The channel as read from the chain.
    pub fn info(&self) -> &ChannelInfo {
        &self.info
    }

    /// The signing domain vouchers must use.
    pub fn domain(&self) -> &ChannelDomain {
        &self.domain
    }

    /// The last accepted state.
    pub fn accepted(&self) -> &AcceptedState {
        &self.accepted
    }

    /// The channel's deposit.
    pub fn deposit(&self) -> u128 {
        self.info.deposit
    }

    /// Records a top-up seen on-chain. A deposit never shrinks while a channel is open, so a
    /// lower value (a stale read) is ignored.
    pub fn raise_deposit(&mut self, deposit: u128) {
        self.info.deposit = self.info.deposit.max(deposit);
    }

    /// Checks a voucher against every rule without changing anything, returning its digest.
    ///
    /// The cheap field checks run before the signature check, so garbage costs no ECDSA.
    pub fn check(&self, voucher: &SignedState, keys: &PayerKeys) -> Result<B256, ChannelError> {
        let digest = self.check_fields(voucher)?;
        keys.verify(self.info.payer, &digest, &voucher.signature)?;
        Ok(digest)
    }

    /// Every rule but the signature (channel id, nonce, cumulative, deposit), in that order;
    /// returns the state's digest. A session checks these first, so garbage costs no ECDSA,
    /// then has the signature checked off the async reactor.
    pub fn check_fields(&self, voucher: &SignedState) -> Result<B256, ChannelError> {
        let state = &voucher.state;
        if state.channelId != self.info.id {
            return Err(ChannelError::WrongChannel {
                got: state.channelId,
                expected: self.info.id,
            });
        }
        if state.nonce <= self.accepted.nonce {
            return Err(ChannelError::StaleNonce {
                got: state.nonce,
                current: self.accepted.nonce,
            });
        }
        if state.cumulative < self.accepted.cumulative {
            return Err(ChannelError::CumulativeDecreased {
                got: state.cumulative,
                current: self.accepted.cumulative,
            });
        }
        if state.cumulative > self.info.deposit {
            return Err(ChannelError::ExceedsDeposit {
                got: state.cumulative,
                deposit: self.info.deposit,
            });
        }
        Ok(self.domain.state_digest(state))
    }

    /// Every rule, for a voucher whose signature was already checked: it must have been
    /// checked against this channel's payer under this channel's domain.
    pub fn check_verified(&self, voucher: &VerifiedState) -> Result<B256, ChannelError> {
        if voucher.payer != self.info.payer || voucher.domain != *self.domain {
            return Err(ChannelError::InvalidSignature(
                SignatureError::WrongSigner {
                    expected: self.info.payer,
                },
            ));
        }
        self.check_fields(&voucher.signed)
    }

    /// Makes a voucher that passed [`OpenChannel::check`] the accepted state, once it has been
    /// persisted. The caller guarantees nothing else was accepted since the check (a session
    /// holds at most one voucher in flight); a voucher that is no longer ahead is ignored.
    pub fn apply_checked(&mut self, voucher: &SignedState) -> &AcceptedState {
        if voucher.state.nonce > self.accepted.nonce
            && voucher.state.cumulative >= self.accepted.cumulative
        {
            self.accepted = AcceptedState {
                nonce: voucher.state.nonce,
                cumulative: voucher.state.cumulative,
                signature: Some(voucher.signature),
            };
        }
        &self.accepted
    }

    /// Accepts a voucher if every rule holds; on error nothing changes and the last accepted
    /// state stays in force.
    pub fn accept(
        &mut self,
        voucher: &SignedState,
        keys: &PayerKeys,
    ) -> Result<&AcceptedState, ChannelError> {
        self.check(voucher, keys)?;
        self.accepted = AcceptedState {
            nonce: voucher.state.nonce,
            cumulative: voucher.state.cumulative,
            signature: Some(voucher.signature),
        };
        Ok(&self.accepted)
    }
}
