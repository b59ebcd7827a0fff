//! The per-service consistent-hash lookup table ("Maglev table") that the data path indexes
//! with `flow_hash(5-tuple) % size`.
//!
//! # Design
//!
//! Every member keeps Maglev's preference list: a permutation of all `M` entries given by
//! `offset = h1(key) % M`, `skip = h2(key) % (M - 1) + 1` (with `M` prime), position `i` being
//! entry `(offset + i * skip) % M`.
//!
//! Unlike plain Maglev, entries are not handed out round robin. Position `i` of member `s`
//! carries the score `E = -ln(1 - (i + 1) / (M + 1)) * (1 / w_s)`, the `i`-th order statistic of an
//! exponential race with rate `w_s`, and entry `j` belongs to the member with the smallest
//! `(score, key)` among all members that list it (which is every member). That is a
//! rendezvous (highest-random-weight) choice per entry, so:
//!
//! * each member wins an entry with probability `w_s / sum(w)`: weighted shares;
//! * an entry's owner depends only on the members' own scores for that entry, so removing a
//!   member changes exactly the entries it owned, adding one only takes entries, and raising
//!   a member's weight only moves entries to it (strict minimal disruption);
//! * the result depends only on the set of `(key, weight)` pairs, not on their order.
//!
//! The table is built in two passes instead of merging the members' score sequences in order
//! (which takes about `M ln M` heap steps): each member walks its list while its score is
//! below a threshold, which settles all but about `M / n` entries in about `M ln n` steps,
//! and the rest get every member's score computed directly from its position. The tests
//! check the result against the heap merge.
//!
//! The logarithms come from a small portable implementation that uses only IEEE-754 basic
//! operations (no libm), so agents on different platforms or C libraries compute bit-identical
//! scores and therefore identical tables.

use std::sync::{Arc, Mutex};

use crate::NO_SERVER;

/// One server's claim on a table: a stable key (same on every agent) and a weight (0 = no new flows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    pub key: u64,
    pub weight: u32,
}

/// Builds a table of `size` entries (size must be prime, >= 2); each entry is the index into
/// `members` of the chosen member, or crate::NO_SERVER.
///
/// Keys should be unique; members with weight 0 take no entries, and if no member has a
/// weight above 0 every entry is [`NO_SERVER`]. The result depends only on the multiset of
/// members, not on their order (entries are reported as indexes into `members`).
///
/// # Panics
///
/// If `size` is not a prime (use [`is_prime`] to validate configuration first), or if there
/// are `u32::MAX` or more members.
pub fn build(members: &[Member], size: u32) -> Vec<u32> {
    assert!(
        is_prime(size),
        "consistent-hash table size {size} is not a prime >= 2"
    );
    assert!(
        members.len() < NO_SERVER as usize,
        "too many members for a consistent-hash table"
    );

    let m = size as usize;
    let mut table = vec![NO_SERVER; m];

    let order = canonical_order(members);
    if order.is_empty() {
        return table;
    }
    let ln = ln_table(size);
    let modulus = Modulus::new(size);
    let lists: Vec<List> = order
        .iter()
        .map(|&i| List::new(members[i as usize], size, &modulus))
        .collect();

    // 1. Every member walks its list while its score is below `threshold`, and each entry
    //    keeps the smallest (score, rank) seen. An entry reached this way has its final
    //    owner: every position not walked scores `threshold` or more (scores only grow
    //    along a list). The scores of one entry are exponential with rates w_s, so an entry
    //    stays unreached with probability exp(-threshold * sum(w)); with threshold
    //    ln(n) / sum(w) that leaves about 1/n of the entries, after about m * ln(n) steps.
    let total_weight: f64 = lists.iter().map(|l| l.weight).sum();
    let threshold = ((lists.len().max(2) as f64).ln() / total_weight) as f32;
    // Each entry's best as one integer, `score bits << 32 | rank` (the bits of non-negative
    // floats order like the floats), so keeping the best is a branch-free `min`: whether a
    // step improves its entry is a coin toss for a branch predictor.
    let mut best: Vec<u64> = vec![u64::MAX; m];
    for (rank, list) in lists.iter().enumerate() {
        let steps = ln.partition_point(|&ln_i| list.score(ln_i) < threshold);
        let mut pos = list.offset as usize;
        for &ln_i in &ln[..steps] {
            let candidate = pack(list.score(ln_i), rank);
            best[pos] = best[pos].min(candidate);
            pos += list.skip as usize;
            if pos >= m {
                pos -= m;
            }
        }
    }
    // 2. The entries nobody reached: each member's score for it, directly (its position in
    //    the member's list is `(entry - offset) / skip` modulo m).
    for (entry, owner) in best.iter_mut().enumerate() {
        if *owner != u64::MAX {
            continue;
        }
        for (rank, list) in lists.iter().enumerate() {
            let i = list.position(entry as u32, &modulus);
            *owner = (*owner).min(pack(list.score(ln[i as usize]), rank));
        }
    }
    for (entry, &owner) in table.iter_mut().zip(&best) {
        *entry = order[owner as u32 as usize];
    }
    table
}

