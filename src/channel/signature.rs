//! Signing and checking channel-state signatures.
//!
//! Three rules make a signature acceptable here, and each is what the contract's `ecrecover`
//! path will also accept, so the engine never holds a voucher it cannot redeem:
//! - `r` and `s` are in `[1, n)`, and `s <= n/2` (low-s: the high-s twin is refused, EIP-2);
//! - the parity `v` is the one that recovers the payer (a flipped `v` verifies under plain ECDSA
//!   but recovers someone else on-chain, so it is checked too);
//! - the point `R = u1*G + u2*Q` has `x(R) == r` exactly (no `x`-reduced twin, which
//!   `ecrecover` cannot express).
//!
//! The payer is known once the channel is read, so [`PayerKeys::verify`] checks against the
//! payer's public key, recovered once and cached, instead of recovering a key from every
//! voucher: a verification skips the square root and the keccak that recovery needs. A payer
//! seen again also gets a precomputed table of its key ([`ecmult::KeyTable`], 5 KiB), kept in
//! the same cache within a byte budget, and vouchers that arrive together are checked as one
//! batch ([`PayerKeys::verify_batch`]). The curve arithmetic of these checks is the
//! variable-time code of [`ecmult`] (safe: nothing in a check is secret); signing stays on
//! k256's constant-time code.

use alloy::primitives::{Address, B256, Signature, U256};
use k256::ecdsa::{SigningKey, VerifyingKey};
use k256::elliptic_curve::PrimeField;
use k256::elliptic_curve::ops::{LinearCombination, Reduce};
use k256::elliptic_curve::point::AffineCoordinates;
use k256::{AffinePoint, ProjectivePoint, Scalar};
use lru::LruCache;
use std::num::NonZeroUsize;
use std::sync::Arc;

use super::ecmult::{self, BatchItem, Key, KeyTable};

/// Why a signature was refused. Every variant maps to the protocol code `invalid_signature`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// Not 65 bytes (`r || s || v`) or 64 bytes (EIP-2098 `r || vs`).
    #[error("signature must be 65 bytes (r, s, v) or 64 bytes (EIP-2098), got {len}")]
    BadLength {
        /// The length received.
        len: usize,
    },
    /// `v` is not 27, 28, 0 or 1.
    #[error("signature v must be 27 or 28 (or 0 or 1), got {v}")]
    BadV {
        /// The byte received.
        v: u8,
    },
    /// `r` or `s` is zero or not below the curve order.
    #[error("signature scalar out of range")]
    ScalarOutOfRange,
    /// `s` is in the upper half of the curve order: the malleable twin of a valid signature.
    #[error("signature has high s; sign with low-s (EIP-2) normalization")]
    HighS,
    /// The signature is well formed but was not made by the expected key over this digest.
    #[error("signature does not match the expected signer {expected}")]
    WrongSigner {
        /// Who should have signed.
        expected: Address,
    },
    /// No public key can be recovered from the signature over this digest.
    #[error("no public key recovers from this signature")]
    Unrecoverable,
}

/// The curve order's half, the bound for low-s.
const HALF_ORDER: U256 = U256::from_limbs([
    0xdfe92f46681b20a0,
    0x5d576e7357a4501d,
    0xffffffffffffffff,
    0x7fffffffffffffff,
]);

/// Parses a wire signature: 65 bytes `r || s || v` (v in {27, 28, 0, 1}) or the 64-byte
/// EIP-2098 compact form `r || vs`. Refuses high-s and out-of-range scalars.
pub fn parse_signature(bytes: &[u8]) -> Result<Signature, SignatureError> {
    let sig = match bytes.len() {
        65 => {
            let parity = match bytes[64] {
                27 | 0 => false,
                28 | 1 => true,
                v => return Err(SignatureError::BadV { v }),
            };
            Signature::from_bytes_and_parity(&bytes[..64], parity)
        }
        64 => Signature::from_erc2098(bytes),
        len => return Err(SignatureError::BadLength { len }),
    };
    check_scalars(&sig)?;
    Ok(sig)
}

