//! Exact products of a u64 polynomial by a binary polynomial in Z/2^64[X]/(X^N + 1), through
//! a complex f64 FFT.
//!
//! This is the one expensive step of encryption (the mask times the key). tfhe-rs computes it
//! exactly with Karatsuba; here it is about 10x faster, still exact:
//!
//! - The u64 polynomial `a` is split into two signed 32-bit limbs, `a = hi * 2^32 + lo`, with
//!   `lo, hi` in [-2^31, 2^31). Each limb times a binary key is an integer polynomial whose
//!   coefficients are at most 2^31 * N = 2^42 in magnitude, far inside f64's 53-bit mantissa.
//! - A real negacyclic polynomial of size N is folded into N/2 complex values
//!   `z_j = (p_j + i p_{j+N/2}) w^j` with `w = exp(i pi / N)`; a cyclic FFT of size N/2 of `z`
//!   evaluates `p` at N/2 roots of X^N + 1 (the other half are their conjugates). Products
//!   are pointwise; the inverse FFT and the inverse twist give back the folded product.
//! - Every output coefficient is rounded to the nearest integer. The worst-case f64 error of
//!   the two transforms and the product is below 0.03 (SECURITY.md, "Exact mask products"),
//!   so the rounding is exact. The code also measures the distance of every output to the
//!   nearest integer, and if any exceeds [`MAX_ROUNDING_DISTANCE`] (never observed) it
//!   recomputes the product exactly with tfhe-rs's Karatsuba: the result is exact in all cases.
//!
//! The forward transform is decimation in frequency (natural order in, bit-reversed out) and
//! the inverse is decimation in time (bit-reversed in, natural out), so no permutation is ever
//! done: pointwise products do not care about the order.

use tfhe::core_crypto::algorithms::polynomial_algorithms::polynomial_wrapping_add_mul_assign;
use tfhe::core_crypto::entities::Polynomial;

/// Largest accepted distance between an FFT output and the nearest integer before the exact
/// fallback is used. The proven error bound is below 0.03; anything above 0.25 would mean the
/// bound's assumptions are broken (for example a non-binary key).
pub const MAX_ROUNDING_DISTANCE: f64 = 0.25;

/// Bits per digit plane of a small key ([`NegacyclicFft::add_mul_digits`]): digits up to 15
/// keep the a-priori rounding bound (15 x the binary 0.03 = 0.45) below the 1/2 that
/// would round wrongly; the measured worst case is far lower (the tests print it), and an
/// output beyond [`MAX_ROUNDING_DISTANCE`] still takes the exact fallback.
pub const DIGIT_BITS: u32 = 4;

/// FFT tables for polynomials of size N (a power of two, at least 4).
#[derive(Debug, Clone)]
pub struct NegacyclicFft {
    n: usize,
    /// Twiddles of every forward stage, concatenated: stage with half-size h holds
    /// exp(-2 pi i j / (2h)) for j < h.
    tw_re: Vec<f64>,
    tw_im: Vec<f64>,
    /// w^j for j < N/2.
    twist_re: Vec<f64>,
    twist_im: Vec<f64>,
    /// conj(w^j) / (N/2) for j < N/2: the inverse twist with the FFT normalisation.
    untwist_re: Vec<f64>,
    untwist_im: Vec<f64>,
}

/// A binary polynomial in the FFT domain, ready to multiply many u64 polynomials.
#[derive(Clone)]
pub struct BinarySpectrum {
    re: Vec<f64>,
    im: Vec<f64>,
    /// The coefficients, kept for the exact fallback.
    coefficients: Vec<u64>,
}

/// Reusable work buffers (4 x N/2 f64), so that multiplication does not allocate.
#[derive(Debug, Clone)]
pub struct Scratch {
    lo_re: Vec<f64>,
    lo_im: Vec<f64>,
    hi_re: Vec<f64>,
    hi_im: Vec<f64>,
}

