//! The Dilated Residual Network family (Yu, Koltun and Funkhouser, CVPR 2017) the ensemble is made of.
//!
//! This follows fyu/drn `drn.py` block for block: `BasicBlock`, `_make_layer`,
//! `_make_conv_layers`, arch C (a residual stem, residual-free dilated tail blocks) and arch D
//! (plain convolution stem and tail). Output stride is 8: layers 5 and 6 dilate instead of
//! striding. BatchNorm runs in inference mode on its running statistics. The stages are one table
//! ([`DrnConfig::stages`]) that the builder walks and the parameter and multiply-add counts walk.
//!
//! Tensor names are PyTorch's `state_dict` names, so a model exported from `drn.py` loads as is
//! (its `*.num_batches_tracked` entries are ignored):
//! - arch C stem: `conv1.weight`, `bn1.{weight,bias,running_mean,running_var}`;
//!   arch D stem: `layer0.0.weight` (conv), `layer0.1.*` (BatchNorm).
//! - residual stages: `layerK.B.conv1.weight`, `layerK.B.bn1.*`, `layerK.B.conv2.weight`,
//!   `layerK.B.bn2.*`, and on a block that changes shape `layerK.B.downsample.0.weight`,
//!   `layerK.B.downsample.1.*`.
//! - convolution stages (arch D layers 1, 2, 7, 8): `layerK.{3i}.weight`, `layerK.{3i+1}.*`
//!   (the ReLU at 3i+2 has no parameters).
//! - classifier: `fc.weight` `[1, C, 1, 1]` and `fc.bias` (C = `channels[7]`, or 21 x `channels[7]`
//!   with spatial pyramid pooling).
//!
//! The paper's variants add two heads of our own naming: `map_head.{weight,bias}` (the
//! probability map) and `attention.{weight,bias}` (the spatial attention gate).

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Module, ModuleT, Shape, Tensor};
use candle_nn::{batch_norm, conv2d, conv2d_no_bias, BatchNorm, Conv2d, Conv2dConfig, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::ModelError;
use Unit::{Conv, NoShortcut, Residual};

mod conv;

/// The reference's channel widths, stem to tail.
pub const REFERENCE_CHANNELS: [usize; 8] = [16, 32, 64, 128, 256, 512, 512, 512];

/// Which member of the DRN family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arch {
    #[serde(rename = "drn_c_26")]
    DrnC26,
    #[serde(rename = "drn_c_42")]
    DrnC42,
    #[serde(rename = "drn_d_22")]
    DrnD22,
    #[serde(rename = "drn_d_38")]
    DrnD38,
}

impl Arch {
    /// Blocks (arch C) or convolutions (arch D) per stage, as `drn.py` declares them.
    pub fn layers(self) -> [usize; 8] {
        match self {
            Arch::DrnC26 | Arch::DrnD22 => [1, 1, 2, 2, 2, 2, 1, 1],
            Arch::DrnC42 | Arch::DrnD38 => [1, 1, 3, 4, 6, 3, 1, 1],
        }
    }

    fn is_c(self) -> bool {
        matches!(self, Arch::DrnC26 | Arch::DrnC42)
    }

    /// The stem's convolution and BatchNorm: `conv1` and `bn1` in arch C, `layer0.0` and
    /// `layer0.1` (a `Sequential`) in arch D.
    fn stem_names(self) -> (&'static str, &'static str) {
        if self.is_c() {
            ("conv1", "bn1")
        } else {
            ("layer0.0", "layer0.1")
        }
    }

    /// `layer1` to `layer8` as `drn.py`'s `DRN.__init__` declares them: (unit, stride of the
    /// first unit, dilation, new_level).
    fn layout(self) -> &'static [(Unit, usize, usize, bool); 8] {
        if self.is_c() {
            &ARCH_C
        } else {
            &ARCH_D
        }
    }
}

/// What the units of a stage are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// `BasicBlock` (`_make_layer`): two 3x3 convolutions and the shortcut, a 1x1 projection on
    /// the block that changes the shape.
    Residual,
    /// `BasicBlock` without the shortcut (`_make_layer(residual=False)`): arch C's tail, which
    /// must not re-add the gridding artefacts of the dilated layers.
    NoShortcut,
    /// One 3x3 convolution, BatchNorm and ReLU (`_make_conv_layers`): arch D's first two and last
    /// two stages.
    Conv,
}

// The trunk after the stem, as drn.py declares it. Output stride 8: layers 2 to 4 halve the size,
// layers 5 and 6 dilate instead of striding. `new_level` starts a stage's first block at half the
// dilation; as no dilated stage sets it, it is kept only to read like drn.py.
#[rustfmt::skip]
const ARCH_C: [(Unit, usize, usize, bool); 8] = [
    // unit      stride dilation new_level
    (Residual,   1,     1,       true),  // layer1
    (Residual,   2,     1,       true),  // layer2
    (Residual,   2,     1,       true),  // layer3
    (Residual,   2,     1,       true),  // layer4
    (Residual,   1,     2,       false), // layer5
    (Residual,   1,     4,       false), // layer6
    (NoShortcut, 1,     2,       false), // layer7
    (NoShortcut, 1,     1,       false), // layer8
];

