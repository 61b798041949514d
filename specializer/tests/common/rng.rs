//! The one pseudo-random generator of the specializer tests: xorshift64 (shifts 13, 7, 17), deterministic per seed.

/// xorshift64. `Rng(seed)` yields the same sequence for a seed everywhere (the tests' seeds,
/// and so their cases, depend on it: do not change the algorithm). A zero seed yields only
/// zeros; [`Rng::new`] avoids it.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    /// A generator whose seed is never zero (`seed | 1`).
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    /// The next value; also the new state.
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform-ish in `0..n` (`next() % n`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    /// One element of `v`.
    pub fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len())]
    }

    /// A value biased toward boundaries (0, 1, sign bits, all-ones of each width, and neighbours).
    pub fn value(&mut self) -> u64 {
        let specials = [
            0,
            1,
            2,
            u64::MAX,
            0x7f,
            0x80,
            0xff,
            0x7fff,
            0x8000,
            0xffff,
            0x7fff_ffff,
            0x8000_0000,
            0xffff_ffff,
            0x1_0000_0000,
            0x7fff_ffff_ffff_ffff,
            0x8000_0000_0000_0000,
        ];
        match self.below(4) {
            0 => self.pick(&specials),
            1 => self
                .pick(&specials)
                .wrapping_add(self.below(5) as u64)
                .wrapping_sub(2),
            2 => self.below(64) as u64,
            _ => self.next(),
        }
    }
}
