//! [`Channels`]: every `PaymentChannels` call encoded and every event decoded once, on top of
//! any [`Backend`].

use alloy::primitives::{Address, B256, Bytes, Log, Signature, U256};
use alloy::sol_types::{SolCall, SolEvent};

use super::bindings::PaymentChannels as pc;
use super::{
    Backend, ChainError, ChannelChain, ChannelEvent, Claim, Claimed, CloseOutcome, Events, PaidRun,
    Result, SettleOutcome, SkipReason, TxOutcome, TxReceipt, TxRequest, WithdrawRequest,
};
use crate::channel::{ChannelInfo, signature};

/// The `PaymentChannels` contract at an address, reached through a backend (one sender).
#[derive(Debug, Clone)]
pub struct Channels<B> {
    backend: B,
    address: Address,
}

impl<B: Backend> Channels<B> {
    /// The contract already deployed at `address`.
    pub fn at(backend: B, address: Address) -> Self {
        Self { backend, address }
    }

    /// Deploys the committed bytecode from the backend's sender.
    pub async fn deploy(backend: B) -> Result<Self> {
        let outcome = backend
            .send(TxRequest {
                to: None,
                input: pc::BYTECODE.clone(),
                value: U256::ZERO,
            })
            .await?;
        let address = outcome
            .created
            .ok_or_else(|| ChainError::Decode("the deployment created no contract".into()))?;
        Ok(Self { backend, address })
    }

    /// The same contract, used by another sender.
    pub fn with_backend<B2: Backend>(&self, backend: B2) -> Channels<B2> {
        Channels {
            backend,
            address: self.address,
        }
    }

    /// The backend (and so the sender) in use.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The contract's address.
    pub fn address(&self) -> Address {
        self.address
    }

    async fn send<C: SolCall>(&self, call: C, value: U256) -> Result<TxOutcome> {
        self.backend
            .send(TxRequest {
                to: Some(self.address),
                input: call.abi_encode().into(),
                value,
            })
            .await
    }

    async fn view<C: SolCall>(&self, call: C) -> Result<C::Return> {
        let out = self
            .backend
            .call(self.address, call.abi_encode().into())
            .await?;
        C::abi_decode_returns(&out).map_err(|e| ChainError::Decode(e.to_string()))
    }

    /// Opens a channel from the sender (the payer), depositing `amount` (native ETH when
    /// `token` is zero; an ERC-20 must be approved first). Returns the channel id.
    pub async fn open(
        &self,
        payee: Address,
        token: Address,
        salt: B256,
        amount: u128,
        withdraw_delay_secs: u32,
    ) -> Result<(B256, TxReceipt)> {
        let value = if token.is_zero() {
            U256::from(amount)
        } else {
            U256::ZERO
        };
        let call = pc::openCall {
            payee,
            token,
            salt,
            amount,
            withdrawDelay: withdraw_delay_secs,
        };
        let outcome = self.send(call, value).await?;
        let id = events::<pc::Opened>(&outcome.logs, self.address)
            .next()
            .map(|e| e.channelId)
            .ok_or_else(|| ChainError::Decode("open emitted no Opened event".into()))?;
        Ok((id, outcome.receipt))
    }

    /// The `open` transaction, for a sender that sends it itself ([`super::TxSender`]): many
    /// channels opened without waiting for each receipt (a load generator's).
    pub fn open_tx(
        &self,
        payee: Address,
        token: Address,
        salt: B256,
        amount: u128,
        withdraw_delay_secs: u32,
    ) -> TxRequest {
        let value = if token.is_zero() {
            U256::from(amount)
        } else {
            U256::ZERO
        };
        let call = pc::openCall {
            payee,
            token,
            salt,
            amount,
            withdrawDelay: withdraw_delay_secs,
        };
        TxRequest {
            to: Some(self.address),
            input: call.abi_encode().into(),
            value,
        }
    }

    /// Adds `amount` to a channel's deposit.
    pub async fn top_up(&self, id: B256, token: Address, amount: u128) -> Result<TxReceipt> {
        let value = if token.is_zero() {
            U256::from(amount)
        } else {
            U256::ZERO
        };
        Ok(self
            .send(
                pc::topUpCall {
                    channelId: id,
                    amount,
                },
                value,
            )
            .await?
            .receipt)
    }

    /// Starts the withdrawal delay (payer only).
    pub async fn request_withdraw(&self, id: B256) -> Result<TxReceipt> {
        Ok(self
            .send(pc::requestWithdrawCall { channelId: id }, U256::ZERO)
            .await?
            .receipt)
    }