/// `r` and `s` in `[1, n)` and `s <= n/2`.
fn check_scalars(sig: &Signature) -> Result<(Scalar, Scalar), SignatureError> {
    let r = scalar_from(sig.r()).ok_or(SignatureError::ScalarOutOfRange)?;
    let s = scalar_from(sig.s()).ok_or(SignatureError::ScalarOutOfRange)?;
    if sig.s() > HALF_ORDER {
        return Err(SignatureError::HighS);
    }
    Ok((r, s))
}

/// A non-zero scalar below the curve order, or `None`.
fn scalar_from(value: U256) -> Option<Scalar> {
    let scalar: Option<Scalar> = Scalar::from_repr(value.to_be_bytes::<32>().into()).into();
    scalar.filter(|s| !bool::from(s.is_zero()))
}

/// The 65-byte wire form `r || s || v` with `v` in {27, 28}.
pub fn to_bytes(sig: &Signature) -> [u8; 65] {
    sig.as_bytes()
}

/// The EIP-2098 compact form `(r, vs)` the contract takes.
pub fn to_compact(sig: &Signature) -> (B256, B256) {
    let compact = sig.as_erc2098();
    (
        B256::from_slice(&compact[..32]),
        B256::from_slice(&compact[32..]),
    )
}

/// Signs a digest with RFC 6979 deterministic nonces, normalized to low-s.
pub fn sign_digest(key: &SigningKey, digest: &B256) -> Signature {
    let (sig, recid) = key
        .sign_prehash_recoverable(digest.as_slice())
        .expect("a 32-byte prehash is always accepted by k256");
    Signature::from_signature_and_parity(sig, recid.is_y_odd())
}

/// The Ethereum address of a public key.
pub fn address_of(key: &VerifyingKey) -> Address {
    Address::from_public_key(key)
}

/// Recovers the signer's address, refusing high-s and malformed scalars. Slower than
/// [`verify_with_key`]; used the first time a payer is seen and by the `state verify` command.
pub fn recover_address(digest: &B256, sig: &Signature) -> Result<Address, SignatureError> {
    recover_key(digest, sig).map(|key| address_of(&key))
}

/// Recovers the signer's public key, refusing high-s and malformed scalars.
pub fn recover_key(digest: &B256, sig: &Signature) -> Result<VerifyingKey, SignatureError> {
    check_scalars(sig)?;
    sig.recover_from_prehash(digest)
        .map_err(|_| SignatureError::Unrecoverable)
}

/// The digest as a scalar (reduced modulo `n`, as ECDSA takes it).
fn digest_scalar(digest: &B256) -> Scalar {
    <Scalar as Reduce<k256::U256>>::reduce_bytes(&digest.0.into())
}

/// Checks `sig` over `digest` against a known public key, including the parity `v`, with the
/// acceptance rules of the module docs. Returns `false` for any mismatch. Variable-time (see
/// [`ecmult`]); [`verify_with_key_constant_time`] is the same check on k256's constant-time
/// arithmetic.
pub fn verify_with_key(key: &AffinePoint, digest: &B256, sig: &Signature) -> bool {
    let Ok((r, s)) = check_scalars(sig) else {
        return false;
    };
    let Some(key) = Key::new(key) else {
        return false;
    };
    ecmult::verify(&key, &digest_scalar(digest), &r, &s, sig.v())
}

/// [`verify_with_key`] with a payer's precomputed table.
pub fn verify_with_table(table: &KeyTable, digest: &B256, sig: &Signature) -> bool {
    let Ok((r, s)) = check_scalars(sig) else {
        return false;
    };
    ecmult::verify_with_table(table, &digest_scalar(digest), &r, &s, sig.v())
}

