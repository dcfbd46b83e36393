//! One CPU kernel for continuous-batching decode (`nanoctl.model.kv_cache.RaggedView.attend`).
//!
//! Every row of a decode step has one new query and its own number of cached keys. PyTorch's CPU
//! SDPA needs the rows padded to the longest one plus a mask, and for a single query per row it
//! streams K/V at about a third of what one core can read. Here each (row, head) reads exactly its
//! own visible keys (sliding window included) once for the scores and its values once for the
//! weighted sum: `out = softmax(scale * q . K^T) V`, softmax with the max subtracted, in fp32.
//! The two inner loops (dot product, multiply-add) use AVX2+FMA when the CPU has them (checked at
//! run time); the portable forms give the same math.

use crate::softcap::exp_f32;

/// Where one layer's cache lives: element strides of the (slot, position, kv head) axes; the last
/// axis (head dim) is contiguous.
#[derive(Clone, Copy)]
pub struct Layout {
    pub slot: usize,
    pub pos: usize,
    pub head: usize,
    pub dim: usize,
}

const LANES: usize = 32;

/// Positions ahead to prefetch. Rows' caches are far larger than L3, and a key is only a few cache
/// lines: without software prefetch one core read K/V at ~8 GB/s of the ~20 GB/s it can stream.
const PREFETCH_AHEAD: usize = 8;

/// Ask for the cache lines of `len` elements at `p` (a hint: no effect on results, never faults).
#[inline(always)]
fn prefetch<T>(p: *const T, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let bytes = len * std::mem::size_of::<T>();
        let base = p as *const i8;
        let mut off = 0;
        while off < bytes {
            // SAFETY: prefetch is a hint and does not fault, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(off)) };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len);
}

/// A cached K/V element: fp32, or fp16 (IEEE half, as raw bits) for a half-size cache
/// (`nanoctl serve --kv-dtype float16`: half the bytes each decode step reads).
pub trait Elem: Copy + Send + Sync {
    fn to_f32(self) -> f32;
    /// Eight elements at `p` as fp32 (AVX2; F16C for fp16).
    ///
    /// # Safety
    /// `p` must point at 8 readable elements, and the CPU must have AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

/// IEEE 754 binary16 bits.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(transparent)]
pub struct F16(pub u16);

impl Elem for F16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        let h = self.0 as u32;
        let sign = (h & 0x8000) << 16;
        let exp = (h >> 10) & 0x1f;
        let man = h & 0x3ff;
        let bits = if exp == 0 {
            if man == 0 {
                sign
            } else {
                // subnormal: normalize
                let mut e = 127 - 15 + 1;
                let mut m = man;
                while m & 0x400 == 0 {
                    m <<= 1;
                    e -= 1;
                }
                sign | ((e as u32) << 23) | ((m & 0x3ff) << 13)
            }
        } else if exp == 0x1f {
            sign | 0x7f80_0000 | (man << 13)
        } else {
            sign | ((exp + 127 - 15) << 23) | (man << 13)
        };
        f32::from_bits(bits)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const F16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

#[inline(always)]
fn dot_generic<E: Elem>(a: &[f32], b: &[E]) -> f32 {
    // Independent lanes so the sum can vectorize (fp adds are not reassociated otherwise).
    let mut acc = [0.0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..LANES {
            acc[i] = x[i].mul_add(y[i].to_f32(), acc[i]);
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail = x.mul_add(y.to_f32(), tail);
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn axpy_generic<E: Elem>(p: f32, v: &[E], out: &mut [f32]) {
    for (x, y) in out.iter_mut().zip(v) {
        *x = p.mul_add(y.to_f32(), *x);
    }
}

/// AVX2+FMA(+F16C) forms of the two inner loops: four 8-wide accumulators for the dot product (LLVM
/// kept the generic one scalar, ~60 ns per key), and an 8-wide multiply-add for the weighted sum.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Elem;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot<E: Elem>(a: &[f32], b: &[E]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (j, slot) in acc.iter_mut().enumerate() {
                *slot = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8 * j)), E::load8(pb.add(i + 8 * j)), *slot);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), E::load8(pb.add(i)), acc[0]);
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
        let mut total = _mm_cvtss_f32(h);
        while i < n {
            total = (*pa.add(i)).mul_add((*pb.add(i)).to_f32(), total);
            i += 1;
        }
        total
    }

    /// out = sum_t p[t] * v[t * stride ..][..out.len()], 64 outputs at a time held in 8 registers.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn weighted_sum<E: Elem>(p: &[f32], v: &[E], stride: usize, out: &mut [f32]) {
        let dim = out.len();
        assert!(p.is_empty() || (p.len() - 1) * stride + dim <= v.len());
        let pv = v.as_ptr();
        let mut c = 0;
        while c + 64 <= dim {
            let mut acc = [_mm256_setzero_ps(); 8];
            for (t, &w) in p.iter().enumerate() {
                if c == 0 {
                    super::prefetch(pv.wrapping_add((t + super::PREFETCH_AHEAD) * stride), dim);
                }
                let wv = _mm256_set1_ps(w);
                let row = pv.add(t * stride + c);
                for (j, slot) in acc.iter_mut().enumerate() {
                    *slot = _mm256_fmadd_ps(wv, E::load8(row.add(8 * j)), *slot);
                }
            }
            for (j, slot) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.as_mut_ptr().add(c + 8 * j), *slot);
            }
            c += 64;
        }
        if c < dim {
            for x in out[c..].iter_mut() {
                *x = 0.0;
            }
            for (t, &w) in p.iter().enumerate() {
                axpy(w, &v[t * stride + c..t * stride + dim], &mut out[c..]);
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy<E: Elem>(p: f32, v: &[E], out: &mut [f32]) {
        let n = v.len().min(out.len());
        let (pv, po) = (v.as_ptr(), out.as_mut_ptr());
        let w = _mm256_set1_ps(p);
        let mut i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(po.add(i), _mm256_fmadd_ps(w, E::load8(pv.add(i)), _mm256_loadu_ps(po.add(i))));
            i += 8;
        }
        while i < n {
            *po.add(i) = p.mul_add((*pv.add(i)).to_f32(), *po.add(i));
            i += 1;
        }
    }
}

