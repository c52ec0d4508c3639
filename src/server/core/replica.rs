//! Cluster presence on a conversation's owner core: a replica of the cluster-wide presence
//! kept in Redis, fed by versioned changes, with this node's own changes sent through Redis.
//!
//! The replica's metas live in the core's [`crate::presence::PresenceShard`], so states and
//! diffs go out exactly as on a single node (coalesced per window, state before diff). What
//! changes is where a change comes from: a local join or leave is queued and sent to Redis
//! (one script call per conversation per window), and the replica applies it when its version
//! comes back, in the same order as every other node's replica. A joiner gets its
//! `presence_state` once its own meta is in the replica, so the state holds every connection
//! of the conversation on every node, itself included.
//!
//! A replica starts from a snapshot (taken after this node's metas are written, so a joiner
//! finds itself), applies version v+1 after v, ignores older ones, and reads a new snapshot
//! on a gap. While Redis is unreachable, local changes apply here only (remote metas freeze);
//! when it is back, every replica writes this node's live metas and reads a snapshot again.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use uuid::Uuid;

use super::{Core, CoreMsg, Joiner};
use crate::cluster::presence::{Change, Changes, PresenceRequest};
use crate::limits;
use crate::presence::{Meta, PhxRef, PresenceShard};

/// One conversation's replica on its owner core.
#[derive(Debug, Default)]
pub(crate) struct Replica {
    /// The version held; `None` until the first snapshot.
    version: Option<u64>,
    /// A snapshot is being read: changes wait in `early`.
    resyncing: bool,
    early: Vec<Changes>,
    /// The user of every meta held (a leave carries only the ref).
    users: HashMap<PhxRef, Uuid>,
    /// This node's live metas: the truth Redis is resynced to.
    local: HashMap<PhxRef, (Uuid, Meta)>,
    /// Joiners waiting for their meta to reach the replica.
    joiners: HashMap<PhxRef, Joiner>,
    /// Local changes not sent yet.
    queued: Vec<Change>,
}

/// What applying a set of changes found.
enum Applied {
    /// Applied (or already held); a flush may be due.
    Done { flush: bool },
    /// A version was missed: read a snapshot.
    Gap,
}

impl Replica {
    /// Applies changes whose order is known (a version's, a snapshot's difference, or local
    /// ones while Redis is down): idempotent per meta.
    fn apply(&mut self, shard: &mut PresenceShard<Joiner>, conversation: Uuid, changes: &[Change]) -> bool {
        self.apply_as(shard, conversation, changes, false)
    }

    /// [`Replica::apply`]; with `first`, the replica's first snapshot: metas nobody here is
    /// waiting for were already present, so no member gets a diff for them (a joiner finds
    /// them in its state), as on a single node where a joiner's diff holds only its own meta.
    fn apply_as(
        &mut self,
        shard: &mut PresenceShard<Joiner>,
        conversation: Uuid,
        changes: &[Change],
        first: bool,
    ) -> bool {
        let mut flush = false;
        for change in changes {
            match *change {
                Change::Join { user, meta } => {
                    if self.users.insert(meta.phx_ref, user).is_none() {
                        let joiner = self.joiners.remove(&meta.phx_ref);
                        if first && joiner.is_none() {
                            shard.add_present(conversation, user, meta);
                        } else {
                            shard.add(conversation, user, meta, joiner);
                            flush = true;
                        }
                    }
                }
                Change::Leave(phx_ref) => {
                    if let Some(user) = self.users.remove(&phx_ref) {
                        flush |= shard.untrack(conversation, user, &phx_ref);
                    }
                }
            }
        }
        flush
    }

    /// Applies one version if it is the next.
    fn apply_version(&mut self, shard: &mut PresenceShard<Joiner>, conversation: Uuid, changes: Changes) -> Applied {
        let Some(held) = self.version else { return Applied::Done { flush: false } };
        if changes.version <= held {
            return Applied::Done { flush: false };
        }
        if changes.version > held + 1 {
            return Applied::Gap;
        }
        self.version = Some(changes.version);
        Applied::Done { flush: self.apply(shard, conversation, &changes.changes) }
    }