/// The engine's check on k256's constant-time `lincomb` (what [`verify_with_key`] did before
/// the variable-time code): the reference the tests and benches compare against.
pub fn verify_with_key_constant_time(key: &AffinePoint, digest: &B256, sig: &Signature) -> bool {
    let Ok((r, s)) = check_scalars(sig) else {
        return false;
    };
    let z = digest_scalar(digest);
    // s is non-zero, so it is invertible.
    let w: Scalar = Option::from(s.invert()).unwrap_or(Scalar::ZERO);
    let point = ProjectivePoint::lincomb(
        &ProjectivePoint::GENERATOR,
        &(z * w),
        &ProjectivePoint::from(*key),
        &(r * w),
    )
    .to_affine();
    // The identity's x is zero and r is not, so the identity never passes.
    point.x()[..] == sig.r().to_be_bytes::<32>()[..] && bool::from(point.y_is_odd()) == sig.v()
}

/// One signature to check in a batch: who should have signed, what, and the signature.
#[derive(Debug, Clone, Copy)]
pub struct SignatureCheck<'a> {
    /// The expected signer.
    pub payer: Address,
    /// The signed digest.
    pub digest: B256,
    /// The signature.
    pub signature: &'a Signature,
}

/// One batch equation over `items` with fresh randomizers from the OS's CSPRNG.
fn batch_holds(items: &[BatchItem<'_>]) -> bool {
    let mut bytes = vec![0u8; 16 * items.len()];
    getrandom::fill(&mut bytes).expect("the OS provides randomness");
    let randomizers: Vec<u128> = bytes
        .chunks_exact(16)
        .map(|c| u128::from_le_bytes(c.try_into().expect("16 bytes")))
        .collect();
    ecmult::verify_batch(items, &randomizers)
}

/// What [`PayerKeys::verify_batch`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchOutcome {
    /// One result per check, in order.
    pub results: Vec<Result<(), SignatureError>>,
    /// How many went into the batch equation (the others were checked alone: a payer seen for
    /// the first time, one without a table yet, or a malformed signature).
    pub batched: usize,
    /// The batch equation failed and its signatures were checked one at a time.
    pub fell_back: bool,
}

/// 65,536 payer keys take about 16 MiB (168 bytes a key, and the cache's links) and cover far
/// more channels than one node serves at once; a miss costs one signature recovery, never an
/// error.
pub const DEFAULT_PAYER_KEY_CACHE_ENTRIES: usize = 65_536;

/// 64 MiB of precomputed tables, about 12,000 payers at 5 KiB each (plus bookkeeping): a
/// working set of 10,000 payers stays warm. A payer whose table was evicted is checked without
/// one (as fast as libsecp256k1) and gets it built again; 0 turns tables off.
pub const DEFAULT_PAYER_TABLE_CACHE_BYTES: usize = 64 << 20;

/// Shards of the key cache: each has its own lock, held only to look a key up or put one in.
const KEY_SHARDS: usize = 16;

/// Bytes one cached table counts for: its points, the `KeyTable`, the `Arc` and the cache
/// entry (address, links) around it.
fn table_entry_bytes() -> usize {
    KeyTable::size_bytes() + 2 * std::mem::size_of::<usize>() + 64
}

/// One shard: payers' keys, and the tables of payers seen again.
struct Shard {
    keys: LruCache<Address, Key>,
    /// `None` when tables are turned off.
    tables: Option<LruCache<Address, Arc<KeyTable>>>,
}