#[rustfmt::skip]
const ARCH_D: [(Unit, usize, usize, bool); 8] = [
    // unit      stride dilation new_level
    (Conv,       1,     1,       true),  // layer1
    (Conv,       2,     1,       true),  // layer2
    (Residual,   2,     1,       true),  // layer3
    (Residual,   2,     1,       true),  // layer4
    (Residual,   1,     2,       false), // layer5
    (Residual,   1,     4,       false), // layer6
    (Conv,       1,     2,       false), // layer7
    (Conv,       1,     1,       false), // layer8
];

/// The stem: one 7x7 convolution (padding 3, stride 1) to `channels[0]`, BatchNorm and ReLU.
const STEM_KERNEL: usize = 7;

/// One stage of the trunk: `repeats` units of `channels` outputs, the first striding by `stride`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageSpec {
    /// `K` of `layerK`, the stage's tensor-name prefix.
    pub layer: usize,
    pub unit: Unit,
    pub channels: usize,
    /// Blocks or convolutions ([`Arch::layers`]).
    pub repeats: usize,
    pub stride: usize,
    pub dilation: usize,
    pub new_level: bool,
}

/// How the final features become one vector for the classifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Global average pooling, as in the reference.
    #[default]
    Avg,
    /// Spatial pyramid pooling: adaptive average pools at 1x1, 2x2 and 4x4, concatenated.
    Spp,
}

/// Spatial pyramid levels (bins per side); 1 + 4 + 16 = 21 bins per channel.
const SPP_LEVELS: [usize; 3] = [1, 2, 4];

/// One network of the ensemble.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrnConfig {
    pub arch: Arch,
    /// 1 (raw or LCN) or 2 (both).
    pub in_channels: usize,
    pub channels: [usize; 8],
    pub pooling: Pooling,
    /// A 1x1 convolution on the stride-8 features giving a fracture logit map at size / 8.
    pub map_head: bool,
    /// Spatial attention before pooling. The paper says some members have "an attention
    /// mechanism" and nothing more; ours is the simplest spatial one: a 1x1 convolution to one
    /// channel, a sigmoid, and the features multiplied by that gate. The map head reads the
    /// ungated features, so the map and the gate stay separate quantities.
    pub attention: bool,
}

impl DrnConfig {
    /// The reference network: reference channels, average pooling, no extra heads.
    pub fn new(arch: Arch, in_channels: usize) -> Self {
        Self {
            arch,
            in_channels,
            channels: REFERENCE_CHANNELS,
            pooling: Pooling::Avg,
            map_head: false,
            attention: false,
        }
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        if self.in_channels == 0 {
            return Err(ModelError::InvalidConfig(
                "a DRN needs at least one input channel".into(),
            ));
        }
        if self.channels.contains(&0) {
            return Err(ModelError::InvalidConfig(format!(
                "DRN channels {:?} contain 0; every stage needs at least one channel",
                self.channels
            )));
        }
        Ok(())
    }

    /// The trunk after the stem, the one description of it: [`Drn::new`] builds these stages,
    /// [`count_parameters`] and [`multiply_adds`] count them. A stage without units is left out.
    pub fn stages(&self) -> Vec<StageSpec> {
        self.arch
            .layout()
            .iter()
            .zip(self.channels)
            .zip(self.arch.layers())
            .enumerate()
            .filter(|(_, (_, repeats))| *repeats > 0)
            .map(
                |(i, ((&(unit, stride, dilation, new_level), channels), repeats))| StageSpec {
                    layer: i + 1,
                    unit,
                    channels,
                    repeats,
                    stride,
                    dilation,
                    new_level,
                },
            )
            .collect()
    }
}

/// Inputs of the fc: one per channel, or one per channel and pyramid bin.
fn fc_inputs(pooling: Pooling, out_dim: usize) -> usize {
    match pooling {
        Pooling::Avg => out_dim,
        Pooling::Spp => out_dim * SPP_LEVELS.iter().map(|k| k * k).sum::<usize>(),
    }
}

fn conv3x3(
    inp: usize,
    out: usize,
    stride: usize,
    dilation: usize,
    vb: VarBuilder,
) -> candle_core::Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: dilation,
        stride,
        dilation,
        ..Default::default()
    };
    conv2d_no_bias(inp, out, 3, cfg, vb)
}

fn bn(c: usize, vb: VarBuilder) -> candle_core::Result<BatchNorm> {
    batch_norm(c, 1e-5, vb)
}

/// How the CPU fast path computes the stride-1 3x3 convolutions (nearly all the work).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Conv3x3 {
    /// im2col and one matrix product: 9 multiply-adds per output and channel pair.
    Im2col,
    /// Winograd F(2x2, 3x3): 4, at the cost of a few extra additions; rounding stays near
    /// float32's own (differences around 1e-6 relative).
    #[default]
    Winograd,
}

/// A convolution and the BatchNorm after it, in one of three forms.
#[derive(Debug, Clone)]
enum ConvBn {
    /// As the weights file has it: candle's convolution, then BatchNorm on its running statistics.
    Unfolded { conv: Conv2d, bn: BatchNorm },
    /// BatchNorm folded into the convolution's weights and bias; candle's conv2d, any device.
    Folded(Conv2d),
    /// Folded, the weights in the CPU fast path's layout.
    Cpu(conv::ConvKernel),
}

