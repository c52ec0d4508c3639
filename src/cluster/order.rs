//! One conversation's delivery order on one core, in cluster mode.
//!
//! A conversation's messages reach a core from three sources: this node's writer (its own
//! commits), Redis (other nodes' commits, published after theirs) and PostgreSQL (gap fills
//! and catch-up reads). Each source is in `seq` order on its own, but together they interleave,
//! repeat and skip: a publication can be lost, late, or overtaken by a fill. The database gives
//! every conversation a dense `seq` (1, 2, 3, …) in commit order, so the core needs only the
//! next `seq` it owes its members: anything below is a repeat, anything above waits until the
//! gap before it is filled. Every member therefore sees each message once, in the database's
//! order, whichever source brought it first.
//!
//! Pure code: no clock, no IO. The caller passes the time in and asks for fills.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What became of an offered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// Delivered now, followed by held messages it unblocked.
    Delivered {
        /// How many held messages followed it.
        unblocked: usize,
    },
    /// Already delivered (or skipped past): dropped.
    Repeat,
    /// Ahead of a gap: held until the gap is filled.
    Held,
    /// Ahead of a gap, and the hold was full: it and every held message were dropped. The
    /// caller fills from [`Cursor::next_seq`] instead (the dropped messages come back with it).
    Overflow,
}

/// The missing messages to read from the database: those after `after` and before `before`
/// (each a `(seq, inserted_at)`), which in one conversation is a range of its primary key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fill {
    /// The last delivered message (`seq`, `inserted_at`).
    pub after: (u64, i64),
    /// The first held message.
    pub before: (u64, i64),
}

/// The next `seq` owed to this core's members of one conversation, and what arrived ahead of it.
#[derive(Debug)]
pub struct Cursor<T> {
    /// `None` until the conversation's current head is known (after the subscription is
    /// confirmed): until then everything is held.
    next_seq: Option<u64>,
    /// `inserted_at` of the last delivered message (or of the head delivery started after).
    last_at: i64,
    /// Messages ahead of `next_seq`, by `seq`, with their `inserted_at`.
    held: BTreeMap<u64, (i64, T)>,
    hold_max: usize,
    /// Since when a gap has been open (something held while `next_seq` is missing).
    gap_since: Option<Instant>,
}

impl<T> Cursor<T> {
    /// A cursor whose starting point is not known yet; it holds at most `hold_max` messages.
    pub fn pending(hold_max: usize) -> Cursor<T> {
        Cursor { next_seq: None, last_at: 0, held: BTreeMap::new(), hold_max: hold_max.max(1), gap_since: None }
    }

    /// The next `seq` owed, once started.
    pub fn next_seq(&self) -> Option<u64> {
        self.next_seq
    }

    /// The last delivered `(seq, inserted_at)`, once started: where a read of what follows
    /// begins.
    pub fn delivered(&self) -> Option<(u64, i64)> {
        self.next_seq.map(|next| (next - 1, self.last_at))
    }

    /// Messages waiting behind a gap.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Starts delivery after `head`, the conversation's last committed `(seq, inserted_at)`
    /// when the subscription became live (`(0, 0)`: none yet). Held messages at or below it
    /// are dropped (the member joined after them); those above are delivered into `out` as far
    /// as they are contiguous. Returns how many were delivered.
    pub fn start(&mut self, head: (u64, i64), now: Instant, out: &mut Vec<T>) -> usize {
        let (head, at) = head;
        self.next_seq = Some(head + 1);
        self.last_at = at;
        self.held = self.held.split_off(&(head + 1));
        self.gap_since = None;
        let n = self.drain(out);
        self.mark_gap(now);
        n
    }

