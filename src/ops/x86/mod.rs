//! x86-64 AVX2+FMA kernels behind the layers of `ops`: one register-blocked matrix-multiply
//! micro-kernel shared by convolution and attention, a vector `exp`, and the drivers that feed
//! them. Everything here works on plain `f32` slices; the layers check the CPU first.

pub mod activation;
pub mod attention;
pub mod conv;
pub mod layer_norm;
pub mod linear;
pub mod norm;

use std::arch::x86_64::*;

/// Rows of one micro-kernel tile (output channels in a convolution).
pub const MR: usize = 6;
/// Columns of one micro-kernel tile (pixels in a convolution): two 8-lane registers.
pub const NR: usize = 16;

/// Whether this CPU has the AVX2 and FMA units the kernels need (checked once).
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// How a tile's accumulators start before the products are added.
#[derive(Clone, Copy)]
pub enum Start<'a> {
    /// From zero: `C = A·B`.
    Zero,
    /// From the current tile: `C += A·B`.
    Load,
    /// From a per-row value (a convolution's bias): `C = bias + A·B`.
    RowBias(&'a [f32; MR]),
    /// From a per-column value (a linear layer's bias): `C = bias + A·B`.
    ColumnBias(&'a [f32; NR]),
}

/// A raw pointer that rayon tasks may share; every task writes a disjoint part.
#[derive(Clone, Copy)]
pub struct SharedMut(pub *mut f32);
// SAFETY: tasks holding it write only to disjoint ranges, and the buffer outlives the tasks.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so closures capture the `Send` wrapper and not the raw field).
    pub fn get(self) -> *mut f32 {
        self.0
    }
}

/// A vector of `len` floats written by `fill` through the pointer it receives (from any
/// thread), without the zeroing pass of `vec![0.0; len]`.
///
/// # Safety
/// `fill` must write every one of the `len` elements.
pub unsafe fn filled(len: usize, fill: impl FnOnce(SharedMut)) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    fill(SharedMut(v.as_mut_ptr()));
    v.set_len(len);
    v
}

/// Where the micro-kernel finds the `NR` values of its right operand for each step.
pub trait Rows: Copy {
    /// The first of the `NR` values for step `step`.
    ///
    /// # Safety
    /// `step` must be within the operand the implementor describes.
    unsafe fn row(self, step: usize) -> *const f32;
}

/// Rows `ld` floats apart: a packed panel (`ld = NR`) or a row-major matrix.
#[derive(Clone, Copy)]
pub struct Strided {
    pub ptr: *const f32,
    pub ld: usize,
}

impl Rows for Strided {
    #[inline(always)]
    unsafe fn row(self, step: usize) -> *const f32 {
        self.ptr.add(step * self.ld)
    }
}

/// Rows at `base + offsets[step]`: an implicit im2col matrix over a padded image.
#[derive(Clone, Copy)]
pub struct Gathered {
    pub base: *const f32,
    pub offsets: *const usize,
}

impl Rows for Gathered {
    #[inline(always)]
    unsafe fn row(self, step: usize) -> *const f32 {
        self.base.add(*self.offsets.add(step))
    }
}

/// Operands of one `MR×NR` tile product `C (+)= A·B` over `k` steps: `A` holds `MR` values per
/// step at `a + step·lda`, `B` holds `NR` values per step where `b` says, and `C` rows are `ldc`
/// apart. All must be valid for the whole tile (callers pad their operands).
#[derive(Clone, Copy)]
pub struct Tile<B: Rows> {
    pub k: usize,
    pub a: *const f32,
    pub lda: usize,
    pub b: B,
    pub c: *mut f32,
    pub ldc: usize,
}

/// The `MR×NR` micro-kernel: 12 accumulators, two `B` loads and six `A` broadcasts per step.
///
/// # Safety
/// The CPU must have AVX2 and FMA; the operands of `t` must be valid for the whole tile.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn tile<B: Rows>(t: Tile<B>, start: Start) {
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    match start {
        Start::Zero => {}
        Start::Load => {
            for (i, row) in acc.iter_mut().enumerate() {
                let c = t.c.add(i * t.ldc);
                *row = [_mm256_loadu_ps(c), _mm256_loadu_ps(c.add(8))];
            }
        }
        Start::RowBias(bias) => {
            for (row, &b) in acc.iter_mut().zip(bias) {
                *row = [_mm256_set1_ps(b); 2];
            }
        }
        Start::ColumnBias(bias) => {
            let b = [_mm256_loadu_ps(bias.as_ptr()), _mm256_loadu_ps(bias[8..].as_ptr())];
            acc = [b; MR];
        }
    }
    let mut a = t.a;
    for step in 0..t.k {
        let b = t.b.row(step);
        let b0 = _mm256_loadu_ps(b);
        let b1 = _mm256_loadu_ps(b.add(8));
        for (i, row) in acc.iter_mut().enumerate() {
            let ai = _mm256_set1_ps(*a.add(i));
            row[0] = _mm256_fmadd_ps(ai, b0, row[0]);
            row[1] = _mm256_fmadd_ps(ai, b1, row[1]);
        }
        a = a.add(t.lda);
    }
    for (i, row) in acc.iter().enumerate() {
        let c = t.c.add(i * t.ldc);
        _mm256_storeu_ps(c, row[0]);
        _mm256_storeu_ps(c.add(8), row[1]);
    }
}

