//! Tariffs: exact rational prices per message, per second, per byte out and per byte in, and
//! their JSON form (DESIGN.md section 4.1).

use alloy::primitives::U256;
use serde::{Deserialize, Serialize};

use super::error::TariffError;

/// Nanoseconds in a second: per-second prices are charged per nanosecond.
pub const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Largest common denominator a tariff may have (2^120). Keeps `cumulative * denominator`
/// (cumulative is at most 2^128) inside 256 bits with room for one more event.
pub const MAX_DENOMINATOR: U256 = U256::from_limbs([0, 1 << 56, 0, 0]);

/// The rational price `amount / per` base units per unit. `{"amount":"1","per":"100"}` is one
/// hundredth of a base unit per unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Price {
    /// Base units charged per `per` units.
    pub amount: u128,
    /// How many units `amount` buys; never zero.
    pub per: u128,
}

impl Price {
    /// `amount / per`, refusing a zero `per`.
    pub fn new(amount: u128, per: u128) -> Result<Self, TariffError> {
        if per == 0 {
            return Err(TariffError::ZeroPer);
        }
        Ok(Self { amount, per })
    }

    /// A whole number of base units per unit.
    pub const fn whole(amount: u128) -> Self {
        Self { amount, per: 1 }
    }

    /// The price of one unit rounded up to whole base units (what one unit can cost at most).
    pub fn ceil_per_unit(&self) -> u128 {
        self.amount.div_ceil(self.per)
    }
}

/// The JSON form of a price: decimal strings.
#[derive(Serialize, Deserialize)]
struct PriceJson {
    amount: String,
    per: String,
}

fn parse_base_units(field: &'static str, text: &str) -> Result<u128, TariffError> {
    let trimmed = text.trim();
    if trimmed.starts_with('-') {
        return Err(TariffError::Negative { field });
    }
    if trimmed.is_empty() || !trimmed.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TariffError::NotADecimal {
            field,
            text: text.to_string(),
        });
    }
    trimmed
        .parse::<u128>()
        .map_err(|_| TariffError::Overflow { field })
}

impl Serialize for Price {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        PriceJson {
            amount: self.amount.to_string(),
            per: self.per.to_string(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Price {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = PriceJson::deserialize(d)?;
        let amount = parse_base_units("amount", &raw.amount).map_err(serde::de::Error::custom)?;
        let per = parse_base_units("per", &raw.per).map_err(serde::de::Error::custom)?;
        Price::new(amount, per).map_err(serde::de::Error::custom)
    }
}

/// What a session charges for: any combination of the four prices, added together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tariff {
    /// Per application message delivered (an `app` message or a binary frame).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_message: Option<Price>,
    /// Per second of connected, unpaused time, charged per nanosecond.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_second: Option<Price>,
    /// Per byte delivered to the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_byte_out: Option<Price>,
    /// Per byte received from the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_byte_in: Option<Price>,
}

impl Tariff {
    /// Parses the JSON of DESIGN.md section 4.1, refusing a zero `per`, a negative or
    /// non-decimal amount, an amount above `u128`, unknown fields, and a tariff whose prices
    /// need a common denominator above [`MAX_DENOMINATOR`].
    pub fn from_json(text: &str) -> Result<Self, TariffError> {
        let tariff: Self =
            serde_json::from_str(text).map_err(|e| TariffError::Json(e.to_string()))?;
        tariff.rates()?;
        Ok(tariff)
    }

    /// The JSON form.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a tariff always serializes")
    }

    /// Whether nothing is priced.
    pub fn is_free(&self) -> bool {
        [
            self.per_message,
            self.per_second,
            self.per_byte_out,
            self.per_byte_in,
        ]
        .iter()
        .all(|p| p.is_none_or(|p| p.amount == 0))
    }

    /// The tariff compiled for metering: every price scaled to one common denominator.
    pub fn rates(&self) -> Result<Rates, TariffError> {
        Rates::new(self)
    }
}

/// A tariff with every price over one common denominator `D`, so that metering is integer
/// additions and comparisons: a unit of kind k adds `weight_k = amount_k * D / per_k` to the
/// scaled consumption, which is `D` times the exact consumption in base units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rates {
    /// The common denominator `D`.
    pub denominator: U256,
    /// Scaled cost of one message.
    pub message: U256,
    /// Scaled cost of one nanosecond.
    pub nanosecond: U256,
    /// Scaled cost of one byte out.
    pub byte_out: U256,
    /// Scaled cost of one byte in.
    pub byte_in: U256,
}

