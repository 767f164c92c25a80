//! x86-64 AVX2+FMA kernels behind the layers of `ops`: one register-blocked matrix-multiply
//! micro-kernel shared by convolution and attention, a vector `exp`, and the drivers that feed
//! them. Everything here works on plain `f32` slices; the layers check the CPU first.

pub mod attention;
pub mod conv;
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

/// Operands of one `MR×NR` tile product `C (+)= A·B` over `k` steps: `A` holds `MR` values per
/// step at `a + step·lda`, `B` holds `NR` values per step at `b + step·ldb`, `C` rows are `ldc`
/// apart. All pointers must cover the full `MR×NR` tile (see [`tile`] for partial ones).
#[derive(Clone, Copy)]
pub struct Tile {
    pub k: usize,
    pub a: *const f32,
    pub lda: usize,
    pub b: *const f32,
    pub ldb: usize,
    pub c: *mut f32,
    pub ldc: usize,
}

/// The `MR×NR` micro-kernel: 12 accumulators, two `B` loads and six `A` broadcasts per step.
///
/// # Safety
/// The CPU must have AVX2 and FMA; the pointers of `t` must be valid for a full tile.
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel(t: Tile, start: Start) {
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
    }
    let (mut a, mut b) = (t.a, t.b);
    for _ in 0..t.k {
        let b0 = _mm256_loadu_ps(b);
        let b1 = _mm256_loadu_ps(b.add(8));
        for (i, row) in acc.iter_mut().enumerate() {
            let ai = _mm256_set1_ps(*a.add(i));
            row[0] = _mm256_fmadd_ps(ai, b0, row[0]);
            row[1] = _mm256_fmadd_ps(ai, b1, row[1]);
        }
        a = a.add(t.lda);
        b = b.add(t.ldb);
    }
    for (i, row) in acc.iter().enumerate() {
        let c = t.c.add(i * t.ldc);
        _mm256_storeu_ps(c, row[0]);
        _mm256_storeu_ps(c.add(8), row[1]);
    }
}

/// `C (+)= A·B` for the top-left `rows×cols` of a tile (`rows ≤ MR`, `cols ≤ NR`): full tiles
/// run in place, partial ones through a scratch tile so nothing outside `C` is touched. `A` and
/// `B` must still be readable for the full tile (callers pad their packed operands).
///
/// # Safety
/// As [`kernel`], with `C` valid for `rows×cols`.
pub unsafe fn tile(t: Tile, rows: usize, cols: usize, start: Start) {
    if rows == MR && cols == NR {
        return kernel(t, start);
    }
    let mut scratch = [0f32; MR * NR];
    for i in 0..rows {
        let c = std::slice::from_raw_parts_mut(t.c.add(i * t.ldc), cols);
        if let Start::Load = start {
            scratch[i * NR..i * NR + cols].copy_from_slice(c);
        }
    }
    kernel(Tile { c: scratch.as_mut_ptr(), ldc: NR, ..t }, start);
    for i in 0..rows {
        let c = std::slice::from_raw_parts_mut(t.c.add(i * t.ldc), cols);
        c.copy_from_slice(&scratch[i * NR..i * NR + cols]);
    }
}

/// `e^x` on eight lanes (Cephes polynomial, about 1 ulp); exactly 0 below −87.3.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn exp8(x: __m256) -> __m256 {
    const LO: f32 = -87.33;
    const HI: f32 = 88.37;
    const COEFFS: [f32; 6] =
        [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5.0e-1];
    let in_range = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(LO));
    let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(LO)), _mm256_set1_ps(HI));
    let n = _mm256_cvtps_epi32(_mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)));
    let nf = _mm256_cvtepi32_ps(n);
    // r = x − n·ln 2 in two parts so that r keeps full precision.
    let r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(COEFFS[0]);
    for &c in &COEFFS[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let y = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0)));
    let pow2 =
        _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(n, _mm256_set1_epi32(127))));
    _mm256_and_ps(_mm256_mul_ps(y, pow2), in_range)
}

/// `x·sigmoid(x)` on eight lanes.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn silu8(x: __m256) -> __m256 {
    let one = _mm256_set1_ps(1.0);
    _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))))
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
