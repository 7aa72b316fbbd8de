//! [`EvmNode`]: an in-process EVM (revm) that runs the committed contract bytecode, for the demo
//! and for unit tests that need no node. Every transaction is its own block; time moves only
//! when [`EvmNode::advance_time`] says so. The integration tests run the same scenarios on
//! anvil.

use std::sync::{Arc, Mutex, MutexGuard};

use alloy::primitives::{Address, B256, Bytes, U256, keccak256};
use revm::context::result::{ExecutionResult, Output};
use revm::context::{BlockEnv, CfgEnv, Context, Journal, TxEnv};
use revm::database::{CacheDB, EmptyDB};
use revm::handler::{MainBuilder, MainnetEvm};
use revm::primitives::TxKind;
use revm::primitives::hardfork::SpecId;
use revm::{ExecuteCommitEvm, ExecuteEvm};

use super::{
    Backend, BlockLog, ChainError, Mined, Result, TxOutcome, TxParams, TxReceipt, TxRequest,
    TxSender,
};

/// Chain id the in-process EVM reports unless told otherwise (anvil's default).
pub const DEFAULT_EVM_CHAIN_ID: u64 = 31337;
/// Unix time of the in-process EVM's first block: fixed, so runs are reproducible.
pub const DEFAULT_EVM_START_TIME_SECS: u64 = 1_767_225_600;
/// Gas limit of each transaction; far above what a 100-claim batch needs (about 1.2M).
const TX_GAS_LIMIT: u64 = 16_000_000;
/// Block gas limit of the in-process EVM.
const BLOCK_GAS_LIMIT: u64 = 60_000_000;

type Db = CacheDB<EmptyDB>;
type Evm = MainnetEvm<Context<BlockEnv, TxEnv, CfgEnv, Db, Journal<Db>, ()>>;

/// The chain's state. revm's `Evm` is not `Send`, so one is built around the database for each
/// transaction, inside the lock, and the database is taken back after it.
struct Inner {
    db: Db,
    cfg: CfgEnv,
    block: u64,
    timestamp: u64,
    logs: Vec<BlockLog>,
    /// Transactions sent by each account (its next nonce).
    nonces: std::collections::HashMap<Address, u64>,
    /// Receipts of transactions sent with [`TxSender::broadcast`], by hash.
    receipts: std::collections::HashMap<B256, Mined>,
}

impl Inner {
    /// Runs `f` on an EVM over the state at the current block and time, then keeps the state.
    fn with_evm<T>(&mut self, f: impl FnOnce(&mut Evm) -> T) -> T {
        let (number, timestamp) = (self.block + 1, self.timestamp);
        let db = std::mem::replace(&mut self.db, CacheDB::new(EmptyDB::new()));
        let mut evm = Context::new(db, SpecId::PRAGUE)
            .with_cfg(self.cfg.clone())
            .modify_block_chained(|block: &mut BlockEnv| {
                block.number = U256::from(number);
                block.timestamp = U256::from(timestamp);
                block.gas_limit = BLOCK_GAS_LIMIT;
                block.basefee = 0;
            })
            .build_mainnet();
        let out = f(&mut evm);
        self.db = evm.ctx.journaled_state.database;
        out
    }
}

/// A shared in-process chain; clone it freely, and take a [`EvmBackend`] per sender.
#[derive(Clone)]
pub struct EvmNode {
    inner: Arc<Mutex<Inner>>,
    chain_id: u64,
}

impl std::fmt::Debug for EvmNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvmNode")
            .field("chain_id", &self.chain_id)
            .finish_non_exhaustive()
    }
}

impl Default for EvmNode {
    fn default() -> Self {
        Self::new(DEFAULT_EVM_CHAIN_ID)
    }
}