/// The payers' public keys, recovered once each and kept in an LRU cache keyed by payer, and
/// the precomputed tables of payers seen more than once, in a second LRU bounded in bytes.
///
/// This is the one type that decides whether a voucher's signature is the payer's: a cached
/// key with a table is checked on the table, a cached key without one the ordinary way (and
/// the table is built once that check passes), an unknown payer by recovering its key.
///
/// Shared by every connection: the cache is split in shards by payer, and a shard's lock is
/// held only to copy a key (or a table's `Arc`) out or put one in, never across the
/// elliptic-curve work, so checks run in parallel on as many threads as the caller gives them.
pub struct PayerKeys {
    shards: Box<[std::sync::Mutex<Shard>]>,
    table_bytes: usize,
    /// Picks a payer's shard with a key chosen at random when the cache is made: anyone can
    /// make keys whose addresses end in the same byte, and a shard picked by such a byte could
    /// be filled by one attacker's payers to evict an honest payer's table (each shard has a
    /// sixteenth of the budget); a keyed hash spreads any set of payers evenly.
    shard_of: std::collections::hash_map::RandomState,
}

impl std::fmt::Debug for PayerKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PayerKeys")
            .field("cached", &self.len())
            .field("tables", &self.tables())
            .finish_non_exhaustive()
    }
}

impl Default for PayerKeys {
    fn default() -> Self {
        Self::new(NonZeroUsize::new(DEFAULT_PAYER_KEY_CACHE_ENTRIES).expect("non-zero"))
    }
}

impl PayerKeys {
    /// An empty cache holding up to about `capacity` keys, with the default table budget.
    pub fn new(capacity: NonZeroUsize) -> Self {
        Self::with_table_bytes(capacity, DEFAULT_PAYER_TABLE_CACHE_BYTES)
    }

    /// An empty cache holding up to about `capacity` keys and `table_bytes` of tables (0: no
    /// tables).
    pub fn with_table_bytes(capacity: NonZeroUsize, table_bytes: usize) -> Self {
        let per_shard = NonZeroUsize::new(capacity.get().div_ceil(KEY_SHARDS)).expect("non-zero");
        let tables_per_shard = table_bytes / table_entry_bytes() / KEY_SHARDS;
        Self {
            shards: (0..KEY_SHARDS)
                .map(|_| {
                    std::sync::Mutex::new(Shard {
                        keys: LruCache::new(per_shard),
                        tables: NonZeroUsize::new(tables_per_shard).map(LruCache::new),
                    })
                })
                .collect(),
            table_bytes: KEY_SHARDS * tables_per_shard * table_entry_bytes(),
            shard_of: std::collections::hash_map::RandomState::new(),
        }
    }

    fn shard(&self, payer: &Address) -> std::sync::MutexGuard<'_, Shard> {
        use std::hash::BuildHasher;
        let shard = &self.shards[(self.shard_of.hash_one(payer) % KEY_SHARDS as u64) as usize];
        shard.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The payer's key and table, as cached.
    fn lookup(&self, payer: &Address) -> (Option<Key>, Option<Arc<KeyTable>>) {
        let mut shard = self.shard(payer);
        let table = shard.tables.as_mut().and_then(|t| t.get(payer).cloned());
        let key = match &table {
            // Keep the key as fresh as its table.
            Some(table) => {
                shard.keys.get(payer);
                Some(*table.key())
            }
            None => shard.keys.get(payer).copied(),
        };
        (key, table)
    }

    /// Builds and caches `payer`'s table, unless tables are off.
    fn build_table(&self, payer: Address, key: &Key) {
        if self.table_bytes == 0 {
            return;
        }
        let table = Arc::new(KeyTable::new(key));
        if let Some(tables) = self.shard(&payer).tables.as_mut() {
            tables.put(payer, table);
        }
    }

