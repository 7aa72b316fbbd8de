//! Signature checks off the async reactor, batched under load.
//!
//! A voucher's check (tens of µs of elliptic-curve work) runs on the verifier's own pool of
//! threads, one per core, never on the reactor's threads: a connection waiting for its check
//! holds no reactor thread, so one connection's checks cannot starve the others' delivery.
//!
//! Vouchers waiting at the same moment are checked together: a worker takes every voucher in
//! the queue (up to a bound that keeps what batching adds to a voucher's latency under
//! [`DEFAULT_VERIFY_MAX_ADDED_LATENCY_US`]) and checks them with one batch equation
//! ([`PayerKeys::verify_states`]). A lone voucher is never held back waiting for company: a
//! worker that finds one voucher checks it at once.
//!
//! Only a connection that has already sent a good signature has its vouchers batched: a new
//! connection's vouchers (its `open`) are checked alone, so whoever sends bad signatures (say,
//! `open`s naming an honest payer's channel, reconnecting after each) never puts them into an
//! honest batch. A batch that fails anyway (a proven connection's voucher went bad) is checked
//! again one voucher at a time to name the bad one; that connection is then a suspect, and its vouchers are
//! checked alone from then on, so invalid signatures cannot make honest connections pay for
//! fallbacks again and again. A connection is known by the Tokio task it runs on
//! (`tokio::task::try_id`), or by its payer outside a task.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Instant;

use alloy::primitives::Address;
use lru::LruCache;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::channel::{
    ChannelDomain, ChannelError, PayerKeys, SignatureError, SignedState, VerifiedState, ecmult,
};

/// What batching may add to a voucher's latency: a voucher checked in a batch of `k` waits
/// for the other `k - 1`. 750 µs keeps it under a millisecond, far below a round trip over
/// the internet, and allows batches of about 40 at the development machine's ~18 µs per
/// batched voucher.
pub const DEFAULT_VERIFY_MAX_ADDED_LATENCY_US: u64 = 750;

/// The most vouchers in one batch, whatever the latency bound allows (the batch gain levels
/// off by 128).
pub const DEFAULT_VERIFY_MAX_BATCH: usize = 128;

/// Vouchers waiting for a worker; more wait on a semaphore (in their own tasks) instead of
/// growing the queue. 4,096 is far more than two cores clear in a second's fraction.
pub const DEFAULT_VERIFY_QUEUE: usize = 4_096;

/// Connections remembered as having sent a good signature (batched from then on) or a bad one
/// (checked alone from then on); a forgotten one is checked alone until it proves itself again.
pub const DEFAULT_VERIFY_SUSPECTS: usize = 65_536;

/// The first estimate of a batched voucher's cost before any batch was timed.
const INITIAL_BATCHED_NS: u64 = 25_000;

/// How the verifier's pool runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifierConfig {
    /// Worker threads (default: one per core).
    pub threads: usize,
    /// The most batching may add to a voucher's latency, in microseconds (0: never batch).
    pub max_added_latency_us: u64,
    /// The most vouchers in one batch.
    pub max_batch: usize,
    /// Vouchers waiting for a worker before callers wait for room.
    pub queue: usize,
    /// Connections remembered as proven or suspect.
    pub suspects: usize,
}

impl Default for VerifierConfig {
    fn default() -> Self {
        Self {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            max_added_latency_us: DEFAULT_VERIFY_MAX_ADDED_LATENCY_US,
            max_batch: DEFAULT_VERIFY_MAX_BATCH,
            queue: DEFAULT_VERIFY_QUEUE,
            suspects: DEFAULT_VERIFY_SUSPECTS,
        }
    }
}

/// What a connection's signatures have shown so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// One was good and none bad: its vouchers are batched.
    Proven,
    /// One was bad: its vouchers are checked alone.
    Suspect,
}

/// Who sent a voucher, for the standings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    Task(tokio::task::Id),
    Payer(Address),
}

type Reply = Result<VerifiedState, ChannelError>;