impl ConvBn {
    fn new(conv: Conv2d, bn: BatchNorm) -> Self {
        ConvBn::Unfolded { conv, bn }
    }

    /// `relu(bn(conv(x)) + residual)`, the residual and the ReLU optional. With `train`, those
    /// ops compute it with BatchNorm on the batch's statistics (only the unfolded form can train).
    fn forward(
        &self,
        x: &Features,
        residual: Option<&Features>,
        relu: bool,
        train: Option<&dyn TrainingOps>,
    ) -> candle_core::Result<Features> {
        let candle = |y: Tensor| -> candle_core::Result<Features> {
            let y = match residual {
                Some(Features::Tensor(r)) => (y + r)?,
                Some(Features::Nhwc(_)) => candle_core::bail!("a channels-last residual"),
                None => y,
            };
            Ok(Features::Tensor(if relu { y.relu()? } else { y }))
        };
        match (self, x) {
            (ConvBn::Unfolded { conv, bn }, Features::Tensor(x)) => match train {
                Some(ops) => {
                    let residual = match residual {
                        Some(Features::Tensor(r)) => Some(r),
                        Some(Features::Nhwc(_)) => candle_core::bail!("a channels-last residual"),
                        None => None,
                    };
                    Ok(Features::Tensor(ops.conv_bn(conv, bn, x, residual, relu)?))
                }
                None => candle(bn.forward_t(&conv.forward(x)?, false)?),
            },
            (ConvBn::Folded(_) | ConvBn::Cpu(_), _) if train.is_some() => candle_core::bail!(
                "a network prepared for inference (BatchNorm folded) cannot train; train the \
                 network Drn::new built"
            ),
            (ConvBn::Folded(conv), Features::Tensor(x)) => candle(conv.forward(x)?),
            (ConvBn::Cpu(kernel), Features::Nhwc(x)) => {
                let residual = match residual {
                    Some(Features::Nhwc(r)) => Some(r),
                    Some(Features::Tensor(_)) => candle_core::bail!("a channels-first residual"),
                    None => None,
                };
                Ok(Features::Nhwc(kernel.forward(x, residual, relu)?))
            }
            _ => candle_core::bail!(
                "a DRN layer got features in the other layout; every layer of a network must be \
                 prepared the same way"
            ),
        }
    }

    fn fold(&self) -> candle_core::Result<ConvBn> {
        Ok(match self {
            ConvBn::Unfolded { conv, bn } => ConvBn::Folded(conv.absorb_bn(bn)?),
            other => other.clone(),
        })
    }

    fn to_cpu(&self, conv3x3: Conv3x3) -> candle_core::Result<ConvBn> {
        let winograd = conv3x3 == Conv3x3::Winograd;
        Ok(match self.fold()? {
            ConvBn::Folded(conv) => ConvBn::Cpu(conv::ConvKernel::new(&conv, winograd)?),
            other => other,
        })
    }
}

/// How a training pass computes one convolution unit, `relu(bn(conv(x)) + residual)` (the
/// residual and the ReLU optional), with BatchNorm in training mode: normalised by the batch's
/// statistics, and the running statistics (the `Var`s behind `bn.running_mean()` and
/// `bn.running_var()`) moved towards them by `bn.momentum()`. It must be differentiable with
/// respect to `x`, the convolution's weight and the BatchNorm's weight and bias.
pub trait TrainingOps: Sync {
    fn conv_bn(
        &self,
        conv: &Conv2d,
        bn: &BatchNorm,
        x: &Tensor,
        residual: Option<&Tensor>,
        relu: bool,
    ) -> candle_core::Result<Tensor>;
}

/// [`TrainingOps`] from candle's own differentiable ops (`Conv2d`, `BatchNorm::forward_t`).
#[derive(Debug, Clone, Copy, Default)]
pub struct CandleTraining;

impl TrainingOps for CandleTraining {
    fn conv_bn(
        &self,
        conv: &Conv2d,
        bn: &BatchNorm,
        x: &Tensor,
        residual: Option<&Tensor>,
        relu: bool,
    ) -> candle_core::Result<Tensor> {
        let y = bn.forward_t(&conv.forward(x)?, true)?;
        let y = match residual {
            Some(r) => (y + r)?,
            None => y,
        };
        if relu {
            y.relu()
        } else {
            Ok(y)
        }
    }
}

/// Feature maps between layers: candle's `[N, C, H, W]` tensors, or the CPU fast path's
/// channels-last buffers.
enum Features {
    Tensor(Tensor),
    Nhwc(conv::Nhwc),
}

/// `drn.py`'s BasicBlock; `residual: false` is arch C's tail, which must not re-add the
/// gridding artefacts of the dilated layers.
#[derive(Debug, Clone)]
struct BasicBlock {
    conv1: ConvBn,
    conv2: ConvBn,
    downsample: Option<ConvBn>,
    residual: bool,
}

