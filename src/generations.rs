//! A cache bounded by two generations, for state the commit pipeline keeps
//! in memory that would otherwise grow with every user or group ever seen
//! (inbox heads, groups).
//!
//! Entries go into the young generation. When it is full the owner retires
//! it ([`Generations::rotate_if_full`]): it becomes the old generation and
//! the previous old one is dropped. An entry found in the old generation
//! moves back to the young one, so whatever is in use survives; whatever
//! went unused for a whole generation is read from the store again. This
//! costs no bookkeeping per access (unlike an LRU list), and the owner
//! chooses when rotation may happen: the pipeline rotates only between
//! group commits, so nothing the batch being built relies on is dropped
//! before that batch is written.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;

pub struct Generations<K, V> {
    young: HashMap<K, V>,
    old: HashMap<K, V>,
    per_generation: usize,
}

impl<K: Hash + Eq, V: Clone> Generations<K, V> {
    /// A cache whose young generation retires at `per_generation` entries.
    pub fn new(per_generation: usize) -> Self {
        Generations {
            young: HashMap::new(),
            old: HashMap::new(),
            per_generation,
        }
    }

    /// The entry if it is in the young generation (no mutation, so callers
    /// behind a read lock can try this first).
    pub fn peek<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.young.get(key)
    }

    /// The entry, moved back into the young generation if it was old.
    pub fn get<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some(v) = self.young.get(key) {
            return Some(v.clone());
        }
        let (k, v) = self.old.remove_entry(key)?;
        self.young.insert(k, v.clone());
        Some(v)
    }

    /// Set `key` (in the young generation).
    pub fn insert(&mut self, key: K, value: V) {
        self.old.remove(&key);
        self.young.insert(key, value);
    }

    /// Retire the young generation if it is full.
    pub fn rotate_if_full(&mut self) {
        if self.young.len() >= self.per_generation {
            self.old = std::mem::take(&mut self.young);
        }
    }

    /// Retire the young generation whatever its size (tests).
    #[cfg(test)]
    pub fn retire_all(&mut self) {
        self.old = std::mem::take(&mut self.young);
    }

    pub fn clear(&mut self) {
        self.young.clear();
        self.old.clear();
    }

    /// Entries held in (young, old).
    pub fn sizes(&self) -> (usize, usize) {
        (self.young.len(), self.old.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn used_entries_survive_and_unused_ones_go_after_a_generation() {
        let mut c: Generations<String, u64> = Generations::new(2);
        c.insert("a".into(), 1);
        c.insert("b".into(), 2);
        c.rotate_if_full();
        assert_eq!(c.sizes(), (0, 2));
        assert_eq!(c.peek("a"), None, "old entries are not peeked");
        // Found in the old generation: back in the young one.
        assert_eq!(c.get("a"), Some(1));
        c.insert("c".into(), 3);
        c.rotate_if_full();
        // "b" was not used for a whole generation.
        assert_eq!(c.get("b"), None);
        assert_eq!((c.get("a"), c.get("c")), (Some(1), Some(3)));
        // Nothing is dropped without a rotation, however much is inserted.
        for i in 0..10 {
            c.insert(format!("x{i}"), i);
        }
        assert_eq!((c.get("a"), c.get("x0")), (Some(1), Some(0)));
    }
}
