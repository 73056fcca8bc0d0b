//! The CPU fast path of the DRN's convolutions: channels-last feature maps, im2col tiles multiplied
//! by the `gemm` crate, and the folded BatchNorm bias, the residual add and the ReLU applied while
//! each output tile is still in cache.
//!
//! candle 0.11's CPU `conv2d` copies its input into a strided layout per call and runs many small
//! products; here one convolution is a handful of large, cache-sized products, and the feature maps
//! stay in NHWC between layers so that an im2col row is nine `memcpy`s of `cin` floats each.

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

/// A batch of feature maps, channels last: value `(b, y, x, ch)` at
/// `data[((b * h + y) * w + x) * c + ch]`.
#[derive(Debug, Clone)]
pub(crate) struct Nhwc {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub data: Vec<f32>,
}

impl Nhwc {
    /// From candle's `[N, C, H, W]`.
    pub fn from_nchw(x: &Tensor) -> Result<Self> {
        let (n, c, h, w) = x.dims4()?;
        let data = x
            .to_dtype(DType::F32)?
            .permute((0, 2, 3, 1))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Self { n, h, w, c, data })
    }

    /// Back to candle's `[N, C, H, W]`.
    pub fn into_nchw(self, device: &Device) -> Result<Tensor> {
        Tensor::from_vec(self.data, (self.n, self.h, self.w, self.c), device)?
            .permute((0, 3, 1, 2))?
            .contiguous()
    }
}

/// Output values a tile aims at: a tile's im2col rows plus its output rows stay within the 2 MiB L2
/// of the cores this was tuned on, while the weights (up to 9.4 MB for 512 -> 512 channels, packed
/// again by `gemm` for every tile) are amortised over enough rows.
const TILE_FLOATS: usize = 1 << 21;

/// Below this many channels the transforms cost more than the multiplies saved: measured on
/// DRN-C-26, 64 -> 64 at 128 x 128 took 3.8 ms by im2col and 5 ms by Winograd, 128 -> 128 the
/// other way round.
pub(crate) const WINOGRAD_MIN_CHANNELS: usize = 128;