impl BasicBlock {
    fn forward(
        &self,
        x: &Features,
        train: Option<&dyn TrainingOps>,
    ) -> candle_core::Result<Features> {
        let out = self.conv1.forward(x, None, true, train)?;
        let projected;
        let shortcut = match (&self.downsample, self.residual) {
            (_, false) => None,
            (Some(down), true) => {
                projected = down.forward(x, None, false, train)?;
                Some(&projected)
            }
            (None, true) => Some(x),
        };
        self.conv2.forward(&out, shortcut, true, train)
    }

    fn map(
        &self,
        f: &impl Fn(&ConvBn) -> candle_core::Result<ConvBn>,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            conv1: f(&self.conv1)?,
            conv2: f(&self.conv2)?,
            downsample: self.downsample.as_ref().map(f).transpose()?,
            residual: self.residual,
        })
    }
}

#[derive(Debug, Clone)]
enum Stage {
    Blocks(Vec<BasicBlock>),
    /// Convolution, BatchNorm, ReLU: arch D's convolution stages.
    Convs(Vec<ConvBn>),
}

impl Stage {
    fn forward(
        &self,
        x: Features,
        train: Option<&dyn TrainingOps>,
    ) -> candle_core::Result<Features> {
        let mut x = x;
        match self {
            Stage::Blocks(blocks) => {
                for b in blocks {
                    x = b.forward(&x, train)?;
                }
            }
            Stage::Convs(convs) => {
                for c in convs {
                    x = c.forward(&x, None, true, train)?;
                }
            }
        }
        Ok(x)
    }

    fn map(
        &self,
        f: &impl Fn(&ConvBn) -> candle_core::Result<ConvBn>,
    ) -> candle_core::Result<Self> {
        Ok(match self {
            Stage::Blocks(blocks) => {
                Stage::Blocks(blocks.iter().map(|b| b.map(f)).collect::<Result<_, _>>()?)
            }
            Stage::Convs(convs) => Stage::Convs(convs.iter().map(f).collect::<Result<_, _>>()?),
        })
    }
}

/// `_make_layer`: basic blocks; the first may stride, and with a shortcut gets a 1x1 projection
/// when the shape changes.
fn make_layer(inplanes: &mut usize, s: &StageSpec, vb: VarBuilder) -> candle_core::Result<Stage> {
    let (planes, stride, dilation) = (s.channels, s.stride, s.dilation);
    let downsample = if stride != 1 || *inplanes != planes {
        let cfg = Conv2dConfig {
            stride,
            ..Default::default()
        };
        Some(ConvBn::new(
            conv2d_no_bias(*inplanes, planes, 1, cfg, vb.pp("0.downsample.0"))?,
            bn(planes, vb.pp("0.downsample.1"))?,
        ))
    } else {
        None
    };
    let first_dilation = if dilation == 1 {
        (1, 1)
    } else if s.new_level {
        (dilation / 2, dilation)
    } else {
        (dilation, dilation)
    };
    let mut out = Vec::with_capacity(s.repeats);
    let mut downsample = downsample;
    for i in 0..s.repeats {
        let vb = vb.pp(i.to_string());
        let (inp, stride, (d0, d1)) = if i == 0 {
            (*inplanes, stride, first_dilation)
        } else {
            (planes, 1, (dilation, dilation))
        };
        let conv1 = ConvBn::new(
            conv3x3(inp, planes, stride, d0, vb.pp("conv1"))?,
            bn(planes, vb.pp("bn1"))?,
        );
        let conv2 = ConvBn::new(
            conv3x3(planes, planes, 1, d1, vb.pp("conv2"))?,
            bn(planes, vb.pp("bn2"))?,
        );
        out.push(BasicBlock {
            conv1,
            conv2,
            downsample: downsample.take(),
            residual: s.unit == Residual,
        });
        *inplanes = planes;
    }
    Ok(Stage::Blocks(out))
}

/// `_make_conv_layers`: plain 3x3 convolutions, the first one striding.
fn make_conv_layers(
    inplanes: &mut usize,
    s: &StageSpec,
    vb: VarBuilder,
) -> candle_core::Result<Stage> {
    let mut out = Vec::with_capacity(s.repeats);
    for i in 0..s.repeats {
        let stride = if i == 0 { s.stride } else { 1 };
        out.push(ConvBn::new(
            conv3x3(
                *inplanes,
                s.channels,
                stride,
                s.dilation,
                vb.pp((3 * i).to_string()),
            )?,
            bn(s.channels, vb.pp((3 * i + 1).to_string()))?,
        ));
        *inplanes = s.channels;
    }
    Ok(Stage::Convs(out))
}

/// A Dilated Residual Network with one fracture logit and, optionally, a logit map.
#[derive(Debug, Clone)]
pub struct Drn {
    stem: ConvBn,
    stages: Vec<Stage>,
    attention: Option<Conv2d>,
    map_head: Option<Conv2d>,
    fc: Conv2d,
    pooling: Pooling,
}

impl Drn {
    pub fn new(cfg: &DrnConfig, vb: VarBuilder) -> Result<Self, ModelError> {
        cfg.validate()?;
        Ok(Self::build(cfg, vb)?)
    }

