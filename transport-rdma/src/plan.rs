//! Which queue pairs a connection has and which one each slice takes. Pure.
//!
//! A connection joins local NIC `k mod L` with the peer's NIC `k mod R` for every
//! `k < max(L, R)` (`L`, `R`: the NIC counts of the two sides), so every NIC on both
//! sides carries traffic; a local NIC whose partner runs another link layer (InfiniBand
//! against RoCE cannot talk) is joined with the next of the peer's NICs that matches.
//! Each pair gets the configured number of RC queue pairs.
//!
//! Slice `n` of a connection leaves on the `n mod m`-th of the `m` pairs whose local NIC
//! is preferred for the slice's memory (see `topology`), on that pair's queue pair
//! `(n / m) mod q`: consecutive slices of one request spread over NICs first, then over
//! queue pairs.

use crate::device::LinkLayer;
use crate::topology::NicSet;

/// One (local NIC, remote NIC) path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pair {
    /// Index of the local NIC.
    pub local: usize,
    /// Index of the peer's NIC (its rail: the key of a remote region on it is
    /// `RemoteKeys::rail(remote)`).
    pub remote: usize,
}

/// The pairs a connection opens between NICs with link layers `local` and `remote`, in
/// order; empty when no two share a link layer.
pub fn pair_nics(local: &[LinkLayer], remote: &[LinkLayer]) -> Vec<Pair> {
    let (l, r) = (local.len(), remote.len());
    let mut pairs: Vec<Pair> = Vec::new();
    for k in 0..l.max(r) {
        if l == 0 || r == 0 {
            break;
        }
        let li = k % l;
        let found = (0..r)
            .map(|step| (k + step) % r)
            .find(|&ri| remote[ri] == local[li]);
        if let Some(ri) = found {
            let p = Pair {
                local: li,
                remote: ri,
            };
            if !pairs.contains(&p) {
                pairs.push(p);
            }
        }
    }
    pairs
}

/// Where slice `n` goes: `(pair index, queue pair index within the pair)`, among the
/// pairs whose local NIC is in `preferred` (every pair when none is). `None` only when
/// there are no pairs or no queue pairs.
pub fn pick(
    pairs: &[Pair],
    preferred: NicSet,
    qps_per_pair: usize,
    n: u64,
) -> Option<(usize, usize)> {
    if pairs.is_empty() || qps_per_pair == 0 {
        return None;
    }
    let in_set = |p: &Pair| p.local < 64 && preferred >> p.local & 1 == 1;
    let m = pairs.iter().filter(|p| in_set(p)).count();
    let (m, filter_on) = if m == 0 {
        (pairs.len(), false)
    } else {
        (m, true)
    };
    let nth = (n % m as u64) as usize;
    let pair = pairs
        .iter()
        .enumerate()
        .filter(|(_, p)| !filter_on || in_set(p))
        .nth(nth)
        .map(|(i, _)| i)?;
    let qp = ((n / m as u64) % qps_per_pair as u64) as usize;
    Some((pair, qp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use LinkLayer::{Ethernet as E, Infiniband as I};

    fn pairs(v: &[(usize, usize)]) -> Vec<Pair> {
        v.iter()
            .map(|&(local, remote)| Pair { local, remote })
            .collect()
    }

    #[test]
    fn every_nic_on_both_sides_is_paired() {
        assert_eq!(pair_nics(&[I, I], &[I, I]), pairs(&[(0, 0), (1, 1)]));
        assert_eq!(
            pair_nics(&[I], &[I, I, I]),
            pairs(&[(0, 0), (0, 1), (0, 2)])
        );
        assert_eq!(
            pair_nics(&[I, I, I, I], &[I, I]),
            pairs(&[(0, 0), (1, 1), (2, 0), (3, 1)])
        );
    }

    #[test]
    fn link_layers_must_match() {
        // Local 0 is RoCE, the peer's NIC 0 is IB: it joins the peer's RoCE NIC.
        assert_eq!(pair_nics(&[E, I], &[I, E]), pairs(&[(0, 1), (1, 0)]));
        assert_eq!(pair_nics(&[E], &[I, I]), Vec::new());
        assert_eq!(pair_nics(&[], &[I]), Vec::new());
    }

    #[test]
    fn slices_stripe_over_preferred_nics_then_queue_pairs() {
        let ps = pairs(&[(0, 0), (1, 1), (2, 0), (3, 1)]);
        let mut count = std::collections::HashMap::new();
        for n in 0..800 {
            let (p, q) = pick(&ps, 0b0101, 2, n).unwrap();
            assert!(ps[p].local == 0 || ps[p].local == 2, "only preferred NICs");
            *count.entry((p, q)).or_insert(0) += 1;
        }
        assert_eq!(count.len(), 4, "two pairs, two queue pairs each: {count:?}");
        assert!(count.values().all(|&c| c == 200), "{count:?}");
        // Consecutive slices change NIC first.
        assert_eq!(pick(&ps, 0b0101, 2, 0), Some((0, 0)));
        assert_eq!(pick(&ps, 0b0101, 2, 1), Some((2, 0)));
        assert_eq!(pick(&ps, 0b0101, 2, 2), Some((0, 1)));
    }

    #[test]
    fn no_preferred_pair_means_every_pair() {
        let ps = pairs(&[(0, 0), (1, 1)]);
        let used: std::collections::HashSet<usize> =
            (0..10).map(|n| pick(&ps, 0b100, 1, n).unwrap().0).collect();
        assert_eq!(used.len(), 2);
        assert_eq!(pick(&[], u64::MAX, 1, 0), None);
        assert_eq!(pick(&ps, u64::MAX, 0, 0), None);
    }
}
