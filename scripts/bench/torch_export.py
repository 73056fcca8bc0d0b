#!/usr/bin/env python3
"""Writes a DRN's weights as PyTorch exports them: fyu/drn drn.py's state_dict names and shapes.

Needs numpy and safetensors only (no torch), so CI can run it: models/tests/torch_export.rs loads
the file through our manifest and Ensemble path. drn_torch.py checks, where torch is installed,
that these names and shapes are exactly torch's state_dict of the same network.

  torch_export.py --arch drn_d_22 --in-channels 1 --channels 8,8,16,16,32,32,32,32 \
      [--map-head] [--attention] [--pooling avg|spp] [--seed 1] --out weights.safetensors

Tensors: convolution weights He-normal (drn.py's rule), BatchNorm weight/bias/running statistics
random and far from the identity, and one int64 `num_batches_tracked` per BatchNorm, as torch has.
"""

import argparse
import sys

import numpy as np
from safetensors.numpy import save_file

ARCHS = {
    # arch -> (C or D, blocks or convolutions per stage), as drn.py's drn_c_26() etc. declare them
    "drn_c_26": ("C", [1, 1, 2, 2, 2, 2, 1, 1]),
    "drn_c_42": ("C", [1, 1, 3, 4, 6, 3, 1, 1]),
    "drn_d_22": ("D", [1, 1, 2, 2, 2, 2, 1, 1]),
    "drn_d_38": ("D", [1, 1, 3, 4, 6, 3, 1, 1]),
}
REFERENCE_CHANNELS = [16, 32, 64, 128, 256, 512, 512, 512]
SPP_BINS = 1 + 4 + 16


def state_dict_shapes(arch, in_channels, channels, map_head=False, attention=False, pooling="avg"):
    """Name -> shape, in drn.py's module order (`num_batches_tracked` has shape ())."""
    kind, layers = ARCHS[arch]
    out = {}

    def conv(name, cin, cout, k):
        out[f"{name}.weight"] = (cout, cin, k, k)

    def bn(name, c):
        for t in ("weight", "bias", "running_mean", "running_var"):
            out[f"{name}.{t}"] = (c,)
        out[f"{name}.num_batches_tracked"] = ()

    inplanes = channels[0]

    def make_layer(prefix, planes, blocks, stride):
        # drn.py _make_layer: a 1x1 projection on the first block when the shape changes.
        nonlocal inplanes
        if stride != 1 or inplanes != planes:
            conv(f"{prefix}.0.downsample.0", inplanes, planes, 1)
            bn(f"{prefix}.0.downsample.1", planes)
        for i in range(blocks):
            conv(f"{prefix}.{i}.conv1", inplanes if i == 0 else planes, planes, 3)
            bn(f"{prefix}.{i}.bn1", planes)
            conv(f"{prefix}.{i}.conv2", planes, planes, 3)
            bn(f"{prefix}.{i}.bn2", planes)
            inplanes = planes

    def make_conv_layers(prefix, planes, convs):
        # drn.py _make_conv_layers: Conv2d, BatchNorm2d, ReLU per convolution (indices 3i, 3i+1).
        nonlocal inplanes
        for i in range(convs):
            conv(f"{prefix}.{3 * i}", inplanes, planes, 3)
            bn(f"{prefix}.{3 * i + 1}", planes)
            inplanes = planes

    if kind == "C":
        conv("conv1", in_channels, channels[0], 7)
        bn("bn1", channels[0])
        make_layer("layer1", channels[0], layers[0], 1)
        make_layer("layer2", channels[1], layers[1], 2)
    else:
        conv("layer0.0", in_channels, channels[0], 7)
        bn("layer0.1", channels[0])
        make_conv_layers("layer1", channels[0], layers[0])
        make_conv_layers("layer2", channels[1], layers[1])
    make_layer("layer3", channels[2], layers[2], 2)
    make_layer("layer4", channels[3], layers[3], 2)
    make_layer("layer5", channels[4], layers[4], 1)
    if layers[5] > 0:
        make_layer("layer6", channels[5], layers[5], 1)
    if kind == "C":
        if layers[6] > 0:
            make_layer("layer7", channels[6], layers[6], 1)
        if layers[7] > 0:
            make_layer("layer8", channels[7], layers[7], 1)
    else:
        if layers[6] > 0:
            make_conv_layers("layer7", channels[6], layers[6])
        if layers[7] > 0:
            make_conv_layers("layer8", channels[7], layers[7])
    # Our heads: 1x1 convolutions with a bias to one channel (drn.py's fc, and the paper's map
    # and attention heads under the names models/README.md gives them).
    for head, used in (("attention", attention), ("map_head", map_head)):
        if used:
            out[f"{head}.weight"] = (1, inplanes, 1, 1)
            out[f"{head}.bias"] = (1,)
    fc_in = inplanes * (SPP_BINS if pooling == "spp" else 1)
    out["fc.weight"] = (1, fc_in, 1, 1)
    out["fc.bias"] = (1,)
    return out


def random_state_dict(shapes, seed):
    """He-normal convolutions, non-trivial BatchNorm, small heads; float32, int64 counters."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in shapes.items():
        leaf = name.rsplit(".", 1)[1]
        head = name.split(".", 1)[0] in ("fc", "map_head", "attention")
        if leaf == "num_batches_tracked":
            value = np.array(int(rng.integers(1, 100_000)), dtype=np.int64)
        elif len(shape) == 4:
            cout, cin, k, _ = shape
            std = np.sqrt(1.0 / cin) if head else np.sqrt(2.0 / (k * k * cout))
            value = rng.normal(0.0, std, shape)
        elif head:
            value = rng.uniform(-0.1, 0.1, shape)
        elif leaf == "weight":
            value = rng.uniform(0.5, 1.5, shape)
        elif leaf == "running_var":
            value = rng.uniform(0.5, 2.0, shape)
        else:
            value = rng.uniform(-0.25, 0.25, shape)
        # (np.ascontiguousarray would turn the 0-d counter into shape (1,).)
        tensors[name] = value if value.ndim == 0 else np.ascontiguousarray(value, dtype=np.float32)
    return tensors


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(ARCHS), required=True)
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--channels", default=",".join(map(str, REFERENCE_CHANNELS)))
    p.add_argument("--map-head", action="store_true")
    p.add_argument("--attention", action="store_true")
    p.add_argument("--pooling", choices=["avg", "spp"], default="avg")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    channels = [int(c) for c in a.channels.split(",")]
    if len(channels) != 8:
        p.error(f"--channels needs 8 widths, got {len(channels)}")
    shapes = state_dict_shapes(a.arch, a.in_channels, channels, a.map_head, a.attention, a.pooling)
    save_file(random_state_dict(shapes, a.seed), a.out)
    print(f"wrote {len(shapes)} tensors to {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