impl NegacyclicFft {
    /// Tables for polynomial size `n`.
    ///
    /// # Panics
    /// If `n` is not a power of two of at least 4 (the sizes are compile-time parameters).
    pub fn new(n: usize) -> Self {
        assert!(n.is_power_of_two() && n >= 4, "polynomial size {n}");
        let m = n / 2;
        let (mut tw_re, mut tw_im) = (Vec::with_capacity(m), Vec::with_capacity(m));
        let mut half = m / 2;
        while half >= 1 {
            for j in 0..half {
                let angle = -std::f64::consts::PI * j as f64 / half as f64;
                tw_re.push(angle.cos());
                tw_im.push(angle.sin());
            }
            half /= 2;
        }
        let mut twist_re = Vec::with_capacity(m);
        let mut twist_im = Vec::with_capacity(m);
        let mut untwist_re = Vec::with_capacity(m);
        let mut untwist_im = Vec::with_capacity(m);
        for j in 0..m {
            let angle = std::f64::consts::PI * j as f64 / n as f64;
            twist_re.push(angle.cos());
            twist_im.push(angle.sin());
            untwist_re.push(angle.cos() / m as f64);
            untwist_im.push(-angle.sin() / m as f64);
        }
        Self {
            n,
            tw_re,
            tw_im,
            twist_re,
            twist_im,
            untwist_re,
            untwist_im,
        }
    }

    /// Polynomial size N.
    pub fn size(&self) -> usize {
        self.n
    }

    /// Work buffers for [`Self::mul_binary`].
    pub fn scratch(&self) -> Scratch {
        let m = self.n / 2;
        Scratch {
            lo_re: vec![0.0; m],
            lo_im: vec![0.0; m],
            hi_re: vec![0.0; m],
            hi_im: vec![0.0; m],
        }
    }

    /// The spectrum of a binary polynomial (every coefficient 0 or 1).
    ///
    /// # Panics
    /// If `key` does not have N coefficients.
    pub fn binary_spectrum(&self, key: &[u64]) -> BinarySpectrum {
        assert_eq!(key.len(), self.n, "key size");
        let m = self.n / 2;
        let (mut re, mut im) = (vec![0.0; m], vec![0.0; m]);
        self.fold(|j| key[j] as i64 as f64, &mut re, &mut im);
        self.forward(&mut re, &mut im);
        BinarySpectrum {
            re,
            im,
            coefficients: key.to_vec(),
        }
    }

    /// Adds `a * key mod (X^N + 1, 2^64)` to `out`, exactly. Returns the largest distance of
    /// an FFT output to its nearest integer (below 0.03 for binary keys; above
    /// [`MAX_ROUNDING_DISTANCE`] the exact fallback was used).
    ///
    /// # Panics
    /// If `a` or `out` does not have N coefficients.
    pub fn add_mul_binary(
        &self,
        out: &mut [u64],
        a: &[u64],
        key: &BinarySpectrum,
        scratch: &mut Scratch,
    ) -> f64 {
        assert!(a.len() == self.n && out.len() == self.n, "polynomial size");
        let m = self.n / 2;
        let Scratch {
            lo_re,
            lo_im,
            hi_re,
            hi_im,
        } = scratch;
        self.fold(|j| lo_limb(a[j]) as f64, lo_re, lo_im);
        self.fold(|j| hi_limb(a[j]) as f64, hi_re, hi_im);
        self.forward(lo_re, lo_im);
        self.forward(hi_re, hi_im);
        pointwise_mul(lo_re, lo_im, &key.re, &key.im);
        pointwise_mul(hi_re, hi_im, &key.re, &key.im);
        self.inverse(lo_re, lo_im);
        self.inverse(hi_re, hi_im);
        let mut worst = 0.0f64;
        for j in 0..m {
            let (ur, ui) = (self.untwist_re[j], self.untwist_im[j]);
            let (lr, li) = (lo_re[j] * ur - lo_im[j] * ui, lo_re[j] * ui + lo_im[j] * ur);
            let (hr, hi) = (hi_re[j] * ur - hi_im[j] * ui, hi_re[j] * ui + hi_im[j] * ur);
            let (lr_r, li_r, hr_r, hi_r) = (lr.round(), li.round(), hr.round(), hi.round());
            worst = worst
                .max((lr - lr_r).abs())
                .max((li - li_r).abs())
                .max((hr - hr_r).abs())
                .max((hi - hi_r).abs());
            let low = combine(hr_r, lr_r);
            let high = combine(hi_r, li_r);
            out[j] = out[j].wrapping_add(low);
            out[j + m] = out[j + m].wrapping_add(high);
        }
        if worst > MAX_ROUNDING_DISTANCE {
            // Undo the inexact result and recompute exactly (never observed; see module docs).
            for j in 0..m {
                let (ur, ui) = (self.untwist_re[j], self.untwist_im[j]);
                let (lr, li) = (lo_re[j] * ur - lo_im[j] * ui, lo_re[j] * ui + lo_im[j] * ur);
                let (hr, hi) = (hi_re[j] * ur - hi_im[j] * ui, hi_re[j] * ui + hi_im[j] * ur);
                out[j] = out[j].wrapping_sub(combine(hr.round(), lr.round()));
                out[j + m] = out[j + m].wrapping_sub(combine(hi.round(), li.round()));
            }
            exact_add_mul(out, a, &key.coefficients);
        }
        worst
    }