/// The members taking part (weight above 0), as caller indexes in a canonical order (by key,
/// then weight, then caller index for exact duplicates): a member's rank in it breaks ties
/// between equal scores, so the result does not depend on the caller's order.
fn canonical_order(members: &[Member]) -> Vec<u32> {
    let mut order: Vec<u32> = (0..members.len() as u32)
        .filter(|&i| members[i as usize].weight > 0)
        .collect();
    order.sort_unstable_by_key(|&i| (members[i as usize].key, members[i as usize].weight, i));
    order
}

/// A score and the member's rank as one integer that orders by `(score, rank)`.
#[inline]
fn pack(score: f32, rank: usize) -> u64 {
    u64::from(score.to_bits()) << 32 | rank as u64
}

/// Arithmetic modulo the table size (a prime below 2^32), with Barrett reduction: the
/// direct position computation is a multiply, not a 64-bit division.
struct Modulus {
    m: u64,
    /// floor(2^64 / m).
    mu: u128,
}

impl Modulus {
    fn new(m: u32) -> Self {
        Modulus {
            m: u64::from(m),
            mu: (1u128 << 64) / u128::from(m),
        }
    }

    /// `x mod m` for any `x < 2^64`.
    #[inline]
    fn reduce(&self, x: u64) -> u64 {
        let q = ((u128::from(x) * self.mu) >> 64) as u64;
        let r = x - q * self.m;
        // The estimate is low by at most one.
        if r >= self.m {
            r - self.m
        } else {
            r
        }
    }

    #[inline]
    fn mul(&self, a: u32, b: u32) -> u32 {
        self.reduce(u64::from(a) * u64::from(b)) as u32
    }

    /// `a^(m-2) = a^-1 mod m` (Fermat: m is prime), for `0 < a < m`.
    fn inverse(&self, a: u32) -> u32 {
        let mut result = 1u32;
        let mut base = a;
        let mut e = self.m - 2;
        while e > 0 {
            if e & 1 == 1 {
                result = self.mul(result, base);
            }
            base = self.mul(base, base);
            e >>= 1;
        }
        result
    }
}

/// A member's preference list: position `i` is entry `(offset + i * skip) % m`.
struct List {
    offset: u32,
    skip: u32,
    /// `skip^-1 mod m`: the position of entry `j` is `(j - offset) * skip^-1 mod m`.
    inverse_skip: u32,
    weight: f64,
    /// `1 / weight`: a score is `ln[i] * inverse_weight` (a multiply per step, not a division).
    inverse_weight: f64,
}

impl List {
    fn new(member: Member, size: u32, modulus: &Modulus) -> Self {
        let (offset, skip) = permutation(member.key, size);
        List {
            offset,
            skip,
            inverse_skip: modulus.inverse(skip),
            weight: f64::from(member.weight),
            inverse_weight: 1.0 / f64::from(member.weight),
        }
    }

    /// The score of a position whose logarithm is `ln_i`, rounded to single precision: the
    /// table's working set (a best score per entry) then stays in a core's cache. Rounding
    /// keeps scores non-decreasing along a list; equal scores go to the lower key.
    #[inline]
    fn score(&self, ln_i: f64) -> f32 {
        (ln_i * self.inverse_weight) as f32
    }