#[inline(always)]
fn dot<E: Elem>(a: &[f32], b: &[E], simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only true when the CPU has AVX2, FMA and F16C (see `ragged_decode_attention`).
        return unsafe { avx2::dot(a, b) };
    }
    let _ = simd;
    dot_generic(a, b)
}

/// One (row, head): `q` (dk), keys/values of positions `start..=end` of one slot, into `out` (dv).
/// Three passes, so no step waits on the one before: all scores (independent dot products), their
/// exps (a loop LLVM vectorizes), then the weighted sum of the values with the output kept in
/// registers.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_one<E: Elem>(
    q: &[f32],
    k: &[E],
    v: &[E],
    kl: Layout,
    vl: Layout,
    k_base: usize,
    v_base: usize,
    start: usize,
    end: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    simd: bool,
) {
    scores.clear();
    let mut max = f32::NEG_INFINITY;
    for t in start..=end {
        let o = k_base + t * kl.pos;
        prefetch(k.as_ptr().wrapping_add(o + PREFETCH_AHEAD * kl.pos), kl.dim);
        let s = dot(q, &k[o..o + kl.dim], simd) * scale;
        max = max.max(s);
        scores.push(s);
    }
    let mut sum = 0.0f32;
    for s in scores.iter_mut() {
        *s = exp_f32(*s - max);
        sum += *s;
    }
    let first = v_base + start * vl.pos;
    let last = v_base + end * vl.pos + vl.dim;
    weighted_sum(scores, &v[first..last], vl.pos, out, simd);
    let inv = 1.0 / sum;
    out.iter_mut().for_each(|x| *x *= inv);
}

#[inline(always)]
fn weighted_sum_generic<E: Elem>(p: &[f32], v: &[E], stride: usize, out: &mut [f32]) {
    out.iter_mut().for_each(|x| *x = 0.0);
    for (t, &w) in p.iter().enumerate() {
        axpy_generic(w, &v[t * stride..t * stride + out.len()], out);
    }
}

#[inline(always)]
fn weighted_sum<E: Elem>(p: &[f32], v: &[E], stride: usize, out: &mut [f32], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only true when the CPU has AVX2, FMA and F16C; `v` holds p.len() rows of
        // `stride` (the last one at least out.len() long), checked by the slicing in `attend_one`.
        unsafe { avx2::weighted_sum(p, v, stride, out) };
        return;
    }
    let _ = simd;
    weighted_sum_generic(p, v, stride, out)
}

/// One decode step's attention problem: q (B, heads, kl.dim) contiguous; row b's new token sits at
/// `positions[b]` of cache slot `slots[b]` (already written) and sees keys
/// `max(0, pos - window)..=pos` (window < 0: all); `heads` is a multiple of `kv_heads` (GQA).
/// K/V elements are fp32 or fp16 (`E`); the arithmetic is fp32 either way.
#[derive(Clone, Copy)]
pub struct Batch<'a, E: Elem> {
    pub q: &'a [f32],
    pub k: &'a [E],
    pub v: &'a [E],
    pub kl: Layout,
    pub vl: Layout,
    pub heads: usize,
    pub kv_heads: usize,
    pub slots: &'a [usize],
    pub positions: &'a [usize],
    pub window: i64,
    pub scale: f32,
}