    fn build(cfg: &DrnConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let c0 = cfg.channels[0];
        let stem_cfg = Conv2dConfig {
            padding: STEM_KERNEL / 2,
            ..Default::default()
        };
        let (conv_name, bn_name) = cfg.arch.stem_names();
        let stem = ConvBn::new(
            conv2d_no_bias(cfg.in_channels, c0, STEM_KERNEL, stem_cfg, vb.pp(conv_name))?,
            bn(c0, vb.pp(bn_name))?,
        );

        let mut inplanes = c0;
        let mut stages = Vec::with_capacity(8);
        for s in cfg.stages() {
            let vb = vb.pp(format!("layer{}", s.layer));
            stages.push(match s.unit {
                Residual | NoShortcut => make_layer(&mut inplanes, &s, vb)?,
                Conv => make_conv_layers(&mut inplanes, &s, vb)?,
            });
        }
        let out_dim = inplanes;

        let head = |name: &str, inp: usize| conv2d(inp, 1, 1, Conv2dConfig::default(), vb.pp(name));
        let attention = cfg
            .attention
            .then(|| head("attention", out_dim))
            .transpose()?;
        let map_head = cfg
            .map_head
            .then(|| head("map_head", out_dim))
            .transpose()?;
        let fc = head("fc", fc_inputs(cfg.pooling, out_dim))?;
        Ok(Self {
            stem,
            stages,
            attention,
            map_head,
            fc,
            pooling: cfg.pooling,
        })
    }

    /// Folds every BatchNorm into the convolution before it: w' = w * g / sqrt(var + eps),
    /// b' = beta - mean * g / sqrt(var + eps). For inference only (the running statistics are
    /// gone afterwards); the outputs agree with the unfolded network's to rounding.
    pub fn fold_batchnorm(&self) -> candle_core::Result<Drn> {
        self.map_convs(&ConvBn::fold)
    }

    /// Folds the BatchNorms and, on the CPU, moves every trunk convolution to the fast path
    /// (channels-last im2col + `gemm`, fused bias, residual and ReLU). Elsewhere (CUDA) candle's
    /// own conv2d runs the folded convolutions. What [`crate::Ensemble::load`] does to each member.
    pub fn prepare_for_inference(&self, device: &Device) -> candle_core::Result<Drn> {
        self.prepare_for_inference_with(device, Conv3x3::default())
    }

    /// [`Drn::prepare_for_inference`] with a choice of algorithm for the CPU's stride-1 3x3
    /// convolutions; for benchmarks and tests.
    pub fn prepare_for_inference_with(
        &self,
        device: &Device,
        conv3x3: Conv3x3,
    ) -> candle_core::Result<Drn> {
        if device.is_cpu() {
            self.map_convs(&|c: &ConvBn| c.to_cpu(conv3x3))
        } else {
            self.fold_batchnorm()
        }
    }

    fn map_convs(
        &self,
        f: &impl Fn(&ConvBn) -> candle_core::Result<ConvBn>,
    ) -> candle_core::Result<Drn> {
        Ok(Drn {
            stem: f(&self.stem)?,
            stages: self
                .stages
                .iter()
                .map(|s| s.map(f))
                .collect::<candle_core::Result<_>>()?,
            attention: self.attention.clone(),
            map_head: self.map_head.clone(),
            fc: self.fc.clone(),
            pooling: self.pooling,
        })
    }

    /// `[N, in_channels, S, S]` -> (logits `[N]`, map logits `[N, S/8, S/8]` with a map head).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        self.forward_with(x, None)
    }

    /// [`Drn::forward`], or with `train` the training pass with candle's own ops
    /// ([`CandleTraining`]): every BatchNorm normalises by the batch's statistics and moves its
    /// running statistics towards them (momentum 0.1, as PyTorch), writing them into the `Var`s
    /// the network was built from (a `VarMap`'s). Only the network [`Drn::new`] built can
    /// train, not one prepared for inference.
    pub fn forward_t(
        &self,
        x: &Tensor,
        train: bool,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        self.forward_with(x, train.then_some(&CandleTraining as &dyn TrainingOps))
    }

    /// The training pass with the given ops for the convolution units (a trainer's faster
    /// kernels); the heads, pooling and residual wiring are the network's own.
    pub fn forward_train(
        &self,
        x: &Tensor,
        ops: &dyn TrainingOps,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        self.forward_with(x, Some(ops))
    }

    fn forward_with(
        &self,
        x: &Tensor,
        train: Option<&dyn TrainingOps>,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let n = x.dim(0)?;
        let input = match self.stem {
            ConvBn::Cpu(_) => Features::Nhwc(conv::Nhwc::from_nchw(x)?),
            _ => Features::Tensor(x.clone()),
        };
        let mut features = self.stem.forward(&input, None, true, train)?;
        drop(input);
        for stage in &self.stages {
            features = stage.forward(features, train)?;
        }
        let features = match features {
            Features::Tensor(t) => t,
            Features::Nhwc(f) => f.into_nchw(x.device())?,
        };
        let map = match &self.map_head {
            Some(head) => Some(head.forward(&features)?.squeeze(1)?),
            None => None,
        };
        let features = match &self.attention {
            Some(att) => {
                features.broadcast_mul(&candle_nn::ops::sigmoid(&att.forward(&features)?)?)?
            }
            None => features,
        };
        let pooled = match self.pooling {
            Pooling::Avg => features.mean_keepdim((2, 3))?,
            Pooling::Spp => {
                let levels = SPP_LEVELS
                    .iter()
                    .map(|&k| adaptive_avg_pool_flat(&features, k))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let flat = Tensor::cat(&levels, 1)?;
                let c = flat.dim(1)?;
                flat.reshape((n, c, 1, 1))?
            }
        };
        let logits = self.fc.forward(&pooled)?.reshape(n)?;
        Ok((logits, map))
    }
}

