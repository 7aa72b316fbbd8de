//! [`SharedTable`]: a few values that many sessions hold alike (the signing domain of their
//! channels, the compiled terms of their meters), made once and shared, so that an idle session
//! keeps a pointer instead of a copy (docs/SERVER.md, "Memory of an idle session").

use std::sync::{Arc, Mutex};

/// Values shared by key, at most `N` of them (a server has a domain, a tariff per resource and
/// one configuration: a handful). A full table forgets its oldest; a value still held elsewhere
/// lives on, and its key gets a new one when next asked for.
pub(crate) struct SharedTable<K, V, const N: usize> {
    table: Mutex<Vec<(K, Arc<V>)>>,
}

impl<K: PartialEq, V, const N: usize> SharedTable<K, V, N> {
    /// An empty table (for a `static`).
    pub(crate) const fn new() -> Self {
        Self {
            table: Mutex::new(Vec::new()),
        }
    }

    /// The value of `key`, made by `make` the first time (an error of `make` keeps nothing).
    pub(crate) fn get_or_try_make<E>(
        &self,
        key: K,
        make: impl FnOnce() -> Result<V, E>,
    ) -> Result<Arc<V>, E> {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, value)) = table.iter().find(|(k, _)| *k == key) {
            return Ok(value.clone());
        }
        let value = Arc::new(make()?);
        if table.len() >= N {
            table.remove(0);
        }
        table.push((key, value.clone()));
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_gets_one_value_and_a_full_table_forgets_its_oldest() {
        let table: SharedTable<u8, String, 2> = SharedTable::new();
        let make = |s: &str| Ok::<_, ()>(s.to_string());
        let a = table.get_or_try_make(1, || make("a")).unwrap();
        assert!(Arc::ptr_eq(
            &a,
            &table.get_or_try_make(1, || make("x")).unwrap()
        ));
        assert_eq!(table.get_or_try_make(3, || Err(())), Err(()));
        table.get_or_try_make(2, || make("b")).unwrap();
        table.get_or_try_make(3, || make("c")).unwrap();
        let again = table.get_or_try_make(1, || make("a2")).unwrap();
        assert_eq!(*again, "a2", "1 was the oldest: forgotten, made again");
        assert_eq!(*a, "a", "the old value lives on where it is held");
    }
}