    /// Adds `a * key mod (X^N + 1, 2^64)` to `out`, exactly, for a key with small
    /// non-negative coefficients given as its digit planes in base 2^[`DIGIT_BITS`]
    /// (`key = sum_p 16^p planes[p]`, spectra from [`Self::digit_spectra`]): `a`'s limbs
    /// are transformed once, each plane costs one pointwise product and one inverse
    /// transform per limb. A digit of at most 15 scales the binary bound by 15 (below 1/2);
    /// every output is checked as in [`Self::add_mul_binary`] and a plane farther than
    /// [`MAX_ROUNDING_DISTANCE`] from integers is recomputed with Karatsuba. Returns the
    /// largest distance seen.
    ///
    /// # Panics
    /// If `a` or `out` does not have N coefficients.
    pub fn add_mul_digits(
        &self,
        out: &mut [u64],
        a: &[u64],
        planes: &[BinarySpectrum],
        scratch: &mut Scratch,
        work: &mut Scratch,
    ) -> f64 {
        assert!(a.len() == self.n && out.len() == self.n, "polynomial size");
        let m = self.n / 2;
        self.fold(
            |j| lo_limb(a[j]) as f64,
            &mut scratch.lo_re,
            &mut scratch.lo_im,
        );
        self.fold(
            |j| hi_limb(a[j]) as f64,
            &mut scratch.hi_re,
            &mut scratch.hi_im,
        );
        self.forward(&mut scratch.lo_re, &mut scratch.lo_im);
        self.forward(&mut scratch.hi_re, &mut scratch.hi_im);
        let mut worst = 0.0f64;
        let mut product = vec![0u64; self.n];
        for (p, plane) in planes.iter().enumerate() {
            let shift = DIGIT_BITS * p as u32;
            work.lo_re.copy_from_slice(&scratch.lo_re);
            work.lo_im.copy_from_slice(&scratch.lo_im);
            work.hi_re.copy_from_slice(&scratch.hi_re);
            work.hi_im.copy_from_slice(&scratch.hi_im);
            pointwise_mul(&mut work.lo_re, &mut work.lo_im, &plane.re, &plane.im);
            pointwise_mul(&mut work.hi_re, &mut work.hi_im, &plane.re, &plane.im);
            self.inverse(&mut work.lo_re, &mut work.lo_im);
            self.inverse(&mut work.hi_re, &mut work.hi_im);
            let mut plane_worst = 0.0f64;
            for j in 0..m {
                let (ur, ui) = (self.untwist_re[j], self.untwist_im[j]);
                let (lo_re, lo_im) = (work.lo_re[j], work.lo_im[j]);
                let (hi_re, hi_im) = (work.hi_re[j], work.hi_im[j]);
                let (lr, li) = (lo_re * ur - lo_im * ui, lo_re * ui + lo_im * ur);
                let (hr, hi) = (hi_re * ur - hi_im * ui, hi_re * ui + hi_im * ur);
                let (lr_r, li_r, hr_r, hi_r) = (lr.round(), li.round(), hr.round(), hi.round());
                plane_worst = plane_worst
                    .max((lr - lr_r).abs())
                    .max((li - li_r).abs())
                    .max((hr - hr_r).abs())
                    .max((hi - hi_r).abs());
                product[j] = combine(hr_r, lr_r);
                product[j + m] = combine(hi_r, li_r);
            }
            if plane_worst > MAX_ROUNDING_DISTANCE {
                product.fill(0);
                exact_add_mul(&mut product, a, &plane.coefficients);
            }
            worst = worst.max(plane_worst);
            for (o, q) in out.iter_mut().zip(&product) {
                *o = o.wrapping_add(q.wrapping_shl(shift));
            }
        }
        worst
    }

