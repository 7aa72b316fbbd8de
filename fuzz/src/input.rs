//! A reader over the fuzzer's bytes: every read succeeds (zeros once the input is used up), so
//! a target turns any input into a scenario and libFuzzer's mutations map to small changes of
//! it. (No `arbitrary`: this file is also compiled into the main crate's regression tests,
//! which have no such dependency.)

/// The rest of the input.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Reads `data` from its start.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// Whether every byte was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The bytes not read yet, consuming them.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        head
    }

    /// Exactly `L` bytes, zero-padded.
    pub fn array<const L: usize>(&mut self) -> [u8; L] {
        let mut out = [0u8; L];
        let head = self.bytes(L);
        out[..head.len()].copy_from_slice(head);
        out
    }

    /// One byte.
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// A flag.
    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    /// An index below `n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        usize::from(self.u8()) % n
    }

    /// A little-endian `u64`.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// A little-endian `u128`.
    pub fn u128(&mut self) -> u128 {
        u128::from_le_bytes(self.array())
    }

    /// A `u64` of a random bit length (each length from 0 to 64 equally likely): small values
    /// are where the edge cases are, large ones where the overflows are.
    pub fn scaled_u64(&mut self) -> u64 {
        let bits = self.below(65) as u32;
        let raw = self.u64();
        if bits == 64 {
            raw
        } else {
            raw & ((1u64 << bits) - 1)
        }
    }

    /// A `u128` of a random bit length.
    pub fn scaled_u128(&mut self) -> u128 {
        let bits = self.below(129) as u32;
        let raw = self.u128();
        if bits == 128 {
            raw
        } else {
            raw & ((1u128 << bits) - 1)
        }
    }

    /// A short string: printable ASCII, then (rarely) any UTF-8 the bytes make.
    pub fn string(&mut self, max: usize) -> String {
        let len = self.below(max + 1);
        let raw = self.bytes(len);
        if self.bool() {
            String::from_utf8_lossy(raw).into_owned()
        } else {
            raw.iter().map(|b| char::from(b' ' + b % 95)).collect()
        }
    }
}
