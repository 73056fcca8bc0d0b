//! Faster training kernels for the CPU: convolution (im2col and `gemm`, forward and backward),
//! BatchNorm on batch statistics and ReLU, each one candle custom op with its own backward pass.
//!
//! candle 0.11's CPU backward of `conv2d` goes through a direct `conv_transpose2d` and a conv
//! with a feature-map-sized kernel, and its BatchNorm and ReLU are chains of single-threaded
//! element-wise ops; for the narrow members trained here those dominate (see
//! `benches/train_step.rs`). These kernels compute the same functions; a test checks values and
//! gradients against candle's.

use std::sync::{Arc, Mutex};

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Device, Layout, Result, Shape, Storage,
    Tensor, Var,
};
use candle_nn::{BatchNorm, Conv2d};
use fracture_models::drn::{CandleTraining, TrainingOps};
use fracture_models::matmul::matmul;
use rayon::prelude::*;

/// [`TrainingOps`] with this module's kernels on the CPU (candle's own elsewhere, and for
/// grouped or biased convolutions, which the DRN does not have).
#[derive(Debug, Clone, Copy, Default)]
pub struct FastTraining;

impl TrainingOps for FastTraining {
    fn conv_bn(
        &self,
        conv: &Conv2d,
        bn: &BatchNorm,
        x: &Tensor,
        residual: Option<&Tensor>,
        relu: bool,
    ) -> Result<Tensor> {
        let cfg = conv.config();
        let Some((gamma, beta)) = bn.weight_and_bias() else {
            return CandleTraining.conv_bn(conv, bn, x, residual, relu);
        };
        if !x.device().is_cpu() || cfg.groups != 1 || conv.bias().is_some() {
            return CandleTraining.conv_bn(conv, bn, x, residual, relu);
        }
        let y = conv2d(x, conv.weight(), cfg.stride, cfg.padding, cfg.dilation)?;
        let y = batch_norm_train(&y, gamma, beta, bn)?;
        let y = match residual {
            Some(r) => (y + r)?,
            None => y,
        };
        if relu {
            self::relu(&y)
        } else {
            Ok(y)
        }
    }
}

/// The contiguous f32 values of a CPU tensor, for the duration of `f`.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => match layout.contiguous_offsets() {
            Some((a, b)) => Ok(f(&v[a..b])),
            None => bail!("training kernels need contiguous tensors"),
        },
        _ => bail!("training kernels run on float32 CPU tensors only"),
    }
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        (CpuStorage::F32(_), None) => bail!("training kernels need contiguous tensors"),
        _ => bail!("training kernels run on float32 tensors only"),
    }
}

/// The shapes of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geom {
    n: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    dil: usize,
    ho: usize,
    wo: usize,
}

impl Geom {
    fn new(x: &[usize], k: &[usize], stride: usize, pad: usize, dil: usize) -> Result<Geom> {
        let (&[n, cin, h, w], &[cout, kcin, kh, kw]) = (x, k) else {
            bail!("conv2d wants [N, C, H, W] input and [O, C, KH, KW] weights, got {x:?} and {k:?}")
        };
        if kcin != cin {
            bail!("conv2d: the input has {cin} channels, the weights expect {kcin}");
        }
        let span = |len: usize, k: usize| -> Result<usize> {
            let padded = len + 2 * pad;
            let reach = dil * (k - 1) + 1;
            if stride == 0 || padded < reach {
                bail!("conv2d: a {k}x{k} kernel at dilation {dil} does not fit {len} + 2 x {pad}");
            }
            Ok((padded - reach) / stride + 1)
        };
        Ok(Geom {
            n,
            cin,
            h,
            w,
            cout,
            kh,
            kw,
            stride,
            pad,
            dil,
            ho: span(h, kh)?,
            wo: span(w, kw)?,
        })
    }

    fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }

    fn p(&self) -> usize {
        self.ho * self.wo
    }

    /// Output columns `[lo, hi)` whose input column for kernel column `kx` is inside the image.
    fn valid_cols(&self, kx: usize) -> (usize, usize) {
        let off = (kx * self.dil) as isize - self.pad as isize;
        let s = self.stride as isize;
        let lo = if off >= 0 { 0 } else { (-off + s - 1) / s };
        let last = self.w as isize - 1 - off;
        let hi = if last < 0 { 0 } else { last / s + 1 };
        let lo = (lo as usize).min(self.wo);
        (lo, (hi as usize).clamp(lo, self.wo))
    }

    /// The input row for output row `oy` and kernel row `ky`, if inside the image.
    fn row(&self, oy: usize, ky: usize) -> Option<usize> {
        let iy = (oy * self.stride + ky * self.dil) as isize - self.pad as isize;
        (iy >= 0 && (iy as usize) < self.h).then_some(iy as usize)
    }

    /// `col[(c, ky, kx), (oy, ox)]` = the input pixel each kernel tap sees (0 in the padding).
    fn im2col(&self, x: &[f32], col: &mut [f32]) {
        let p = self.p();
        for c in 0..self.cin {
            let plane = &x[c * self.h * self.w..(c + 1) * self.h * self.w];
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let row = &mut col[((c * self.kh + ky) * self.kw + kx) * p..][..p];
                    let (lo, hi) = self.valid_cols(kx);
                    for oy in 0..self.ho {
                        let out = &mut row[oy * self.wo..(oy + 1) * self.wo];
                        let Some(iy) = self.row(oy, ky) else {
                            out.fill(0.0);
                            continue;
                        };
                        let src = &plane[iy * self.w..(iy + 1) * self.w];
                        out[..lo].fill(0.0);
                        out[hi..].fill(0.0);
                        if hi > lo {
                            let first = lo * self.stride + kx * self.dil - self.pad;
                            if self.stride == 1 {
                                out[lo..hi].copy_from_slice(&src[first..first + hi - lo]);
                            } else {
                                for (o, s) in out[lo..hi]
                                    .iter_mut()
                                    .zip(src[first..].iter().step_by(self.stride))
                                {
                                    *o = *s;
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// The adjoint of [`Geom::im2col`]: adds every column entry back onto its input pixel.
    fn col2im(&self, col: &[f32], x: &mut [f32]) {
        let p = self.p();
        for c in 0..self.cin {
            let plane = &mut x[c * self.h * self.w..(c + 1) * self.h * self.w];
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let row = &col[((c * self.kh + ky) * self.kw + kx) * p..][..p];
                    let (lo, hi) = self.valid_cols(kx);
                    if hi <= lo {
                        continue;
                    }
                    for oy in 0..self.ho {
                        let Some(iy) = self.row(oy, ky) else {
                            continue;
                        };
                        let src = &row[oy * self.wo + lo..oy * self.wo + hi];
                        let dst = &mut plane[iy * self.w..(iy + 1) * self.w];
                        let first = lo * self.stride + kx * self.dil - self.pad;
                        for (s, d) in src.iter().zip(dst[first..].iter_mut().step_by(self.stride)) {
                            *d += *s;
                        }
                    }
                }
            }
        }
    }
}

/// Convolution without bias, as candle's `conv2d` (PyTorch's cross-correlation).
struct Conv2dOp {
    stride: usize,
    pad: usize,
    dil: usize,
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "fracture-train-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geom::new(l1.dims(), l2.dims(), self.stride, self.pad, self.dil)?;
        let (x, w) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        let (k, p) = (g.k(), g.p());
        let mut out = vec![0f32; g.n * g.cout * p];
        out.par_chunks_mut(g.cout * p)
            .zip(x.par_chunks(g.cin * g.h * g.w))
            .for_each_init(
                || vec![0f32; k * p],
                |col, (o, xi)| {
                    g.im2col(xi, col);
                    matmul(o, g.cout, p, k, (w, k, 1), (col, p, 1), false);
                },
            );
        Ok((CpuStorage::F32(out), Shape::from((g.n, g.cout, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = Geom::new(x.dims(), w.dims(), self.stride, self.pad, self.dil)?;
        let (k, p) = (g.k(), g.p());
        let plane = g.cin * g.h * g.w;
        let gw = with_f32(x, |xs| {
            with_f32(grad, |gs| {
                // One weight gradient per image, summed in order: the same bits on any number
                // of threads.
                let per_image: Vec<Vec<f32>> = xs
                    .par_chunks(plane)
                    .zip(gs.par_chunks(g.cout * p))
                    .map_init(
                        || vec![0f32; k * p],
                        |col, (xi, gi)| {
                            g.im2col(xi, col);
                            let mut gw = vec![0f32; g.cout * k];
                            // gw[o, k] = grad[o, p] col[k, p]^T
                            matmul(&mut gw, g.cout, k, p, (gi, p, 1), (col, 1, p), false);
                            gw
                        },
                    )
                    .collect();
                let mut sum = vec![0f32; g.cout * k];
                for gwi in per_image {
                    sum.iter_mut().zip(gwi).for_each(|(s, v)| *s += v);
                }
                sum
            })
        })??;
        let gw = Tensor::from_vec(gw, w.shape(), &Device::Cpu)?;
        // The image itself needs no gradient (only the layers after the first do).
        let gx = if x.track_op() {
            let gx = with_f32(w, |ws| {
                with_f32(grad, |gs| {
                    let mut gx = vec![0f32; g.n * plane];
                    gx.par_chunks_mut(plane)
                        .zip(gs.par_chunks(g.cout * p))
                        .for_each_init(
                            || vec![0f32; k * p],
                            |col, (gxi, gi)| {
                                // col[k, p] = w[o, k]^T grad[o, p]
                                matmul(col, k, p, g.cout, (ws, 1, k), (gi, p, 1), false);
                                g.col2im(col, gxi);
                            },
                        );
                    gx
                })
            })??;
            Some(Tensor::from_vec(gx, x.shape(), &Device::Cpu)?)
        } else {
            None
        };
        Ok((gx, Some(gw)))
    }
}

/// `conv2d(x, w)` (no bias) with this module's kernels, differentiable.
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, pad: usize, dil: usize) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, Conv2dOp { stride, pad, dil })
}

/// The batch's per-channel mean and 1 / sqrt(var + eps), kept for the backward pass.
#[derive(Debug, Clone, Default)]
struct BnStats {
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    /// The unbiased variance, for the running statistics.
    var_unbiased: Vec<f32>,
}

/// BatchNorm over N, H and W with the batch's statistics: `gamma (x - mean) / sqrt(var + eps) +
/// beta`, var the biased variance (PyTorch's training mode).
struct BnOp {
    eps: f64,
    stats: Arc<Mutex<BnStats>>,
}

fn bn_dims(l: &Layout) -> Result<(usize, usize, usize)> {
    match l.dims() {
        [n, c, rest @ ..] => Ok((*n, *c, rest.iter().product())),
        d => bail!("batch norm wants [N, C, ...], got {d:?}"),
    }
}

/// Per channel: sums over every image's block of `f(value, other value)`, in f64.
fn channel_sums(
    a: &[f32],
    b: Option<&[f32]>,
    c: usize,
    hw: usize,
    f: impl Fn(usize, f32, f32) -> (f64, f64) + Sync,
) -> Vec<(f64, f64)> {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let mut s = (0.0, 0.0);
            for (i, block) in a.chunks(hw).enumerate().skip(ch).step_by(c) {
                let other = b.map(|b| &b[i * hw..(i + 1) * hw]);
                for (j, &v) in block.iter().enumerate() {
                    let (p, q) = f(ch, v, other.map_or(0.0, |o| o[j]));
                    s.0 += p;
                    s.1 += q;
                }
            }
            s
        })
        .collect()
}

impl CustomOp3 for BnOp {
    fn name(&self) -> &'static str {
        "fracture-train-batch-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, hw) = bn_dims(l1)?;
        let (x, gamma, beta) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        if gamma.len() != c || beta.len() != c {
            bail!(
                "batch norm: {c} channels but {} weights and {} biases",
                gamma.len(),
                beta.len()
            );
        }
        let m = (n * hw) as f64;
        if m < 2.0 {
            bail!("batch norm in training mode needs more than one value per channel");
        }
        let means: Vec<f64> = channel_sums(x, None, c, hw, |_, v, _| (f64::from(v), 0.0))
            .into_iter()
            .map(|s| s.0 / m)
            .collect();
        let sq = channel_sums(x, None, c, hw, |ch, v, _| {
            let d = f64::from(v) - means[ch];
            (d * d, 0.0)
        });
        let var: Vec<f64> = sq.iter().map(|s| s.0 / m).collect();
        let inv_std: Vec<f64> = var.iter().map(|v| 1.0 / (v + self.eps).sqrt()).collect();
        let scale: Vec<f32> = (0..c)
            .map(|ch| (f64::from(gamma[ch]) * inv_std[ch]) as f32)
            .collect();
        let shift: Vec<f32> = (0..c)
            .map(|ch| (f64::from(beta[ch]) - means[ch] * f64::from(gamma[ch]) * inv_std[ch]) as f32)
            .collect();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(hw)
            .zip(x.par_chunks(hw))
            .enumerate()
            .for_each(|(i, (yb, xb))| {
                let (a, b) = (scale[i % c], shift[i % c]);
                yb.iter_mut().zip(xb).for_each(|(y, &x)| *y = x * a + b);
            });
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        *stats = BnStats {
            mean: means.iter().map(|&v| v as f32).collect(),
            inv_std: inv_std.iter().map(|&v| v as f32).collect(),
            var_unbiased: var.iter().map(|&v| (v * m / (m - 1.0)) as f32).collect(),
        };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c, hw) = bn_dims(x.layout())?;
        let m = (n * hw) as f64;
        let stats = self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let gamma = gamma.to_vec1::<f32>()?;
        let (mean, inv_std) = (&stats.mean, &stats.inv_std);
        let (gx, sums) = with_f32(x, |xs| {
            with_f32(grad, |gs| {
                // sum(g) and sum(g * xhat) per channel.
                let sums = channel_sums(gs, Some(xs), c, hw, |ch, g, x| {
                    let xhat = f64::from(x - mean[ch]) * f64::from(inv_std[ch]);
                    (f64::from(g), f64::from(g) * xhat)
                });
                let mut gx = vec![0f32; xs.len()];
                gx.par_chunks_mut(hw)
                    .zip(xs.par_chunks(hw).zip(gs.par_chunks(hw)))
                    .enumerate()
                    .for_each(|(i, (gxb, (xb, gb)))| {
                        let ch = i % c;
                        let k = gamma[ch] * inv_std[ch];
                        let (sg, sgx) = ((sums[ch].0 / m) as f32, (sums[ch].1 / m) as f32);
                        for ((o, &x), &g) in gxb.iter_mut().zip(xb).zip(gb) {
                            let xhat = (x - mean[ch]) * inv_std[ch];
                            *o = k * (g - sg - xhat * sgx);
                        }
                    });
                (gx, sums)
            })
        })??;
        let dev = Device::Cpu;
        let g_gamma: Vec<f32> = sums.iter().map(|s| s.1 as f32).collect();
        let g_beta: Vec<f32> = sums.iter().map(|s| s.0 as f32).collect();
        Ok((
            Some(Tensor::from_vec(gx, x.shape(), &dev)?),
            Some(Tensor::from_vec(g_gamma, c, &dev)?),
            Some(Tensor::from_vec(g_beta, c, &dev)?),
        ))
    }
}