    /// The digit planes (base 2^[`DIGIT_BITS`], lowest first) of a key with non-negative
    /// coefficients below 2^(DIGIT_BITS x `planes`), for [`Self::add_mul_digits`]; `None`
    /// if a coefficient does not fit.
    pub fn digit_spectra(&self, key: &[u64], planes: usize) -> Option<Vec<BinarySpectrum>> {
        let bits = DIGIT_BITS as usize * planes;
        if planes == 0 || bits >= 64 || key.iter().any(|&k| k >> bits != 0) {
            return None;
        }
        let digit = (1u64 << DIGIT_BITS) - 1;
        Some(
            (0..planes)
                .map(|p| {
                    let shift = DIGIT_BITS as usize * p;
                    let digits: Vec<u64> = key.iter().map(|&k| (k >> shift) & digit).collect();
                    self.binary_spectrum(&digits)
                })
                .collect(),
        )
    }

    /// z_j = (p_j + i p_{j+N/2}) w^j.
    fn fold(&self, p: impl Fn(usize) -> f64, re: &mut [f64], im: &mut [f64]) {
        let m = self.n / 2;
        for j in 0..m {
            let (x, y) = (p(j), p(j + m));
            let (c, s) = (self.twist_re[j], self.twist_im[j]);
            re[j] = x * c - y * s;
            im[j] = x * s + y * c;
        }
    }

    /// In-place cyclic FFT of size N/2, natural order in, bit-reversed order out.
    fn forward(&self, re: &mut [f64], im: &mut [f64]) {
        let m = re.len();
        let mut half = m / 2;
        while half >= 2 {
            let start = self.stage_offset(half);
            let (wr, wi) = (
                &self.tw_re[start..start + half],
                &self.tw_im[start..start + half],
            );
            let blocks = re
                .chunks_exact_mut(2 * half)
                .zip(im.chunks_exact_mut(2 * half));
            for (block_re, block_im) in blocks {
                let (ar, br) = block_re.split_at_mut(half);
                let (ai, bi) = block_im.split_at_mut(half);
                let lanes = ar
                    .iter_mut()
                    .zip(ai.iter_mut())
                    .zip(br.iter_mut().zip(bi.iter_mut()))
                    .zip(wr.iter().zip(wi));
                for (((ar, ai), (br, bi)), (wr, wi)) in lanes {
                    let (ur, ui, vr, vi) = (*ar, *ai, *br, *bi);
                    *ar = ur + vr;
                    *ai = ui + vi;
                    let (dr, di) = (ur - vr, ui - vi);
                    *br = dr * wr - di * wi;
                    *bi = dr * wi + di * wr;
                }
            }
            half /= 2;
        }
        // Last stage (half = 1): the twiddle is 1.
        unit_stage(re, im);
    }

