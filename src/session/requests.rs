//! The requests of one session (issue 9, item 9): they are rate limited, at most one streams at
//! a time (or, when configured, a new one cancels the running one), and each one's stream ends
//! with `end {seq, reason}`, also when a disconnect cut it (`interrupted`, sent on resume).
//! Whether a request can be paid for is the meter's call ([`crate::meter::Meter::try_request`]).

use std::collections::VecDeque;

use crate::meter::Nanos;

/// At most 5 requests a second per session: an agent may chain a few quickly, and a flood
/// (each one can start upstream work) is cut off.
pub const DEFAULT_MAX_REQUESTS_PER_SEC: usize = 5;

const SECOND_NS: u64 = 1_000_000_000;

/// What the rate limit says of a new request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Admission {
    /// Within the limit.
    Admitted,
    /// Over the limit: refused (`rate_limited`), the session goes on.
    Refused,
    /// Over twice the limit: the client does not back off; the session ends with 4429.
    Flood,
}

/// The request state of a session.
#[derive(Debug, Default)]
pub(super) struct Requests {
    /// Arrival times of the requests of the last second.
    recent: VecDeque<Nanos>,
    /// The request streaming now: the `seq` its first unit gets.
    active: Option<u64>,
    /// A request cut by a disconnect: the `seq` of its first unit, and of its last (if any) for
    /// the `end {interrupted}` sent on resume.
    interrupted: Option<(u64, Option<u64>)>,
}

impl Requests {
    /// Counts a request arriving at `now` against `limit` per second.
    pub(super) fn admit(&mut self, now: Nanos, limit: usize) -> Admission {
        while self
            .recent
            .front()
            .is_some_and(|t| now.saturating_sub(*t) >= SECOND_NS)
        {
            self.recent.pop_front();
        }
        // Bounded: refused requests are counted too, up to the flood line.
        if self.recent.len() >= limit.saturating_mul(2) {
            return Admission::Flood;
        }
        self.recent.push_back(now);
        if self.recent.len() > limit {
            Admission::Refused
        } else {
            Admission::Admitted
        }
    }

    /// Whether a request is streaming.
    pub(super) fn active(&self) -> bool {
        self.active.is_some()
    }

    /// A request started; its first unit will get `next_seq`.
    pub(super) fn start(&mut self, next_seq: u64) {
        self.active = Some(next_seq);
    }

    /// The streaming request ended before unit `next_seq`: the `seq` of its last unit, `None`
    /// when it delivered none. `None` also when no request was streaming (nothing to end).
    pub(super) fn finish(&mut self, next_seq: u64) -> Option<Option<u64>> {
        let first = self.active.take()?;
        Some((next_seq > first).then(|| next_seq - 1))
    }

    /// The connection dropped: a streaming request is cut, and ends `interrupted` on resume.
    pub(super) fn interrupt(&mut self, next_seq: u64) {
        if let Some(first) = self.active
            && let Some(last) = self.finish(next_seq)
        {
            self.interrupted = Some((first, last));
        }
    }

    /// The request a disconnect cut, if any, once.
    pub(super) fn take_interrupted(&mut self) -> Option<Option<u64>> {
        self.interrupted.take().map(|(_, last)| last)
    }

    /// The first `seq` of the request that has not ended yet (streaming, or cut and not yet
    /// told `interrupted`), if any: what a session record keeps.
    pub(super) fn unended(&self) -> Option<u64> {
        self.active.or(self.interrupted.map(|(first, _)| first))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_second_and_spots_a_flood() {
        let mut r = Requests::default();
        let got: Vec<_> = (0..5).map(|i| r.admit(i, 2)).collect();
        assert_eq!(
            got,
            [
                Admission::Admitted,
                Admission::Admitted,
                Admission::Refused,
                Admission::Refused,
                Admission::Flood
            ]
        );
        // A second later the window is empty again.
        assert_eq!(r.admit(SECOND_NS + 10, 2), Admission::Admitted);
    }

    #[test]
    fn ends_name_the_last_unit() {
        let mut r = Requests::default();
        assert_eq!(r.finish(3), None, "nothing streaming");
        r.start(3);
        assert_eq!(r.finish(3), Some(None), "no unit delivered");
        r.start(3);
        assert_eq!(r.finish(7), Some(Some(6)));
        r.start(7);
        r.interrupt(9);
        assert!(!r.active());
        assert_eq!(r.take_interrupted(), Some(Some(8)));
        assert_eq!(r.take_interrupted(), None);
    }
}