    /// This node's live metas, as joins.
    fn local_joins(&self) -> Vec<Change> {
        self.local.values().map(|&(user, meta)| Change::Join { user, meta }).collect()
    }

    /// Nothing of this node is in the conversation any more: the replica can go.
    fn idle(&self) -> bool {
        self.local.is_empty() && self.queued.is_empty() && self.joiners.is_empty() && !self.resyncing
    }
}

impl Core {
    /// Owner, cluster mode: a local socket joined; its meta goes to Redis, its state follows
    /// once the meta is back in the replica.
    pub(super) fn track_replicated(&self, conversation: Uuid, user: Uuid, meta: Meta, joiner: Joiner) {
        let new = {
            let mut replicas = self.replicas.borrow_mut();
            let new = !replicas.contains_key(&conversation);
            let replica = replicas.entry(conversation).or_default();
            replica.local.insert(meta.phx_ref, (user, meta));
            replica.joiners.insert(meta.phx_ref, joiner);
            replica.queued.push(Change::Join { user, meta });
            new
        };
        if new {
            self.resync_replica(conversation, false);
        } else {
            self.schedule_presence_flush(conversation);
        }
    }

    /// Owner, cluster mode: a local meta left.
    pub(super) fn untrack_replicated(&self, conversation: Uuid, phx_ref: PhxRef) {
        let mut replicas = self.replicas.borrow_mut();
        let Some(replica) = replicas.get_mut(&conversation) else { return };
        replica.local.remove(&phx_ref);
        replica.joiners.remove(&phx_ref);
        replica.queued.push(Change::Leave(phx_ref));
        drop(replicas);
        self.schedule_presence_flush(conversation);
    }

    /// At a presence flush: sends each replica's queued changes to Redis (one call per
    /// conversation); the answer comes back as [`CoreMsg::PresenceChanges`].
    pub(super) fn send_presence_changes(&self) {
        let Some(fabric) = &self.shared.fabric else { return };
        let mut replicas = self.replicas.borrow_mut();
        for (&conversation, replica) in replicas.iter_mut() {
            if replica.queued.is_empty() || replica.version.is_none() || replica.resyncing {
                continue;
            }
            let changes = std::mem::take(&mut replica.queued);
            let (mailboxes, core, sent) = (self.shared.mailboxes.clone(), self.id, changes.clone());
            let reply = Box::new(move |answer: Option<Changes>| {
                let msg = match answer {
                    Some(changes) => CoreMsg::PresenceChanges { conversation, changes },
                    None => CoreMsg::PresenceUnapplied { conversation, changes: sent },
                };
                mailboxes[core].push_blocking(msg);
            });
            let request = PresenceRequest::Apply { conversation, changes, reply };
            if let Err(PresenceRequest::Apply { changes, .. }) = fabric.presence.try_request(request) {
                // The thread is behind: they hold on this node only (this flush sends them to
                // the members) until a resync writes this node's metas.
                replica.apply(&mut self.presence.borrow_mut(), conversation, &changes);
            }
        }
    }

    /// After a presence flush: replicas no local socket needs any more are dropped.
    pub(super) fn drop_idle_replicas(&self) {
        let mut replicas = self.replicas.borrow_mut();
        let mut shard = self.presence.borrow_mut();
        replicas.retain(|conversation, replica| {
            let keep = !replica.idle();
            if !keep {
                shard.forget(*conversation);
            }
            keep
        });
    }

    /// Owner: a version of `conversation`'s presence (a publication, or the answer to this
    /// node's changes).
    pub(super) fn on_presence_changes(&self, conversation: Uuid, changes: Changes) {
        if changes.changes.is_empty() {
            return; // an answer that changed nothing: its version says nothing new
        }
        let outcome = {
            let mut replicas = self.replicas.borrow_mut();
            let Some(replica) = replicas.get_mut(&conversation) else { return };
            if replica.version.is_none() || replica.resyncing {
                if replica.early.len() < limits::PRESENCE_EARLY_MAX {
                    replica.early.push(changes);
                }
                return;
            }
            replica.apply_version(&mut self.presence.borrow_mut(), conversation, changes)
        };
        match outcome {
            Applied::Done { flush } => {
                if flush {
                    self.schedule_presence_flush(conversation);
                }
            }
            Applied::Gap => self.resync_replica(conversation, true),
        }
    }

