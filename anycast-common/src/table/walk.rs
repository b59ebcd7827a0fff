//! Step 1 of a table build: every member walks its list while its score is below the
//! threshold, and each entry keeps the smallest `(score, rank)` it sees.
//!
//! The walk is a random read-modify-write of one word per step over the whole table, so its
//! cost is that of the memory the table's working set touches. Two things keep it small:
//!
//! * Members of the same weight have the same scores along their lists, so the scores are
//!   computed once per weight (a class), not once per step.
//! * When there are few classes, the distinct scores below the threshold are few too, and a
//!   score is replaced by its index among them: `(index, rank)` orders exactly like
//!   `(score, rank)` and fits in 32 bits, so the working set is half that of
//!   `score bits << 32 | rank` (which stays the way when it does not fit).
use super::{List, NO_SERVER};

/// The members of one weight: their lists have the same scores.
pub(super) struct Class {
    /// How many positions of their lists score below the threshold.
    steps: usize,
    /// The members' ranks.
    pub(super) ranks: Vec<u32>,
}

impl Class {
    /// The scores below the threshold, in list order (non-decreasing).
    fn scores<'a>(&self, lists: &'a [List], ln: &'a [f64]) -> impl Iterator<Item = f32> + 'a {
        let list = &lists[self.ranks[0] as usize];
        ln[..self.steps].iter().map(|&ln_i| list.score(ln_i))
    }
}

/// At most this many classes for 32-bit keys: the distinct scores are merged class by class.
const MAX_COMPACT_CLASSES: usize = 8;

/// The rank of the member that owns each entry the walk reaches, [`NO_SERVER`] for the
/// entries it does not reach.
pub(super) fn walk(lists: &[List], ln: &[f64], classes: &[Class], m: usize) -> Vec<u32> {
    let rank_bits = u32::BITS - (lists.len() as u32 - 1).leading_zeros();
    match compact_keys(lists, ln, classes, rank_bits) {
        Some(keys) => {
            let mut best = walk_keys(lists, classes, m, |c, buffer: &mut Vec<u32>| {
                buffer.extend_from_slice(&keys[c]);
            });
            let mask = ((1u64 << rank_bits) - 1) as u32;
            for b in best.iter_mut() {
                *b = if *b == u32::MAX { NO_SERVER } else { *b & mask };
            }
            best
        }
        None => walk_keys(lists, classes, m, |c, buffer: &mut Vec<u64>| {
            let scores = classes[c].scores(lists, ln);
            buffer.extend(scores.map(|s| u64::from(s.to_bits()) << 32));
        })
        .into_iter()
        .map(|b| if b == u64::MAX { NO_SERVER } else { b as u32 })
        .collect(),
    }
}

/// [`walk`] with 64-bit keys whatever the classes: what the 32-bit keys must agree with.
#[cfg(test)]
pub(super) fn walk_wide(lists: &[List], ln: &[f64], classes: &[Class], m: usize) -> Vec<u32> {
    walk_keys(lists, classes, m, |c, buffer: &mut Vec<u64>| {
        let scores = classes[c].scores(lists, ln);
        buffer.extend(scores.map(|s| u64::from(s.to_bits()) << 32));
    })
    .into_iter()
    .map(|b| if b == u64::MAX { NO_SERVER } else { b as u32 })
    .collect()
}

/// The members grouped by weight, each group with its number of positions below the
/// threshold.
pub(super) fn classes(lists: &[List], ln: &[f64], threshold: f32) -> Vec<Class> {
    let mut by_weight: Vec<u32> = (0..lists.len() as u32).collect();
    by_weight.sort_by(|&a, &b| {
        lists[a as usize]
            .weight
            .total_cmp(&lists[b as usize].weight)
    });
    let mut classes: Vec<Class> = Vec::new();
    for rank in by_weight {
        let list = &lists[rank as usize];
        match classes.last_mut() {
            Some(class) if lists[class.ranks[0] as usize].weight == list.weight => {
                class.ranks.push(rank);
            }
            _ => classes.push(Class {
                steps: ln.partition_point(|&ln_i| list.score(ln_i) < threshold),
                ranks: vec![rank],
            }),
        }
    }
    classes
}