    /// Checks that `payer` signed `digest`. On a cache miss the key is recovered from this
    /// signature and kept only if it belongs to `payer`; a cached key without a table gets one
    /// once this check passes.
    pub fn verify(
        &self,
        payer: Address,
        digest: &B256,
        sig: &Signature,
    ) -> Result<(), SignatureError> {
        match self.lookup(&payer) {
            (_, Some(table)) => {
                let (r, s) = check_scalars(sig)?;
                if ecmult::verify_with_table(&table, &digest_scalar(digest), &r, &s, sig.v()) {
                    Ok(())
                } else {
                    Err(SignatureError::WrongSigner { expected: payer })
                }
            }
            (Some(key), None) => {
                let (r, s) = check_scalars(sig)?;
                if ecmult::verify(&key, &digest_scalar(digest), &r, &s, sig.v()) {
                    self.build_table(payer, &key);
                    Ok(())
                } else {
                    Err(SignatureError::WrongSigner { expected: payer })
                }
            }
            (None, _) => {
                // The fast recovery (about a quarter of k256's, which also verifies what it
                // recovered); k256's when the fast path cannot say.
                let (r, s) = check_scalars(sig)?;
                let key = match ecmult::recover(&digest_scalar(digest), &r, &s, sig.v())
                    .and_then(|q| VerifyingKey::from_affine(q).ok())
                {
                    Some(key) => key,
                    None => recover_key(digest, sig)?,
                };
                if address_of(&key) != payer {
                    return Err(SignatureError::WrongSigner { expected: payer });
                }
                let key = Key::new(key.as_affine()).ok_or(SignatureError::Unrecoverable)?;
                self.shard(&payer).keys.put(payer, key);
                Ok(())
            }
        }
    }

    /// Checks many signatures, each as [`PayerKeys::verify`] would, with one batch equation
    /// for those whose payer has a table (see [`ecmult::verify_batch`]); the others are checked
    /// alone first. If the equation fails, each of its signatures is checked alone, so every
    /// result names its own signature's fault. The batch's randomizers come from the operating
    /// system's CSPRNG.
    pub fn verify_batch(&self, checks: &[SignatureCheck<'_>]) -> BatchOutcome {
        let mut results: Vec<Option<Result<(), SignatureError>>> = vec![None; checks.len()];
        let mut pending = Vec::with_capacity(checks.len());
        for (i, check) in checks.iter().enumerate() {
            let scalars = match check_scalars(check.signature) {
                Ok(scalars) => scalars,
                Err(e) => {
                    results[i] = Some(Err(e));
                    continue;
                }
            };
            match self.lookup(&check.payer) {
                (_, Some(table)) => pending.push((i, table, scalars)),
                _ => results[i] = Some(self.verify(check.payer, &check.digest, check.signature)),
            }
        }
        let batched = if pending.len() >= 2 { pending.len() } else { 0 };
        let items: Vec<BatchItem<'_>> = pending
            .iter()
            .map(|(i, table, (r, s))| BatchItem {
                table,
                z: digest_scalar(&checks[*i].digest),
                r: *r,
                s: *s,
                y_odd: checks[*i].signature.v(),
            })
            .collect();
        let all_good = batched > 0 && batch_holds(&items);
        // A failed equation is followed by a check of each signature alone. (Halving instead
        // was measured and is no faster: a batched signature costs about 0.7 of one checked
        // alone, and halving re-checks 1.5 batches' worth on average, 2 when the bad one is in
        // the first half.)
        let good: Vec<bool> = items
            .iter()
            .map(|item| {
                all_good
                    || ecmult::verify_with_table(item.table, &item.z, &item.r, &item.s, item.y_odd)
            })
            .collect();
        for ((i, _, _), ok) in pending.iter().zip(&good) {
            results[*i] = Some(if *ok {
                Ok(())
            } else {
                Err(SignatureError::WrongSigner {
                    expected: checks[*i].payer,
                })
            });
        }
        let fell_back = batched > 0 && !all_good;
        BatchOutcome {
            results: results
                .into_iter()
                .map(|r| r.expect("every check has a result"))
                .collect(),
            batched,
            fell_back,
        }
    }

    /// Whether `payer`'s key is cached (for tests and metrics).
    pub fn contains(&self, payer: &Address) -> bool {
        self.shard(payer).keys.contains(payer)
    }

    /// Whether `payer`'s table is cached (for tests and metrics).
    pub fn has_table(&self, payer: &Address) -> bool {
        self.shard(payer)
            .tables
            .as_ref()
            .is_some_and(|t| t.contains(payer))
    }

    /// Number of cached keys.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).keys.len())
            .sum()
    }

