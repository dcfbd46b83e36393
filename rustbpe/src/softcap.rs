//! One CPU kernel for the model's fused head+loss (`nanoctl.model.kernels.softcap_cross_entropy`).
//!
//! The package has a single native extension, so the kernel lives here next to the tokenizer. PyTorch
//! runs the loss's elementwise tail as six passes over a (vocab x rows) fp32 buffer (tanh, scale, exp,
//! column sum, square, multiply-add), each a trip through memory; this does them in one pass:
//!
//!   z = tanh(u),  e = exp(softcap * z),  sums[c] += e,  u <- e * (1 - z^2)
//!
//! `u` holds logits / softcap. tanh and exp are branch-free polynomial forms (Cephes' expf
//! reduction) that LLVM vectorizes; compiled for AVX2+FMA and picked at run time when the CPU has them.
//! Absolute error of tanh is ~1e-7, below the rounding of the fp32 matmul that produced `u`.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// exp(x) for x in [-87, 88] (inputs are clamped), relative error ~2 ulp.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    let x = x.max(-87.0).min(88.0);
    let n = x.mul_add(LOG2E, 0.5).floor();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    // Cephes expf minimax polynomial for e^r on [-ln2/2, ln2/2]
    let mut p = 1.987_569_1e-4_f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 5.000_000_1e-1);
    let e_r = (p * r).mul_add(r, r + 1.0);
    // n is integral and in [-126, 127] after the clamp, so the conversion cannot overflow
    let bits = unsafe { (n + 127.0).to_int_unchecked::<i32>() } as u32;
    e_r * f32::from_bits(bits << 23)
}

/// tanh(u) = sign(u) * (1 - 2 / (exp(2|u|) + 1)); |u| >= 9 is +-1 to fp32 precision.
#[inline(always)]
fn tanh_f32(u: f32) -> f32 {
    let a = u.abs().min(9.0);
    let t = 1.0 - 2.0 / (exp_f32(2.0 * a) + 1.0);
    t.copysign(u)
}

#[inline(always)]
fn rows_pass(buf: &mut [f32], cols: usize, softcap: f32, sums: &mut [f32]) {
    for row in buf.chunks_exact_mut(cols) {
        for (x, s) in row.iter_mut().zip(sums.iter_mut()) {
            let z = tanh_f32(*x);
            let e = exp_f32(softcap * z);
            *s += e;
            *x = e * z.mul_add(-z, 1.0);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_pass_avx2(buf: &mut [f32], cols: usize, softcap: f32, sums: &mut [f32]) {
    rows_pass(buf, cols, softcap, sums)
}

fn rows_pass_best(buf: &mut [f32], cols: usize, softcap: f32, sums: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function was compiled for.
            unsafe { rows_pass_avx2(buf, cols, softcap, sums) };
            return;
        }
    }
    rows_pass(buf, cols, softcap, sums)
}

/// The pass over a row-major (rows x cols) buffer, split by rows over `threads` threads; `sums` (cols)
/// receives the column sums of exp (added to what it holds).
pub fn softcap_exp_grad(buf: &mut [f32], cols: usize, softcap: f32, sums: &mut [f32], threads: usize) {
    assert!(cols > 0 && buf.len() % cols == 0 && sums.len() == cols);
    let rows = buf.len() / cols;
    let threads = threads.clamp(1, rows.max(1));
    if threads == 1 {
        rows_pass_best(buf, cols, softcap, sums);
        return;
    }
    let per = rows.div_ceil(threads);
    let partials: Vec<Vec<f32>> = std::thread::scope(|scope| {
        let handles: Vec<_> = buf
            .chunks_mut(per * cols)
            .map(|part| {
                scope.spawn(move || {
                    let mut local = vec![0.0f32; cols];
                    rows_pass_best(part, cols, softcap, &mut local);
                    local
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("softcap kernel thread")).collect()
    });
    for local in partials {
        for (s, l) in sums.iter_mut().zip(local) {
            *s += l;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_tanh_track_std() {
        let mut worst_exp = 0.0f32;
        let mut worst_tanh = 0.0f32;
        let mut x = -20.0f32;
        while x <= 20.0 {
            worst_exp = worst_exp.max(((exp_f32(x) - x.exp()) / x.exp()).abs());
            worst_tanh = worst_tanh.max((tanh_f32(x) - x.tanh()).abs());
            x += 0.001;
        }
        assert!(worst_exp < 4e-7, "exp rel err {worst_exp}");
        assert!(worst_tanh < 3e-7, "tanh abs err {worst_tanh}");
    }

    #[test]
    fn threaded_pass_matches_single() {
        let cols = 5;
        let base: Vec<f32> = (0..cols * 37).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect();
        let mut one = base.clone();
        let mut s1 = vec![0.0; cols];
        softcap_exp_grad(&mut one, cols, 15.0, &mut s1, 1);
        let mut three = base.clone();
        let mut s3 = vec![0.0; cols];
        softcap_exp_grad(&mut three, cols, 15.0, &mut s3, 3);
        assert_eq!(one, three);
        for (a, b) in s1.iter().zip(&s3) {
            assert!((a - b).abs() <= 1e-6 * a.abs());
        }
        let u = base[7];
        let z = u.tanh();
        let e = (15.0 * z).exp();
        assert!((one[7] - e * (1.0 - z * z)).abs() <= 1e-5 * e);
    }
}