/// Rows `rows` (indices into slots/positions) of the batch; `out` holds exactly those rows.
#[inline(always)]
fn attend_rows<E: Elem>(b: &Batch<E>, rows: std::ops::Range<usize>, out: &mut [f32], simd: bool) {
    let (kl, vl) = (b.kl, b.vl);
    let group = b.heads / b.kv_heads;
    let mut scores = Vec::new();
    for (r, row) in rows.enumerate() {
        let end = b.positions[row];
        let start = if b.window >= 0 { end.saturating_sub(b.window as usize) } else { 0 };
        for h in 0..b.heads {
            let kvh = h / group;
            let qo = (row * b.heads + h) * kl.dim;
            let oo = (r * b.heads + h) * vl.dim;
            attend_one(
                &b.q[qo..qo + kl.dim],
                b.k,
                b.v,
                kl,
                vl,
                b.slots[row] * kl.slot + kvh * kl.head,
                b.slots[row] * vl.slot + kvh * vl.head,
                start,
                end,
                b.scale,
                &mut scores,
                &mut out[oo..oo + vl.dim],
                simd,
            );
        }
    }
}

/// `attend_rows` compiled for AVX2+FMA+F16C as a whole: without it the scalar `mul_add`s of the
/// softmax's exp become calls to a software fma (about 60 ns per key instead of a few).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_rows_avx2<E: Elem>(b: &Batch<E>, rows: std::ops::Range<usize>, out: &mut [f32]) {
    attend_rows(b, rows, out, true)
}

fn attend_rows_best<E: Elem>(b: &Batch<E>, rows: std::ops::Range<usize>, out: &mut [f32], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only true when the CPU has AVX2, FMA and F16C.
        unsafe { attend_rows_avx2(b, rows, out) };
        return;
    }
    attend_rows(b, rows, out, false)
}