/// [`tile`] for the top-left `rows × cols` of the tile only (`rows ≤ MR`, `cols ≤ NR`):
/// partial tiles go through a scratch tile so that nothing outside `C`'s part is touched.
///
/// # Safety
/// As [`tile`], except that `C` need only be valid for `rows × cols`.
pub unsafe fn tile_part<B: Rows>(t: Tile<B>, rows: usize, cols: usize, start: Start) {
    if rows == MR && cols == NR {
        return tile(t, start);
    }
    let mut scratch = [0f32; MR * NR];
    let c_row = |i: usize| t.c.add(i * t.ldc);
    if let Start::Load = start {
        for i in 0..rows {
            std::ptr::copy_nonoverlapping(c_row(i), scratch[i * NR..].as_mut_ptr(), cols);
        }
    }
    tile(Tile { c: scratch.as_mut_ptr(), ldc: NR, ..t }, start);
    for i in 0..rows {
        std::ptr::copy_nonoverlapping(scratch[i * NR..].as_ptr(), c_row(i), cols);
    }
}

/// `e^x` on eight lanes (Cephes polynomial, about 1 ulp); exactly 0 below −87.3. The
/// polynomial is evaluated in Estrin's scheme, which keeps the dependency chain short so that
/// more independent calls overlap.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn exp8(x: __m256) -> __m256 {
    const LO: f32 = -87.33;
    const HI: f32 = 88.37;
    let c = _mm256_set1_ps;
    let in_range = _mm256_cmp_ps::<_CMP_GE_OQ>(x, c(LO));
    let x = _mm256_min_ps(_mm256_max_ps(x, c(LO)), c(HI));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        c(std::f32::consts::LOG2_E),
    ));
    // r = x − n·ln 2 in two parts so that r keeps full precision.
    let r = _mm256_fnmadd_ps(n, c(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, c(-2.121_944_4e-4), r);
    // e^r ≈ 1 + r + r²·(q0 + q1·r + r²·(q2 + q3·r) + r⁴·(q4 + q5·r)).
    let (r2, q01) = (_mm256_mul_ps(r, r), _mm256_fmadd_ps(c(1.666_666_5e-1), r, c(0.5)));
    let q23 = _mm256_fmadd_ps(c(8.333_452e-3), r, c(4.166_579_6e-2));
    let q45 = _mm256_fmadd_ps(c(1.987_569_1e-4), r, c(1.398_199_9e-3));
    let q = _mm256_fmadd_ps(_mm256_mul_ps(r2, r2), q45, _mm256_fmadd_ps(r2, q23, q01));
    let y = _mm256_fmadd_ps(q, r2, _mm256_add_ps(r, c(1.0)));
    let pow2 =
        _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
    _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(pow2)), in_range)
}

/// `x·sigmoid(x) = x / (1 + e^−x)` on eight lanes.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn silu8(x: __m256) -> __m256 {
    let one = _mm256_set1_ps(1.0);
    _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))))
}

/// `erf(x)` on eight lanes, by Abramowitz and Stegun's formula 7.1.26
/// (`1 − (a₁t + … + a₅t⁵)·e^(−x²)` with `t = 1 / (1 + p·|x|)`, sign restored), absolute error
/// below 1.5e-7: the same approximation as PyTorch's vectorised CPU `erf`.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn erf8(x: __m256) -> __m256 {
    let c = _mm256_set1_ps;
    let sign = _mm256_and_ps(x, c(-0.0));
    let abs = _mm256_xor_ps(x, sign);
    let t = _mm256_div_ps(c(1.0), _mm256_fmadd_ps(c(0.327_591_1), abs, c(1.0)));
    let poly = _mm256_fmadd_ps(c(1.061_405_4), t, c(-1.453_152_1));
    let poly = _mm256_fmadd_ps(poly, t, c(1.421_413_7));
    let poly = _mm256_fmadd_ps(poly, t, c(-0.284_496_74));
    let poly = _mm256_fmadd_ps(poly, t, c(0.254_829_6));
    let tail = _mm256_mul_ps(
        _mm256_mul_ps(poly, t),
        exp8(_mm256_mul_ps(abs, _mm256_xor_ps(abs, c(-0.0)))),
    );
    _mm256_xor_ps(_mm256_sub_ps(c(1.0), tail), sign)
}

/// The exact GELU `x·(1 + erf(x/√2))/2` on eight lanes (through [`erf8`]).
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn gelu8(x: __m256) -> __m256 {
    let c = _mm256_set1_ps;
    let erf = erf8(_mm256_mul_ps(x, c(std::f32::consts::FRAC_1_SQRT_2)));
    _mm256_mul_ps(_mm256_mul_ps(x, c(0.5)), _mm256_add_ps(erf, c(1.0)))
}

/// The sum of the eight lanes.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn hsum8(x: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}
