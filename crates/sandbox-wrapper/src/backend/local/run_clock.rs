//! The timeout clock of one run (a process, or one interpreter call), which stops while the
//! run is paused: the pause switch freezes the run's process tree, and the time it stays
//! frozen does not count against the timeout.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::{CANNOT_FREEZE, Tree};
use crate::output::OutputSink;

/// A run's timeout clock and pause state.
pub(super) struct RunClock {
    started: Instant,
    timeout: Option<Duration>,
    /// Since when the tree is frozen, while it is.
    paused_since: Option<Instant>,
    /// How long it was frozen before.
    paused_total: Duration,
    /// Whether the pause switch can still change (its sender is alive).
    switch_open: bool,
}

impl RunClock {
    /// Starts the clock of a run that has just begun; freezes the tree at once when the switch
    /// is on already (or notes in the output that this host cannot).
    pub(super) fn start(
        timeout: Option<Duration>,
        tree: &Tree,
        paused: &mut watch::Receiver<bool>,
        output: &OutputSink,
    ) -> RunClock {
        let mut clock = RunClock {
            started: Instant::now(),
            timeout,
            paused_since: None,
            paused_total: Duration::ZERO,
            switch_open: true,
        };
        if *paused.borrow_and_update() {
            clock.set_paused(true, tree, output);
        }
        clock
    }

    /// When the run has used up its timeout, counting no frozen time; `None` without a timeout
    /// or while frozen.
    pub(super) fn deadline(&self) -> Option<tokio::time::Instant> {
        match (self.timeout, self.paused_since) {
            (Some(timeout), None) => Some((self.started + timeout + self.paused_total).into()),
            _ => None,
        }
    }

    /// Whether the pause switch may still change: a `select!` waits for it only then.
    pub(super) fn follows_switch(&self) -> bool {
        self.switch_open
    }

    /// The pause switch changed (`changed` is what `paused.changed()` answered): freezes or
    /// thaws the tree to match it.
    pub(super) fn switch_changed(
        &mut self,
        changed: Result<(), watch::error::RecvError>,
        paused: &mut watch::Receiver<bool>,
        tree: &Tree,
        output: &OutputSink,
    ) {
        if changed.is_err() {
            // The pause switch is gone: it can no longer change.
            self.switch_open = false;
            return;
        }
        let pause = *paused.borrow_and_update();
        self.set_paused(pause, tree, output);
    }

    fn set_paused(&mut self, pause: bool, tree: &Tree, output: &OutputSink) {
        match (pause, self.paused_since) {
            (true, None) => {
                if tree.freeze(true) {
                    self.paused_since = Some(Instant::now());
                } else {
                    output.note(CANNOT_FREEZE);
                }
            }
            (false, Some(since)) => {
                tree.freeze(false);
                self.paused_total += since.elapsed();
                self.paused_since = None;
            }
            _ => {}
        }
    }
}
