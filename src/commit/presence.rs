//! Presence that is stored: a user's last-seen time, written when their
//! last connection closes, and their privacy choice (hide last seen).
//!
//! Both live in one `presence` record per user, so each write reads the
//! other half first and keeps it. Who is online right now is not stored
//! (see [`crate::hub::registry`]); this file must never write per presence
//! change, only on these two events.

use swiftlet_protocol::pb;
use swiftlet_protocol::Body;

use super::group::{Fail, Pipeline, Work};
use super::Origin;
use crate::store::StoreError;

impl Pipeline {
    /// The user's last connection closed at `at_ms`.
    pub(super) fn last_seen(
        &mut self,
        w: &mut Work,
        user: &str,
        at_ms: u64,
    ) -> Result<(), StoreError> {
        let (_, hide) = self.store.presence(user)?;
        w.writes += 1;
        self.store.put_presence(&mut w.batch, user, at_ms, hide)
    }

    pub(super) fn set_privacy(
        &mut self,
        w: &mut Work,
        o: &Origin,
        req: pb::SetPrivacy,
    ) -> Result<Option<Body>, Fail> {
        let (last_seen, _) = self.store.presence(&o.user)?;
        self.store
            .put_presence(&mut w.batch, &o.user, last_seen, req.hide_last_seen)?;
        w.writes += 1;
        Ok(Some(Body::Done(pb::Done {})))
    }
}
