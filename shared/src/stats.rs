//! The statistics the evaluation, the audit dashboard, drift detection and training share:
//! Mann-Whitney AUC, Wilson intervals and a stratified, seeded bootstrap.

/// The two-sided 95% normal quantile (scipy's `norm.isf(0.025)`), as statsmodels uses it.
pub const Z95: f64 = 1.959963984540054;

/// Area under the ROC curve: the Mann-Whitney U over positives × negatives, a tie counting 1/2.
///
/// O(n log n) by sorting. `None` when there is no positive or no negative, when the slices differ
/// in length, or when a score is NaN (no order to rank by).
pub fn auc(scores: &[f64], labels: &[bool]) -> Option<f64> {
    if scores.len() != labels.len() || scores.iter().any(|s| s.is_nan()) {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_unstable_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // 2U in integers, so the only rounding is the final division.
    let (mut negatives_below, mut twice_u) = (0u128, 0u128);
    let (mut positives, mut negatives) = (0u128, 0u128);
    let mut i = 0;
    while i < order.len() {
        let score = scores[order[i]];
        let (mut p, mut n) = (0u128, 0u128);
        // `==` (not total_cmp) so that -0.0 and 0.0, adjacent after the sort, are one tie group.
        while i < order.len() && scores[order[i]] == score {
            if labels[order[i]] {
                p += 1;
            } else {
                n += 1;
            }
            i += 1;
        }
        twice_u += 2 * p * negatives_below + p * n;
        negatives_below += n;
        positives += p;
        negatives += n;
    }
    if positives == 0 || negatives == 0 {
        return None;
    }
    Some(twice_u as f64 / (2 * positives * negatives) as f64)
}

/// The 95% Wilson score interval for `successes` out of `n` (statsmodels'
/// `proportion_confint(method="wilson")`, with z = 1.959963984540054), clamped to [0, 1]. `None` when `n` is
/// 0 or `successes > n`.
pub fn wilson(successes: u64, n: u64) -> Option<(f64, f64)> {
    if n == 0 || successes > n {
        return None;
    }
    let (none, all) = (successes == 0, successes == n);
    let (k, n) = (successes as f64, n as f64);
    let p = k / n;
    let z2 = Z95 * Z95;
    let denom = 1.0 + z2 / n;
    let center = (p + z2 / (2.0 * n)) / denom;
    let half = Z95 * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denom;
    // At 0/n and n/n the bound is exactly 0 or 1 in exact arithmetic; rounding can miss it by an ulp.
    let lo = if none { 0.0 } else { (center - half).max(0.0) };
    let hi = if all { 1.0 } else { (center + half).min(1.0) };
    Some((lo, hi))
}

/// SplitMix64 (Steele, Lea & Flood 2014): tiny, fast, and good enough for resampling indices.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// Uniform in `0..n` by the high half of a 64×64 product (Lemire); the bias, n / 2^64, is
    /// far below anything a 1000-resample percentile can show, so no rejection step.
    #[inline]
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
}

/// SplitMix64's finaliser: a bijective 64-bit hash.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a, to give each population its own random stream from one seed.
pub fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// One scored radiograph as the bootstrap sees it.
#[derive(Debug, Clone, Copy)]
pub struct Item {
    pub score: f64,
    pub truth: bool,
    pub call: bool,
}

/// What one resample yields.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// `None` when the sample lacks a class (then every resample does).
    pub auc: Option<f64>,
    pub ppv: Option<f64>,
    pub npv: Option<f64>,
}

const CALL_BIT: u32 = 1 << 31;
const GROUP_MASK: u32 = CALL_BIT - 1;

/// Items sorted once by score into tie groups. A resample then only needs how many times each
/// group was drawn among positives and among negatives: the U statistic follows in one pass over
/// the groups in score order, O(n) per resample instead of a sort.
pub struct Prepared {
    groups: usize,
    /// Per positive: its tie group, with the model's call in the top bit.
    positives: Vec<u32>,
    negatives: Vec<u32>,
}

impl Prepared {
    /// The most items [`Prepared::new`] takes: a tie-group index is packed into 31 bits.
    pub const MAX_ITEMS: usize = (1 << 31) - 1;

    /// `items` must already be in ascending score order (ties in any fixed order).
    ///
    /// # Panics
    /// With more than [`Prepared::MAX_ITEMS`] items; a caller refuses those with a message first.
    pub fn new(items: &[Item]) -> Self {
        assert!(
            items.len() <= Self::MAX_ITEMS,
            "{} items exceed the bootstrap's 2^31 - 1",
            items.len()
        );
        let mut positives = Vec::new();
        let mut negatives = Vec::new();
        let mut group: u32 = 0;
        for (i, it) in items.iter().enumerate() {
            if i > 0 && it.score != items[i - 1].score {
                group += 1;
            }
            let packed = group | if it.call { CALL_BIT } else { 0 };
            if it.truth {
                positives.push(packed);
            } else {
                negatives.push(packed);
            }
        }
        Self {
            groups: if items.is_empty() {
                0
            } else {
                group as usize + 1
            },
            positives,
            negatives,
        }
    }