impl EvmNode {
    /// An empty chain with fees off (gas is counted, not charged).
    pub fn new(chain_id: u64) -> Self {
        let mut cfg = CfgEnv::new_with_spec(SpecId::PRAGUE);
        cfg.chain_id = chain_id;
        cfg.disable_nonce_check = true;
        let inner = Inner {
            db: CacheDB::new(EmptyDB::new()),
            cfg,
            block: 0,
            timestamp: DEFAULT_EVM_START_TIME_SECS,
            logs: Vec::new(),
            nonces: std::collections::HashMap::new(),
            receipts: std::collections::HashMap::new(),
        };
        Self {
            inner: Arc::new(Mutex::new(inner)),
            chain_id,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves a consistent EVM (revm commits atomically).
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sets the native balance of `account`.
    pub fn fund(&self, account: Address, balance: U256) {
        let mut inner = self.lock();
        let mut info = inner
            .db
            .load_account(account)
            .map(|a| a.info.clone())
            .expect("the in-memory database cannot fail");
        info.balance = balance;
        // insert_account_info also marks the account as existing, which load_account does not.
        inner.db.insert_account_info(account, info);
    }

    /// The native balance of `account`.
    pub fn balance_of(&self, account: Address) -> U256 {
        let mut inner = self.lock();
        inner
            .db
            .load_account(account)
            .map(|a| a.info.balance)
            .unwrap_or_default()
    }

    /// Moves the clock forward (for withdrawal delays).
    pub fn advance_time(&self, secs: u64) {
        self.lock().timestamp += secs;
    }

    /// The current block time.
    pub fn timestamp(&self) -> u64 {
        self.lock().timestamp
    }

    /// A backend sending as `sender`.
    pub fn backend(&self, sender: Address) -> EvmBackend {
        EvmBackend {
            node: self.clone(),
            sender,
        }
    }

    fn tx_env(
        &self,
        caller: Address,
        to: Option<Address>,
        input: Bytes,
        value: U256,
    ) -> Result<TxEnv> {
        TxEnv::builder()
            .chain_id(Some(self.chain_id))
            .caller(caller)
            .kind(to.map_or(TxKind::Create, TxKind::Call))
            .data(input)
            .value(value)
            .gas_limit(TX_GAS_LIMIT)
            .gas_price(0)
            .build()
            .map_err(|e| ChainError::Evm(format!("{e:?}")))
    }

    fn transact(&self, caller: Address, tx: TxRequest) -> Result<TxOutcome> {
        let env = self.tx_env(caller, tx.to, tx.input, tx.value)?;
        let mut inner = self.lock();
        let result = inner.with_evm(|evm| {
            // Like a node's gas estimation, a transaction that would revert is refused unmined.
            let dry = evm
                .transact(env.clone())
                .map_err(|e| ChainError::Evm(format!("{e:?}")))?;
            match dry.result {
                ExecutionResult::Success { .. } => {}
                ExecutionResult::Revert { output, .. } => {
                    return Err(ChainError::from_revert(output));
                }
                ExecutionResult::Halt { reason, .. } => {
                    return Err(ChainError::Evm(format!("halted: {reason:?}")));
                }
            }
            evm.transact_commit(env)
                .map_err(|e| ChainError::Evm(format!("{e:?}")))
        })?;
        let gas_used = result.tx_gas_used();
        let ExecutionResult::Success { logs, output, .. } = result else {
            return Err(ChainError::Evm(
                "the committed run differs from the dry run".into(),
            ));
        };
        inner.block += 1;
        *inner.nonces.entry(caller).or_default() += 1;
        let block = inner.block;
        let created = match output {
            Output::Create(_, address) => address,
            Output::Call(_) => None,
        };
        inner.logs.extend(logs.iter().map(|log| BlockLog {
            log: log.clone(),
            block,
        }));
        let tx_hash = keccak256([caller.as_slice(), &block.to_be_bytes()].concat());
        Ok(TxOutcome {
            receipt: TxReceipt {
                tx_hash,
                block,
                gas_used,
            },
            logs,
            created,
        })
    }

    fn call(&self, to: Address, input: Bytes) -> Result<Bytes> {
        let env = self.tx_env(Address::ZERO, Some(to), input, U256::ZERO)?;
        let result = self
            .lock()
            .with_evm(|evm| evm.transact(env))
            .map_err(|e| ChainError::Evm(format!("{e:?}")))?;
        match result.result {
            ExecutionResult::Success { output, .. } => Ok(output.into_data()),
            ExecutionResult::Revert { output, .. } => Err(ChainError::from_revert(output)),
            ExecutionResult::Halt { reason, .. } => {
                Err(ChainError::Evm(format!("halted: {reason:?}")))
            }
        }
    }
}

/// One sender on an [`EvmNode`].
#[derive(Debug, Clone)]
pub struct EvmBackend {
    node: EvmNode,
    sender: Address,
}

impl EvmBackend {
    /// The node this backend sends to.
    pub fn node(&self) -> &EvmNode {
        &self.node
    }
}

impl TxSender for EvmBackend {
    async fn mined_nonce(&self) -> Result<u64> {
        Ok(self
            .node
            .lock()
            .nonces
            .get(&self.sender)
            .copied()
            .unwrap_or(0))
    }

    async fn pending_nonce(&self) -> Result<u64> {
        self.mined_nonce().await
    }

    async fn base_fee(&self) -> Result<u128> {
        Ok(0)
    }

    async fn estimate_gas(&self, tx: &TxRequest) -> Result<u64> {
        let env = self
            .node
            .tx_env(self.sender, tx.to, tx.input.clone(), tx.value)?;
        let result = self
            .node
            .lock()
            .with_evm(|evm| evm.transact(env))
            .map_err(|e| ChainError::Evm(format!("{e:?}")))?;
        let gas_used = result.result.tx_gas_used();
        match result.result {
            ExecutionResult::Success { .. } => Ok(gas_used),
            ExecutionResult::Revert { output, .. } => Err(ChainError::from_revert(output)),
            ExecutionResult::Halt { reason, .. } => {
                Err(ChainError::Evm(format!("halted: {reason:?}")))
            }
        }
    }

    /// Mines the transaction at once (the in-process chain has no mempool); a nonce already
    /// used is a re-broadcast and changes nothing.
    async fn broadcast(&self, tx: TxRequest, params: TxParams) -> Result<B256> {
        let hash = keccak256(
            [
                self.sender.as_slice(),
                &params.nonce.to_be_bytes(),
                keccak256(&tx.input).as_slice(),
            ]
            .concat(),
        );
        if params.nonce < self.mined_nonce().await? {
            return Ok(hash);
        }
        let outcome = self.node.transact(self.sender, tx)?;
        self.node.lock().receipts.insert(
            hash,
            Mined {
                outcome,
                success: true,
            },
        );
        Ok(hash)
    }

    async fn receipt(&self, hash: B256) -> Result<Option<Mined>> {
        Ok(self.node.lock().receipts.get(&hash).cloned())
    }
}

impl Backend for EvmBackend {
    fn chain_id(&self) -> u64 {
        self.node.chain_id
    }

    fn sender(&self) -> Address {
        self.sender
    }

    async fn send(&self, tx: TxRequest) -> Result<TxOutcome> {
        self.node.transact(self.sender, tx)
    }

    async fn call(&self, to: Address, input: Bytes) -> Result<Bytes> {
        self.node.call(to, input)
    }

    async fn block_number(&self) -> Result<u64> {
        Ok(self.node.lock().block)
    }

    async fn logs(
        &self,
        address: Address,
        topics0: &[B256],
        from: u64,
        to: u64,
    ) -> Result<Vec<BlockLog>> {
        let inner = self.node.lock();
        Ok(inner
            .logs
            .iter()
            .filter(|l| {
                (from..=to).contains(&l.block)
                    && l.log.address == address
                    && l.log.topics().first().is_some_and(|t| topics0.contains(t))
            })
            .cloned()
            .collect())
    }

    async fn balance(&self, owner: Address) -> Result<U256> {
        Ok(self.node.balance_of(owner))
    }
}