    /// In-place inverse cyclic FFT of size N/2 (without the 1/(N/2) factor), bit-reversed
    /// order in, natural order out.
    fn inverse(&self, re: &mut [f64], im: &mut [f64]) {
        let m = re.len();
        // First stage (half = 1): the twiddle is 1.
        unit_stage(re, im);
        let mut half = 2;
        while half < m {
            let start = self.stage_offset(half);
            let (wr, wi) = (
                &self.tw_re[start..start + half],
                &self.tw_im[start..start + half],
            );
            let blocks = re
                .chunks_exact_mut(2 * half)
                .zip(im.chunks_exact_mut(2 * half));
            for (block_re, block_im) in blocks {
                let (ar, br) = block_re.split_at_mut(half);
                let (ai, bi) = block_im.split_at_mut(half);
                let lanes = ar
                    .iter_mut()
                    .zip(ai.iter_mut())
                    .zip(br.iter_mut().zip(bi.iter_mut()))
                    .zip(wr.iter().zip(wi));
                for (((ar, ai), (br, bi)), (wr, wi)) in lanes {
                    // v = b * conj(w)
                    let (vr, vi) = (*br * wr + *bi * wi, *bi * wr - *br * wi);
                    let (ur, ui) = (*ar, *ai);
                    *ar = ur + vr;
                    *ai = ui + vi;
                    *br = ur - vr;
                    *bi = ui - vi;
                }
            }
            half *= 2;
        }
    }

    /// Where the twiddles of the stage with half-size `half` start in the tables.
    fn stage_offset(&self, half: usize) -> usize {
        // Stages are stored for half = m/2, m/4, ..., 1: the stage `half` starts after all
        // larger ones, whose sizes sum to m - 2 * half.
        self.n / 2 - 2 * half
    }
}

/// The radix-2 stage of half-size 1, whose twiddle is 1 (the same forward and inverse).
fn unit_stage(re: &mut [f64], im: &mut [f64]) {
    for (r, i) in re.chunks_exact_mut(2).zip(im.chunks_exact_mut(2)) {
        let (ur, ui, vr, vi) = (r[0], i[0], r[1], i[1]);
        r[0] = ur + vr;
        i[0] = ui + vi;
        r[1] = ur - vr;
        i[1] = ui - vi;
    }
}

fn pointwise_mul(re: &mut [f64], im: &mut [f64], kr: &[f64], ki: &[f64]) {
    for j in 0..re.len() {
        let (r, i) = (re[j], im[j]);
        re[j] = r * kr[j] - i * ki[j];
        im[j] = r * ki[j] + i * kr[j];
    }
}

/// The low limb of `a`, signed in [-2^31, 2^31).
fn lo_limb(a: u64) -> i64 {
    a as u32 as i32 as i64
}

/// The high limb of `a`, signed, so that `a = hi * 2^32 + lo (mod 2^64)`.
fn hi_limb(a: u64) -> i64 {
    (a.wrapping_sub(lo_limb(a) as u64) >> 32) as u32 as i32 as i64
}

/// hi * 2^32 + lo mod 2^64, from the rounded limb products.
fn combine(hi: f64, lo: f64) -> u64 {
    ((hi as i64 as u64) << 32).wrapping_add(lo as i64 as u64)
}