/// A square convolution with a bias, its weights laid out for [`ConvKernel::forward`]: row
/// `(ky * k + kx) * cin + ci`, column `co`, i.e. `[k, k, cin, cout]` row-major.
#[derive(Debug, Clone)]
pub(crate) struct ConvKernel {
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    padding: usize,
    dilation: usize,
    /// Winograd F(2x2, 3x3) where it applies (see [`ConvKernel::winograd_applies`]).
    winograd: bool,
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl ConvKernel {
    /// Takes over a candle convolution (usually with BatchNorm already folded in); a missing bias
    /// is zero. `winograd`: use Winograd F(2x2, 3x3) where it applies and pays, i.e. on stride-1
    /// 3x3 convolutions with at least [`WINOGRAD_MIN_CHANNELS`] channels in and out.
    pub fn new(conv: &candle_nn::Conv2d, winograd: bool) -> Result<Self> {
        let cfg = conv.config();
        let (cout, cin, kh, kw) = conv.weight().dims4()?;
        if cfg.groups != 1 || kh != kw {
            candle_core::bail!(
                "the CPU fast path takes square, ungrouped convolutions, not {kh}x{kw} with {} \
                 groups",
                cfg.groups
            );
        }
        let weight = conv
            .weight()
            .to_dtype(DType::F32)?
            .permute((2, 3, 1, 0))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let bias = match conv.bias() {
            Some(b) => b.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            None => vec![0.0; cout],
        };
        Ok(Self {
            cin,
            cout,
            k: kh,
            stride: cfg.stride,
            padding: cfg.padding,
            dilation: cfg.dilation,
            winograd: winograd && cin.min(cout) >= WINOGRAD_MIN_CHANNELS,
            weight,
            bias,
        })
    }

    fn out_side(&self, side: usize) -> Option<usize> {
        let span = self.dilation * (self.k - 1) + 1;
        (side + 2 * self.padding)
            .checked_sub(span)
            .map(|s| s / self.stride + 1)
    }

    /// Rows of the im2col matrix: one per weight row.
    fn depth(&self) -> usize {
        self.k * self.k * self.cin
    }

    /// `relu(conv(x) + bias + residual)`, the residual and the ReLU optional; the residual has
    /// the output's shape.
    pub fn forward(&self, x: &Nhwc, residual: Option<&Nhwc>, relu: bool) -> Result<Nhwc> {
        if x.c != self.cin {
            candle_core::bail!(
                "convolution expects {} input channels, got {}",
                self.cin,
                x.c
            );
        }
        let (Some(oh), Some(ow)) = (self.out_side(x.h), self.out_side(x.w)) else {
            candle_core::bail!(
                "input {}x{} is smaller than the {}x{} kernel (dilation {})",
                x.h,
                x.w,
                self.k,
                self.k,
                self.dilation
            );
        };
        let rows = x.n * oh * ow;
        if let Some(r) = residual {
            if (r.n, r.h, r.w, r.c) != (x.n, oh, ow, self.cout) {
                candle_core::bail!(
                    "residual [{}, {}, {}, {}] does not match the output [{}, {oh}, {ow}, {}]",
                    r.n,
                    r.h,
                    r.w,
                    r.c,
                    x.n,
                    self.cout
                );
            }
        }

        if self.winograd_applies() {
            return Ok(self.forward_winograd(x, residual, relu));
        }
        let depth = self.depth();
        let pointwise = self.k == 1 && self.stride == 1 && self.padding == 0;
        // Enough tiles for both cores to stay busy, each as large as the cache allows.
        let threads = rayon::current_num_threads().max(1);
        let tile = (TILE_FLOATS / (depth + self.cout))
            .clamp(16, 1 << 16)
            .min(rows.div_ceil(4 * threads))
            .max(1);

        let mut out = vec![0f32; rows * self.cout];
        out.par_chunks_mut(tile * self.cout)
            .enumerate()
            .for_each_init(Vec::new, |col: &mut Vec<f32>, (t, dst)| {
                let r0 = t * tile;
                let m = dst.len() / self.cout;
                let lhs: &[f32] = if pointwise {
                    &x.data[r0 * depth..(r0 + m) * depth]
                } else {
                    col.resize(m * depth, 0.0);
                    self.im2col(x, oh, ow, r0, &mut col[..m * depth]);
                    &col[..m * depth]
                };
                matmul(dst, lhs, &self.weight, m, depth, self.cout);
                let res = residual.map(|r| &r.data[r0 * self.cout..(r0 + m) * self.cout]);
                epilogue(dst, &self.bias, res, relu);
            });
        Ok(Nhwc {
            n: x.n,
            h: oh,
            w: ow,
            c: self.cout,
            data: out,
        })
    }

    /// Writes the im2col rows of output pixels `r0..r0 + m` (counted over the whole batch) into
    /// `col`, `depth` values per pixel; taps that fall in the zero padding are zeros.
    fn im2col(&self, x: &Nhwc, oh: usize, ow: usize, r0: usize, col: &mut [f32]) {
        let cin = self.cin;
        let tap =
            |o: usize, kk: usize| (o * self.stride + kk * self.dilation).checked_sub(self.padding);
        for (i, row) in col.chunks_exact_mut(self.depth()).enumerate() {
            let r = r0 + i;
            let (b, oy, ox) = (r / (oh * ow), r / ow % oh, r % ow);
            for (ky, taps) in row.chunks_exact_mut(self.k * cin).enumerate() {
                let iy = tap(oy, ky).filter(|&iy| iy < x.h);
                for (kx, dst) in taps.chunks_exact_mut(cin).enumerate() {
                    match (iy, tap(ox, kx).filter(|&ix| ix < x.w)) {
                        (Some(iy), Some(ix)) => {
                            let at = ((b * x.h + iy) * x.w + ix) * cin;
                            dst.copy_from_slice(&x.data[at..at + cin]);
                        }
                        _ => dst.fill(0.0),
                    }
                }
            }
        }
    }
}

/// `dst[m, n] = lhs[m, k] * rhs[k, n]`, all row-major and contiguous, on the calling thread.
fn matmul(dst: &mut [f32], lhs: &[f32], rhs: &[f32], m: usize, k: usize, n: usize) {
    assert!(dst.len() == m * n && lhs.len() == m * k);
    crate::matmul::matmul(dst, m, n, k, (lhs, k, 1), (rhs, n, 1), false);
}

/// One side of the Winograd tiling of a feature map of `len` pixels at dilation `d`: a tile covers
/// output pixels `first` and `first + d` (when inside), so tiles of one phase (`first % d`) step
/// by `2 d`; a dilated convolution is `d x d` undilated ones on the phases' sub-images.
struct TileAxis {
    /// First output pixel of each tile.
    first: Vec<usize>,
    /// For each output pixel: (tile, 0 or 1 = which of its two pixels).
    of: Vec<(usize, usize)>,
}

impl TileAxis {
    fn new(len: usize, d: usize) -> Self {
        let mut first = Vec::new();
        let mut of = vec![(0, 0); len];
        for phase in 0..d.min(len) {
            for (u, y) in (phase..len).step_by(d).enumerate() {
                if u % 2 == 0 {
                    first.push(y);
                }
                of[y] = (first.len() - 1, u % 2);
            }
        }
        Self { first, of }
    }
}

impl ConvKernel {
    /// Every stride-1 3x3 convolution that keeps the size (padding = dilation): all the DRN's
    /// 3x3 convolutions but the strided ones.
    fn winograd_applies(&self) -> bool {
        self.winograd && self.k == 3 && self.stride == 1 && self.padding == self.dilation
    }

