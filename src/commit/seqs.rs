//! Inbox sequence numbers, and the events that take them.
//!
//! Every inbox event of a user gets the user's next seq: gap-free and in
//! commit order, which is what lets a device's cursor be one number. The
//! pipeline keeps the newest seq of recently written users in [`Heads`] (a
//! two-generation cache), so an append needs no store read; a user not in
//! it is read once from the store.
//!
//! A seq is reserved through the running request's transaction
//! ([`Work::heads_undo`]): a request rolled back gives its seqs back, so a
//! later request of the same group takes them, and seqs become visible to
//! anyone (the batch, the pushes, the next group) only with a request that
//! succeeded. A failed write clears the cache (see `group`).
//!
//! This file must never hand out a seq without reserving it in the
//! transaction, nor put an inbox entry whose seq it did not reserve.

use std::sync::Arc;

use bytes::Bytes;
use prost::Message as _;
use swiftlet_protocol::pb::{self, event::Kind};

use super::group::{Pending, Pipeline, Work};
use super::relay::Route;
use crate::cluster::handoff::RelayEvent;
use crate::generations::Generations;
use crate::hub::mailbox::Sent;
use crate::store::keys::InboxEntry;
use crate::store::StoreError;

/// The pipeline's inbox heads: the newest seq of recently written users.
/// While a request runs it is changed only through [`Work::heads_undo`].
pub(super) type Heads = Generations<Arc<str>, u64>;

/// Users per generation of [`Heads`] (about 64 bytes each): see
/// [`Generations`].
pub(super) const HEADS_PER_GENERATION: usize = 1 << 18;

pub(super) fn encode_event(kind: Kind) -> Bytes {
    Bytes::from(
        pb::Event {
            seq: 0,
            kind: Some(kind),
        }
        .encode_to_vec(),
    )
}

impl Pipeline {
    /// Reserve the next inbox seq of `user` (until the running request is
    /// rolled back: see [`Work::rollback`]).
    pub(super) fn next_seq(&mut self, w: &mut Work, user: &Arc<str>) -> Result<u64, StoreError> {
        if let Route::Remote(_) = self.route(user) {
            // Its home gives it a seq (see `relay`).
            return Ok(0);
        }
        let head = match self.heads.get(&**user) {
            Some(h) => h,
            None => self.store.last_seq(user)?,
        };
        w.heads_undo.set(&mut self.heads, user.clone(), head + 1);
        Ok(head + 1)
    }

    /// Append an encoded event to `user`'s inbox; `entry` is what the slot
    /// stores (a message reference or the event itself). For a user whose
    /// home is another node the event is relayed there instead (see
    /// `relay`), and `seq` is the 0 [`Pipeline::next_seq`] gave.
    pub(super) fn append(
        &mut self,
        w: &mut Work,
        user: &Arc<str>,
        seq: u64,
        entry: InboxEntry,
        event: &Bytes,
        sent: Option<&Arc<Sent>>,
    ) -> Result<(), StoreError> {
        if let Route::Remote(dest) = self.route(user) {
            self.relay_on(w, dest, user, event);
            return Ok(());
        }
        self.store.put_inbox(&mut w.batch, user, seq, entry)?;
        w.writes += 1;
        w.pushes.push(Pending {
            user: user.clone(),
            seq,
            event: event.clone(),
            sent: sent.cloned(),
        });
        Ok(())
    }

    /// Relay `event` to `user`'s home, node `dest`, with this batch.
    pub(super) fn relay_on(&self, w: &mut Work, dest: u16, user: &Arc<str>, event: &Bytes) {
        w.relays.push((
            dest,
            RelayEvent {
                user: user.to_string(),
                event: event.clone(),
                ..RelayEvent::default()
            },
        ));
        w.writes += 1;
    }

    /// Append an inline event (group change, receipt) to each of `users`.
    pub(super) fn append_inline(
        &mut self,
        w: &mut Work,
        users: &[Arc<str>],
        kind: Kind,
    ) -> Result<(), StoreError> {
        let event = encode_event(kind);
        self.append_inline_each(w, users, |_| event.clone())
    }

    /// Append to each of `users` the encoded event `event_for(user)` gives.
    pub(super) fn append_inline_each(
        &mut self,
        w: &mut Work,
        users: &[Arc<str>],
        mut event_for: impl FnMut(&str) -> Bytes,
    ) -> Result<(), StoreError> {
        // Reads first: nothing is put until every seq is known.
        let seqs = users
            .iter()
            .map(|u| self.next_seq(w, u))
            .collect::<Result<Vec<_>, _>>()?;
        for (u, seq) in users.iter().zip(seqs) {
            let event = event_for(u);
            self.append(w, u, seq, InboxEntry::Inline(event.to_vec()), &event, None)?;
        }
        Ok(())
    }
}
