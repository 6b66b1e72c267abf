//! Small helpers shared by the crates above: a hash whose values persist, and the wall clock.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// FNV-1a, 64 bits, of `bytes`.
///
/// Stable across Rust versions, builds, platforms and msbd versions (unlike the standard
/// library's hasher), and it must stay so: its values persist. Data-directory markers
/// ([`crate::wrapper::marker_for`]) name cgroups and sandboxes left on the host, sandbox names
/// embed it, and the HTTP principals of msbd builds up to commit 7d717a8 (`token:` and this hash
/// of the token) own tasks in the stores they wrote (msbd finds them by that name to give them
/// to the token's current principal). Changing it would orphan all of them.
pub fn fnv1a_64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    })
}

/// The wall-clock time in seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The time the session manager measures idleness by: the system's clock, or one that moves only
/// when told ([`Clock::manual`]), so that a test of idle expiry need not wait for real time.
/// Cheap to clone: clones of a manual clock share its time.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    manual: Option<Arc<Mutex<f64>>>,
}

impl Clock {
    /// The system's wall clock ([`unix_now`]).
    pub fn system() -> Clock {
        Clock::default()
    }

    /// A clock that starts at the system's time now and moves only by [`Clock::advance`].
    pub fn manual() -> Clock {
        Clock {
            manual: Some(Arc::new(Mutex::new(unix_now()))),
        }
    }

    /// The time in seconds since the Unix epoch.
    pub fn now(&self) -> f64 {
        match &self.manual {
            None => unix_now(),
            Some(time) => *time.lock().unwrap_or_else(PoisonError::into_inner),
        }
    }

    /// Moves a manual clock forward by `by`; returns `false`, changing nothing, on the system
    /// clock.
    pub fn advance(&self, by: Duration) -> bool {
        match &self.manual {
            None => false,
            Some(time) => {
                *time.lock().unwrap_or_else(PoisonError::into_inner) += by.as_secs_f64();
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_64_keeps_its_values() {
        // Published FNV-1a test vectors, and values captured before the copies were merged.
        assert_eq!(fnv1a_64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a_64(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(fnv1a_64("é".as_bytes()), 0x0ac2_1707_b718_1e01);
        assert_eq!(fnv1a_64(b"session with spaces"), 0xcb2a_a8ee_8e34_6b8c);
    }

    #[test]
    fn a_manual_clock_moves_only_when_told_and_its_clones_share_it() {
        let clock = Clock::manual();
        let start = clock.now();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(clock.now(), start);
        let clone = clock.clone();
        assert!(clone.advance(Duration::from_secs(90)));
        assert_eq!(clock.now(), start + 90.0);
        assert!(!Clock::system().advance(Duration::from_secs(1)));
        assert!(Clock::system().now() >= start);
    }

    #[test]
    fn unix_now_is_after_2024() {
        assert!(unix_now() > 1_704_067_200.0);
    }
}