    /// The position of `entry` in this list.
    #[inline]
    fn position(&self, entry: u32, modulus: &Modulus) -> u32 {
        let m = modulus.m as u32;
        let delta = if entry >= self.offset {
            entry - self.offset
        } else {
            entry + (m - self.offset)
        };
        modulus.mul(delta, self.inverse_skip)
    }
}

/// Stable key for a server identity string (e.g. "10.0.2.11" or a server name): FNV-1a 64.
pub fn member_key(identity: &str) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    identity.bytes().fold(FNV_OFFSET, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
    })
}

/// True if n is prime (used to validate configured table sizes).
pub fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    let n = u64::from(n);
    let mut d = 5u64;
    while d * d <= n {
        if n.is_multiple_of(d) || n.is_multiple_of(d + 2) {
            return false;
        }
        d += 6;
    }
    true
}

/// Number of entries of `table` held by each member index `0..n` (entries that are
/// [`NO_SERVER`] or out of range are not counted).
pub fn shares(table: &[u32], n: usize) -> Vec<usize> {
    let mut counts = vec![0usize; n];
    for &entry in table {
        if let Some(count) = counts.get_mut(entry as usize) {
            *count += 1;
        }
    }
    counts
}

/// splitmix64's finaliser: a bijective 64-bit mixer with full avalanche.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn h1(key: u64) -> u64 {
    mix64(key.wrapping_add(0x9e37_79b9_7f4a_7c15))
}

fn h2(key: u64) -> u64 {
    mix64(key.wrapping_add(0x3c6e_f372_fe94_f82a) ^ 0x5851_f42d_4c95_7f2d)
}

/// Maglev's `(offset, skip)` for a key in a table of prime size `m`.
fn permutation(key: u64, m: u32) -> (u32, u32) {
    let m = u64::from(m);
    let offset = h1(key) % m;
    let skip = h2(key) % (m - 1) + 1;
    (offset as u32, skip as u32)
}

/// The last table of logarithms built, shared by every build with the same size.
static LN_CACHE: Mutex<Option<(u32, Arc<[f64]>)>> = Mutex::new(None);

/// `ln[i] = -ln(1 - (i + 1) / (m + 1)) = ln((m + 1) / (m - i))` for `i` in `0..m`:
/// the unit-rate exponential quantile of position `i`. Depends only on `m`.
fn ln_table(m: u32) -> Arc<[f64]> {
    if let Some((cached_m, table)) = &*LN_CACHE.lock().unwrap_or_else(|e| e.into_inner()) {
        if *cached_m == m {
            return Arc::clone(table);
        }
    }
    let total = u64::from(m) + 1;
    let mut table: Vec<f64> = Vec::with_capacity(m as usize);
    let mut previous = 0.0f64;
    for i in 0..u64::from(m) {
        // Strictly increasing in exact arithmetic with gaps far above the rounding error;
        // the max() merely guarantees the merge's invariant (non-decreasing scores).
        let value = ln_ratio(total, u64::from(m) - i).max(previous);
        table.push(value);
        previous = value;
    }
    let table: Arc<[f64]> = table.into();
    *LN_CACHE.lock().unwrap_or_else(|e| e.into_inner()) = Some((m, Arc::clone(&table)));
    table
}

