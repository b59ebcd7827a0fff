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
    let order = canonical_order(members);
    if order.is_empty() {
        return vec![NO_SERVER; m];
    }
    if let [only] = order[..] {
        // Every entry is its own.
        return vec![only; m];
    }
    let ln = ln_table(size);
    let modulus = Modulus::new(size);
    let mut lists: Vec<List> = order
        .iter()
        .map(|&i| List::new(members[i as usize], size))
        .collect();
    invert_skips(&mut lists, &modulus);

    // 1. Every member walks its list while its score is below `threshold`, and each entry
    //    keeps the smallest (score, rank) seen. An entry reached this way has its final
    //    owner: every position not walked scores `threshold` or more (scores only grow
    //    along a list). The scores of one entry are exponential with rates w_s, so an entry
    //    stays unreached with probability exp(-threshold * sum(w)); with threshold
    //    (ln(n) + c) / sum(w) that leaves about e^-c / n of the entries, after about
    //    m * (ln(n) + c) steps. An unreached entry costs n direct computations (step 2),
    //    each a few times a step of the walk (a random read of the logarithms), so c is
    //    the logarithm of that ratio. The threshold decides only the work, never the table.
    let total_weight: f64 = lists.iter().map(|l| l.weight).sum();
    let threshold = (((lists.len().max(2) as f64).ln() + TAIL_COST_LN) / total_weight) as f32;
    let classes = walk::classes(&lists, &ln, threshold);
    let mut ranks = walk::walk(&lists, &ln, &classes, m);

    // 2. The entries nobody reached: each member's position in them, directly (the position
    //    of entry j in a list is `(j - offset) / skip` modulo m), member by member over all
    //    of them, so that the computations of different entries overlap. Within a class
    //    (one weight) the score grows with the position, so only the nearest position
    //    needs a score, and the positions just after it if rounding gave them the same.
    let unreached: Vec<u32> = (0..size)
        .filter(|&e| ranks[e as usize] == NO_SERVER)
        .collect();
    let mut best = vec![u64::MAX; unreached.len()];
    let mut nearest = vec![u64::MAX; unreached.len()];
    for class in &classes {
        nearest.fill(u64::MAX);
        for &rank in &class.ranks {
            let list = &lists[rank as usize];
            for (near, &entry) in nearest.iter_mut().zip(&unreached) {
                let i = list.position(entry, &modulus);
                *near = (*near).min(u64::from(i) << 32 | u64::from(rank));
            }
        }
        let first = &lists[class.ranks[0] as usize];
        for ((owner, &near), &entry) in best.iter_mut().zip(&nearest).zip(&unreached) {
            let (i, mut rank) = ((near >> 32) as usize, near as u32);
            let score = first.score(ln[i]);
            if ln
                .get(i + 1)
                .is_some_and(|&next| first.score(next) == score)
            {
                // Positions i..=last share the score: the lowest rank among them wins.
                // (Single-precision rounding merges neighbouring positions only in tables
                // far larger than the agent accepts, but the heap merge's result is the
                // definition.)
                let last = i + ln[i..].partition_point(|&ln_i| first.score(ln_i) == score) - 1;
                rank = class
                    .ranks
                    .iter()
                    .copied()
                    .filter(|&r| lists[r as usize].position(entry, &modulus) as usize <= last)
                    .min()
                    .unwrap_or(rank);
            }
            *owner = (*owner).min(pack(score, rank as usize));
        }
    }
    for (&entry, &owner) in unreached.iter().zip(&best) {
        ranks[entry as usize] = owner as u32;
    }
    for entry in ranks.iter_mut() {
        *entry = order[*entry as usize];
    }
    ranks
}

/// `c` of the walk's threshold `(ln(n) + c) / sum(w)`: the logarithm of what an unreached
/// entry's direct computation costs against a step of the walk (about 4x, measured).
const TAIL_COST_LN: f64 = 1.0;

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
    /// floor(2^64 / m), below 2^64 for every m >= 2: one 64x64-bit multiplication.
    mu: u64,
}

impl Modulus {
    fn new(m: u32) -> Self {
        Modulus {
            m: u64::from(m),
            mu: ((1u128 << 64) / u128::from(m)) as u64,
        }
    }

    /// `x mod m` for any `x < 2^64`.
    #[inline]
    fn reduce(&self, x: u64) -> u64 {
        let q = ((u128::from(x) * u128::from(self.mu)) >> 64) as u64;
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
    /// The list, with `inverse_skip` still to be filled in by [`invert_skips`].
    fn new(member: Member, size: u32) -> Self {
        let (offset, skip) = permutation(member.key, size);
        List {
            offset,
            skip,
            inverse_skip: 0,
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
        // Branch-free: whether the entry lies before the offset is a coin toss.
        let m = modulus.m;
        let delta = u64::from(entry) + (m - u64::from(self.offset));
        let delta = delta - m * u64::from(delta >= m);
        modulus.mul(delta as u32, self.inverse_skip)
    }
}

/// Fills in every list's `skip^-1 mod m` with a single modular inversion (Montgomery's
/// trick: invert the product of all the skips, then take each factor off with two
/// multiplications), instead of an exponentiation per member.
fn invert_skips(lists: &mut [List], modulus: &Modulus) {
    // before[k] = skip_0 * ... * skip_(k-1)
    let mut before = Vec::with_capacity(lists.len());
    let mut product = 1u32;
    for list in lists.iter() {
        before.push(product);
        product = modulus.mul(product, list.skip);
    }
    // The inverse of the product of the skips of lists[..=k], from k = last down to 0.
    let mut inverse = modulus.inverse(product);
    for (list, &before) in lists.iter_mut().zip(&before).rev() {
        list.inverse_skip = modulus.mul(inverse, before);
        inverse = modulus.mul(inverse, list.skip);
    }
}

/// Stable key for a server identity string (e.g. "10.0.2.11" or a server name): FNV-1a 64.
pub fn member_key(identity: &str) -> u64 {
    fnv1a(FNV_OFFSET, identity)
}

/// [`member_key`] of a value's `Display` form (an address), without building the string.
pub fn member_key_of(identity: impl std::fmt::Display) -> u64 {
    use std::fmt::Write as _;
    struct Hasher(u64);
    impl std::fmt::Write for Hasher {
        fn write_str(&mut self, part: &str) -> std::fmt::Result {
            self.0 = fnv1a(self.0, part);
            Ok(())
        }
    }
    let mut hasher = Hasher(FNV_OFFSET);
    // Writing into the hasher cannot fail.
    let _ = write!(hasher, "{identity}");
    hasher.0
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a 64 from `hash` on over `bytes`.
fn fnv1a(hash: u64, bytes: &str) -> u64 {
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.bytes().fold(hash, |hash, byte| {
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

/// Computes what every build of tables of `size` entries shares (a table of logarithms,
/// kept for the last size used), so that the first build does not pay for it. Optional.
///
/// # Panics
///
/// If `size` is not a prime.
pub fn prepare(size: u32) {
    assert!(
        is_prime(size),
        "consistent-hash table size {size} is not a prime >= 2"
    );
    ln_table(size);
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

mod walk;

#[cfg(test)]
mod tests;