/// PyTorch's `adaptive_avg_pool2d(x, k).flatten(1)`: `[N, C, H, W]` -> `[N, C * k * k]`, bins
/// `[floor(i H / k), ceil((i + 1) H / k))` so every pixel is used even when k does not divide H.
fn adaptive_avg_pool_flat(x: &Tensor, k: usize) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if k == 1 {
        return x.mean((2, 3));
    }
    let bounds = |i: usize, len: usize| (i * len / k, ((i + 1) * len).div_ceil(k));
    let mut bins = Vec::with_capacity(k * k);
    for i in 0..k {
        let (h0, h1) = bounds(i, h);
        let rows = x.narrow(2, h0, h1 - h0)?;
        for j in 0..k {
            let (w0, w1) = bounds(j, w);
            bins.push(rows.narrow(3, w0, w1 - w0)?.mean((2, 3))?.unsqueeze(2)?);
        }
    }
    Tensor::cat(&bins, 2)?.reshape((n, c * k * k))
}

/// One tensor a [`Drn`] reads, with the initialisation candle-nn would give it.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: candle_nn::Init,
}

impl ParamSpec {
    /// BatchNorm running statistics are state, not learned parameters.
    pub fn is_running_stat(&self) -> bool {
        self.name.ends_with(".running_mean") || self.name.ends_with(".running_var")
    }
}

/// A VarBuilder backend that records what the network asks for and hands back zero tensors
/// that occupy no memory, so the full-size architecture can be listed without allocating it.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<ParamSpec>>>);

