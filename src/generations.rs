//! A cache bounded by two generations, for state the commit pipeline keeps
//! in memory that would otherwise grow with every user or group ever seen
//! (inbox heads, groups).
//!
//! Entries go into the young generation. When it is full (by entry count, or
//! by a weight the owner gives each value, such as a group's member count)
//! the owner retires it ([`Generations::rotate_if_full`]): it becomes the old generation and
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
    /// The young generation retires when its weight reaches this.
    per_generation: usize,
    /// What one value weighs (1 for a cache bounded by entries).
    weigh: fn(&V) -> usize,
    young_weight: usize,
}

impl<K: Hash + Eq, V: Clone> Generations<K, V> {
    /// A cache whose young generation retires at `per_generation` entries.
    pub fn new(per_generation: usize) -> Self {
        Self::weighted(per_generation, |_| 1)
    }

    /// A cache whose young generation retires when the weights of its
    /// values add up to `per_generation`.
    pub fn weighted(per_generation: usize, weigh: fn(&V) -> usize) -> Self {
        Generations {
            young: HashMap::new(),
            old: HashMap::new(),
            per_generation,
            weigh,
            young_weight: 0,
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
        self.young_weight += (self.weigh)(&v);
        self.young.insert(k, v.clone());
        Some(v)
    }

    /// Set `key` (in the young generation); returns what it held.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let old = self.old.remove(&key);
        self.young_weight += (self.weigh)(&value);
        match self.young.insert(key, value) {
            Some(replaced) => {
                self.young_weight -= (self.weigh)(&replaced);
                Some(replaced)
            }
            None => old,
        }
    }

    /// Forget `key` (in both generations); returns what it held.
    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let old = self.old.remove(key);
        match self.young.remove(key) {
            Some(v) => {
                self.young_weight -= (self.weigh)(&v);
                Some(v)
            }
            None => old,
        }
    }

    /// Retire the young generation if it is full.
    pub fn rotate_if_full(&mut self) {
        if self.young_weight >= self.per_generation {
            self.retire_young();
        }
    }

    fn retire_young(&mut self) {
        self.old = std::mem::take(&mut self.young);
        self.young_weight = 0;
    }

    /// Retire the young generation whatever its size (tests).
    #[cfg(test)]
    pub fn retire_all(&mut self) {
        self.retire_young();
    }

    pub fn clear(&mut self) {
        self.young.clear();
        self.old.clear();
        self.young_weight = 0;
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

    #[test]
    fn a_weighted_generation_retires_by_weight_not_by_count() {
        // Values weigh what they say: a generation holds 10.
        let mut c: Generations<&str, usize> = Generations::weighted(10, |w| *w);
        c.insert("big", 9);
        c.rotate_if_full();
        assert_eq!(c.sizes(), (1, 0), "9 of 10: not full");
        // Replacing an entry counts its new weight only.
        c.insert("big", 8);
        c.insert("small", 1);
        c.rotate_if_full();
        assert_eq!(c.sizes(), (2, 0), "8 + 1 of 10: not full");
        c.insert("one more", 1);
        c.rotate_if_full();
        assert_eq!(c.sizes(), (0, 3));
        // Brought back from the old generation, it weighs in the young one.
        assert_eq!(c.get("big"), Some(8));
        c.insert("two", 2);
        c.rotate_if_full();
        assert_eq!(c.sizes(), (0, 2), "8 + 2 of 10: full");
    }

    #[test]
    fn insert_and_remove_return_what_the_key_held_in_either_generation() {
        let mut c: Generations<&str, usize> = Generations::weighted(10, |w| *w);
        assert_eq!(c.insert("a", 4), None);
        c.retire_all();
        assert_eq!(c.insert("a", 5), Some(4), "from the old generation");
        assert_eq!(c.insert("a", 6), Some(5), "from the young generation");
        assert_eq!(c.remove("a"), Some(6));
        assert_eq!((c.remove("a"), c.get("a")), (None, None));
        c.insert("b", 3);
        c.retire_all();
        assert_eq!(c.remove("b"), Some(3), "from the old generation");
        // A removed entry no longer weighs in the young generation.
        c.insert("c", 9);
        c.remove("c");
        c.insert("d", 9);
        c.rotate_if_full();
        assert_eq!(c.sizes(), (1, 0), "9 of 10: not full");
    }
}