/// `out += a * key` exactly, with tfhe-rs's Karatsuba.
pub fn exact_add_mul(out: &mut [u64], a: &[u64], key: &[u64]) {
    let mut o = Polynomial::from_container(out);
    polynomial_wrapping_add_mul_assign(
        &mut o,
        &Polynomial::from_container(a),
        &Polynomial::from_container(key),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Checks the FFT product against Karatsuba; returns the rounding distance.
    fn check(n: usize, a: &[u64], key: &[u64]) -> f64 {
        let fft = NegacyclicFft::new(n);
        let spectrum = fft.binary_spectrum(key);
        let mut scratch = fft.scratch();
        let mut got = vec![7u64; n];
        let distance = fft.add_mul_binary(&mut got, a, &spectrum, &mut scratch);
        let mut want = vec![7u64; n];
        exact_add_mul(&mut want, a, key);
        assert_eq!(got, want);
        distance
    }

    #[test]
    fn limbs_recombine() {
        for a in [
            0,
            1,
            u64::MAX,
            1 << 31,
            (1 << 31) - 1,
            1 << 63,
            0x8000_0000_8000_0000,
        ] {
            let (lo, hi) = (lo_limb(a), hi_limb(a));
            assert!((-(1 << 31)..(1 << 31)).contains(&lo));
            assert!((-(1 << 31)..(1 << 31)).contains(&hi));
            assert_eq!(combine(hi as f64, lo as f64), a);
        }
    }

    #[test]
    fn matches_karatsuba_on_random_and_extreme_inputs() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut worst = 0.0f64;
        for n in [4, 64, 2048] {
            for trial in 0..20 {
                let a: Vec<u64> = (0..n).map(|_| rng.random()).collect();
                let key: Vec<u64> = match trial {
                    0 => vec![1; n],
                    1 => vec![0; n],
                    _ => (0..n).map(|_| rng.random_range(0..2)).collect(),
                };
                worst = worst.max(check(n, &a, &key));
            }
            // Worst case for the f64 error: every limb at its extreme, every key bit set.
            worst = worst.max(check(n, &vec![0x8000_0000_8000_0000; n], &vec![1; n]));
            worst = worst.max(check(n, &vec![0x7fff_ffff_7fff_ffff; n], &vec![1; n]));
            let alternating: Vec<u64> = (0..n)
                .map(|j| {
                    if j % 2 == 0 {
                        0x8000_0000_8000_0000
                    } else {
                        0x7fff_ffff_7fff_ffff
                    }
                })
                .collect();
            worst = worst.max(check(n, &alternating, &vec![1; n]));
        }
        // The fast path was exact on its own: the documented error bound holds.
        assert!(worst < 0.03, "rounding distance {worst}");
    }

    #[test]
    fn digit_planes_of_a_small_key_give_the_exact_product() {
        let n = 2048;
        let fft = NegacyclicFft::new(n);
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(21);
        // Key sums of 3, 8 and 1,000 binary keys, and the worst case of each width.
        for (max, planes) in [(3u64, 1), (15, 1), (16, 2), (1000, 3), (4095, 3)] {
            for worst_case in [false, true] {
                let key: Vec<u64> = (0..n)
                    .map(|_| {
                        if worst_case {
                            max
                        } else {
                            rng.random_range(0..=max)
                        }
                    })
                    .collect();
                let a: Vec<u64> = (0..n)
                    .map(|_| if worst_case { 1 << 31 } else { rng.random() })
                    .collect();
                let spectra = fft.digit_spectra(&key, planes).unwrap();
                let mut got = vec![5u64; n];
                let (mut s1, mut s2) = (fft.scratch(), fft.scratch());
                let worst = fft.add_mul_digits(&mut got, &a, &spectra, &mut s1, &mut s2);
                let mut want = vec![5u64; n];
                exact_add_mul(&mut want, &a, &key);
                assert_eq!(got, want, "key max {max}, worst case {worst_case}");
                assert!(worst < MAX_ROUNDING_DISTANCE, "rounding distance {worst}");
                eprintln!(
                    "digits: key max {max}, worst case {worst_case}: largest distance {worst:.4}"
                );
            }
        }
        assert!(fft.digit_spectra(&[16, 0, 0, 0], 1).is_none());
    }

    #[test]
    fn non_binary_keys_fall_back_to_the_exact_product() {
        // A key with large coefficients breaks the f64 error bound; the result stays exact.
        let n = 2048;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(6);
        let a: Vec<u64> = (0..n).map(|_| rng.random()).collect();
        let key: Vec<u64> = (0..n).map(|_| rng.random_range(0..1_000_000)).collect();
        assert!(check(n, &a, &key) > MAX_ROUNDING_DISTANCE);
    }
}