impl candle_nn::var_builder::SimpleBackend for Recorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg("parameter recorder poisoned".into()))?
            .push(ParamSpec {
                name: name.to_string(),
                shape: s.dims().to_vec(),
                init: h,
            });
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("the parameter recorder cannot serve {name} without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Every tensor a [`Drn`] with this configuration reads, in construction order.
pub fn parameter_specs(cfg: &DrnConfig) -> Result<Vec<ParamSpec>, ModelError> {
    cfg.validate()?;
    let recorder = Recorder::default();
    let vb = VarBuilder::from_backend(Box::new(recorder.clone()), DType::F32, Device::Cpu);
    Drn::build(cfg, vb)?;
    let specs = recorder
        .0
        .lock()
        .map_err(|_| ModelError::InvalidConfig("parameter recorder poisoned".into()))?
        .clone();
    Ok(specs)
}

/// Learned parameters (convolution and fc weights and biases, BatchNorm weight and bias; not
/// the running statistics), counted analytically.
pub fn count_parameters(cfg: &DrnConfig) -> usize {
    // The spatial size does not change the parameter count.
    let t = tally(cfg, 64);
    t.params as usize
}

/// Multiply-adds of one forward pass on an `input_size x input_size` image, counted
/// analytically over the convolutions and the fc (BatchNorm, ReLU and pooling are negligible).
pub fn multiply_adds(cfg: &DrnConfig, input_size: usize) -> u64 {
    tally(cfg, input_size).macs
}

/// A walk over [`DrnConfig::stages`] that counts instead of allocating; the units' insides
/// mirror [`make_layer`] and [`make_conv_layers`], and a test keeps them in step.
struct Tally {
    params: u64,
    macs: u64,
    side: u64,
}

impl Tally {
    fn conv(&mut self, cin: usize, cout: usize, k: usize, stride: usize, bias: bool) {
        // Every convolution here pads by dilation * (k - 1) / 2, so only the stride changes size.
        let side = (self.side - 1) / stride as u64 + 1;
        let (cin, cout, k) = (cin as u64, cout as u64, k as u64);
        self.params += cout * cin * k * k + if bias { cout } else { 0 };
        self.macs += side * side * cout * cin * k * k;
        self.side = side;
    }

    fn bn(&mut self, c: usize) {
        self.params += 2 * c as u64;
    }

    fn layer(&mut self, inplanes: &mut usize, s: &StageSpec) {
        let (planes, blocks, stride) = (s.channels, s.repeats, s.stride);
        if stride != 1 || *inplanes != planes {
            let side = self.side;
            self.conv(*inplanes, planes, 1, stride, false);
            self.bn(planes);
            self.side = side;
        }
        for i in 0..blocks {
            let (inp, s) = if i == 0 {
                (*inplanes, stride)
            } else {
                (planes, 1)
            };
            self.conv(inp, planes, 3, s, false);
            self.bn(planes);
            self.conv(planes, planes, 3, 1, false);
            self.bn(planes);
            *inplanes = planes;
        }
    }

    fn conv_layers(&mut self, inplanes: &mut usize, s: &StageSpec) {
        let (channels, convs, stride) = (s.channels, s.repeats, s.stride);
        for i in 0..convs {
            self.conv(
                *inplanes,
                channels,
                3,
                if i == 0 { stride } else { 1 },
                false,
            );
            self.bn(channels);
            *inplanes = channels;
        }
    }
}

fn tally(cfg: &DrnConfig, input_size: usize) -> Tally {
    let c0 = cfg.channels[0];
    let mut t = Tally {
        params: 0,
        macs: 0,
        side: input_size.max(1) as u64,
    };
    t.conv(cfg.in_channels, c0, STEM_KERNEL, 1, false);
    t.bn(c0);
    let mut ip = c0;
    for s in cfg.stages() {
        match s.unit {
            Residual | NoShortcut => t.layer(&mut ip, &s),
            Conv => t.conv_layers(&mut ip, &s),
        }
    }
    let side = t.side;
    if cfg.attention {
        t.conv(ip, 1, 1, 1, true);
    }
    if cfg.map_head {
        t.conv(ip, 1, 1, 1, true);
    }
    t.side = 1;
    t.conv(fc_inputs(cfg.pooling, ip), 1, 1, 1, true);
    t.side = side;
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Arch; 4] = [Arch::DrnC26, Arch::DrnC42, Arch::DrnD22, Arch::DrnD38];

    /// candle's pattern: a test body taking a device, run on the CPU and, in a `cuda` build,
    /// on the first GPU.
    macro_rules! test_device {
        ($body:ident, $cpu:ident, $cuda:ident) => {
            #[test]
            fn $cpu() -> candle_core::Result<()> {
                $body(&Device::Cpu)
            }

            #[cfg(feature = "cuda")]
            #[test]
            fn $cuda() -> candle_core::Result<()> {
                $body(&Device::new_cuda(0)?)
            }
        };
    }

    /// Largest difference relative to the largest reference value.
    fn relative_diff(got: &Tensor, want: &Tensor) -> candle_core::Result<f32> {
        let scale = want.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
        Ok((got - want)?.abs()?.max_all()?.to_scalar::<f32>()? / scale)
    }

    /// Folding BatchNorm (and, on the CPU, the fast path) changes nothing but rounding, on
    /// statistics far from the identity.
    fn folded_matches_unfolded(dev: &Device) -> candle_core::Result<()> {
        let to_candle = |e: ModelError| candle_core::Error::Msg(e.to_string());
        let tmp = tempfile::tempdir()?;
        for (i, arch) in ALL.into_iter().enumerate() {
            let spec = crate::MemberSpec {
                name: "fold".into(),
                arch,
                input: crate::manifest::Input::Both,
                map_head: true,
                attention: i % 2 == 0,
                pooling: if i < 2 { Pooling::Spp } else { Pooling::Avg },
                channels: [4, 6, 8, 8, 12, 12, 10, 10],
                weights: "w.safetensors".into(),
                sha256: String::new(),
            };
            let path = tmp.path().join(format!("{i}.safetensors"));
            crate::init::init_member_weights_with(
                &spec,
                i as u64 + 7,
                crate::init::BatchNormInit::Random,
                &path,
            )
            .map_err(to_candle)?;
            let tensors = candle_core::safetensors::load(&path, dev)?;
            let vb = VarBuilder::from_tensors(tensors, DType::F32, dev);
            let net = Drn::new(&spec.drn_config(), vb).map_err(to_candle)?;
            let x = Tensor::randn(0f32, 1.0, (2, 2, 48, 48), dev)?;
            let (want_logits, want_map) = net.forward(&x)?;
            let want_map = want_map.expect("a map head");
            for prepared in [
                net.fold_batchnorm()?,
                net.prepare_for_inference_with(dev, Conv3x3::Im2col)?,
                net.prepare_for_inference(dev)?,
            ] {
                let (logits, map) = prepared.forward(&x)?;
                let map = map.expect("a map head");
                let (dl, dm) = (
                    relative_diff(&logits, &want_logits)?,
                    relative_diff(&map, &want_map)?,
                );
                assert!(dl < 1e-4 && dm < 1e-4, "{arch:?}: logits {dl}, map {dm}");
            }
        }
        Ok(())
    }

    test_device!(
        folded_matches_unfolded,
        folded_matches_unfolded_cpu,
        folded_matches_unfolded_cuda
    );

    fn millions(n: usize) -> f64 {
        n as f64 / 1e6
    }

    #[test]
    fn parameter_counts_match_the_reference() {
        let c26 = count_parameters(&DrnConfig::new(Arch::DrnC26, 1));
        let d22 = count_parameters(&DrnConfig::new(Arch::DrnD22, 1));
        assert!((millions(c26) - 20.61).abs() < 0.01, "DRN-C-26: {c26}");
        assert!((millions(d22) - 15.88).abs() < 0.01, "DRN-D-22: {d22}");
    }

    #[test]
    fn multiply_adds_at_1024_match_the_notes() {
        let c26 = multiply_adds(&DrnConfig::new(Arch::DrnC26, 1), 1024) as f64 / 1e9;
        let d22 = multiply_adds(&DrnConfig::new(Arch::DrnD22, 1), 1024) as f64 / 1e9;
        assert!((c26 - 353.0).abs() / 353.0 < 0.01, "DRN-C-26: {c26} G");
        assert!((d22 - 271.0).abs() / 271.0 < 0.01, "DRN-D-22: {d22} G");
    }

    /// `fracture model summary` prints these; the shipped weights were made for these shapes.
    #[test]
    fn the_reference_networks_have_their_exact_counts() {
        for (arch, params, macs_1024) in [
            (Arch::DrnC26, 20_612_529, 353_009_402_368),
            (Arch::DrnC42, 30_720_689, 522_123_739_648),
            (Arch::DrnD22, 15_879_697, 270_733_935_104),
            (Arch::DrnD38, 25_987_857, 439_848_272_384),
        ] {
            let cfg = DrnConfig::new(arch, 1);
            assert_eq!(count_parameters(&cfg), params, "{arch:?}");
            assert_eq!(multiply_adds(&cfg, 1024), macs_1024, "{arch:?}");
        }
    }

    #[test]
    fn the_analytic_count_matches_the_built_network() {
        for arch in ALL {
            for (pooling, map_head, attention, in_channels) in [
                (Pooling::Avg, false, false, 1),
                (Pooling::Spp, true, true, 2),
                (Pooling::Avg, true, false, 2),
            ] {
                let cfg = DrnConfig {
                    arch,
                    in_channels,
                    channels: [4, 6, 8, 8, 12, 12, 10, 10],
                    pooling,
                    map_head,
                    attention,
                };
                let built: usize = parameter_specs(&cfg)
                    .expect("specs")
                    .iter()
                    .filter(|p| !p.is_running_stat())
                    .map(|p| p.shape.iter().product::<usize>())
                    .sum();
                assert_eq!(built, count_parameters(&cfg), "{cfg:?}");
            }
        }
    }

    #[test]
    fn tensor_names_follow_pytorch() {
        let names = |arch| -> Vec<String> {
            parameter_specs(&DrnConfig::new(arch, 1))
                .expect("specs")
                .into_iter()
                .map(|p| p.name)
                .collect()
        };
        let c = names(Arch::DrnC26);
        for want in [
            "conv1.weight",
            "bn1.running_var",
            "layer1.0.conv1.weight",
            "layer1.0.bn1.running_mean",
            "layer2.0.downsample.0.weight",
            "layer2.0.downsample.1.bias",
            "layer8.0.conv2.weight",
            "fc.weight",
            "fc.bias",
        ] {
            assert!(c.iter().any(|n| n == want), "DRN-C-26 lacks {want}");
        }
        let d = names(Arch::DrnD22);
        for want in [
            "layer0.0.weight",
            "layer0.1.weight",
            "layer1.0.weight",
            "layer1.1.running_var",
            "layer3.0.downsample.0.weight",
            "layer8.0.weight",
            "fc.bias",
        ] {
            assert!(d.iter().any(|n| n == want), "DRN-D-22 lacks {want}");
        }
    }

    #[test]
    fn forward_shapes_on_a_tiny_network() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for arch in ALL {
            for (pooling, map_head, attention) in
                [(Pooling::Avg, true, false), (Pooling::Spp, false, true)]
            {
                let cfg = DrnConfig {
                    arch,
                    in_channels: 2,
                    channels: [4, 4, 8, 8, 8, 8, 8, 8],
                    pooling,
                    map_head,
                    attention,
                };
                let varmap = candle_nn::VarMap::new();
                let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
                let drn = Drn::new(&cfg, vb).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                let x = Tensor::randn(0f32, 1.0, (3, 2, 64, 64), &dev)?;
                let (logits, map) = drn.forward(&x)?;
                assert_eq!(logits.dims(), &[3]);
                match map {
                    Some(m) => {
                        assert!(map_head);
                        assert_eq!(m.dims(), &[3, 8, 8]);
                    }
                    None => assert!(!map_head),
                }
            }
        }
        Ok(())
    }

    #[test]
    fn adaptive_pooling_matches_pytorch_bins() -> candle_core::Result<()> {
        // 1 x 1 x 5 x 5 holding 0..25: the 2x2 bins overlap at row/column 2.
        let x = Tensor::arange(0f32, 25.0, &Device::Cpu)?.reshape((1, 1, 5, 5))?;
        let got = adaptive_avg_pool_flat(&x, 2)?.to_vec2::<f32>()?;
        let mean = |r: std::ops::Range<usize>, c: std::ops::Range<usize>| {
            let v: Vec<f32> = r
                .flat_map(|i| c.clone().map(move |j| (i * 5 + j) as f32))
                .collect();
            v.iter().sum::<f32>() / v.len() as f32
        };
        let want = [
            mean(0..3, 0..3),
            mean(0..3, 2..5),
            mean(2..5, 0..3),
            mean(2..5, 2..5),
        ];
        for (g, w) in got[0].iter().zip(want) {
            assert!((g - w).abs() < 1e-5);
        }
        Ok(())
    }

    #[test]
    fn serde_names() {
        #[derive(Deserialize)]
        struct T {
            arch: Arch,
            pooling: Pooling,
        }
        let t: T = toml::from_str("arch = \"drn_c_42\"\npooling = \"spp\"").expect("parse");
        assert_eq!((t.arch, t.pooling), (Arch::DrnC42, Pooling::Spp));
    }
}