/// out (B, heads, vl.dim) contiguous = softmax(scale q . K^T) V for every row of `b`, the rows split
/// over `threads` threads.
pub fn ragged_decode_attention<E: Elem>(b: &Batch<E>, out: &mut [f32], threads: usize) {
    let batch = b.slots.len();
    let per_row = b.heads * b.vl.dim;
    #[cfg(target_arch = "x86_64")]
    let simd = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
    #[cfg(not(target_arch = "x86_64"))]
    let simd = false;
    let threads = threads.clamp(1, batch.max(1));
    if threads == 1 {
        attend_rows_best(b, 0..batch, out, simd);
        return;
    }
    let per = batch.div_ceil(threads);
    std::thread::scope(|scope| {
        for (i, part) in out.chunks_mut(per * per_row).enumerate() {
            let rows = i * per..(i * per + part.len() / per_row);
            scope.spawn(move || attend_rows_best(b, rows, part, simd));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// fp32 -> fp16 bits, rounding to nearest even (torch does it for real caches).
    fn to_half(x: f32) -> F16 {
        let b = x.to_bits();
        let sign = ((b >> 16) & 0x8000) as u16;
        let exp = ((b >> 23) & 0xff) as i32;
        let man = b & 0x7f_ffff;
        if exp == 0xff {
            return F16(sign | 0x7c00 | if man != 0 { 0x200 } else { 0 });
        }
        let e = exp - 127 + 15;
        if e >= 0x1f {
            return F16(sign | 0x7c00);
        }
        if e <= 0 {
            if e < -10 {
                return F16(sign);
            }
            let m = man | 0x80_0000;
            let shift = (14 - e) as u32;
            let half = 1u32 << (shift - 1);
            let rest = m & ((1 << shift) - 1);
            let mut v = m >> shift;
            if rest > half || (rest == half && v & 1 == 1) {
                v += 1;
            }
            return F16(sign | v as u16);
        }
        let mut v = ((e as u32) << 10) | (man >> 13);
        let rest = man & 0x1fff;
        if rest > 0x1000 || (rest == 0x1000 && v & 1 == 1) {
            v += 1; // may carry into the exponent, up to infinity: still correct
        }
        F16(sign | v as u16)
    }

    fn naive(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>], scale: f32) -> Vec<f32> {
        let s: Vec<f64> = keys.iter().map(|k| k.iter().zip(q).map(|(a, b)| (a * b) as f64).sum::<f64>() * scale as f64).collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let p: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = p.iter().sum();
        (0..values[0].len()).map(|d| (p.iter().zip(values).map(|(w, v)| w * v[d] as f64).sum::<f64>() / z) as f32).collect()
    }

    #[test]
    fn half_conversion_round_trips_and_rounds_to_nearest_even() {
        for &x in &[0.0f32, -0.0, 1.0, -2.5, 65504.0, 6.1035156e-5, 5.9604645e-8, 1e-3, 0.1, 3.14159] {
            let h = to_half(x);
            let back = h.to_f32();
            assert!((back - x).abs() <= x.abs() * 1e-3 + 6e-8, "{x} -> {back}");
            assert_eq!(to_half(back), h, "{x}: not a fixed point");
        }
        assert_eq!(to_half(1e6).to_f32(), f32::INFINITY);
        assert!(to_half(f32::NAN).to_f32().is_nan());
        assert_eq!(to_half(1.0 + 1.0 / 2048.0).0, to_half(1.0).0); // a tie rounds to even
        for bits in 0u16..=0xffff {
            let x = F16(bits).to_f32();
            if !x.is_nan() {
                assert_eq!(to_half(x).0, bits, "bits {bits:#x}");
            }
        }
    }

    #[test]
    fn half_cache_matches_the_fp32_kernel_on_the_same_values() {
        let (slots_n, t_max, heads, d) = (2usize, 70usize, 2usize, 72usize);
        let mut seed = 99u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let n = slots_n * t_max * heads * d;
        let half: Vec<F16> = (0..2 * n).map(|_| to_half(rnd())).collect();
        let full: Vec<f32> = half.iter().map(|h| h.to_f32()).collect(); // the same values in fp32
        let kl = Layout { slot: t_max * heads * d, pos: heads * d, head: d, dim: d };
        let (slots, positions) = ([1usize, 0], [69usize, 3]);
        let q: Vec<f32> = (0..2 * heads * d).map(|_| rnd()).collect();
        for simd in [false, true] {
            let mut got = vec![0.0f32; 2 * heads * d];
            let mut want = vec![0.0f32; 2 * heads * d];
            let hb = Batch { q: &q, k: &half[..n], v: &half[n..], kl, vl: kl, heads, kv_heads: heads,
                             slots: &slots, positions: &positions, window: -1, scale: 0.2 };
            let fb = Batch { q: &q, k: &full[..n], v: &full[n..], kl, vl: kl, heads, kv_heads: heads,
                             slots: &slots, positions: &positions, window: -1, scale: 0.2 };
            #[cfg(target_arch = "x86_64")]
            let simd = simd && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
            attend_rows_best(&hb, 0..2, &mut got, simd);
            attend_rows_best(&fb, 0..2, &mut want, simd);
            assert_eq!(got, want, "simd {simd}: fp16 elements must read as exactly their fp32 values");
        }
    }

    #[test]
    fn matches_a_naive_softmax_with_windows_gqa_and_threads() {
        let (slots_n, t_max, kv_heads, heads, dk, dv) = (3usize, 40usize, 2usize, 4usize, 40usize, 36usize);
        let mut seed = 12345u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        // K and V interleaved in one buffer (as MLA's values are a slice of its keys): distinct strides
        let width = dk + dv;
        let buf: Vec<f32> = (0..slots_n * t_max * kv_heads * width).map(|_| rnd()).collect();
        let kl = Layout { slot: t_max * kv_heads * width, pos: kv_heads * width, head: width, dim: dk };
        let vl = Layout { dim: dv, ..kl };
        let slots = [2usize, 0];
        let positions = [39usize, 5];
        let q: Vec<f32> = (0..slots.len() * heads * dk).map(|_| rnd()).collect();
        for window in [-1i64, 7] {
            for threads in [1usize, 2] {
                let mut out = vec![0.0f32; slots.len() * heads * dv];
                let batch = Batch {
                    q: &q, k: &buf, v: &buf[dk..], kl, vl, heads, kv_heads,
                    slots: &slots, positions: &positions, window, scale: 0.3,
                };
                ragged_decode_attention(&batch, &mut out, threads);
                for (b, (&s, &p)) in slots.iter().zip(&positions).enumerate() {
                    let start = if window >= 0 { p.saturating_sub(window as usize) } else { 0 };
                    for h in 0..heads {
                        let kvh = h / (heads / kv_heads);
                        let at = |t: usize, off: usize, n: usize| {
                            let o = s * kl.slot + t * kl.pos + kvh * kl.head + off;
                            buf[o..o + n].to_vec()
                        };
                        let keys: Vec<Vec<f32>> = (start..=p).map(|t| at(t, 0, dk)).collect();
                        let values: Vec<Vec<f32>> = (start..=p).map(|t| at(t, dk, dv)).collect();
                        let want = naive(&q[(b * heads + h) * dk..][..dk], &keys, &values, 0.3);
                        let got = &out[(b * heads + h) * dv..][..dv];
                        for (g, w) in got.iter().zip(&want) {
                            assert!((g - w).abs() < 1e-5, "window {window} threads {threads}: {g} vs {w}");
                        }
                    }
                }
            }
        }
    }
}

