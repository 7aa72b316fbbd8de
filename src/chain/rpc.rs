//! [`RpcBackend`]: alloy over JSON-RPC, for anvil and any EVM node (HTTP or HTTPS).

use std::sync::Once;
use std::time::Duration;

use alloy::eips::eip2718::Encodable2718;
use alloy::network::{
    EthereumWallet, NetworkTransactionBuilder, ReceiptResponse, TransactionBuilder,
};
use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::{BlockNumberOrTag, Filter, TransactionRequest};
use alloy::signers::local::PrivateKeySigner;
use alloy::transports::{RpcError, TransportErrorKind};

use super::{
    Backend, BlockLog, ChainError, Mined, Result, TxOutcome, TxParams, TxReceipt, TxRequest,
    TxSender,
};

/// A transaction not mined within 2 minutes is reported as failed (it may still be mined
/// later: callers that signed something with it treat it as possibly sent). Without a bound a
/// stuck transaction would hold its caller forever.
pub const DEFAULT_TX_TIMEOUT_SECS: u64 = 120;

/// One account on a JSON-RPC node: transactions are signed locally with its key.
#[derive(Debug, Clone)]
pub struct RpcBackend {
    provider: DynProvider,
    /// Signs the transactions the settler sends itself (with its own nonces and fees).
    wallet: EthereumWallet,
    sender: Address,
    chain_id: u64,
    tx_timeout: Duration,
}

/// Idle connections to the node kept for the next call.
pub const RPC_POOL_IDLE_PER_HOST: usize = 16;

impl RpcBackend {
    /// Connects to `url` (http:// or https://) as the account of `signer`.
    pub async fn connect(url: &str, signer: PrivateKeySigner) -> Result<Self> {
        install_tls_provider();
        let url = url
            .parse()
            .map_err(|e| ChainError::Rpc(format!("bad RPC URL {url}: {e}")))?;
        let sender = signer.address();
        let wallet = EthereumWallet::from(signer);
        // Nonces from the node's pending count on every send, never a local count: the
        // settler sends with nonces of its own through the same key, which a cached count
        // would not see (the next cooperative close would reuse a batch's nonce).
        // A bounded pool: connections kept idle for the next call are at most
        // RPC_POOL_IDLE_PER_HOST, for 30 s (reqwest keeps every one 90 s by default, and a burst
        // of opens left hundreds of sockets and their buffers behind).
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(RPC_POOL_IDLE_PER_HOST)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| ChainError::Rpc(format!("building the HTTP client: {e}")))?;
        let provider = ProviderBuilder::new()
            .disable_recommended_fillers()
            .with_gas_estimation()
            .with_simple_nonce_management()
            .fetch_chain_id()
            .wallet(wallet.clone())
            .connect_reqwest(http, url)
            .erased();
        let chain_id = provider.get_chain_id().await.map_err(rpc_error)?;
        Ok(Self {
            provider,
            wallet,
            sender,
            chain_id,
            tx_timeout: Duration::from_secs(DEFAULT_TX_TIMEOUT_SECS),
        })
    }

    /// The same account, waiting at most `timeout` for a transaction to be mined.
    pub fn with_tx_timeout(mut self, timeout: Duration) -> Self {
        self.tx_timeout = timeout;
        self
    }

    /// The provider, for calls this module does not wrap.
    pub fn provider(&self) -> &DynProvider {
        &self.provider
    }
}

/// The outcome of a mined transaction from its receipt.
fn outcome_of(receipt: &alloy::rpc::types::TransactionReceipt) -> TxOutcome {
    TxOutcome {
        receipt: TxReceipt {
            tx_hash: receipt.transaction_hash(),
            block: receipt.block_number().unwrap_or_default(),
            gas_used: receipt.gas_used(),
        },
        logs: receipt
            .inner
            .logs()
            .iter()
            .map(|l| l.inner.clone())
            .collect(),
        created: receipt.contract_address(),
    }
}

impl RpcBackend {
    fn request(&self, tx: &TxRequest) -> TransactionRequest {
        let mut request = TransactionRequest::default()
            .with_from(self.sender)
            .with_input(tx.input.clone())
            .with_value(tx.value);
        match tx.to {
            Some(to) => request.set_to(to),
            None => request.set_create(),
        }
        request
    }
}

impl TxSender for RpcBackend {
    async fn mined_nonce(&self) -> Result<u64> {
        self.provider
            .get_transaction_count(self.sender)
            .latest()
            .await
            .map_err(rpc_error)
    }

