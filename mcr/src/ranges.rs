//! Sorted disjoint address ranges, `(start, end)`: what a layer of pages covers, what
//! may go where, what is left.

/// Sorted ranges merged where they touch or overlap.
pub fn merge(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// The parts of sorted disjoint `a` outside sorted disjoint `b`.
pub fn subtract(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut j = 0;
    for &(s, e) in a {
        let mut at = s;
        while j < b.len() && b[j].1 <= at {
            j += 1;
        }
        let mut k = j;
        while k < b.len() && b[k].0 < e {
            if b[k].0 > at {
                out.push((at, b[k].0));
            }
            at = at.max(b[k].1);
            k += 1;
        }
        if at < e {
            out.push((at, e));
        }
    }
    out
}

/// Sorted disjoint ranges in both `a` and `b`. Each range of the shorter list is looked
/// up in the longer by halves: a fill asks this once per chunk of a round, one range
/// against a hundred thousand, and a walk from the start made that quadratic (7 s of a
/// 4 GiB round's 145k pages were spent here).
pub fn intersect(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let (short, long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    let mut out = Vec::new();
    let mut from = 0;
    for &(s, e) in short {
        from += long[from..].partition_point(|r| r.1 <= s);
        for &(x, y) in long[from..].iter().take_while(|r| r.0 < e) {
            let (x, y) = (x.max(s), y.min(e));
            if x < y {
                out.push((x, y));
            }
        }
    }
    out
}

/// Sorted disjoint `a` and `b` together, merged where they touch: one pass, for lists
/// that are sorted already.
pub fn union(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        let next = if j == b.len() || (i < a.len() && a[i].0 <= b[j].0) {
            i += 1;
            a[i - 1]
        } else {
            j += 1;
            b[j - 1]
        };
        match out.last_mut() {
            Some(last) if next.0 <= last.1 => last.1 = last.1.max(next.1),
            _ => out.push(next),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_arithmetic() {
        let a = [(0, 10), (20, 30), (40, 50)];
        let b = [(5, 25), (45, 60)];
        assert_eq!(intersect(&a, &b), vec![(5, 10), (20, 25), (45, 50)]);
        assert_eq!(subtract(&a, &b), vec![(0, 5), (25, 30), (40, 45)]);
        assert_eq!(subtract(&a, &[]), a.to_vec());
        assert_eq!(
            subtract(&[(0, 100)], &[(10, 20), (30, 40)]),
            vec![(0, 10), (20, 30), (40, 100)]
        );
        assert_eq!(
            merge(vec![(20, 30), (0, 10), (10, 15), (25, 40)]),
            vec![(0, 15), (20, 40)]
        );
        assert_eq!(
            union(&[(0, 10), (30, 40)], &[(5, 12), (12, 20), (50, 60)]),
            vec![(0, 20), (30, 40), (50, 60)]
        );
        assert_eq!(union(&[], &b), b.to_vec());
        assert_eq!(union(&a, &b), merge([&a[..], &b[..]].concat()));
    }

    /// Against the page-by-page answer, on lists of every shape (one range against
    /// many, many against one, interleaved, touching).
    #[test]
    fn intersect_agrees_with_pages() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for _ in 0..300 {
            let mut lists = [(); 2].map(|_| {
                let n = [1, 2, 40][next(3) as usize];
                let v: Vec<(u64, u64)> = (0..n)
                    .map(|_| {
                        let s = next(200);
                        (s, s + 1 + next(12))
                    })
                    .collect();
                merge(v)
            });
            let [a, b] = std::mem::take(&mut lists);
            let pages =
                |v: &[(u64, u64)]| -> Vec<u64> { v.iter().flat_map(|&(s, e)| s..e).collect() };
            let got = intersect(&a, &b);
            let want: Vec<u64> = pages(&a)
                .into_iter()
                .filter(|p| b.iter().any(|&(s, e)| s <= *p && *p < e))
                .collect();
            assert_eq!(pages(&got), want, "{a:?} and {b:?}");
            assert!(
                got.windows(2).all(|w| w[0].1 <= w[1].0),
                "{got:?} sorted, disjoint"
            );
            assert_eq!(got, intersect(&b, &a));
        }
    }
}