struct Job {
    domain: ChannelDomain,
    payer: Address,
    voucher: SignedState,
    source: Source,
    reply: oneshot::Sender<Reply>,
    /// Room in the queue, given back when the check is done.
    _permit: OwnedSemaphorePermit,
}

/// Counters of the verifier's work (for tests, benches and metrics).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VerifierStats {
    /// Vouchers checked.
    pub checked: u64,
    /// Batch equations run.
    pub batches: u64,
    /// Vouchers that went into a batch equation.
    pub batched: u64,
    /// Batch equations that failed and were checked again one by one.
    pub fallbacks: u64,
    /// Vouchers checked alone because their connection is a suspect.
    pub suspect_checks: u64,
    /// Vouchers checked alone because their connection has not sent a good signature yet.
    pub unproven_checks: u64,
}

#[derive(Default)]
struct Counters {
    checked: AtomicU64,
    batches: AtomicU64,
    batched: AtomicU64,
    fallbacks: AtomicU64,
    suspect_checks: AtomicU64,
    unproven_checks: AtomicU64,
}

struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
}

struct Pool {
    keys: Arc<PayerKeys>,
    config: VerifierConfig,
    queue: Mutex<Queue>,
    ready: Condvar,
    standings: Mutex<LruCache<Source, Standing>>,
    /// Running estimate of one batched voucher's cost, in nanoseconds.
    batched_ns: AtomicU64,
    counters: Counters,
}

/// Closes the pool when the last [`Verifier`] clone goes: the workers finish the queue and end.
struct Handle {
    pool: Arc<Pool>,
    started: OnceLock<()>,
    room: Arc<Semaphore>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.pool.lock_queue().closed = true;
        self.pool.ready.notify_all();
    }
}

/// The server's signature checker.
#[derive(Clone)]
pub struct Verifier {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("keys", &self.handle.pool.keys)
            .field("config", &self.handle.pool.config)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Default for Verifier {
    fn default() -> Self {
        Self::with_config(PayerKeys::default(), VerifierConfig::default())
    }
}

impl Verifier {
    /// A checker over `keys` on `parallel` threads, batching with the defaults.
    pub fn new(keys: PayerKeys, parallel: usize) -> Self {
        Self::with_config(
            keys,
            VerifierConfig {
                threads: parallel,
                ..VerifierConfig::default()
            },
        )
    }

    /// A checker over `keys` run as `config` says. The threads start with the first check.
    pub fn with_config(keys: PayerKeys, config: VerifierConfig) -> Self {
        let config = VerifierConfig {
            threads: config.threads.max(1),
            max_batch: config.max_batch.max(1),
            queue: config.queue.max(1),
            suspects: config.suspects.max(1),
            ..config
        };
        let pool = Arc::new(Pool {
            keys: Arc::new(keys),
            config,
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                closed: false,
            }),
            ready: Condvar::new(),
            standings: Mutex::new(LruCache::new(
                std::num::NonZeroUsize::new(config.suspects).expect("at least 1"),
            )),
            batched_ns: AtomicU64::new(INITIAL_BATCHED_NS),
            counters: Counters::default(),
        });
        Self {
            handle: Arc::new(Handle {
                room: Arc::new(Semaphore::new(config.queue)),
                pool,
                started: OnceLock::new(),
            }),
        }
    }

    /// The key cache the checks use.
    pub fn keys(&self) -> &PayerKeys {
        &self.handle.pool.keys
    }

    /// What the pool has done so far.
    pub fn stats(&self) -> VerifierStats {
        let c = &self.handle.pool.counters;
        VerifierStats {
            checked: c.checked.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            batched: c.batched.load(Ordering::Relaxed),
            fallbacks: c.fallbacks.load(Ordering::Relaxed),
            suspect_checks: c.suspect_checks.load(Ordering::Relaxed),
            unproven_checks: c.unproven_checks.load(Ordering::Relaxed),
        }
    }

    fn start(&self) {
        self.handle.started.get_or_init(|| {
            ecmult::warm_up();
            for i in 0..self.handle.pool.config.threads {
                let pool = self.handle.pool.clone();
                std::thread::Builder::new()
                    .name(format!("paystream-verify-{i}"))
                    .spawn(move || pool.work())
                    .expect("spawning a verifier thread");
            }
        });
    }

    /// Checks that `payer` signed `voucher` under `domain`.
    pub async fn verify(
        &self,
        domain: ChannelDomain,
        payer: Address,
        voucher: SignedState,
    ) -> Result<VerifiedState, ChannelError> {
        self.start();
        let source = tokio::task::try_id().map_or(Source::Payer(payer), Source::Task);
        let permit = self
            .handle
            .room
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (reply, answer) = oneshot::channel();
        let pool = &self.handle.pool;
        pool.lock_queue().jobs.push_back(Job {
            domain,
            payer,
            voucher,
            source,
            reply,
            _permit: permit,
        });
        pool.ready.notify_one();
        // The worker dropped the job without answering only if the check panicked (it does
        // not): treat the voucher as unverified.
        answer.await.unwrap_or(Err(ChannelError::InvalidSignature(
            SignatureError::Unrecoverable,
        )))
    }
}

