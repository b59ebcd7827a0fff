//! The table builder against a reference build (the heap merge of the members' score
//! sequences), and its shares and disruption properties.
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
fn member_key_of_an_address_is_that_of_its_text() {
    use std::net::IpAddr;
    for text in [
        "10.0.2.11",
        "0.0.0.0",
        "fd00::1",
        "2001:db8::a:b:c:d",
        "::ffff:10.1.2.3",
    ] {
        let address: IpAddr = text.parse().unwrap();
        assert_eq!(member_key_of(address), member_key(&address.to_string()));
    }
    assert_eq!(member_key_of("s1"), member_key("s1"));
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
    // More weights than the walk's 32-bit keys take (its 64-bit keys).
    let many: Vec<u32> = (1..=40).map(|w| w * 3).collect();
    cases.push((members(&many), M));
    cases.push((members(&many), 4099));
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

/// The walk's two key widths give the same owners: 32-bit keys (score indexes, few weights)
/// and 64-bit keys (score bits).
#[test]
fn compact_and_wide_walks_agree() {
    let cases = [
        (members(&vec![100; 1000]), M),
        (members(&mixed_weights(300)), M),
        (members(&[1, 1_000_000]), M),
        (members(&[u32::MAX, 1, 7]), 4099),
        (members(&[5]), 13),
    ];
    for (ms, size) in &cases {
        let modulus = Modulus::new(*size);
        let ln = ln_table(*size);
        let mut lists: Vec<List> = canonical_order(ms)
            .iter()
            .map(|&i| List::new(ms[i as usize], *size))
            .collect();
        invert_skips(&mut lists, &modulus);
        let total: f64 = lists.iter().map(|l| l.weight).sum();
        for threshold in [0.5 / total, 3.0 / total, 12.0 / total] {
            let classes = walk::classes(&lists, &ln, threshold as f32);
            let compact = walk::walk(&lists, &ln, &classes, *size as usize);
            let wide = walk::walk_wide(&lists, &ln, &classes, *size as usize);
            assert_eq!(compact, wide, "{} members, size {size}", ms.len());
            assert!(compact.contains(&NO_SERVER) || threshold > 1.0 / total);
        }
        for (k, list) in lists.iter().enumerate() {
            assert_eq!(modulus.mul(list.skip, list.inverse_skip), 1, "list {k}");
        }
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
