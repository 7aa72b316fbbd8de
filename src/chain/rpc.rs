//! [`RpcBackend`]: alloy over JSON-RPC, for anvil and any EVM node (HTTP or HTTPS).

use std::sync::Once;
use std::time::Duration;

use alloy::network::{ReceiptResponse, TransactionBuilder};
use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::{Filter, TransactionRequest};
use alloy::signers::local::PrivateKeySigner;
use alloy::transports::{RpcError, TransportErrorKind};

use super::{Backend, BlockLog, ChainError, Result, TxOutcome, TxReceipt, TxRequest};

/// A transaction not mined within 2 minutes is reported as failed (it may still be mined
/// later: callers that signed something with it treat it as possibly sent). Without a bound a
/// stuck transaction would hold its caller forever.
pub const DEFAULT_TX_TIMEOUT_SECS: u64 = 120;

/// One account on a JSON-RPC node: transactions are signed locally with its key.
#[derive(Debug, Clone)]
pub struct RpcBackend {
    provider: DynProvider,
    sender: Address,
    chain_id: u64,
    tx_timeout: Duration,
}

impl RpcBackend {
    /// Connects to `url` (http:// or https://) as the account of `signer`.
    pub async fn connect(url: &str, signer: PrivateKeySigner) -> Result<Self> {
        install_tls_provider();
        let url = url
            .parse()
            .map_err(|e| ChainError::Rpc(format!("bad RPC URL {url}: {e}")))?;
        let sender = signer.address();
        let provider = ProviderBuilder::new()
            .wallet(signer)
            .connect_http(url)
            .erased();
        let chain_id = provider.get_chain_id().await.map_err(rpc_error)?;
        Ok(Self {
            provider,
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
        let mut request = TransactionRequest::default()
            .with_from(self.sender)
            .with_input(tx.input)
            .with_value(tx.value);
        match tx.to {
            Some(to) => request.set_to(to),
            None => request.set_create(),
        }
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
        let tx_hash = receipt.transaction_hash();
        if !receipt.status() {
            return Err(ChainError::Failed(tx_hash));
        }
        Ok(TxOutcome {
            receipt: TxReceipt {
                tx_hash,
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
        })
    }

    /// Calls run against the latest mined block, not the node's pending state (alloy's
    /// default): a channel is what the chain has committed, not what a transaction in one
    /// node's mempool may make of it.
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
