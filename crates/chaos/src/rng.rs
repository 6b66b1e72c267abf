//! A small seeded random number generator (SplitMix64): the same seed gives the same run plan,
//! without a dependency.

/// A SplitMix64 generator.
#[derive(Clone, Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    /// A generator for one item of a run (its own stream, whatever else is drawn).
    pub(crate) fn for_item(seed: u64, stream: u64, item: u64) -> Rng {
        let mut rng = Rng(seed ^ stream.wrapping_mul(0xa076_1d64_78bd_642f));
        rng.0 ^= item.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        rng.next_u64();
        rng
    }

    /// The next 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// A number in `low..=high`.
    pub(crate) fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high.saturating_sub(low) + 1)
    }

    /// True with probability `p`.
    pub(crate) fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// A number in `[0, 1)`.
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;

    #[test]
    fn the_same_seed_gives_the_same_numbers() {
        let a: Vec<u64> = (0..5).map(|i| Rng::for_item(7, 1, i).next_u64()).collect();
        let b: Vec<u64> = (0..5).map(|i| Rng::for_item(7, 1, i).next_u64()).collect();
        assert_eq!(a, b);
        let mut rng = Rng::for_item(3, 0, 0);
        for _ in 0..1000 {
            assert!(rng.between(2, 4) >= 2 && rng.between(2, 4) <= 4);
            assert!(rng.unit() < 1.0);
        }
    }
}
