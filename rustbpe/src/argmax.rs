//! Greedy decoding's argmax per row (`nanoctl.model.kernels.argmax_rows`).
//!
//! torch's CPU argmax over a (rows x 32768) fp32 tensor ran at ~1 G elements/s on the 2-core boxes
//! (0.45 ms for 16 rows: as long as a third of the head's matmul at that batch). Here a row is one
//! 8-wide max pass and one scan for the first index holding it, with torch's semantics: the first
//! maximal index wins, and a NaN counts as the maximum (the first NaN's index).

fn argmax_generic(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x.is_nan() {
            return i;
        }
        if x > row[best] {
            best = i;
        }
    }
    best
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn argmax_avx2(row: &[f32]) -> usize {
    use std::arch::x86_64::*;
    let n = row.len();
    let p = row.as_ptr();
    let mut i = 0;
    let mut acc = [_mm256_set1_ps(f32::NEG_INFINITY); 4];
    let mut nan = _mm256_setzero_ps();
    while i + 32 <= n {
        for (j, a) in acc.iter_mut().enumerate() {
            let x = _mm256_loadu_ps(p.add(i + 8 * j));
            nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
            *a = _mm256_max_ps(*a, x);
        }
        i += 32;
    }
    if _mm256_movemask_ps(nan) != 0 {
        return argmax_generic(row);
    }
    let m = _mm256_max_ps(_mm256_max_ps(acc[0], acc[1]), _mm256_max_ps(acc[2], acc[3]));
    let mut lanes = [0.0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), m);
    let mut max = lanes.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    for &x in &row[i..] {
        if x.is_nan() {
            return argmax_generic(row);
        }
        max = max.max(x);
    }
    // The first index holding the maximum: 8 at a time, then the lane.
    let target = _mm256_set1_ps(max);
    let mut k = 0;
    while k + 8 <= n {
        let hit = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_loadu_ps(p.add(k)), target));
        if hit != 0 {
            return k + hit.trailing_zeros() as usize;
        }
        k += 8;
    }
    k + row[k..].iter().position(|&x| x == max).unwrap_or(0)
}

/// out[r] = argmax of row r of `x` (rows x cols, row-major); cols > 0.
pub fn argmax_rows(x: &[f32], cols: usize, out: &mut [i64]) {
    assert!(cols > 0 && x.len() >= out.len() * cols);
    #[cfg(target_arch = "x86_64")]
    let simd = is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    let simd = false;
    for (r, o) in out.iter_mut().enumerate() {
        let row = &x[r * cols..(r + 1) * cols];
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: the CPU has AVX2 (checked above).
            *o = unsafe { argmax_avx2(row) } as i64;
            continue;
        }
        let _ = simd;
        *o = argmax_generic(row) as i64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_maximum_and_nan_like_torch() {
        let cols = 77; // a tail past the 32-wide blocks and the 8-wide scan
        let mut x: Vec<f32> = (0..3 * cols).map(|i| ((i * 7919 % 1000) as f32) / 1000.0 - 0.5).collect();
        x[5] = 9.0; // row 0: the max in the first block...
        x[60] = 9.0; // ...and again later: the first wins
        x[cols + 76] = 9.0; // row 1: the max in the scalar tail
        x[2 * cols + 40] = f32::NAN; // row 2: a NaN beats everything
        x[2 * cols + 3] = 100.0;
        let mut out = vec![-1i64; 3];
        argmax_rows(&x, cols, &mut out);
        assert_eq!(out, vec![5, 76, 40]);
        for r in 0..3 {
            assert_eq!(out[r] as usize, argmax_generic(&x[r * cols..(r + 1) * cols]));
        }
    }
}
