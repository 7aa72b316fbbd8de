//! Serde helpers: money as decimal strings of whole base units; counters as JSON numbers.

/// `u128` as a decimal string; anything else (a number, a sign, a fraction) is refused.
pub mod u128_string {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the decimal string.
    pub fn serialize<S: Serializer>(v: &u128, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    /// Reads a decimal string of digits.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
        let text = String::deserialize(d)?;
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(serde::de::Error::custom(format!(
                "money must be a decimal string of whole base units, got {text:?}"
            )));
        }
        text.parse()
            .map_err(|_| serde::de::Error::custom("amount too large"))
    }
}

/// `u64` as a JSON number; a decimal string is accepted on input (nonces above 2^53 do not
/// survive JavaScript numbers).
pub mod u64_number {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes a JSON number.
    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*v)
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumberOrString {
        Number(u64),
        String(String),
    }

    /// Reads a JSON number or a decimal string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match NumberOrString::deserialize(d)? {
            NumberOrString::Number(n) => Ok(n),
            NumberOrString::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
                s.parse()
                    .map_err(|_| serde::de::Error::custom("nonce too large"))
            }
            NumberOrString::String(s) => Err(serde::de::Error::custom(format!(
                "expected a non-negative integer, got {s:?}"
            ))),
        }
    }
}