    /// Withdraws the unclaimed deposit after the delay (payer only).
    pub async fn withdraw(&self, id: B256) -> Result<TxReceipt> {
        Ok(self
            .send(pc::withdrawCall { channelId: id }, U256::ZERO)
            .await?
            .receipt)
    }

    /// Lets `operator` claim for the sender (a payee).
    pub async fn set_operator(&self, operator: Address, allowed: bool) -> Result<TxReceipt> {
        Ok(self
            .send(pc::setOperatorCall { operator, allowed }, U256::ZERO)
            .await?
            .receipt)
    }

    /// The contract's EIP-712 domain separator.
    pub async fn domain_separator(&self) -> Result<B256> {
        self.view(pc::DOMAIN_SEPARATORCall {}).await
    }

    /// The digest a payer signs, as the contract computes it.
    pub async fn state_digest(&self, id: B256, nonce: u64, cumulative: u128) -> Result<B256> {
        self.view(pc::stateDigestCall {
            channelId: id,
            nonce,
            cumulative,
        })
        .await
    }

    /// The `settle(claims)` transaction, for a sender that sends it itself
    /// ([`super::TxSender`]).
    pub fn settle_tx(&self, claims: &[Claim]) -> TxRequest {
        let call = pc::settleCall {
            claims: claims.iter().map(to_sol).collect(),
        };
        TxRequest {
            to: Some(self.address),
            input: call.abi_encode().into(),
            value: U256::ZERO,
        }
    }

    /// What a mined `settle(claims)` did: every claim not named by a `ClaimSkipped` (by its
    /// index) was paid.
    pub fn settle_outcome(&self, claims: &[Claim], outcome: TxOutcome) -> SettleOutcome {
        let mut skip_of = vec![None; claims.len()];
        for e in events::<pc::ClaimSkipped>(&outcome.logs, self.address) {
            if let Some(slot) = usize::try_from(e.index)
                .ok()
                .and_then(|i| skip_of.get_mut(i))
            {
                *slot = Some(SkipReason::from_code(e.reason));
            }
        }
        let mut claimed = Vec::new();
        let mut skipped = Vec::new();
        for (claim, skip) in claims.iter().zip(skip_of) {
            match skip {
                Some(reason) => skipped.push((claim.channel_id, reason)),
                None => claimed.push(Claimed {
                    channel_id: claim.channel_id,
                    nonce: claim.nonce,
                    claimed: claim.amount,
                }),
            }
        }
        let runs = events::<pc::Settled>(&outcome.logs, self.address)
            .map(|e| PaidRun {
                payee: e.payee,
                token: e.token,
                amount: e.amount,
                channel_ids: e.channelIds,
            })
            .collect();
        SettleOutcome {
            receipt: outcome.receipt,
            claimed,
            skipped,
            runs,
        }
    }

    /// Whether `operator` may claim for `payee`.
    pub async fn is_operator(&self, payee: Address, operator: Address) -> Result<bool> {
        self.view(pc::isOperatorCall { payee, operator }).await
    }

    /// The channel's fields as the contract returns them (all zero when unknown).
    pub async fn channel_view(&self, id: B256) -> Result<pc::ChannelView> {
        self.view(pc::getChannelCall { channelId: id }).await
    }
}

impl<B: Backend> ChannelChain for Channels<B> {
    fn chain_id(&self) -> u64 {
        self.backend.chain_id()
    }

    fn contract(&self) -> Address {
        self.address
    }

    async fn read_channel(&self, id: B256) -> Result<Option<ChannelInfo>> {
        let v = self.channel_view(id).await?;
        if v.payer.is_zero() {
            return Ok(None);
        }
        Ok(Some(ChannelInfo {
            id,
            payer: v.payer,
            payee: v.payee,
            token: v.token,
            deposit: v.deposit,
            claimed: v.claimed,
            claimed_nonce: v.claimedNonce,
            withdraw_delay: v.withdrawDelay,
            withdraw_at: v.withdrawAt,
            closed: v.closed,
        }))
    }

    async fn settle(&self, claims: &[Claim]) -> Result<SettleOutcome> {
        let tx = self.settle_tx(claims);
        let outcome = self.backend.send(tx).await?;
        Ok(self.settle_outcome(claims, outcome))
    }