    /// One stratified resample: as many positives and negatives as the sample has, each drawn
    /// with replacement from its own class. `counts` is scratch of `groups` zeros, left zeroed.
    fn resample(&self, rng: &mut SplitMix64, counts: &mut [[u32; 2]]) -> Sample {
        let (np, nn) = (self.positives.len(), self.negatives.len());
        let mut tp = 0u64;
        for _ in 0..np {
            let v = self.positives[rng.below(np)];
            counts[(v & GROUP_MASK) as usize][0] += 1;
            tp += u64::from(v >> 31);
        }
        let mut fp = 0u64;
        for _ in 0..nn {
            let v = self.negatives[rng.below(nn)];
            counts[(v & GROUP_MASK) as usize][1] += 1;
            fp += u64::from(v >> 31);
        }
        let (mut below, mut twice_u) = (0u64, 0u64);
        for c in counts.iter_mut() {
            let (p, n) = (u64::from(c[0]), u64::from(c[1]));
            twice_u += 2 * p * below + p * n;
            below += n;
            *c = [0, 0];
        }
        let (np, nn) = (np as u64, nn as u64);
        let (fn_, tn) = (np - tp, nn - fp);
        let ratio = |a: u64, b: u64| (b > 0).then(|| a as f64 / b as f64);
        Sample {
            auc: ratio(twice_u, 2 * np * nn),
            ppv: ratio(tp, tp + fp),
            npv: ratio(tn, tn + fn_),
        }
    }

    /// `resamples` stratified resamples. Resample `r` draws from its own stream (seeded from
    /// `stream` and `r`), so results do not depend on how many threads share the work.
    pub fn bootstrap(&self, resamples: usize, stream: u64) -> Vec<Sample> {
        let mut out = vec![Sample::default(); resamples];
        if resamples == 0 || self.groups == 0 {
            return out;
        }
        let run = |first: usize, chunk: &mut [Sample]| {
            let mut counts = vec![[0u32; 2]; self.groups];
            for (k, slot) in chunk.iter_mut().enumerate() {
                let r = (first + k) as u64;
                let mut rng = SplitMix64::new(mix64(stream ^ mix64(r.wrapping_add(1))));
                *slot = self.resample(&mut rng, &mut counts);
            }
        };
        let work = (self.positives.len() + self.negatives.len()).saturating_mul(resamples);
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(resamples);
        // Spawning costs tens of microseconds: small populations run inline.
        if threads <= 1 || work < 1 << 18 {
            run(0, &mut out);
            return out;
        }
        let per = resamples.div_ceil(threads);
        std::thread::scope(|s| {
            for (t, chunk) in out.chunks_mut(per).enumerate() {
                let run = &run;
                s.spawn(move || run(t * per, chunk));
            }
        });
        out
    }
}

/// The percentile interval (2.5th, 97.5th) of `values`, interpolating linearly between order
/// statistics as numpy's default `percentile` does. `None` when `values` is empty.
pub fn percentile_ci(mut values: Vec<f64>) -> Option<(f64, f64)> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable_by(f64::total_cmp);
    let at = |q: f64| {
        let h = (values.len() - 1) as f64 * q;
        let lo = h.floor() as usize;
        let hi = (lo + 1).min(values.len() - 1);
        values[lo] + (h - lo as f64) * (values[hi] - values[lo])
    };
    Some((at(0.025), at(0.975)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(scores: &[f64], truth: &[bool]) -> Vec<Item> {
        let mut v: Vec<Item> = scores
            .iter()
            .zip(truth)
            .map(|(&score, &truth)| Item {
                score,
                truth,
                call: score >= 0.5,
            })
            .collect();
        v.sort_by(|a, b| a.score.total_cmp(&b.score));
        v
    }

    /// The O(n) resample AUC must equal the sorting AUC on the same multiset.
    #[test]
    fn resample_auc_matches_direct_auc() {
        let mut rng = SplitMix64::new(7);
        let scores: Vec<f64> = (0..300).map(|_| (rng.below(20) as f64) / 20.0).collect();
        let truth: Vec<bool> = (0..300).map(|i| (i % 3 == 0) ^ (scores[i] > 0.6)).collect();
        let it = items(&scores, &truth);
        let prep = Prepared::new(&it);
        let pos: Vec<Item> = it.iter().copied().filter(|i| i.truth).collect();
        let neg: Vec<Item> = it.iter().copied().filter(|i| !i.truth).collect();
        let mut counts = vec![[0u32; 2]; prep.groups];
        for seed in 0..20 {
            let mut a = SplitMix64::new(seed);
            let mut b = SplitMix64::new(seed);
            let got = prep.resample(&mut a, &mut counts);
            let mut s = Vec::new();
            let mut l = Vec::new();
            for _ in 0..pos.len() {
                s.push(pos[b.below(pos.len())].score);
                l.push(true);
            }
            for _ in 0..neg.len() {
                s.push(neg[b.below(neg.len())].score);
                l.push(false);
            }
            assert!((got.auc.unwrap() - auc(&s, &l).unwrap()).abs() < 1e-15);
            assert!(counts.iter().all(|c| *c == [0, 0]));
        }
    }

    #[test]
    fn percentile_interpolates() {
        let v: Vec<f64> = (0..=100).map(f64::from).collect();
        assert_eq!(percentile_ci(v), Some((2.5, 97.5)));
        assert_eq!(percentile_ci(vec![3.0]), Some((3.0, 3.0)));
        assert_eq!(percentile_ci(vec![]), None);
    }

    #[test]
    fn bootstrap_independent_of_threads() {
        let scores: Vec<f64> = (0..2000).map(|i| ((i * 37) % 101) as f64 / 100.0).collect();
        let truth: Vec<bool> = (0..2000).map(|i| i % 4 == 0 || scores[i] > 0.9).collect();
        let prep = Prepared::new(&items(&scores, &truth));
        let all = prep.bootstrap(200, 42);
        // 1 resample at a time runs inline: must give the same numbers as the threaded run.
        for r in [0usize, 57, 199] {
            let mut counts = vec![[0u32; 2]; prep.groups];
            let mut rng = SplitMix64::new(mix64(42 ^ mix64(r as u64 + 1)));
            assert_eq!(prep.resample(&mut rng, &mut counts).auc, all[r].auc);
        }
    }
}
