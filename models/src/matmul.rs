//! The one safe wrapper around the `gemm` crate's matrix product, for the inference fast path
//! (`drn/conv.rs`) and the training kernels (`fracture-train`).

/// A matrix operand: element `(row, column)` is `data[row * row_stride + column * column_stride]`.
/// `(data, k, 1)` is a row-major `[m, k]` matrix, `(data, 1, m)` its transpose.
pub type Strided<'a> = (&'a [f32], usize, usize);

/// `dst[m, n] = (accumulate ? dst : 0) + a[m, k] b[k, n]`, `dst` row-major and contiguous (its
/// first `m * n` values), on the calling thread.
///
/// # Panics
/// When a slice is too short for its shape and strides, or a stride does not fit an `isize`.
pub fn matmul(
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    a: Strided<'_>,
    b: Strided<'_>,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let dst_len = m.checked_mul(n).expect("matmul: m * n overflows");
    assert!(
        dst.len() >= dst_len,
        "matmul: dst holds {} of {dst_len} values",
        dst.len()
    );
    if k == 0 {
        if !accumulate {
            dst[..dst_len].fill(0.0);
        }
        return;
    }
    let ((a, a_rs, a_cs), (b, b_rs, b_cs)) = (a, b);
    assert_fits("a", a.len(), m, k, a_rs, a_cs);
    assert_fits("b", b.len(), k, n, b_rs, b_cs);
    let stride = |s: usize| isize::try_from(s).expect("matmul: a stride exceeds isize::MAX");
    // SAFETY: `gemm::gemm` is an `unsafe fn` over raw pointers and strides. With these strides it
    // reads a[i * a_rs + j * a_cs] (i < m, j < k) and b[j * b_rs + c * b_cs] (c < n), reads `dst`
    // only when accumulating, and writes dst[i * n + c]. `assert_fits` and the assert on `dst`
    // keep the largest of each index inside its slice, every stride fits an isize, and `dst`, a
    // unique borrow, overlaps neither input. `Parallelism::None`: no other thread touches them.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            stride(n),
            accumulate,
            a.as_ptr(),
            stride(a_cs),
            stride(a_rs),
            b.as_ptr(),
            stride(b_cs),
            stride(b_rs),
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Panics unless element `(rows - 1, cols - 1)`, the farthest one, lies inside a slice of `len`.
fn assert_fits(name: &str, len: usize, rows: usize, cols: usize, rs: usize, cs: usize) {
    let last = (rows - 1)
        .checked_mul(rs)
        .and_then(|r| (cols - 1).checked_mul(cs).and_then(|c| r.checked_add(c)));
    assert!(
        last.is_some_and(|last| last < len),
        "matmul: {name} holds {len} values, too few for {rows} x {cols} at strides ({rs}, {cs})"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: Strided, b: Strided) -> Vec<f32> {
        let at = |(v, rs, cs): Strided, i: usize, j: usize| v[i * rs + j * cs];
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for c in 0..n {
                out[i * n + c] = (0..k).map(|j| at(a, i, j) * at(b, j, c)).sum();
            }
        }
        out
    }

    #[test]
    fn products_of_strided_operands_match_the_definition() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 - 1.5).collect();
        // Row-major, and the same matrices read through their transposes' storage.
        let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let want = naive(m, n, k, (&a, k, 1), (&b, n, 1));
        for (a, b) in [
            ((&a[..], k, 1), (&b[..], n, 1)),
            ((&at[..], 1, m), (&bt[..], 1, k)),
        ] {
            let mut dst = vec![f32::NAN; m * n];
            matmul(&mut dst, m, n, k, a, b, false);
            assert_eq!(dst, want);
            matmul(&mut dst, m, n, k, a, b, true);
            let twice: Vec<f32> = want.iter().map(|v| 2.0 * v).collect();
            assert_eq!(dst, twice);
        }
    }

    #[test]
    fn an_empty_inner_dimension_gives_zeros_or_leaves_dst() {
        let mut dst = vec![3f32; 6];
        matmul(&mut dst, 2, 3, 0, (&[], 0, 1), (&[], 3, 1), true);
        assert_eq!(dst, vec![3.0; 6]);
        matmul(&mut dst, 2, 3, 0, (&[], 0, 1), (&[], 3, 1), false);
        assert_eq!(dst, vec![0.0; 6]);
    }

    #[test]
    #[should_panic(expected = "too few")]
    fn a_short_operand_is_refused() {
        let mut dst = vec![0f32; 4];
        matmul(
            &mut dst,
            2,
            2,
            2,
            (&[1.0; 3], 2, 1),
            (&[1.0; 4], 2, 1),
            false,
        );
    }

    #[test]
    #[should_panic(expected = "dst holds")]
    fn a_short_destination_is_refused() {
        let mut dst = vec![0f32; 3];
        matmul(
            &mut dst,
            2,
            2,
            2,
            (&[1.0; 4], 2, 1),
            (&[1.0; 4], 2, 1),
            false,
        );
    }
}
