//! One CPU kernel for decode steps' products x @ W^T (`nanoctl.model.kernels.FewRowsMatmul`, layout
//! "packed"): the head and the block linears.
//!
//! A decode step multiplies a few rows of hidden state (M <= 32) by the whole (vocab x dim) head.
//! For so few rows MKL's sgemm ran at 10-35% of one core's FMA rate on the 2-core boxes measured,
//! and needed 3-4x the time it takes just to stream the weight once. Here the weight is packed once
//! into panels of 16 vocab rows, each (dim x 16) contiguous; for each panel every tile of up to 6
//! rows keeps its 6 x 16 outputs in registers over the whole dim (one broadcast per row and one
//! 16-wide load per dim step), so the weight is read once from memory and the FMA units stay busy.

pub const PANEL: usize = 16;
const TILE: usize = 6;
const PREFETCH_PANELS: usize = 2;

/// out (rows x out_cols, row-major, out_cols <= panels * PANEL) = x (rows x dim) @ W^T, with W
/// given as `packed` panels: packed[p][d][j] = W[p * PANEL + j][d] (zero past the vocab).
fn panels_generic(x: &[f32], rows: usize, dim: usize, packed: &[f32], panels: std::ops::Range<usize>, out: &mut [f32], out_cols: usize) {
    for p in panels {
        let panel = &packed[p * dim * PANEL..(p + 1) * dim * PANEL];
        for m in 0..rows {
            let mut acc = [0.0f32; PANEL];
            for d in 0..dim {
                let xv = x[m * dim + d];
                for j in 0..PANEL {
                    acc[j] = xv.mul_add(panel[d * PANEL + j], acc[j]);
                }
            }
            let c0 = p * PANEL;
            let n = PANEL.min(out_cols - c0);
            out[m * out_cols + c0..m * out_cols + c0 + n].copy_from_slice(&acc[..n]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{PANEL, PREFETCH_PANELS, TILE};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn panels(
        x: &[f32],
        rows: usize,
        dim: usize,
        packed: &[f32],
        panels: std::ops::Range<usize>,
        out: &mut [f32],
        out_cols: usize,
    ) {
        assert!(x.len() >= rows * dim && packed.len() >= panels.end * dim * PANEL);
        assert!(out.len() >= rows * out_cols);
        let px = x.as_ptr();
        let mut buf = [0.0f32; PANEL];
        for p in panels.clone() {
            let panel = packed.as_ptr().add(p * dim * PANEL);
            let c0 = p * PANEL;
            let n = PANEL.min(out_cols - c0);
            let mut m0 = 0;
            while m0 < rows {
                let tile = TILE.min(rows - m0);
                let mut acc = [[_mm256_setzero_ps(); 2]; TILE];
                // A panel row is one cache line: the first tile asks for the panel after next, line by
                // line, so the head streams from memory while the FMAs run (without it every panel's
                // first tile waits on DRAM: 16-32 rows ran at ~55% of the in-cache rate).
                let ahead = panel.wrapping_add(PREFETCH_PANELS * dim * PANEL);
                let fetch = m0 == 0 && p + PREFETCH_PANELS < panels.end;
                for d in 0..dim {
                    if fetch {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(d * PANEL) as *const i8);
                    }
                    let w0 = _mm256_loadu_ps(panel.add(d * PANEL));
                    let w1 = _mm256_loadu_ps(panel.add(d * PANEL + 8));
                    for (i, a) in acc.iter_mut().enumerate().take(tile) {
                        let xv = _mm256_broadcast_ss(&*px.add((m0 + i) * dim + d));
                        a[0] = _mm256_fmadd_ps(xv, w0, a[0]);
                        a[1] = _mm256_fmadd_ps(xv, w1, a[1]);
                    }
                }
                for (i, a) in acc.iter().enumerate().take(tile) {
                    let dst = out.as_mut_ptr().add((m0 + i) * out_cols + c0);
                    if n == PANEL {
                        _mm256_storeu_ps(dst, a[0]);
                        _mm256_storeu_ps(dst.add(8), a[1]);
                    } else {
                        _mm256_storeu_ps(buf.as_mut_ptr(), a[0]);
                        _mm256_storeu_ps(buf.as_mut_ptr().add(8), a[1]);
                        std::ptr::copy_nonoverlapping(buf.as_ptr(), dst, n);
                    }
                }
                m0 += tile;
            }
        }
    }
}

fn panels_best(x: &[f32], rows: usize, dim: usize, packed: &[f32], panels: std::ops::Range<usize>, out: &mut [f32], out_cols: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function was compiled for.
            unsafe { avx2::panels(x, rows, dim, packed, panels, out, out_cols) };
            return;
        }
    }
    panels_generic(x, rows, dim, packed, panels, out, out_cols)
}

/// out (rows x out_cols) = x (rows x dim) @ W^T for W packed as above (`packed.len()` a multiple of
/// dim * PANEL covering out_cols), the panels split over `threads` threads.
pub fn packed_matmul(x: &[f32], rows: usize, dim: usize, packed: &[f32], out: &mut [f32], out_cols: usize, threads: usize) {
    let panels = out_cols.div_ceil(PANEL);
    assert!(packed.len() >= panels * dim * PANEL && x.len() >= rows * dim && out.len() >= rows * out_cols);
    // A thread is spawned per call: only worth it for at least ~2M multiply-adds each.
    let threads = threads.clamp(1, panels.max(1)).min((rows * dim * out_cols >> 21).max(1));
    if threads == 1 {
        panels_best(x, rows, dim, packed, 0..panels, out, out_cols);
        return;
    }
    // Threads write disjoint column ranges of the same rows: hand each the whole buffer by address.
    let per = panels.div_ceil(threads);
    let out_addr = out.as_mut_ptr() as usize;
    let out_len = out.len();
    std::thread::scope(|scope| {
        for t in 0..threads {
            let range = t * per..((t + 1) * per).min(panels);
            if range.is_empty() {
                continue;
            }
            scope.spawn(move || {
                // SAFETY: every thread writes only the columns of its own panels.
                let out = unsafe { std::slice::from_raw_parts_mut(out_addr as *mut f32, out_len) };
                panels_best(x, rows, dim, packed, range, out, out_cols)
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_plain_matmul_for_any_rows_and_threads() {
        let (vocab, dim) = (37usize, 20usize); // a partial last panel, a dim not a multiple of 8
        let w: Vec<f32> = (0..vocab * dim).map(|i| ((i * 7919 % 1000) as f32) / 1000.0 - 0.5).collect();
        let panels = vocab.div_ceil(PANEL);
        let mut packed = vec![0.0f32; panels * dim * PANEL];
        for v in 0..vocab {
            for d in 0..dim {
                packed[(v / PANEL) * dim * PANEL + d * PANEL + v % PANEL] = w[v * dim + d];
            }
        }
        for rows in [1usize, 5, 6, 7, 13] {
            let x: Vec<f32> = (0..rows * dim).map(|i| ((i * 104729 % 997) as f32) / 997.0 - 0.5).collect();
            for threads in [1usize, 2, 3] {
                let mut out = vec![f32::NAN; rows * vocab];
                packed_matmul(&x, rows, dim, &packed, &mut out, vocab, threads);
                for m in 0..rows {
                    for v in 0..vocab {
                        let want: f32 = (0..dim).map(|d| x[m * dim + d] * w[v * dim + d]).sum();
                        let got = out[m * vocab + v];
                        assert!((got - want).abs() < 1e-4, "rows {rows} threads {threads} [{m},{v}]: {got} vs {want}");
                    }
                }
            }
        }
    }
}