    /// `U = G g G^T` for every (input, output) channel pair, as 16 `[cin, cout]` matrices.
    /// Made per call rather than kept: it is 16/9 the size of the weights, and a few milliseconds
    /// against the hundreds the convolution takes.
    fn winograd_weights(&self) -> Vec<f32> {
        let (cin, cout) = (self.cin, self.cout);
        let plane = cin * cout;
        let mut u = vec![0f32; 16 * plane];
        let g = |ky: usize, kx: usize, ci: usize| {
            &self.weight[((ky * 3 + kx) * cin + ci) * cout..][..cout]
        };
        let mut gg = vec![0f32; 12 * cout];
        for ci in 0..cin {
            // G g, row i and column kx at gg[(i * 3 + kx) * cout..]: rows g0, (g0 + g1 + g2) / 2,
            // (g0 - g1 + g2) / 2, g2.
            for kx in 0..3 {
                let (a, b, c) = (g(0, kx, ci), g(1, kx, ci), g(2, kx, ci));
                for co in 0..cout {
                    let (a, b, c) = (a[co], b[co], c[co]);
                    gg[kx * cout + co] = a;
                    gg[(3 + kx) * cout + co] = 0.5 * (a + b + c);
                    gg[(6 + kx) * cout + co] = 0.5 * (a - b + c);
                    gg[(9 + kx) * cout + co] = c;
                }
            }
            // (G g) G^T, the same along kx.
            for i in 0..4 {
                let row = |kx: usize| &gg[(i * 3 + kx) * cout..][..cout];
                let (a, b, c) = (row(0), row(1), row(2));
                for j in 0..4 {
                    let dst = &mut u[(i * 4 + j) * plane + ci * cout..][..cout];
                    for co in 0..cout {
                        dst[co] = match j {
                            0 => a[co],
                            1 => 0.5 * (a[co] + b[co] + c[co]),
                            2 => 0.5 * (a[co] - b[co] + c[co]),
                            _ => c[co],
                        };
                    }
                }
            }
        }
        u
    }

