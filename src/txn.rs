//! All-or-nothing requests inside a group commit.
//!
//! The commit pipeline applies many requests into one batch and writes it
//! once. A request can fail after it has already changed things: the store
//! read of its third recipient's inbox head fails after the first two had
//! sequence numbers reserved, or after membership rows were put. Left in
//! place, those changes would be committed with the rest of the group: rows
//! of a change that was answered `STORE_UNAVAILABLE`, and sequence numbers
//! reserved for events never written, holes that leave a client's cursor
//! stuck below them for good.
//!
//! So the pipeline takes a savepoint before each request and, when the
//! request fails, rolls back to it. What a request changes is of two kinds:
//! lists it appends to (the batch's writes, the pushes), cut back to their
//! length at the savepoint; and keyed state it changes in place (the cached
//! inbox heads, the watermarks written in this group), changed only through
//! an [`Undo`] log, which records what each key held and puts it back.
//!
//! The guarantee: after a rollback every key set through an [`Undo`] since
//! its last [`Undo::forget`] holds what it held before (or is absent again),
//! so nothing a failed request reserved or cached is seen by a later
//! request or by the commit. An [`Undo`] holds the changes of one request
//! only: the pipeline forgets them when the next request begins, so the log
//! never grows with the size of a group.

use std::collections::HashMap;
use std::hash::Hash;

use crate::generations::Generations;

/// Keyed state whose changes an [`Undo`] can take back.
pub trait Restore<K, V> {
    /// Make `key` hold `value` (`None`: nothing); returns what it held.
    fn replace(&mut self, key: K, value: Option<V>) -> Option<V>;
}

impl<K: Hash + Eq, V> Restore<K, V> for HashMap<K, V> {
    fn replace(&mut self, key: K, value: Option<V>) -> Option<V> {
        match value {
            Some(v) => self.insert(key, v),
            None => self.remove(&key),
        }
    }
}

impl<K: Hash + Eq, V: Clone> Restore<K, V> for Generations<K, V> {
    fn replace(&mut self, key: K, value: Option<V>) -> Option<V> {
        match value {
            Some(v) => self.insert(key, v),
            None => self.remove(&key),
        }
    }
}

/// What the keys set since the last [`Undo::forget`] held before.
pub struct Undo<K, V> {
    /// Oldest change first; a key set twice appears twice.
    log: Vec<(K, Option<V>)>,
}

impl<K, V> Default for Undo<K, V> {
    fn default() -> Self {
        Undo { log: Vec::new() }
    }
}

impl<K: Clone, V> Undo<K, V> {
    /// Set `key` to `value` in `state`, remembering what it held.
    #[inline]
    pub fn set(&mut self, state: &mut impl Restore<K, V>, key: K, value: V) {
        let prior = state.replace(key.clone(), Some(value));
        self.log.push((key, prior));
    }

    /// Put back what every key set since the last [`Undo::forget`] held,
    /// newest change first (so a key set twice ends as it was before the
    /// first), then forget.
    pub fn rollback(&mut self, state: &mut impl Restore<K, V>) {
        while let Some((key, prior)) = self.log.pop() {
            state.replace(key, prior);
        }
    }

    /// Keep the changes made so far: a later rollback leaves them.
    pub fn forget(&mut self) {
        self.log.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rollback_puts_back_every_key_as_it_was_and_spares_what_was_kept() {
        let mut heads: Generations<&str, u64> = Generations::new(100);
        heads.insert("amy", 4);
        heads.insert("bob", 7);
        heads.retire_all();
        let mut undo = Undo::default();
        undo.set(&mut heads, "amy", 5);
        undo.forget();
        undo.set(&mut heads, "amy", 6);
        undo.set(&mut heads, "amy", 7);
        undo.set(&mut heads, "bob", 8);
        undo.set(&mut heads, "cat", 1);
        undo.rollback(&mut heads);
        assert_eq!(heads.get("amy"), Some(5), "kept before the forget");
        assert_eq!(
            heads.get("bob"),
            Some(7),
            "put back from the old generation"
        );
        assert_eq!(heads.get("cat"), None, "absent again");
        // The log is empty after a rollback: a second one changes nothing.
        heads.insert("amy", 9);
        undo.rollback(&mut heads);
        assert_eq!(heads.get("amy"), Some(9));

        let mut marks: HashMap<&str, (u64, u64)> = HashMap::new();
        let mut undo = Undo::default();
        undo.set(&mut marks, "amy", (1, 0));
        undo.rollback(&mut marks);
        assert!(marks.is_empty());
    }
}