/// BatchNorm `bn` in training mode on `x`, differentiable in `x`, `gamma` and `beta`; moves
/// `bn`'s running statistics towards the batch's (PyTorch's rule and momentum, the unbiased
/// variance) when they are `Var`s.
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    bn: &BatchNorm,
) -> Result<Tensor> {
    let stats = Arc::new(Mutex::new(BnStats::default()));
    let y = x.contiguous()?.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        BnOp {
            eps: bn.eps(),
            stats: stats.clone(),
        },
    )?;
    let s = stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mom = bn.momentum() as f32;
    for (running, batch) in [
        (bn.running_mean(), &s.mean),
        (bn.running_var(), &s.var_unbiased),
    ] {
        if !running.is_variable() {
            continue;
        }
        let old = running.to_vec1::<f32>()?;
        let new: Vec<f32> = old
            .iter()
            .zip(batch)
            .map(|(&r, &b)| r * (1.0 - mom) + b * mom)
            .collect();
        Var::from_tensor(running)?.set(&Tensor::from_vec(new, old.len(), &Device::Cpu)?)?;
    }
    Ok(y)
}

struct ReluOp;

impl CustomOp1 for ReluOp {
    fn name(&self) -> &'static str {
        "fracture-train-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l)?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(1 << 14)
            .zip(x.par_chunks(1 << 14))
            .for_each(|(y, x)| y.iter_mut().zip(x).for_each(|(y, &x)| *y = x.max(0.0)));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let gx = with_f32(res, |r| {
            with_f32(grad, |g| {
                let mut gx = vec![0f32; g.len()];
                gx.par_chunks_mut(1 << 14)
                    .zip(r.par_chunks(1 << 14).zip(g.par_chunks(1 << 14)))
                    .for_each(|(o, (r, g))| {
                        for ((o, &r), &g) in o.iter_mut().zip(r).zip(g) {
                            *o = if r > 0.0 { g } else { 0.0 };
                        }
                    });
                gx
            })
        })??;
        Ok(Some(Tensor::from_vec(gx, res.shape(), &Device::Cpu)?))
    }
}

/// `max(x, 0)`, differentiable (gradient 0 at 0, as candle and PyTorch).
pub fn relu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(ReluOp)
}