    /// Number of cached tables.
    pub fn tables(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .tables
                    .as_ref()
                    .map_or(0, LruCache::len)
            })
            .sum()
    }

    /// The most bytes the cached tables take (the budget, rounded down to whole tables).
    pub fn table_budget_bytes(&self) -> usize {
        self.table_bytes
    }

    /// Whether no key is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> SigningKey {
        SigningKey::from_bytes(&[byte; 32].into()).unwrap()
    }

    #[test]
    fn half_order_is_n_over_two() {
        // -1 is n - 1, the largest scalar; floor(n / 2) = (n - 1) / 2 since n is odd.
        let n_minus_one = U256::from_be_bytes::<32>((-Scalar::ONE).to_repr().into());
        assert_eq!(HALF_ORDER, n_minus_one >> 1);
    }

    #[test]
    fn sign_then_verify_and_recover() {
        let signer = key(7);
        let digest = B256::repeat_byte(0x42);
        let sig = sign_digest(&signer, &digest);
        assert!(sig.s() <= HALF_ORDER);
        let vk = *signer.verifying_key();
        assert!(verify_with_key(vk.as_affine(), &digest, &sig));
        assert_eq!(recover_address(&digest, &sig).unwrap(), address_of(&vk));
        // Flipped parity verifies under plain ECDSA but must fail here.
        assert!(!verify_with_key(
            vk.as_affine(),
            &digest,
            &sig.with_parity(!sig.v())
        ));
        // Another digest fails.
        assert!(!verify_with_key(
            vk.as_affine(),
            &B256::repeat_byte(1),
            &sig
        ));
    }

    #[test]
    fn parse_forms_and_rejections() {
        let digest = B256::repeat_byte(9);
        let sig = sign_digest(&key(3), &digest);
        let bytes = to_bytes(&sig);
        assert_eq!(parse_signature(&bytes).unwrap(), sig);
        let (r, vs) = to_compact(&sig);
        let compact = [r.as_slice(), vs.as_slice()].concat();
        assert_eq!(parse_signature(&compact).unwrap(), sig);
        let mut zero_v = bytes;
        zero_v[64] -= 27;
        assert_eq!(parse_signature(&zero_v).unwrap(), sig);
        let mut bad_v = bytes;
        bad_v[64] = 29;
        assert_eq!(parse_signature(&bad_v), Err(SignatureError::BadV { v: 29 }));
        assert_eq!(
            parse_signature(&bytes[..10]),
            Err(SignatureError::BadLength { len: 10 })
        );
        assert_eq!(
            parse_signature(&[0u8; 65][..64]),
            Err(SignatureError::ScalarOutOfRange)
        );
    }

    #[test]
    fn payer_keys_cache_only_the_right_payer() {
        let payer = key(5);
        let other = key(6);
        let payer_addr = address_of(payer.verifying_key());
        let digest = B256::repeat_byte(3);
        let keys = PayerKeys::new(NonZeroUsize::new(2).unwrap());
        let forged = sign_digest(&other, &digest);
        assert_eq!(
            keys.verify(payer_addr, &digest, &forged),
            Err(SignatureError::WrongSigner {
                expected: payer_addr
            })
        );
        assert!(keys.is_empty());
        let good = sign_digest(&payer, &digest);
        keys.verify(payer_addr, &digest, &good).unwrap();
        assert!(keys.contains(&payer_addr));
        // Cached path: the forged one still fails, the good one passes.
        assert!(keys.verify(payer_addr, &digest, &forged).is_err());
        keys.verify(payer_addr, &digest, &good).unwrap();
    }
}