impl Pool {
    fn lock_queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many vouchers one batch may take now: at least 2 unless batching is off, so that
    /// batches keep forming and the cost estimate keeps learning (a limit of 1 would never
    /// time a batch again, and one slow batch, say a descheduled worker, would turn batching
    /// off for good).
    fn batch_limit(&self) -> usize {
        if self.config.max_added_latency_us == 0 {
            return 1;
        }
        let per = self.batched_ns.load(Ordering::Relaxed).max(1);
        let extra = self.config.max_added_latency_us * 1_000 / per;
        usize::try_from(extra.saturating_add(1))
            .unwrap_or(usize::MAX)
            .max(2)
            .min(self.config.max_batch)
    }

    /// A worker: takes what is queued, up to the batch limit, and checks it.
    fn work(&self) {
        loop {
            let jobs: Vec<Job> = {
                let mut queue = self.lock_queue();
                while queue.jobs.is_empty() && !queue.closed {
                    queue = self.ready.wait(queue).unwrap_or_else(|p| p.into_inner());
                }
                if queue.jobs.is_empty() {
                    return;
                }
                let take = queue.jobs.len().min(self.batch_limit());
                queue.jobs.drain(..take).collect()
            };
            // A panic would only drop the replies (callers see an unverified voucher); the
            // worker lives on.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.check(jobs)));
        }
    }

    fn standing(&self, source: &Source) -> Option<Standing> {
        self.standings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(source)
            .copied()
    }

    /// Records what a check showed: a bad signature makes its sender a suspect for good; a
    /// good one proves a sender that is not a suspect.
    fn record(&self, source: Source, good: bool) {
        let mut standings = self.standings.lock().unwrap_or_else(|p| p.into_inner());
        if !good {
            standings.put(source, Standing::Suspect);
        } else if standings.get(&source).is_none() {
            standings.put(source, Standing::Proven);
        }
    }

    fn check(&self, jobs: Vec<Job>) {
        let mut together = Vec::with_capacity(jobs.len());
        let mut alone = Vec::new();
        for job in jobs {
            match self.standing(&job.source) {
                Some(Standing::Proven) => together.push(job),
                Some(Standing::Suspect) => {
                    self.counters.suspect_checks.fetch_add(1, Ordering::Relaxed);
                    alone.push(job);
                }
                None => {
                    self.counters
                        .unproven_checks
                        .fetch_add(1, Ordering::Relaxed);
                    alone.push(job);
                }
            }
        }
        for job in alone {
            let result = self.keys.verify_state(&job.domain, job.payer, &job.voucher);
            self.answer(job, result);
        }
        if together.is_empty() {
            return;
        }
        let vouchers: Vec<(ChannelDomain, Address, SignedState)> = together
            .iter()
            .map(|job| (job.domain, job.payer, job.voucher.clone()))
            .collect();
        let started = Instant::now();
        let (results, fell_back) = self.keys.verify_states(&vouchers);
        if vouchers.len() >= 2 {
            let c = &self.counters;
            c.batches.fetch_add(1, Ordering::Relaxed);
            c.batched
                .fetch_add(vouchers.len() as u64, Ordering::Relaxed);
            if fell_back {
                c.fallbacks.fetch_add(1, Ordering::Relaxed);
            } else {
                // Learn what a batched voucher costs (an average weighted 1/4 to the newest).
                let per = started.elapsed().as_nanos() as u64 / vouchers.len() as u64;
                let old = self.batched_ns.load(Ordering::Relaxed);
                self.batched_ns
                    .store((3 * old + per) / 4, Ordering::Relaxed);
            }
        }
        for (job, result) in together.into_iter().zip(results) {
            self.answer(job, result);
        }
    }