/// `ln(a / b)` for `a > b >= 1` (both below 2^53), using only IEEE-754 basic operations so
/// the result is bit-identical on every platform. Relative error is a few ulps.
fn ln_ratio(a: u64, b: u64) -> f64 {
    debug_assert!(a > b && b >= 1);
    // ln(x) = e * ln 2 + 2 atanh(z) with x = 2^e * m, z = (m - 1) / (m + 1), m in [1/√2, √2).
    let (e, z) = if (a as f64) < std::f64::consts::SQRT_2 * (b as f64) {
        // Near 1: form z straight from the integers, avoiding cancellation in m - 1.
        (0i64, (a - b) as f64 / (a + b) as f64)
    } else {
        let x = a as f64 / b as f64; // >= 1, finite, normal
        let bits = x.to_bits();
        let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023;
        let mut m = f64::from_bits((bits & ((1u64 << 52) - 1)) | (1023u64 << 52)); // [1, 2)
        if m >= std::f64::consts::SQRT_2 {
            m *= 0.5; // exact
            e += 1;
        }
        (e, (m - 1.0) / (m + 1.0))
    };
    // |z| <= (√2 - 1) / (√2 + 1) < 0.1716, z^2 < 0.0295: 13 terms reach below 2^-60.
    let z2 = z * z;
    let mut series = 2.0 / 25.0;
    for k in (0..12).rev() {
        series = series * z2 + 2.0 / (2 * k + 1) as f64;
    }
    e as f64 * std::f64::consts::LN_2 + z * series
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::time::Instant;

    const M: u32 = 65537;

    use std::cmp::Ordering;
    use std::collections::binary_heap::{BinaryHeap, PeekMut};

    /// The first implementation, kept as the reference: merges the members' score
    /// sequences with a binary heap; the first member to reach an entry is its argmin.
    fn build_by_merge(members: &[Member], size: u32) -> Vec<u32> {
        let m = size as usize;
        let mut table = vec![NO_SERVER; m];
        let order = canonical_order(members);
        if order.is_empty() {
            return table;
        }
        let ln = ln_table(size);
        let mut cursors: Vec<Cursor> = Vec::with_capacity(order.len());
        let mut heap: BinaryHeap<Head> = BinaryHeap::with_capacity(order.len());
        for (slot, &caller_index) in order.iter().enumerate() {
            let member = members[caller_index as usize];
            let (offset, skip) = permutation(member.key, size);
            let weight = f64::from(member.weight);
            cursors.push(Cursor {
                pos: offset,
                skip,
                next: 0,
                weight,
                caller_index,
            });
            heap.push(Head::new(
                (ln[0] * (1.0 / weight)) as f32 as f64,
                slot as u32,
            ));
        }
        let mut unclaimed = m;
        while unclaimed > 0 {
            let Some(mut top) = heap.peek_mut() else {
                break;
            };
            let cursor = &mut cursors[top.slot() as usize];
            let entry = &mut table[cursor.pos as usize];
            if *entry == NO_SERVER {
                *entry = cursor.caller_index;
                unclaimed -= 1;
            }
            cursor.next += 1;
            if cursor.next == size {
                PeekMut::pop(top);
            } else {
                let pos = u64::from(cursor.pos) + u64::from(cursor.skip);
                cursor.pos = if pos >= u64::from(size) {
                    (pos - u64::from(size)) as u32
                } else {
                    pos as u32
                };
                top.set_score((ln[cursor.next as usize] * (1.0 / cursor.weight)) as f32 as f64);
            }
        }
        table
    }

    /// A member's walk along its preference list.
    struct Cursor {
        /// Entry at position `next`.
        pos: u32,
        skip: u32,
        /// Position in the preference list.
        next: u32,
        weight: f64,
        /// Index into the caller's slice, written into the table.
        caller_index: u32,
    }

    /// A heap element: the next score of the member in `slot`, packed as
    /// `score bits << 64 | slot` so one integer comparison orders by `(score, slot)`. The bits of
    /// non-negative finite floats order like the floats. Ordered in reverse so that `BinaryHeap`
    /// (a max-heap) yields the smallest first.
    #[derive(PartialEq, Eq)]
    struct Head(u128);

    impl Head {
        #[inline]
        fn new(score: f64, slot: u32) -> Self {
            Head(u128::from(score.to_bits()) << 64 | u128::from(slot))
        }

        #[inline]
        fn slot(&self) -> u32 {
            self.0 as u32
        }

        #[inline]
        fn set_score(&mut self, score: f64) {
            *self = Head::new(score, self.slot());
        }
    }

    impl Ord for Head {
        #[inline]
        fn cmp(&self, other: &Self) -> Ordering {
            other.0.cmp(&self.0)
        }
    }

    impl PartialOrd for Head {
        fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
            Some(self.cmp(other))
        }
    }

    fn members(weights: &[u32]) -> Vec<Member> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Member {
                key: member_key(&format!("10.0.{}.{}", i / 250, i % 250 + 1)),
                weight,
            })
            .collect()
    }

    /// The table with entries replaced by the owning member's key (0 for none).
    fn by_key(table: &[u32], members: &[Member]) -> Vec<u64> {
        table
            .iter()
            .map(|&e| {
                if e == NO_SERVER {
                    0
                } else {
                    members[e as usize].key
                }
            })
            .collect()
    }

    /// Asserts every member's share is within 1 percentage point of its weighted share and
    /// returns the worst absolute deviation in percentage points.
    fn check_shares(weights: &[u32]) -> f64 {
        let members = members(weights);
        let table = build(&members, M);
        assert_eq!(table.len(), M as usize);
        assert!(table.iter().all(|&e| (e as usize) < members.len()));
        let counts = shares(&table, members.len());
        assert_eq!(counts.iter().sum::<usize>(), M as usize);
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let mut worst = 0.0f64;
        for (i, (&count, &w)) in counts.iter().zip(weights).enumerate() {
            let expected = 100.0 * w as f64 / total as f64;
            let actual = 100.0 * count as f64 / M as f64;
            let deviation = (actual - expected).abs();
            assert!(
                deviation <= 1.0,
                "member {i} weight {w}: {actual:.3}% vs expected {expected:.3}%"
            );
            worst = worst.max(deviation);
        }
        println!(
            "{} members: worst share deviation {worst:.4} percentage points",
            weights.len()
        );
        worst
    }

    fn mixed_weights(n: usize) -> Vec<u32> {
        (0..n).map(|i| [1, 2, 3, 5, 8, 10, 1, 4][i % 8]).collect()
    }

    #[test]
    fn shares_three_equal() {
        check_shares(&[1, 1, 1]);
        check_shares(&[100, 100, 100]);
    }

    #[test]
    fn shares_weights_1_to_4() {
        check_shares(&[1, 2, 3, 4]);
    }

    #[test]
    fn shares_ten_mixed() {
        check_shares(&[1, 2, 3, 5, 8, 10, 1, 4, 20, 6]);
    }

    #[test]
    fn shares_hundred() {
        check_shares(&[1; 100]);
        check_shares(&mixed_weights(100));
    }

    #[test]
    fn shares_report_worst() {
        let sets: Vec<Vec<u32>> = vec![
            vec![1, 1, 1],
            vec![1, 2, 3, 4],
            vec![1, 2, 3, 5, 8, 10, 1, 4, 20, 6],
            vec![1; 100],
            mixed_weights(100),
            vec![1, 1000],
        ];
        let worst = sets.iter().map(|s| check_shares(s)).fold(0.0, f64::max);
        println!("worst share deviation over all sets: {worst:.4} percentage points");
    }

    #[test]
    fn removal_moves_only_the_removed_members_entries() {
        for n in [3usize, 10, 100] {
            let all = members(&mixed_weights(n));
            let before = by_key(&build(&all, M), &all);
            for k in [0, n / 2, n - 1] {
                let removed = all[k].key;
                let rest: Vec<Member> = all.iter().copied().filter(|m| m.key != removed).collect();
                let after = by_key(&build(&rest, M), &rest);
                let mut moved = 0;
                for (j, (&b, &a)) in before.iter().zip(&after).enumerate() {
                    if b == removed {
                        assert_ne!(a, removed, "n={n} k={k}: entry {j} still removed member");
                        assert_ne!(a, 0, "n={n} k={k}: entry {j} lost its server");
                        moved += 1;
                    } else {
                        assert_eq!(a, b, "n={n} k={k}: entry {j} changed needlessly");
                    }
                }
                assert!(moved > 0, "n={n} k={k}: removed member owned nothing");
            }
        }
    }

    #[test]
    fn adding_a_member_only_takes_entries() {
        for n in [3usize, 10, 100] {
            let old = members(&mixed_weights(n));
            let before = by_key(&build(&old, M), &old);
            let newcomer = Member {
                key: member_key("192.168.77.1"),
                weight: 3,
            };
            let mut new = old.clone();
            new.insert(n / 2, newcomer);
            let after = by_key(&build(&new, M), &new);
            let mut taken = 0;
            for (&b, &a) in before.iter().zip(&after) {
                if a == newcomer.key {
                    taken += 1;
                } else {
                    assert_eq!(a, b, "n={n}: an entry moved between old members");
                }
            }
            assert!(taken > 0);
        }
    }

    #[test]
    fn raising_a_weight_only_moves_entries_to_that_member() {
        let low = members(&mixed_weights(10));
        let mut high = low.clone();
        high[4].weight *= 3;
        let before = by_key(&build(&low, M), &low);
        let after = by_key(&build(&high, M), &high);
        let target = low[4].key;
        let mut gained = 0;
        for (&b, &a) in before.iter().zip(&after) {
            if a != b {
                assert_eq!(a, target);
                gained += 1;
            } else if b == target {
                assert_eq!(a, target);
            }
        }
        assert!(gained > 0);
    }

    #[test]
    fn input_order_does_not_matter() {
        let original = members(&mixed_weights(50));
        let reference = by_key(&build(&original, M), &original);
        let mut reversed = original.clone();
        reversed.reverse();
        assert_eq!(by_key(&build(&reversed, M), &reversed), reference);
        let mut shuffled = original.clone();
        // A deterministic shuffle.
        let mut state = 12345u64;
        for i in (1..shuffled.len()).rev() {
            state = mix64(state.wrapping_add(0x9e37_79b9_7f4a_7c15));
            shuffled.swap(i, (state % (i as u64 + 1)) as usize);
        }
        assert_ne!(shuffled, original);
        assert_eq!(by_key(&build(&shuffled, M), &shuffled), reference);
        // Building twice gives the same table.
        assert_eq!(build(&original, M), build(&original, M));
    }

    #[test]
    fn weight_zero_takes_nothing_and_equals_removal() {
        let mut all = members(&[1, 2, 3, 4, 5]);
        all[2].weight = 0;
        let table = build(&all, M);
        let counts = shares(&table, all.len());
        assert_eq!(counts[2], 0);
        assert_eq!(counts.iter().sum::<usize>(), M as usize);
        let rest: Vec<Member> = all.iter().copied().filter(|m| m.weight > 0).collect();
        assert_eq!(by_key(&table, &all), by_key(&build(&rest, M), &rest));
    }

    #[test]
    fn no_usable_members_gives_no_server() {
        assert!(build(&[], M).iter().all(|&e| e == NO_SERVER));
        assert_eq!(build(&[], 7).len(), 7);
        let idle = members(&[0, 0, 0]);
        let table = build(&idle, M);
        assert_eq!(table.len(), M as usize);
        assert!(table.iter().all(|&e| e == NO_SERVER));
        assert_eq!(shares(&table, 3), vec![0, 0, 0]);
    }

    #[test]
    fn small_tables_are_full() {
        for size in [2u32, 3, 5, 7, 13, 251] {
            let ms = members(&[1, 2, 3]);
            let table = build(&ms, size);
            assert_eq!(table.len(), size as usize);
            assert!(table.iter().all(|&e| e < 3), "size {size}");
            let single = build(&ms[..1], size);
            assert!(single.iter().all(|&e| e == 0), "size {size}");
        }
    }

    #[test]
    #[should_panic(expected = "not a prime")]
    fn non_prime_size_panics() {
        build(&members(&[1]), 65536);
    }

    #[test]
    fn permutations_cover_every_entry() {
        for key in [0u64, 1, u64::MAX, member_key("a"), member_key("10.0.2.11")] {
            for m in [2u32, 3, 13, M] {
                let (offset, skip) = permutation(key, m);
                assert!(offset < m && (1..m).contains(&skip));
                let mut seen = vec![false; m as usize];
                let mut pos = offset as u64;
                for _ in 0..m {
                    assert!(!seen[pos as usize]);
                    seen[pos as usize] = true;
                    pos = (pos + skip as u64) % m as u64;
                }
            }
        }
    }

    #[test]
    fn portable_ln_is_accurate_and_monotone() {
        for m in [2u32, 3, 13, 251, M, 1_000_003] {
            let total = m as u64 + 1;
            let mut previous = 0.0;
            for i in (0..m as u64).step_by((m as usize / 5000).max(1)) {
                let ours = ln_ratio(total, m as u64 - i);
                // ln((m + 1) / (m - i)) = ln(1 + (i + 1) / (m - i)), free of cancellation.
                let exact = ((i + 1) as f64 / (m as u64 - i) as f64).ln_1p();
                let err = ((ours - exact) / exact).abs();
                assert!(err < 1e-13, "m={m} i={i}: {ours} vs {exact}");
                assert!(ours > previous);
                previous = ours;
            }
        }
        let table = ln_table(M);
        assert_eq!(table.len(), M as usize);
        assert!(table.windows(2).all(|w| w[0] < w[1]));
        assert!(table[0] > 0.0 && table[M as usize - 1].is_finite());
    }

    #[test]
    fn member_key_is_fnv1a() {
        assert_eq!(member_key(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(member_key("a"), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(member_key("10.0.2.11"), member_key("10.0.2.12"));
    }

    #[test]
    fn primes() {
        let small: Vec<u32> = (0..50).filter(|&n| is_prime(n)).collect();
        assert_eq!(
            small,
            [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47]
        );
        assert!(is_prime(65537));
        assert!(is_prime(crate::DEFAULT_RING_SIZE));
        assert!(!is_prime(65536));
        assert!(!is_prime(65535));
        assert!(is_prime(1_000_003));
        assert!(!is_prime(1_000_001));
        assert!(is_prime(4_294_967_291));
        assert!(!is_prime(u32::MAX));
        assert!(!is_prime(65521 * 65521)); // square of a prime
    }

    /// The threshold walk with its direct tail gives exactly the table of the heap merge:
    /// many member counts, weights (equal, mixed, extreme), sizes, and duplicate keys.
    #[test]
    fn build_equals_the_merge_reference() {
        let mut cases: Vec<(Vec<Member>, u32)> = Vec::new();
        for n in [1usize, 2, 3, 7, 50, 300, 1000] {
            cases.push((members(&vec![100; n]), M));
            cases.push((members(&mixed_weights(n)), M));
        }
        cases.push((members(&[1, 1_000_000]), M));
        cases.push((members(&[u32::MAX, 1, 7]), M));
        cases.push((members(&[0, 3, 0, 5]), M));
        for size in [2u32, 3, 13, 251, 4099] {
            cases.push((members(&[1, 2, 3, 4, 5]), size));
            cases.push((members(&mixed_weights(40)), size));
        }
        let mut dup = members(&[4, 4, 9]);
        dup[1].key = dup[0].key;
        cases.push((dup.clone(), M));
        dup[1].weight = 9;
        cases.push((dup, 251));
        for (ms, size) in &cases {
            assert_eq!(
                build(ms, *size),
                build_by_merge(ms, *size),
                "{} members, size {size}",
                ms.len()
            );
        }
    }

    #[test]
    fn modular_arithmetic() {
        for m in [2u32, 3, 13, M, 1_000_003, 4_294_967_291] {
            let modulus = Modulus::new(m);
            for x in [
                0u64,
                1,
                m as u64 - 1,
                m as u64,
                u64::MAX,
                u64::MAX - 1,
                1 << 63,
            ] {
                assert_eq!(modulus.reduce(x), x % m as u64, "{x} mod {m}");
            }
            for a in [1u32, 2, m / 2, m - 1] {
                if a % m == 0 {
                    continue;
                }
                assert_eq!(modulus.mul(a, modulus.inverse(a)), 1, "{a}^-1 mod {m}");
            }
        }
    }

    #[test]
    fn build_time_1000_members() {
        let ms = members(&mixed_weights(1000));
        // The logarithm table alone (built once per size and cached).
        let start = Instant::now();
        let sum: f64 = (0..u64::from(M))
            .map(|i| ln_ratio(u64::from(M) + 1, u64::from(M) - i))
            .sum();
        println!("ln table for M={M}: {:?} (sum {sum:.1})", start.elapsed());
        let mut times = Vec::new();
        let mut table = Vec::new();
        for _ in 0..5 {
            let start = Instant::now();
            table = build(&ms, M);
            times.push(start.elapsed());
        }
        times.sort();
        println!(
            "build of 1000 members at M={M}: min {:?}, median {:?}, max {:?}",
            times[0], times[2], times[4]
        );
        let start = Instant::now();
        let reference = build_by_merge(&ms, M);
        println!("the heap merge, same members: {:?}", start.elapsed());
        assert_eq!(table, reference);
        assert_eq!(shares(&table, ms.len()).iter().sum::<usize>(), M as usize);
        let mut seen: HashMap<u32, usize> = HashMap::new();
        for &e in &table {
            *seen.entry(e).or_default() += 1;
        }
        assert_eq!(seen.len(), 1000, "every member got entries");
    }
}
