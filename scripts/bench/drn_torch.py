#!/usr/bin/env python3
"""DRN forward pass: ours (the Rust bench binary) vs PyTorch eager vs ONNX Runtime, on the CPU.

Run through scripts/bench/drn-bench.sh, which makes the venv and builds `--ours`. The three run
round-robin (the order rotating every round) on the same weights and inputs, 2 threads each;
the table gives medians. Before timing, a parity check runs one shared set of weights (random
BatchNorm statistics, map head) through all three and prints the largest differences.

The network is written here after fyu/drn drn.py (BasicBlock, _make_layer, _make_conv_layers,
arch C and D), with our heads: global average pooling, `fc` a 1x1 convolution to one logit, and an
optional `map_head` (1x1 convolution on the stride-8 features).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort
import torch
from safetensors.torch import load_file
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_export import ARCHS, REFERENCE_CHANNELS, state_dict_shapes  # noqa: E402

THREADS = 2


def conv3x3(cin, cout, stride=1, padding=1, dilation=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=padding, bias=False, dilation=dilation)


class BasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=(1, 1), residual=True):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, padding=dilation[0], dilation=dilation[0])
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, padding=dilation[1], dilation=dilation[1])
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.residual = residual

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (self.downsample(x) if self.downsample is not None else x)
        return self.relu(out)


class DRN(nn.Module):
    def __init__(self, arch, in_channels=1, channels=REFERENCE_CHANNELS, map_head=False):
        super().__init__()
        kind, layers = ARCHS[arch]
        self.kind = kind
        self.inplanes = channels[0]
        if kind == "C":
            self.conv1 = nn.Conv2d(in_channels, channels[0], 7, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(channels[0])
            self.relu = nn.ReLU(inplace=True)
            self.layer1 = self._make_layer(channels[0], layers[0], stride=1)
            self.layer2 = self._make_layer(channels[1], layers[1], stride=2)
        else:
            self.layer0 = nn.Sequential(
                nn.Conv2d(in_channels, channels[0], 7, padding=3, bias=False),
                nn.BatchNorm2d(channels[0]),
                nn.ReLU(inplace=True),
            )
            self.layer1 = self._make_conv_layers(channels[0], layers[0], stride=1)
            self.layer2 = self._make_conv_layers(channels[1], layers[1], stride=2)
        self.layer3 = self._make_layer(channels[2], layers[2], stride=2)
        self.layer4 = self._make_layer(channels[3], layers[3], stride=2)
        self.layer5 = self._make_layer(channels[4], layers[4], dilation=2, new_level=False)
        self.layer6 = self._make_layer(channels[5], layers[5], dilation=4, new_level=False)
        if kind == "C":
            self.layer7 = self._make_layer(channels[6], layers[6], dilation=2, new_level=False, residual=False)
            self.layer8 = self._make_layer(channels[7], layers[7], dilation=1, new_level=False, residual=False)
        else:
            self.layer7 = self._make_conv_layers(channels[6], layers[6], dilation=2)
            self.layer8 = self._make_conv_layers(channels[7], layers[7], dilation=1)
        self.map_head = nn.Conv2d(channels[7], 1, 1) if map_head else None
        self.fc = nn.Conv2d(channels[7], 1, 1)

    def _make_layer(self, planes, blocks, stride=1, dilation=1, new_level=True, residual=True):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        first = (1, 1) if dilation == 1 else (dilation // 2 if new_level else dilation, dilation)
        layers = [BasicBlock(self.inplanes, planes, stride, downsample, dilation=first, residual=residual)]
        self.inplanes = planes
        for _ in range(1, blocks):
            layers.append(BasicBlock(self.inplanes, planes, residual=residual, dilation=(dilation, dilation)))
        return nn.Sequential(*layers)

    def _make_conv_layers(self, channels, convs, stride=1, dilation=1):
        modules = []
        for i in range(convs):
            modules += [
                nn.Conv2d(self.inplanes, channels, 3, stride=stride if i == 0 else 1, padding=dilation,
                          bias=False, dilation=dilation),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            ]
            self.inplanes = channels
        return nn.Sequential(*modules)

    def forward(self, x):
        if self.kind == "C":
            x = self.relu(self.bn1(self.conv1(x)))
        else:
            x = self.layer0(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4, self.layer5, self.layer6,
                      self.layer7, self.layer8):
            x = layer(x)
        logits = self.fc(x.mean(dim=(2, 3), keepdim=True)).flatten()
        if self.map_head is None:
            return logits
        return logits, self.map_head(x).squeeze(1)


class Ours:
    """The Rust bench binary in --serve mode."""

    def __init__(self, exe):
        env = dict(os.environ, RAYON_NUM_THREADS=str(THREADS))
        self.p = subprocess.Popen([exe, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  env=env)

    def ask(self, *words):
        self.p.stdin.write(" ".join(map(str, words)) + "\n")
        self.p.stdin.flush()
        reply = self.p.stdout.readline().split()
        if not reply or reply[0] != "ok":
            raise RuntimeError(f"drn --serve: {' '.join(map(str, words))}: {' '.join(reply) or 'no reply'}")
        return reply[1:]

    def run(self, batch, size, input_path, emit=False):
        r = self.ask("run", batch, size, input_path, int(emit))
        if not emit:
            return float(r[0])
        bar = r.index("|")
        return float(r[0]), np.array(r[1:bar], dtype=np.float32), np.array(r[bar + 1:], dtype=np.float32)


def torch_model(arch, weights, map_head=False):
    model = DRN(arch, 1, map_head=map_head).eval()
    # The names and shapes torch_export.py writes (and CI loads) must be torch's own.
    want = state_dict_shapes(arch, 1, REFERENCE_CHANNELS, map_head=map_head)
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert have == want, f"torch_export.py disagrees with torch: {set(have.items()) ^ set(want.items())}"
    state = load_file(weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    return model


def onnx_session(model, path, size):
    x = torch.zeros(1, 1, size, size)
    torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["logits"], opset_version=17,
                      dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}, "logits": {0: "n"}}, dynamo=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def parity(ours, tmp, nets, size=256, batch=2):
    """Same weights and input through ours (folded + fast path) and torch; ORT for reference."""
    print(f"== parity: random BatchNorm statistics, map head, {batch} x 1 x {size} x {size} ==")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((batch, 1, size, size)).astype(np.float32)
    xpath = os.path.join(tmp, "parity.f32")
    x.tofile(xpath)
    worst = 0.0
    for arch in nets:
        w = os.path.join(tmp, f"{arch}-parity.safetensors")
        ours.ask("init", arch, 1, 1, w, 11)
        model = torch_model(arch, w, map_head=True)
        with torch.no_grad():
            t_logits, t_map = model(torch.from_numpy(x))
        t_logits, t_map = t_logits.numpy(), t_map.numpy().ravel()
        for mode in ("stock", "fast"):
            ours.ask("load", arch, 1, 1, w, mode)
            _, o_logits, o_map = ours.run(batch, size, xpath, emit=True)
            dl = float(np.abs(o_logits - t_logits).max())
            dm = float(np.abs(o_map - t_map).max())
            scale = float(max(np.abs(t_logits).max(), np.abs(t_map).max()))
            print(f"{arch} ours({mode}) vs torch: max |diff| logits {dl:.2e}, map {dm:.2e} "
                  f"(outputs up to {scale:.2f})")
            worst = max(worst, dl, dm)
        # The map head is not exported: compare the logit only.
        model.map_head, head = None, model.map_head
        sess = onnx_session(model, os.path.join(tmp, f"{arch}-parity.onnx"), size)
        model.map_head = head
        r_logits = sess.run(None, {"x": x})[0]
        print(f"{arch} ORT vs torch: max |diff| logits {float(np.abs(r_logits - t_logits).max()):.2e}")
    print(f"parity: worst |ours - torch| = {worst:.2e} ({'ok' if worst < 1e-3 else 'OVER 1e-3'})")
    return worst


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ours", required=True, help="the `drn` bench binary")
    p.add_argument("--nets", default="drn_d_22,drn_c_26")
    p.add_argument("--sizes", default="512,1024")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--reps", type=int, default=3, help="timed rounds per case (after one warm-up)")
    p.add_argument("--no-parity", action="store_true")
    a = p.parse_args(argv)
    nets = a.nets.split(",")
    sizes = [int(s) for s in a.sizes.split(",")]
    batches = [int(b) for b in a.batches.split(",")]

    torch.set_num_threads(THREADS)
    torch.set_num_interop_threads(1)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {ort.__version__} "
          f"(intra_op {THREADS}), ours: RAYON_NUM_THREADS={THREADS}")
    ours = Ours(a.ours)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if not a.no_parity:
            parity(ours, tmp, nets)
        for arch in nets:
            w = os.path.join(tmp, f"{arch}.safetensors")
            ours.ask("init", arch, 1, 0, w, 1)
            ours.ask("load", arch, 1, 0, w, "fast")
            model = torch_model(arch, w)
            sess = onnx_session(model, os.path.join(tmp, f"{arch}.onnx"), 256)
            for size in sizes:
                macs = int(ours.ask("macs", arch, size)[0])
                for batch in batches:
                    x = np.random.default_rng(size + batch).standard_normal((batch, 1, size, size)).astype(np.float32)
                    xpath = os.path.join(tmp, "x.f32")
                    x.tofile(xpath)
                    xt = torch.from_numpy(x)

                    def run_torch():
                        t = time.perf_counter()
                        with torch.no_grad():
                            model(xt)
                        return time.perf_counter() - t

                    def run_ort():
                        t = time.perf_counter()
                        sess.run(None, {"x": x})
                        return time.perf_counter() - t

                    impls = {"ours": lambda: ours.run(batch, size, xpath), "pytorch": run_torch, "ort": run_ort}
                    times = {k: [] for k in impls}
                    for f in impls.values():
                        f()  # warm-up
                    names = list(impls)
                    for r in range(a.reps):
                        for k in names[r % 3:] + names[:r % 3]:
                            times[k].append(impls[k]())
                    med = {k: statistics.median(v) for k, v in times.items()}
                    for k in names:
                        rows.append((arch, size, batch, k, 1e3 * med[k] / batch, 2 * macs * batch / med[k] / 1e9,
                                     med["pytorch"] / med[k]))
                    print(f"{arch} {size} b{batch}: " + ", ".join(f"{k} {1e3 * med[k] / batch:.0f} ms/img" for k in names),
                          flush=True)
    print()
    print(f"| net | size | batch | impl | ms/image | GFLOP/s | speed vs PyTorch |  (median of {a.reps})")
    print("|---|---|---|---|---|---|---|")
    for arch, size, batch, k, ms, gf, ratio in rows:
        print(f"| {arch} | {size} | {batch} | {k} | {ms:.0f} | {gf:.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main(sys.argv[1:])
