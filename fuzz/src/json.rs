//! Arbitrary JSON values for request bodies and `app` data.

use serde_json::{Map, Number, Value};

use crate::input::Input;

/// A JSON value at most `depth` levels deep.
pub fn value(input: &mut Input<'_>, depth: u32) -> Value {
    let kinds = if depth == 0 { 6 } else { 8 };
    match input.below(kinds) {
        0 => Value::Null,
        1 => Value::Bool(input.bool()),
        2 => Value::from(input.scaled_u64()),
        3 => Value::from(-(input.scaled_u64() as i64)),
        4 => Number::from_f64(f64::from_bits(input.u64())).map_or(Value::Null, Value::Number),
        5 => Value::String(input.string(24)),
        6 => {
            let n = input.below(5);
            Value::Array((0..n).map(|_| value(input, depth - 1)).collect())
        }
        _ => {
            let n = input.below(5);
            let mut map = Map::new();
            for _ in 0..n {
                let key = input.string(8);
                map.insert(key, value(input, depth - 1));
            }
            Value::Object(map)
        }
    }
}