    /// Offers message `seq` stored at `at`; what becomes deliverable, in order, is appended
    /// to `out`.
    pub fn offer(&mut self, seq: u64, at: i64, message: T, now: Instant, out: &mut Vec<T>) -> Offered {
        let Some(next) = self.next_seq else {
            return self.hold(seq, at, message, now);
        };
        if seq < next || self.held.contains_key(&seq) {
            return Offered::Repeat;
        }
        if seq > next {
            return self.hold(seq, at, message, now);
        }
        out.push(message);
        self.next_seq = Some(next + 1);
        self.last_at = at;
        let unblocked = self.drain(out);
        self.gap_since = None;
        self.mark_gap(now);
        Offered::Delivered { unblocked }
    }

    /// What to read from the database, when a gap has been open for at least `wait` (a late
    /// publication usually arrives well within it).
    pub fn gap_due(&self, now: Instant, wait: Duration) -> Option<Fill> {
        let since = self.gap_since?;
        let next = self.next_seq?;
        let (&first, &(at, _)) = self.held.iter().next()?;
        let fill = Fill { after: (next - 1, self.last_at), before: (first, at) };
        (now.saturating_duration_since(since) >= wait).then_some(fill)
    }

    /// Restarts the gap's clock (after a fill was asked for, so it is not asked again at once).
    pub fn gap_asked(&mut self, now: Instant) {
        if self.gap_since.is_some() {
            self.gap_since = Some(now);
        }
    }

    fn hold(&mut self, seq: u64, at: i64, message: T, now: Instant) -> Offered {
        if self.held.contains_key(&seq) {
            return Offered::Repeat;
        }
        if self.held.len() >= self.hold_max {
            self.held.clear();
            self.mark_gap(now);
            return Offered::Overflow;
        }
        self.held.insert(seq, (at, message));
        self.mark_gap(now);
        Offered::Held
    }

    fn drain(&mut self, out: &mut Vec<T>) -> usize {
        let mut n = 0;
        while let Some(next) = self.next_seq {
            let Some((at, message)) = self.held.remove(&next) else { break };
            out.push(message);
            self.next_seq = Some(next + 1);
            self.last_at = at;
            n += 1;
        }
        n
    }

