//! Pacing of background work (resyncs) to a share of the time, so that the work that
//! matters now (new objects) finds the CPU free: in this process, and in the API server
//! that shares the machine.
//!
//! Strict queue priority decides which key goes first, but not who gets the CPU: a resync
//! of every object runs flat out on every core between two new objects. Paced, background
//! work that took `t` earns a pause of `t × (1 / share − 1)`; pauses are taken once they add
//! up to [`PACE_QUANTUM`], long enough for the timer (1 ms) and short enough not to matter.

use std::time::Duration;

use tokio::time::Instant;

/// The shortest pause taken; smaller ones are added up until they reach it.
pub const PACE_QUANTUM: Duration = Duration::from_millis(5);

/// Keeps one kind of background work to `share` of the time.
#[derive(Debug, Clone)]
pub struct Pacer {
    /// Pause earned per unit of work; 0 does not pace.
    ratio: f64,
    debt: Duration,
    paused_until: Option<Instant>,
}

impl Pacer {
    /// A pacer for `share` of the time, in (0, 1]; 1 (or anything out of range) does not
    /// pace.
    pub fn new(share: f64) -> Self {
        let ratio = if share > 0.0 && share < 1.0 {
            1.0 / share - 1.0
        } else {
            0.0
        };
        Self {
            ratio,
            debt: Duration::ZERO,
            paused_until: None,
        }
    }

    /// Records `took` of background work done just now.
    pub fn worked(&mut self, took: Duration) {
        if self.ratio == 0.0 {
            return;
        }
        self.debt += took.mul_f64(self.ratio);
        if self.debt >= PACE_QUANTUM {
            let now = Instant::now();
            let from = self.paused_until.map_or(now, |until| until.max(now));
            self.paused_until = Some(from + self.debt);
            self.debt = Duration::ZERO;
        }
    }

    /// Until when background work must wait, if it must now.
    pub fn paused_until(&self) -> Option<Instant> {
        self.paused_until.filter(|until| *until > Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn work_earns_pauses_in_proportion_taken_in_quanta() {
        let mut pacer = Pacer::new(0.25);
        pacer.worked(Duration::from_millis(1));
        assert_eq!(pacer.paused_until(), None, "3 ms is below the quantum");
        pacer.worked(Duration::from_millis(1));
        assert_eq!(
            pacer.paused_until(),
            Some(Instant::now() + Duration::from_millis(6))
        );
        // Work done during a pause (a key already in flight) extends it.
        pacer.worked(Duration::from_millis(2));
        assert_eq!(
            pacer.paused_until(),
            Some(Instant::now() + Duration::from_millis(12))
        );
        tokio::time::sleep(Duration::from_millis(12)).await;
        assert_eq!(pacer.paused_until(), None);
    }

    #[test]
    fn a_full_share_never_pauses() {
        for share in [1.0, 0.0, f64::NAN] {
            let mut pacer = Pacer::new(share);
            pacer.worked(Duration::from_secs(10));
            assert_eq!(pacer.paused_until(), None, "{share}");
        }
    }
}
