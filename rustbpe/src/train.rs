//! BPE training: count unique pieces in parallel, then merge pairs incrementally.
//!
//! Counting: each batch of documents is split into `2 x threads` groups of similar byte size; every
//! group counts its pieces in a map keyed by borrowed `&str` (no allocation per piece), and the group
//! maps are folded into one owned map per batch.
//!
//! Merging: words live in one flat `u32` arena and shrink in place. Pair counts are 64-bit and kept
//! per pair together with the list of words that (may) contain the pair. A max-heap ordered by
//! (count, smallest pair) holds at most one entry per pair; counts of existing pairs only ever drop,
//! so a popped entry whose count is stale is refreshed and pushed back (lazy update). The chosen
//! merge is therefore always "highest count, ties to the smallest (left, right) id pair", which is
//! deterministic and matches a naive reference implementation.

use std::cmp::Reverse;

use ahash::AHashMap;
use dary_heap::OctonaryHeap;
use rayon::prelude::*;

use crate::keys::{ShortKey, SHORT};
use crate::split::Splitter;

pub type Pair = (u32, u32);

#[inline(always)]
fn key(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

/// Unique pieces of the corpus with their frequencies.
#[derive(Default)]
pub struct PieceCounts {
    short: AHashMap<ShortKey, i64>,
    long: AHashMap<Box<[u8]>, i64>,
    pub pieces: u64,
}

impl PieceCounts {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn unique(&self) -> usize {
        self.short.len() + self.long.len()
    }

    /// (piece bytes, count) for every unique piece, in no particular order.
    pub fn for_each(&self, mut f: impl FnMut(&[u8], i64)) {
        for (k, &c) in &self.short {
            let (b, n) = k.bytes();
            f(&b[..n], c);
        }
        for (k, &c) in &self.long {
            f(k, c);
        }
    }

    /// Split and count a batch of documents in parallel.
    pub fn add_batch<S: AsRef<str> + Sync>(&mut self, splitter: &Splitter, docs: &[S]) -> Result<(), String> {
        if docs.is_empty() {
            return Ok(());
        }
        let total: usize = docs.iter().map(|d| d.as_ref().len()).sum();
        let groups = (rayon::current_num_threads() * 2).max(1);
        let target = total / groups + 1;
        // Contiguous groups of roughly equal bytes (documents vary from a line to a book).
        let mut bounds = vec![0usize];
        let mut acc = 0;
        for (i, d) in docs.iter().enumerate() {
            acc += d.as_ref().len();
            if acc >= target && i + 1 < docs.len() {
                bounds.push(i + 1);
                acc = 0;
            }
        }
        bounds.push(docs.len());
        // Per-batch counts fit in u32 (a batch holds at most a few hundred MB).
        type Local<'a> = (AHashMap<ShortKey, u32>, AHashMap<&'a str, i64>, u64);
        let maps: Vec<Result<Local<'_>, String>> = bounds
            .par_windows(2)
            .map(|w| {
                let mut short: AHashMap<ShortKey, u32> = AHashMap::with_capacity(1 << 14);
                let mut long: AHashMap<&str, i64> = AHashMap::new();
                let mut n = 0u64;
                for d in &docs[w[0]..w[1]] {
                    splitter.for_each(d.as_ref(), |p| {
                        n += 1;
                        if p.len() <= SHORT {
                            *short.entry(ShortKey::new(p.as_bytes())).or_insert(0) += 1;
                        } else {
                            *long.entry(p).or_insert(0) += 1;
                        }
                    })?;
                }
                Ok((short, long, n))
            })
            .collect();
        for r in maps {
            let (short, long, n) = r?;
            self.pieces += n;
            self.short.reserve(short.len() / 4);
            for (k, c) in short {
                *self.short.entry(k).or_insert(0) += c as i64;
            }
            for (p, c) in long {
                if let Some(v) = self.long.get_mut(p.as_bytes()) {
                    *v += c;
                } else {
                    self.long.insert(p.as_bytes().into(), c);
                }
            }
        }
        Ok(())
    }
}

/// All words (unique pieces of >= 2 bytes) as token ids in one arena; words shrink in place.
struct Words {
    ids: Vec<u32>,
    start: Vec<usize>,
    len: Vec<u32>,
    count: Vec<i64>,
}

impl Words {
    fn from_counts(counts: PieceCounts) -> Words {
        // Single-byte pieces hold no pair, so they never take part in a merge.
        let mut entries: Vec<(Vec<u8>, i64)> = Vec::with_capacity(counts.unique());
        counts.for_each(|k, c| {
            if k.len() >= 2 {
                entries.push((k.to_vec(), c));
            }
        });
        drop(counts);
        let total: usize = entries.iter().map(|(k, _)| k.len()).sum();
        let mut w = Words {
            ids: Vec::with_capacity(total),
            start: Vec::with_capacity(entries.len()),
            len: Vec::with_capacity(entries.len()),
            count: Vec::with_capacity(entries.len()),
        };
        for (k, c) in entries {
            w.start.push(w.ids.len());
            w.len.push(k.len() as u32);
            w.count.push(c);
            w.ids.extend(k.iter().map(|&b| b as u32));
        }
        w
    }