    async fn close_cooperative(
        &self,
        claim: &Claim,
        payee_signature: &Signature,
    ) -> Result<CloseOutcome> {
        let call = pc::closeCooperativeCall {
            claim: to_sol(claim),
            payeeSignature: Bytes::copy_from_slice(&signature::to_bytes(payee_signature)),
        };
        let outcome = self.send(call, U256::ZERO).await?;
        let event = events::<pc::ClosedCooperatively>(&outcome.logs, self.address)
            .next()
            .ok_or_else(|| ChainError::Decode("no ClosedCooperatively event".into()))?;
        Ok(CloseOutcome {
            receipt: outcome.receipt,
            claimed: event.claimed,
            paid: event.paid,
            refund: event.refund,
        })
    }

    async fn block_number(&self) -> Result<u64> {
        self.backend.block_number().await
    }

    async fn channel_events(
        &self,
        from: u64,
        to: u64,
        events: Events,
    ) -> Result<Vec<(ChannelEvent, u64)>> {
        let mut topics = vec![
            pc::Settled::SIGNATURE_HASH,
            pc::ToppedUp::SIGNATURE_HASH,
            pc::WithdrawRequested::SIGNATURE_HASH,
            pc::Withdrawn::SIGNATURE_HASH,
            pc::ClosedCooperatively::SIGNATURE_HASH,
        ];
        if events == Events::All {
            topics.push(pc::Opened::SIGNATURE_HASH);
        }
        let logs = self.backend.logs(self.address, &topics, from, to).await?;
        let mut out = Vec::new();
        // Only the contract's own events count (a token could emit look-alikes).
        for l in logs.iter().filter(|l| l.log.address == self.address) {
            let Some(topic) = l.log.topics().first().copied() else {
                continue;
            };
            if topic == pc::Opened::SIGNATURE_HASH {
                if let Ok(e) = pc::Opened::decode_log(&l.log) {
                    let info = ChannelInfo {
                        id: e.channelId,
                        payer: e.payer,
                        payee: e.payee,
                        token: e.token,
                        deposit: e.deposit,
                        claimed: 0,
                        claimed_nonce: 0,
                        withdraw_delay: e.withdrawDelay,
                        withdraw_at: 0,
                        closed: false,
                    };
                    out.push((ChannelEvent::Opened(info), l.block));
                }
                continue;
            }
            if topic == pc::Settled::SIGNATURE_HASH {
                if let Ok(e) = pc::Settled::decode_log(&l.log) {
                    out.extend(
                        e.data
                            .channelIds
                            .iter()
                            .map(|id| (ChannelEvent::Settled { channel_id: *id }, l.block)),
                    );
                }
                continue;
            }
            out.extend(Self::other_event(topic, l));
        }
        Ok(out)
    }
}

impl<B: Backend> Channels<B> {
    /// A `ToppedUp`, `WithdrawRequested`, `Withdrawn` or `ClosedCooperatively` log.
    fn other_event(topic: B256, l: &super::BlockLog) -> Option<(ChannelEvent, u64)> {
        let event = if topic == pc::ToppedUp::SIGNATURE_HASH {
            let e = pc::ToppedUp::decode_log(&l.log).ok()?;
            ChannelEvent::ToppedUp {
                channel_id: e.channelId,
                deposit: e.deposit,
            }
        } else if topic == pc::WithdrawRequested::SIGNATURE_HASH {
            let e = pc::WithdrawRequested::decode_log(&l.log).ok()?;
            ChannelEvent::WithdrawRequested(WithdrawRequest {
                channel_id: e.channelId,
                withdraw_at: e.withdrawAt,
                block: l.block,
            })
        } else if topic == pc::Withdrawn::SIGNATURE_HASH {
            let e = pc::Withdrawn::decode_log(&l.log).ok()?;
            ChannelEvent::Withdrawn {
                channel_id: e.channelId,
            }
        } else {
            let e = pc::ClosedCooperatively::decode_log(&l.log).ok()?;
            ChannelEvent::Closed {
                channel_id: e.channelId,
            }
        };
        Some((event, l.block))
    }
}

/// The claim as the contract takes it: the signature in EIP-2098 form.
fn to_sol(claim: &Claim) -> pc::Claim {
    let (r, vs) = signature::to_compact(&claim.signature);
    pc::Claim {
        channelId: claim.channel_id,
        nonce: claim.nonce,
        cumulative: claim.cumulative,
        amount: claim.amount,
        r,
        vs,
    }
}

/// The events of type `E` emitted by `contract` among `logs`, in order. (A token called in
/// the same transaction could emit look-alike events; only the contract's own count.)
fn events<E: SolEvent>(logs: &[Log], contract: Address) -> impl Iterator<Item = E> + '_ {
    logs.iter()
        .filter(move |l| l.address == contract && l.topics().first() == Some(&E::SIGNATURE_HASH))
        .filter_map(|l| E::decode_log(l).ok().map(|decoded| decoded.data))
}