    /// Owner: Redis did not take this node's changes: they hold on this node only (remote
    /// metas freeze) until a resync writes this node's metas.
    pub(super) fn on_presence_unapplied(&self, conversation: Uuid, changes: &[Change]) {
        let flush = {
            let mut replicas = self.replicas.borrow_mut();
            let Some(replica) = replicas.get_mut(&conversation) else { return };
            replica.apply(&mut self.presence.borrow_mut(), conversation, changes)
        };
        if flush {
            self.schedule_presence_flush(conversation);
        }
    }

    /// Writes this node's live metas of `conversation` to Redis and reads a snapshot
    /// (`counted`: a resync after a missed version, for `/metrics`).
    pub(super) fn resync_replica(&self, conversation: Uuid, counted: bool) {
        let Some(fabric) = &self.shared.fabric else { return };
        let mut replicas = self.replicas.borrow_mut();
        let Some(replica) = replicas.get_mut(&conversation) else { return };
        if replica.resyncing {
            return;
        }
        replica.resyncing = true;
        if counted {
            fabric.stats.presence_resyncs.fetch_add(1, Ordering::Relaxed);
        }
        let (mailboxes, core) = (self.shared.mailboxes.clone(), self.id);
        let reply = Box::new(move |snapshot: Option<Changes>| {
            mailboxes[core].push_blocking(CoreMsg::PresenceSnapshot { conversation, snapshot });
        });
        let request = PresenceRequest::Resync { conversation, metas: replica.local_joins(), reply };
        if fabric.presence.try_request(request).is_err() {
            drop(replicas);
            self.send_to(self.id, CoreMsg::PresenceSnapshot { conversation, snapshot: None });
        }
    }

    /// Owner: every replica is resynced (Redis is back, or lost this node's metas).
    pub(super) fn resync_replicas(&self) {
        let conversations: Vec<Uuid> = self.replicas.borrow().keys().copied().collect();
        for conversation in conversations {
            self.resync_replica(conversation, false);
        }
    }

    /// Owner: a snapshot arrived: the replica becomes it (the difference goes to the members as
    /// a diff), then applies what arrived meanwhile. Without one (Redis unreachable), the
    /// replica carries on with this node's metas only until the next resync.
    pub(super) fn on_presence_snapshot(&self, conversation: Uuid, snapshot: Option<Changes>) {
        let (flush, gap) = {
            let mut replicas = self.replicas.borrow_mut();
            let Some(replica) = replicas.get_mut(&conversation) else { return };
            replica.resyncing = false;
            let mut shard = self.presence.borrow_mut();
            let Some(snapshot) = snapshot else {
                // Redis is unreachable: this node's changes hold here only until it is back.
                replica.version.get_or_insert(0);
                let queued = std::mem::take(&mut replica.queued);
                let flush = replica.apply(&mut shard, conversation, &queued);
                drop(shard);
                drop(replicas);
                if flush {
                    self.schedule_presence_flush(conversation);
                }
                return;
            };
            let present: HashMap<PhxRef, Change> = snapshot.changes.iter().map(|c| (c.phx_ref(), *c)).collect();
            let mut changes: Vec<Change> =
                replica.users.keys().filter(|r| !present.contains_key(*r)).map(|r| Change::Leave(*r)).collect();
            changes.extend(snapshot.changes.iter().filter(|c| !replica.users.contains_key(&c.phx_ref())).copied());
            let first = replica.version.is_none();
            let mut flush = replica.apply_as(&mut shard, conversation, &changes, first);
            replica.version = Some(snapshot.version);
            let mut early = std::mem::take(&mut replica.early);
            early.sort_by_key(|c| c.version);
            let mut gap = false;
            for changes in early {
                match replica.apply_version(&mut shard, conversation, changes) {
                    Applied::Done { flush: f } => flush |= f,
                    Applied::Gap => {
                        gap = true;
                        break;
                    }
                }
            }
            (flush || !replica.queued.is_empty(), gap)
        };
        if gap {
            self.resync_replica(conversation, true);
        }
        if flush {
            self.schedule_presence_flush(conversation);
        }
    }
}