    fn get(&self, i: usize) -> &[u32] {
        &self.ids[self.start[i]..self.start[i] + self.len[i] as usize]
    }
}

struct PairStat {
    count: i64,
    /// Words that contain (or once contained) the pair, ascending, no duplicates.
    words: Vec<u32>,
}

/// Statistics about a training run (for logs and the CLI summary).
#[derive(Clone, Debug, Default)]
pub struct MergeStats {
    pub unique_words: usize,
    pub initial_pairs: usize,
}

/// Learn up to `num_merges` merges. `progress(done, total)` is called about every 1% and may abort.
/// Merge i creates token id 256 + i from the returned pair.
pub fn train_merges<E>(
    counts: PieceCounts,
    num_merges: usize,
    mut progress: impl FnMut(usize, usize) -> Result<(), E>,
) -> Result<(Vec<Pair>, MergeStats), E> {
    let mut words = Words::from_counts(counts);
    let nw = words.count.len();
    let mut stats = MergeStats { unique_words: nw, initial_pairs: 0 };

    // Initial pair counts and pair -> words index: collect (pair, word) occurrences in parallel, sort,
    // then group. Sorting gives each pair's word list in ascending order.
    let mut occ: Vec<(u64, u32)> = (0..nw)
        .into_par_iter()
        .with_min_len(4096)
        .flat_map_iter(|w| {
            let ids = words.get(w);
            ids.windows(2).map(move |p| (key(p[0], p[1]), w as u32))
        })
        .collect();
    occ.par_sort_unstable();
    let mut index: AHashMap<u64, u32> = AHashMap::new();
    let mut slots: Vec<PairStat> = Vec::new();
    let mut heap_init: Vec<(i64, Reverse<u64>)> = Vec::new();
    let mut i = 0;
    while i < occ.len() {
        let k = occ[i].0;
        let mut count = 0i64;
        let mut ws = Vec::new();
        while i < occ.len() && occ[i].0 == k {
            let w = occ[i].1;
            count += words.count[w as usize];
            if ws.last() != Some(&w) {
                ws.push(w);
            }
            i += 1;
        }
        index.insert(k, slots.len() as u32);
        slots.push(PairStat { count, words: ws });
        heap_init.push((count, Reverse(k)));
    }
    drop(occ);
    stats.initial_pairs = slots.len();
    let mut heap = OctonaryHeap::from(heap_init);

    let mut merges: Vec<Pair> = Vec::with_capacity(num_merges);
    let report_every = (num_merges / 100).max(1);
    let mut next_report = report_every;
    // Per-merge scratch: decrements of existing pairs, and the new pairs (all contain the new id).
    let mut dec: AHashMap<u64, i64> = AHashMap::new();
    let mut newp: AHashMap<u64, (i64, Vec<u32>)> = AHashMap::new();

    while merges.len() < num_merges {
        let Some((c, Reverse(k))) = heap.pop() else {
            break;
        };
        let slot = index[&k] as usize;
        let cur = slots[slot].count;
        if cur != c {
            if cur > 0 {
                heap.push((cur, Reverse(k)));
            }
            continue;
        }
        if c <= 0 {
            break;
        }
        let (a, b) = ((k >> 32) as u32, k as u32);
        let z = 256 + merges.len() as u32;
        merges.push((a, b));

        let wl = std::mem::take(&mut slots[slot].words);
        for &w in &wl {
            let wi = w as usize;
            let wc = words.count[wi];
            let s = words.start[wi];
            let n = words.len[wi] as usize;
            let ids = &mut words.ids[s..s + n];
            let mut add = |pk: u64, d: i64| {
                if (pk >> 32) as u32 == z || pk as u32 == z {
                    let e = newp.entry(pk).or_insert_with(|| (0, Vec::new()));
                    e.0 += d;
                    if d > 0 && e.1.last() != Some(&w) {
                        e.1.push(w);
                    }
                } else {
                    *dec.entry(pk).or_insert(0) += d;
                }
            };
            // In-place left-to-right merge; `o` (write) never passes `r` (read).
            let (mut r, mut o) = (0usize, 0usize);
            while r < n {
                if r + 1 < n && ids[r] == a && ids[r + 1] == b {
                    if o > 0 {
                        let x = ids[o - 1];
                        add(key(x, a), -wc);
                        add(key(x, z), wc);
                    }
                    add(k, -wc);
                    if r + 2 < n {
                        let y = ids[r + 2];
                        add(key(b, y), -wc);
                        add(key(z, y), wc);
                    }
                    ids[o] = z;
                    o += 1;
                    r += 2;
                } else {
                    ids[o] = ids[r];
                    o += 1;
                    r += 1;
                }
            }
            words.len[wi] = o as u32;
        }
        for (pk, d) in dec.drain() {
            let sl = *index.get(&pk).expect("pair seen in a word is indexed") as usize;
            slots[sl].count += d;
        }
        debug_assert_eq!(slots[slot].count, 0);
        for (pk, (cnt, ws)) in newp.drain() {
            if cnt > 0 {
                index.insert(pk, slots.len() as u32);
                slots.push(PairStat { count: cnt, words: ws });
                heap.push((cnt, Reverse(pk)));
            }
        }
        if merges.len() >= next_report && merges.len() < num_merges {
            next_report += report_every;
            progress(merges.len(), num_merges)?;
        }
    }
    // Always a final report, also when the corpus ran out of pairs before `num_merges`.
    progress(merges.len(), num_merges)?;
    Ok((merges, stats))
}