impl Rates {
    fn new(tariff: &Tariff) -> Result<Self, TariffError> {
        // (amount, denominator) per kind; a per-second price is per (per * 1e9) nanoseconds.
        let ns = tariff
            .per_second
            .map(|p| {
                p.per
                    .checked_mul(NANOS_PER_SEC)
                    .map(|per| (p.amount, per))
                    .ok_or(TariffError::Overflow {
                        field: "perSecond.per",
                    })
            })
            .transpose()?;
        let kinds = [
            tariff.per_message.map(|p| (p.amount, p.per)),
            ns,
            tariff.per_byte_out.map(|p| (p.amount, p.per)),
            tariff.per_byte_in.map(|p| (p.amount, p.per)),
        ];
        let mut denominator = U256::from(1u8);
        for (_, per) in kinds.iter().flatten() {
            let per = U256::from(*per);
            let g = gcd(denominator, per);
            denominator = (denominator / g)
                .checked_mul(per)
                .filter(|d| *d <= MAX_DENOMINATOR)
                .ok_or(TariffError::TooFine)?;
        }
        let weight = |kind: Option<(u128, u128)>| -> U256 {
            // D / per is exact (D is a multiple of per), and amount < 2^128, D <= 2^120.
            kind.map_or(U256::ZERO, |(amount, per)| {
                U256::from(amount) * (denominator / U256::from(per))
            })
        };
        Ok(Self {
            denominator,
            message: weight(kinds[0]),
            nanosecond: weight(kinds[1]),
            byte_out: weight(kinds[2]),
            byte_in: weight(kinds[3]),
        })
    }
}

fn gcd(mut a: U256, mut b: U256) -> U256 {
    while !b.is_zero() {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_design_json_and_round_trips() {
        let text = r#"{"perMessage":{"amount":"1","per":"100"},"perSecond":{"amount":"5","per":"1"},"perByteOut":{"amount":"3","per":"1000"},"perByteIn":{"amount":"0","per":"1"}}"#;
        let t = Tariff::from_json(text).unwrap();
        assert_eq!(
            t.per_message,
            Some(Price {
                amount: 1,
                per: 100
            })
        );
        assert_eq!(t.per_second, Some(Price::whole(5)));
        assert_eq!(Tariff::from_json(&t.to_json()).unwrap(), t);
        let r = t.rates().unwrap();
        // lcm(100, 1e9, 1000, 1) = 1e9
        assert_eq!(r.denominator, U256::from(1_000_000_000u64));
        assert_eq!(r.message, U256::from(10_000_000u64));
        assert_eq!(r.nanosecond, U256::from(5u8));
        assert_eq!(r.byte_out, U256::from(3_000_000u64));
        assert_eq!(r.byte_in, U256::ZERO);
    }

    #[test]
    fn refuses_invalid_tariffs() {
        let cases = [
            (r#"{"perMessage":{"amount":"1","per":"0"}}"#, "zero"),
            (r#"{"perMessage":{"amount":"-1","per":"1"}}"#, "negative"),
            (r#"{"perMessage":{"amount":"1.5","per":"1"}}"#, "decimal"),
            (
                r#"{"perMessage":{"amount":"340282366920938463463374607431768211456","per":"1"}}"#,
                "too large",
            ),
            (
                r#"{"perSecond":{"amount":"1","per":"340282366920938463463374607431768211455"}}"#,
                "too large",
            ),
            (r#"{"perMinute":{"amount":"1","per":"1"}}"#, "unknown field"),
            (r#"{"perMessage":{"amount":1,"per":"1"}}"#, "invalid type"),
            (
                r#"{"perMessage":{"amount":"1","per":"1180591620717411303424"},"perByteIn":{"amount":"1","per":"1180591620717411303423"}}"#,
                "denominator",
            ),
        ];
        for (text, expect) in cases {
            let err = Tariff::from_json(text).unwrap_err().to_string();
            assert!(err.contains(expect), "{text}: {err}");
        }
    }

    #[test]
    fn an_empty_tariff_is_free() {
        assert!(Tariff::from_json("{}").unwrap().is_free());
        assert!(
            !Tariff {
                per_message: Some(Price::whole(1)),
                ..Tariff::default()
            }
            .is_free()
        );
    }
}