    /// Winograd F(2x2, 3x3) (Lavin and Gray, CVPR 2016): 16 multiply-adds per 2x2 output tile and
    /// channel pair instead of 36. Tiles are transformed and multiplied in cache-sized groups
    /// in parallel; the outputs are then put in place with bias, residual and ReLU.
    fn forward_winograd(&self, x: &Nhwc, residual: Option<&Nhwc>, relu: bool) -> Nhwc {
        let (cin, cout, d) = (self.cin, self.cout, self.dilation);
        let (rows, cols) = (TileAxis::new(x.h, d), TileAxis::new(x.w, d));
        let per_image = rows.first.len() * cols.first.len();
        let tiles = x.n * per_image;
        let u = self.winograd_weights();
        let plane = cin * cout;
        let threads = rayon::current_num_threads().max(1);
        let group = (TILE_FLOATS / (16 * (cin + cout)))
            .clamp(8, 4096)
            .min(tiles.div_ceil(4 * threads))
            .max(1);
        let zeros = vec![0f32; cin];

        // Per tile its four outputs (2x2, row-major), `cout` values each.
        let mut y = vec![0f32; tiles * 4 * cout];
        y.par_chunks_mut(group * 4 * cout)
            .enumerate()
            .for_each_init(
                || (Vec::new(), Vec::new()),
                |(v, m): &mut (Vec<f32>, Vec<f32>), (g, ys)| {
                    let t0 = g * group;
                    let tc = ys.len() / (4 * cout);
                    v.resize(tc * 16 * cin, 0.0);
                    m.resize(tc * 16 * cout, 0.0);
                    for i in 0..tc {
                        let t = t0 + i;
                        let (img, rest) = (t / per_image, t % per_image);
                        let (y0, x0) = (
                            rows.first[rest / cols.first.len()],
                            cols.first[rest % cols.first.len()],
                        );
                        let pixel = |s: usize, q: usize| -> &[f32] {
                            let iy = (y0 + s * d).checked_sub(d).filter(|&iy| iy < x.h);
                            let ix = (x0 + q * d).checked_sub(d).filter(|&ix| ix < x.w);
                            match (iy, ix) {
                                (Some(iy), Some(ix)) => {
                                    &x.data[((img * x.h + iy) * x.w + ix) * cin..][..cin]
                                }
                                _ => &zeros,
                            }
                        };
                        let p: [&[f32]; 16] = std::array::from_fn(|k| pixel(k / 4, k % 4));
                        winograd_input(&p, &mut v[i * cin..], tc * cin, cin);
                    }
                    // One product per transform position, each over the whole group.
                    for xi in 0..16 {
                        matmul(
                            &mut m[xi * tc * cout..(xi + 1) * tc * cout],
                            &v[xi * tc * cin..(xi + 1) * tc * cin],
                            &u[xi * plane..(xi + 1) * plane],
                            tc,
                            cin,
                            cout,
                        );
                    }
                    for (i, yt) in ys.chunks_exact_mut(4 * cout).enumerate() {
                        winograd_output(&m[i * cout..], tc * cout, yt, cout);
                    }
                },
            );

        let mut out = vec![0f32; x.n * x.h * x.w * cout];
        out.par_chunks_mut(x.w * cout)
            .enumerate()
            .for_each(|(r, dst)| {
                let (img, oy) = (r / x.h, r % x.h);
                let (tr, s) = rows.of[oy];
                for (ox, px) in dst.chunks_exact_mut(cout).enumerate() {
                    let (tcol, q) = cols.of[ox];
                    let t = img * per_image + tr * cols.first.len() + tcol;
                    px.copy_from_slice(&y[(t * 4 + s * 2 + q) * cout..][..cout]);
                }
                let res = residual.map(|res| &res.data[r * x.w * cout..(r + 1) * x.w * cout]);
                epilogue(dst, &self.bias, res, relu);
            });
        Nhwc {
            n: x.n,
            h: x.h,
            w: x.w,
            c: cout,
            data: out,
        }
    }
}

/// `V = B^T d B` for a 4x4 input tile `p` (row-major, `c` channels per pixel), written as 16
/// rows of `c` values `stride` apart.
fn winograd_input(p: &[&[f32]; 16], v: &mut [f32], stride: usize, c: usize) {
    for ci in 0..c {
        let d: [f32; 16] = std::array::from_fn(|k| p[k][ci]);
        // B^T d: rows d0 - d2, d1 + d2, d2 - d1, d1 - d3.
        let t: [[f32; 4]; 4] = std::array::from_fn(|q| {
            let col = |s: usize| d[s * 4 + q];
            [
                col(0) - col(2),
                col(1) + col(2),
                col(2) - col(1),
                col(1) - col(3),
            ]
        });
        // (B^T d) B: the same combination along the other axis; t is indexed [column][row].
        for i in 0..4 {
            let (a, b, cc, dd) = (t[0][i], t[1][i], t[2][i], t[3][i]);
            v[(i * 4) * stride + ci] = a - cc;
            v[(i * 4 + 1) * stride + ci] = b + cc;
            v[(i * 4 + 2) * stride + ci] = cc - b;
            v[(i * 4 + 3) * stride + ci] = b - dd;
        }
    }
}

/// `Y = A^T m A`: 16 rows of `c` values, `stride` apart, to a 2x2 output tile (row-major, `c`
/// values a pixel).
fn winograd_output(m: &[f32], stride: usize, y: &mut [f32], c: usize) {
    for co in 0..c {
        let at = |i: usize, j: usize| m[(i * 4 + j) * stride + co];
        // A^T m: rows m0 + m1 + m2 and m1 - m2 - m3.
        let t: [[f32; 4]; 2] = [
            std::array::from_fn(|j| at(0, j) + at(1, j) + at(2, j)),
            std::array::from_fn(|j| at(1, j) - at(2, j) - at(3, j)),
        ];
        for (s, r) in t.iter().enumerate() {
            y[(s * 2) * c + co] = r[0] + r[1] + r[2];
            y[(s * 2 + 1) * c + co] = r[1] - r[2] - r[3];
        }
    }
}

/// `dst = relu(dst + bias + residual)` row by row, the ReLU and residual optional.
fn epilogue(dst: &mut [f32], bias: &[f32], residual: Option<&[f32]>, relu: bool) {
    let c = bias.len();
    let floor = if relu { 0.0 } else { f32::NEG_INFINITY };
    match residual {
        Some(res) => {
            for (row, res) in dst.chunks_exact_mut(c).zip(res.chunks_exact(c)) {
                for ((v, b), r) in row.iter_mut().zip(bias).zip(res) {
                    *v = (*v + b + r).max(floor);
                }
            }
        }
        None => {
            for row in dst.chunks_exact_mut(c) {
                for (v, b) in row.iter_mut().zip(bias) {
                    *v = (*v + b).max(floor);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Module;
    use candle_nn::{Conv2d, Conv2dConfig};

    /// The fast path against candle's own conv2d: shapes DRN uses, and awkward ones.
    #[test]
    fn matches_candle_conv2d() -> Result<()> {
        let dev = Device::Cpu;
        // (batch, cin, cout, side, k, stride, padding, dilation)
        let cases = [
            (1, 1, 16, 37, 7, 1, 3, 1),
            (2, 2, 8, 20, 7, 1, 3, 1),
            (3, 16, 32, 33, 3, 2, 1, 1),
            (2, 32, 32, 17, 3, 1, 1, 1),
            (2, 24, 40, 19, 3, 1, 2, 2),
            (1, 40, 24, 23, 3, 1, 4, 4),
            (4, 8, 16, 12, 3, 1, 4, 4),
            (2, 16, 32, 21, 1, 2, 0, 1),
            (2, 48, 16, 9, 1, 1, 0, 1),
            (1, 5, 7, 11, 3, 2, 0, 1),
            (3, 3, 5, 10, 5, 2, 2, 2),
        ];
        for (i, &(n, cin, cout, side, k, stride, padding, dilation)) in cases.iter().enumerate() {
            let w = Tensor::randn(0f32, 0.3, (cout, cin, k, k), &dev)?;
            let b = Tensor::randn(0f32, 1.0, cout, &dev)?;
            let cfg = Conv2dConfig {
                padding,
                stride,
                dilation,
                ..Default::default()
            };
            let conv = Conv2d::new(w, Some(b), cfg);
            let x = Tensor::randn(0f32, 1.0, (n, cin, side, side), &dev)?;
            let want = conv.forward(&x)?;
            let xs = Nhwc::from_nchw(&x)?;
            let residual = Tensor::randn(0f32, 1.0, want.shape(), &dev)?;
            let want_fused = (&want + &residual)?.relu()?;
            let residual = Nhwc::from_nchw(&residual)?;
            for winograd in [false, true] {
                let mut kernel = ConvKernel::new(&conv, winograd)?;
                // Small channel counts keep the test fast; force the path they would not take.
                kernel.winograd = winograd;
                let what = format!("case {i}, winograd {}", kernel.winograd_applies());
                let got = kernel.forward(&xs, None, false)?.into_nchw(&dev)?;
                assert_close(&got, &want, &what)?;
                let got = kernel.forward(&xs, Some(&residual), true)?;
                assert_close(
                    &got.into_nchw(&dev)?,
                    &want_fused,
                    &format!("{what}, fused"),
                )?;
            }
        }
        Ok(())
    }

    /// Max difference relative to the largest reference value, so near-zero outputs of a sum of
    /// hundreds of terms do not make the comparison meaningless.
    fn assert_close(got: &Tensor, want: &Tensor, what: &str) -> Result<()> {
        assert_eq!(got.dims(), want.dims(), "{what}");
        let scale = want.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(
            diff / scale < 1e-4,
            "{what}: max diff {diff}, scale {scale}"
        );
        Ok(())
    }

    #[test]
    fn too_small_inputs_and_wrong_residuals_are_refused() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::zeros((4, 2, 3, 3), DType::F32, &dev)?;
        let cfg = Conv2dConfig {
            dilation: 4,
            ..Default::default()
        };
        let kernel = ConvKernel::new(&Conv2d::new(w, None, cfg), false)?;
        let x = Nhwc::from_nchw(&Tensor::zeros((1, 2, 5, 5), DType::F32, &dev)?)?;
        assert!(kernel.forward(&x, None, false).is_err());
        let x = Nhwc::from_nchw(&Tensor::zeros((1, 2, 12, 12), DType::F32, &dev)?)?;
        let wrong = Nhwc::from_nchw(&Tensor::zeros((1, 4, 3, 3), DType::F32, &dev)?)?;
        assert!(kernel.forward(&x, Some(&wrong), false).is_err());
        Ok(())
    }
}