    fn answer(&self, job: Job, result: Reply) {
        self.counters.checked.fetch_add(1, Ordering::Relaxed);
        match &result {
            Ok(_) => self.record(job.source, true),
            Err(ChannelError::InvalidSignature(_)) => self.record(job.source, false),
            Err(_) => {}
        }
        let _ = job.reply.send(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::{ChannelState, signature};
    use alloy::primitives::B256;
    use k256::ecdsa::SigningKey;

    fn domain() -> ChannelDomain {
        ChannelDomain::new(31337, Address::repeat_byte(0xcc))
    }

    fn key(i: u8) -> SigningKey {
        SigningKey::from_slice(&[i.max(1); 32]).unwrap()
    }

    fn voucher(signer: &SigningKey, nonce: u64) -> (Address, SignedState) {
        let state = ChannelState {
            channelId: B256::repeat_byte(7),
            nonce,
            cumulative: u128::from(nonce),
        };
        let signature = signature::sign_digest(signer, &domain().state_digest(&state));
        (
            signature::address_of(signer.verifying_key()),
            SignedState { state, signature },
        )
    }

    fn config(threads: usize) -> VerifierConfig {
        VerifierConfig {
            threads,
            ..VerifierConfig::default()
        }
    }

    /// A verifier whose cache knows the payers' keys and tables (two checks each).
    async fn warm(verifier: &Verifier, signers: &[SigningKey]) {
        for signer in signers {
            let (payer, v) = voucher(signer, 1);
            for _ in 0..2 {
                verifier.verify(domain(), payer, v.clone()).await.unwrap();
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lone_voucher_is_checked_at_once() {
        let verifier = Verifier::with_config(PayerKeys::default(), config(2));
        let (payer, v) = voucher(&key(1), 3);
        let checked = verifier.verify(domain(), payer, v.clone()).await.unwrap();
        assert_eq!(checked.signed(), &v);
        assert_eq!(verifier.stats().batches, 0);
        // Another payer's signature is refused.
        let (other, _) = voucher(&key(2), 3);
        assert!(matches!(
            verifier.verify(domain(), other, v).await,
            Err(ChannelError::InvalidSignature(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn vouchers_waiting_together_are_checked_as_one_batch() {
        let verifier = Verifier::with_config(PayerKeys::default(), config(1));
        let signers: Vec<SigningKey> = (1..=8).map(key).collect();
        warm(&verifier, &signers).await;
        assert!(signers.iter().all(|s| {
            verifier
                .keys()
                .has_table(&signature::address_of(s.verifying_key()))
        }));
        // 64 connections: each proves itself with a first voucher (checked alone), then all
        // send their next one at the same moment, beside 32 new connections sending forged
        // `open`s (another payer's signature), which are never put into a batch.
        let round = Arc::new(tokio::sync::Barrier::new(64 + 32));
        let honest: Vec<_> = (0..64u64)
            .map(|i| {
                let verifier = verifier.clone();
                let round = round.clone();
                let signer = signers[i as usize % 8].clone();
                tokio::spawn(async move {
                    let (payer, first) = voucher(&signer, 10 + i);
                    verifier.verify(domain(), payer, first).await?;
                    round.wait().await;
                    let (payer, next) = voucher(&signer, 100 + i);
                    verifier.verify(domain(), payer, next).await
                })
            })
            .collect();
        let forgers: Vec<_> = (0..32u64)
            .map(|i| {
                let verifier = verifier.clone();
                let round = round.clone();
                let victim = signature::address_of(signers[i as usize % 8].verifying_key());
                tokio::spawn(async move {
                    round.wait().await;
                    let (_, forged) = voucher(&key(200), 1_000 + i);
                    verifier.verify(domain(), victim, forged).await
                })
            })
            .collect();
        for task in honest {
            task.await.unwrap().unwrap();
        }
        for task in forgers {
            assert!(matches!(
                task.await.unwrap(),
                Err(ChannelError::InvalidSignature(_))
            ));
        }
        let stats = verifier.stats();
        assert!(stats.batches >= 1 && stats.batched >= 2, "{stats:?}");
        assert_eq!(stats.fallbacks, 0, "{stats:?}");
        assert!(stats.unproven_checks >= 64 + 32, "{stats:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_that_sent_a_bad_signature_is_checked_alone() {
        let verifier = Verifier::with_config(PayerKeys::default(), config(1));
        let signers: Vec<SigningKey> = (1..=4).map(key).collect();
        warm(&verifier, &signers).await;
        let attacker_payer = signature::address_of(signers[0].verifying_key());
        // The attacker's task: one forged voucher (signed by someone else), then good ones.
        let attacker = {
            let verifier = verifier.clone();
            let signers = signers.clone();
            tokio::spawn(async move {
                let (_, forged) = voucher(&signers[1], 100);
                let bad = verifier.verify(domain(), attacker_payer, forged).await;
                let mut later = Vec::new();
                for nonce in 101..111 {
                    let (payer, v) = voucher(&signers[0], nonce);
                    later.push(verifier.verify(domain(), payer, v).await);
                }
                (bad, later)
            })
        };
        let honest: Vec<_> = (0..40u64)
            .map(|i| {
                let verifier = verifier.clone();
                let (payer, v) = voucher(&signers[1 + i as usize % 3], 200 + i);
                tokio::spawn(async move { verifier.verify(domain(), payer, v).await })
            })
            .collect();
        let (bad, later) = attacker.await.unwrap();
        assert!(matches!(bad, Err(ChannelError::InvalidSignature(_))));
        // Its good vouchers still pass, checked alone.
        assert!(later.iter().all(Result::is_ok));
        for task in honest {
            task.await.unwrap().unwrap();
        }
        let stats = verifier.stats();
        assert_eq!(stats.suspect_checks, 10, "{stats:?}");
        assert_eq!(stats.fallbacks, 0, "{stats:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_makes_callers_wait_not_fail() {
        let verifier = Verifier::with_config(
            PayerKeys::default(),
            VerifierConfig {
                queue: 1,
                ..config(1)
            },
        );
        let tasks: Vec<_> = (0..16u64)
            .map(|i| {
                let verifier = verifier.clone();
                let (payer, v) = voucher(&key(1 + (i % 4) as u8), 1 + i);
                tokio::spawn(async move { verifier.verify(domain(), payer, v).await })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!(verifier.stats().checked, 16);
    }

    #[test]
    fn the_batch_limit_follows_the_latency_bound() {
        let verifier = Verifier::with_config(PayerKeys::default(), config(1));
        let pool = &verifier.handle.pool;
        pool.batched_ns.store(25_000, Ordering::Relaxed);
        assert_eq!(pool.batch_limit(), 31);
        pool.batched_ns.store(1_000, Ordering::Relaxed);
        assert_eq!(pool.batch_limit(), DEFAULT_VERIFY_MAX_BATCH);
        // One slow batch (a descheduled worker: 6 ms a voucher) leaves room for two, so
        // batches keep forming and the estimate can come back down.
        pool.batched_ns.store(6_000_000, Ordering::Relaxed);
        assert_eq!(pool.batch_limit(), 2);
        let never = Verifier::with_config(
            PayerKeys::default(),
            VerifierConfig {
                max_added_latency_us: 0,
                ..config(1)
            },
        );
        assert_eq!(never.handle.pool.batch_limit(), 1);
    }
}