    /// A gap is open while something is held past a known `next_seq`; its clock starts when
    /// it opens and keeps running while it stays open.
    fn mark_gap(&mut self, now: Instant) {
        let open = self.next_seq.is_some() && !self.held.is_empty();
        match (open, self.gap_since) {
            (true, None) => self.gap_since = Some(now),
            (false, Some(_)) => self.gap_since = None,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test messages are stored 10 µs apart.
    fn at(seq: u64) -> i64 {
        seq as i64 * 10
    }

    fn started(head: u64) -> (Cursor<u64>, Instant) {
        started_holding(head, 8)
    }

    fn started_holding(head: u64, hold_max: usize) -> (Cursor<u64>, Instant) {
        let now = Instant::now();
        let mut c = Cursor::pending(hold_max);
        assert_eq!(c.start((head, at(head)), now, &mut Vec::new()), 0);
        (c, now)
    }

    #[test]
    fn in_order_delivers_and_repeats_drop() {
        let (mut c, now) = started(0);
        let mut out = Vec::new();
        assert_eq!(c.offer(1, 10, 1, now, &mut out), Offered::Delivered { unblocked: 0 });
        assert_eq!(c.offer(2, 20, 2, now, &mut out), Offered::Delivered { unblocked: 0 });
        assert_eq!(c.offer(1, 10, 1, now, &mut out), Offered::Repeat);
        assert_eq!(out, [1, 2]);
        assert_eq!(c.next_seq(), Some(3));
    }

    #[test]
    fn a_gap_holds_until_filled_then_drains_in_order() {
        let (mut c, now) = started(0);
        let mut out = Vec::new();
        assert_eq!(c.offer(3, 30, 3, now, &mut out), Offered::Held);
        assert_eq!(c.offer(3, 30, 3, now, &mut out), Offered::Repeat, "a held repeat is dropped too");
        assert_eq!(c.offer(2, 20, 2, now, &mut out), Offered::Held);
        assert!(out.is_empty());
        assert_eq!(c.gap_due(now, Duration::from_millis(25)), None, "not yet due");
        let later = now + Duration::from_millis(25);
        let fill = Fill { after: (0, 0), before: (2, 20) };
        assert_eq!(c.gap_due(later, Duration::from_millis(25)), Some(fill), "between the head and the first held");
        c.gap_asked(later);
        assert_eq!(c.gap_due(later, Duration::from_millis(25)), None, "asked: the clock restarts");
        assert_eq!(c.offer(1, 10, 1, later, &mut out), Offered::Delivered { unblocked: 2 });
        assert_eq!(out, [1, 2, 3]);
        assert_eq!(c.gap_due(later + Duration::from_secs(1), Duration::ZERO), None, "closed");
    }

    #[test]
    fn a_fill_spans_from_the_last_delivered_to_the_first_held() {
        let (mut c, now) = started(10);
        let mut out = Vec::new();
        for seq in [11, 14, 13] {
            c.offer(seq, at(seq), seq, now, &mut out);
        }
        assert_eq!(out, [11]);
        assert_eq!(c.gap_due(now, Duration::ZERO), Some(Fill { after: (11, 110), before: (13, 130) }));
    }

    #[test]
    fn pending_holds_everything_and_start_drops_what_came_before_the_head() {
        let now = Instant::now();
        let mut c = Cursor::pending(8);
        let mut out = Vec::new();
        for seq in [5, 7, 6, 4] {
            assert_eq!(c.offer(seq, at(seq), seq, now, &mut out), Offered::Held);
        }
        assert_eq!(c.gap_due(now, Duration::ZERO), None, "no gap before the head is known");
        assert_eq!(c.start((5, 50), now, &mut out), 2);
        assert_eq!(out, [6, 7]);
        assert_eq!(c.held(), 0);
        assert_eq!(c.offer(5, 50, 5, now, &mut out), Offered::Repeat);
    }

    #[test]
    fn a_full_hold_is_dropped_and_refilled_from_next_seq() {
        let (mut c, now) = started(10);
        let mut out = Vec::new();
        for seq in 13..21 {
            assert_eq!(c.offer(seq, at(seq), seq, now, &mut out), Offered::Held);
        }
        assert_eq!(c.offer(21, 210, 21, now, &mut out), Offered::Overflow);
        assert_eq!(c.held(), 0);
        assert_eq!(c.next_seq(), Some(11), "the fill starts where delivery stopped");
        for seq in 11..22 {
            assert_eq!(c.offer(seq, at(seq), seq, now, &mut out), Offered::Delivered { unblocked: 0 });
        }
        assert_eq!(out, (11..22).collect::<Vec<_>>());
    }

    /// Three sources (own commits, publications, fills), each in order alone, interleaved at
    /// random with repeats and losses: every message is delivered once, in `seq` order, as
    /// long as the fill covers what the others lost.
    #[test]
    fn interleaved_sources_deliver_each_once_in_order() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..200 {
            let total = 1 + crate::ids::splitmix64(&mut rng) % 300;
            let (mut c, now) = started_holding(0, 512);
            let mut sources: Vec<Vec<u64>> = vec![Vec::new(), Vec::new(), (1..=total).collect()];
            for seq in 1..=total {
                // The writer and Redis each carry a random share, possibly both or neither.
                for source in sources.iter_mut().take(2) {
                    if !crate::ids::splitmix64(&mut rng).is_multiple_of(3) {
                        source.push(seq);
                    }
                }
            }
            let mut out = Vec::new();
            while sources.iter().any(|s| !s.is_empty()) {
                let live: Vec<usize> = (0..3).filter(|&i| !sources[i].is_empty()).collect();
                let i = live[(crate::ids::splitmix64(&mut rng) % live.len() as u64) as usize];
                let seq = sources[i].remove(0);
                c.offer(seq, at(seq), seq, now, &mut out);
            }
            assert_eq!(out, (1..=total).collect::<Vec<_>>(), "round {round}");
        }
    }
}