/// Byte strings of every token: 256 single bytes, then one per merge (rank = id).
pub fn token_bytes(merges: &[Pair]) -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    for &(a, b) in merges {
        let mut t = v[a as usize].clone();
        t.extend_from_slice(&v[b as usize]);
        v.push(t);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::split::GPT4_PATTERN_N2;

    fn train_texts(texts: &[&str], num_merges: usize) -> Vec<Pair> {
        let sp = Splitter::new(GPT4_PATTERN_N2).unwrap();
        let mut pc = PieceCounts::new();
        pc.add_batch(&sp, texts).unwrap();
        train_merges::<()>(pc, num_merges, |_, _| Ok(())).unwrap().0
    }

    /// Straightforward BPE: recount all pairs every step, pick the highest count, ties to the
    /// smallest pair, merge left to right.
    fn naive(texts: &[&str], num_merges: usize) -> Vec<Pair> {
        let sp = Splitter::new(GPT4_PATTERN_N2).unwrap();
        let mut counts: std::collections::BTreeMap<Vec<u32>, i64> = Default::default();
        for t in texts {
            for p in sp.split(t).unwrap() {
                *counts.entry(p.bytes().map(|b| b as u32).collect()).or_insert(0) += 1;
            }
        }
        let mut words: Vec<(Vec<u32>, i64)> = counts.into_iter().collect();
        let mut merges = Vec::new();
        for m in 0..num_merges {
            let mut pc: std::collections::BTreeMap<Pair, i64> = Default::default();
            for (w, c) in &words {
                for p in w.windows(2) {
                    *pc.entry((p[0], p[1])).or_insert(0) += c;
                }
            }
            let Some((&best, _)) = pc.iter().max_by(|x, y| x.1.cmp(y.1).then(y.0.cmp(x.0))) else {
                break;
            };
            let z = 256 + m as u32;
            for (w, _) in words.iter_mut() {
                let mut out = Vec::with_capacity(w.len());
                let mut i = 0;
                while i < w.len() {
                    if i + 1 < w.len() && (w[i], w[i + 1]) == best {
                        out.push(z);
                        i += 2;
                    } else {
                        out.push(w[i]);
                        i += 1;
                    }
                }
                *w = out;
            }
            merges.push(best);
        }
        merges
    }

    #[test]
    fn matches_naive_reference() {
        let texts = [
            "the cat sat on the mat; the cat ate the rat. aaaa aaa aa abab ababab",
            "Numbers 12345 and 678, don't we'll they're! Ünïcödé 中文 文字 😀😀",
            "hello hello hello world world  \n\n  indentation\tand\ttabs\r\n",
        ];
        for n in [1, 10, 60, 200] {
            assert_eq!(train_texts(&texts, n), naive(&texts, n), "num_merges={n}");
        }
    }

    #[test]
    fn repeated_bytes_overlap() {
        // "aaaa" with (a,a) merged twice in a row: counts must handle overlapping occurrences.
        let m = train_texts(&["aaaaaaa aaaa aaa"], 5);
        assert_eq!(m, naive(&["aaaaaaa aaaa aaa"], 5));
        assert_eq!(m[0], (97, 97));
    }

    #[test]
    fn stops_when_nothing_left_to_merge() {
        let m = train_texts(&["ab"], 100);
        assert_eq!(m, vec![(97, 98)]);
        assert!(train_texts(&["a b c"], 10).iter().all(|&(a, _)| a == 32));
    }

    #[test]
    fn token_bytes_concatenate() {
        let tb = token_bytes(&[(104, 105), (256, 33)]);
        assert_eq!(tb.len(), 258);
        assert_eq!(tb[257], b"hi!".to_vec());
    }
}