    async fn pending_nonce(&self) -> Result<u64> {
        self.provider
            .get_transaction_count(self.sender)
            .pending()
            .await
            .map_err(rpc_error)
    }

    async fn base_fee(&self) -> Result<u128> {
        let block = self
            .provider
            .get_block_by_number(BlockNumberOrTag::Latest)
            .await
            .map_err(rpc_error)?
            .ok_or_else(|| ChainError::Rpc("no latest block".into()))?;
        Ok(block.header.base_fee_per_gas.map_or(0, u128::from))
    }

    async fn estimate_gas(&self, tx: &TxRequest) -> Result<u64> {
        self.provider
            .estimate_gas(self.request(tx))
            .await
            .map_err(rpc_error)
    }

    async fn broadcast(&self, tx: TxRequest, params: TxParams) -> Result<B256> {
        let request = self
            .request(&tx)
            .with_chain_id(self.chain_id)
            .with_nonce(params.nonce)
            .with_gas_limit(params.gas_limit)
            .with_max_fee_per_gas(params.fees.max_fee_per_gas)
            .with_max_priority_fee_per_gas(params.fees.max_priority_fee_per_gas);
        let envelope = request
            .build(&self.wallet)
            .await
            .map_err(|e| ChainError::Rpc(format!("signing: {e}")))?;
        let hash = *envelope.tx_hash();
        match self
            .provider
            .send_raw_transaction(&envelope.encoded_2718())
            .await
        {
            Ok(_) => Ok(hash),
            // The node has it already (a re-broadcast), or its nonce was used: the caller
            // looks the hash up either way.
            Err(e) if is_known(&e.to_string()) => Ok(hash),
            Err(e) => Err(rpc_error(e)),
        }
    }

    async fn receipt(&self, hash: B256) -> Result<Option<Mined>> {
        let receipt = self
            .provider
            .get_transaction_receipt(hash)
            .await
            .map_err(rpc_error)?;
        Ok(receipt.map(|r| Mined {
            success: r.status(),
            outcome: outcome_of(&r),
        }))
    }
}

/// A node's answer that a broadcast transaction is not new.
fn is_known(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("already known")
        || m.contains("known transaction")
        || m.contains("already imported")
        || m.contains("nonce too low")
}

/// rustls needs a process-wide crypto provider; `ring` is the light one this crate builds.
fn install_tls_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Another part of the process may have installed one already; either is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Maps an RPC error, decoding revert data when the node returned some (as it does when gas
/// estimation or `eth_call` hits a revert).
fn rpc_error(error: RpcError<TransportErrorKind>) -> ChainError {
    if let Some(data) = error
        .as_error_resp()
        .and_then(|payload| payload.as_revert_data())
    {
        return ChainError::from_revert(data);
    }
    ChainError::Rpc(error.to_string())
}

impl Backend for RpcBackend {
    fn chain_id(&self) -> u64 {
        self.chain_id
    }

    fn sender(&self) -> Address {
        self.sender
    }

    async fn send(&self, tx: TxRequest) -> Result<TxOutcome> {
        let request = self.request(&tx);
        let pending = self
            .provider
            .send_transaction(request)
            .await
            .map_err(rpc_error)?;
        let receipt = pending
            .with_timeout(Some(self.tx_timeout))
            .get_receipt()
            .await
            .map_err(|e| ChainError::Rpc(e.to_string()))?;
        if !receipt.status() {
            return Err(ChainError::Failed(receipt.transaction_hash()));
        }
        Ok(outcome_of(&receipt))
    }

    async fn call(&self, to: Address, input: Bytes) -> Result<Bytes> {
        let request = TransactionRequest::default().with_to(to).with_input(input);
        self.provider
            .call(request)
            .latest()
            .await
            .map_err(rpc_error)
    }

    async fn block_number(&self) -> Result<u64> {
        self.provider.get_block_number().await.map_err(rpc_error)
    }

    async fn logs(
        &self,
        address: Address,
        topics0: &[B256],
        from: u64,
        to: u64,
    ) -> Result<Vec<BlockLog>> {
        let filter = Filter::new()
            .address(address)
            .event_signature(topics0.to_vec())
            .from_block(from)
            .to_block(to);
        let logs = self.provider.get_logs(&filter).await.map_err(rpc_error)?;
        Ok(logs
            .into_iter()
            .map(|l| BlockLog {
                block: l.block_number.unwrap_or_default(),
                log: l.inner,
            })
            .collect())
    }

    async fn balance(&self, owner: Address) -> Result<U256> {
        self.provider.get_balance(owner).await.map_err(rpc_error)
    }
}