/// Each class's keys `index << rank_bits`, where `index` numbers the distinct scores of all
/// classes in increasing order (equal scores, equal index), if there are few classes and
/// every key with a rank fits below `u32::MAX` (the "not reached" value).
fn compact_keys(
    lists: &[List],
    ln: &[f64],
    classes: &[Class],
    rank_bits: u32,
) -> Option<Vec<Vec<u32>>> {
    let total: usize = classes.iter().map(|c| c.steps).sum();
    if classes.len() > MAX_COMPACT_CLASSES || (total as u64) << rank_bits > u64::from(u32::MAX) {
        return None;
    }
    let scores: Vec<Vec<u32>> = classes
        .iter()
        .map(|c| c.scores(lists, ln).map(f32::to_bits).collect())
        .collect();
    let mut keys: Vec<Vec<u32>> = classes
        .iter()
        .map(|c| Vec::with_capacity(c.steps))
        .collect();
    // A merge of the classes' sorted scores. Non-negative floats order like their bits.
    let mut index = 0u32;
    let mut last: Option<u32> = None;
    loop {
        let next = keys
            .iter()
            .zip(&scores)
            .enumerate()
            .filter_map(|(c, (k, s))| s.get(k.len()).map(|&bits| (bits, c)))
            .min();
        let Some((bits, c)) = next else { break };
        if last.is_some_and(|l| l != bits) {
            index += 1;
        }
        last = Some(bits);
        keys[c].push(index << rank_bits);
    }
    Some(keys)
}

/// A packed `(score, rank)` that orders like the pair.
trait Key: Copy + Ord {
    const NONE: Self;
    fn with_rank(self, rank: u32) -> Self;
}

impl Key for u32 {
    const NONE: Self = u32::MAX;
    #[inline]
    fn with_rank(self, rank: u32) -> Self {
        self | rank
    }
}

impl Key for u64 {
    const NONE: Self = u64::MAX;
    #[inline]
    fn with_rank(self, rank: u32) -> Self {
        self | u64::from(rank)
    }
}

/// The walk itself: each entry's smallest key. Keeping the best is a branch-free `min`:
/// whether a step improves its entry is a coin toss for a branch predictor. A list is walked
/// as [`CHAINS`] interleaved lists (positions `k, k + CHAINS, ...`), so that the next
/// position's addition and wrap-around are not one chain of dependent instructions through
/// the whole walk.
fn walk_keys<K: Key>(
    lists: &[List],
    classes: &[Class],
    m: usize,
    mut keys_of: impl FnMut(usize, &mut Vec<K>),
) -> Vec<K> {
    let mut best = vec![K::NONE; m];
    let mut keys = Vec::new();
    let wide = m as u64;
    for (c, class) in classes.iter().enumerate() {
        keys.clear();
        keys_of(c, &mut keys);
        for &rank in &class.ranks {
            let list = &lists[rank as usize];
            let (offset, skip) = (u64::from(list.offset), u64::from(list.skip));
            let stride = (CHAINS as u64 * skip % wide) as usize;
            let mut pos: [usize; CHAINS] =
                std::array::from_fn(|k| ((offset + k as u64 * skip) % wide) as usize);
            let mut steps = keys.chunks_exact(CHAINS);
            for chunk in &mut steps {
                for (pos, &key) in pos.iter_mut().zip(chunk) {
                    best[*pos] = best[*pos].min(key.with_rank(rank));
                    *pos += stride;
                    if *pos >= m {
                        *pos -= m;
                    }
                }
            }
            for (&pos, &key) in pos.iter().zip(steps.remainder()) {
                best[pos] = best[pos].min(key.with_rank(rank));
            }
        }
    }
    best
}

/// Interleaved walks per list (4 measured 0.55x the time of 1 here).
const CHAINS: usize = 4;
