"""Small ONNX models for the target tests and benchmarks (built with torch, exported with the TorchScript exporter).

Every builder returns an ``onnx.ModelProto`` with one float input named "input" and one output named "output";
``batch`` is a symbolic dim unless ``static_batch`` is given.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import onnx


def _export(module, example, dynamic: dict | None, opset: int = 17) -> onnx.ModelProto:
    import torch

    module = module.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            buf,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": dynamic, "output": dynamic} if dynamic else None,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return onnx.load_from_string(buf.getvalue())


def _seed(seed: int):
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)


def mlp(d_in: int = 256, hidden: int = 1024, d_out: int = 64, batch: int = 32, static_batch: bool = False, seed=0):
    import torch

    _seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(d_in, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, d_out),
    )
    return _export(model, torch.randn(batch, d_in), None if static_batch else {0: "batch"})


def cnn(channels: int = 32, size: int = 32, classes: int = 10, batch: int = 2, static_batch: bool = False, seed=0):
    """conv3x3 -> BN -> ReLU -> conv3x3/2 -> ReLU -> [1x1 -> ReLU -> 3x3 residual] -> maxpool -> avgpool -> fc."""
    import torch
    from torch import nn

    _seed(seed)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            c = channels
            self.stem = nn.Conv2d(3, c, 3, padding=1)
            self.bn = nn.BatchNorm2d(c)
            self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
            self.pw = nn.Conv2d(2 * c, 2 * c, 1)
            self.conv = nn.Conv2d(2 * c, 2 * c, 3, padding=1)
            self.fc = nn.Linear(2 * c, classes)
            with torch.no_grad():
                self.bn.running_mean.uniform_(-0.1, 0.1)
                self.bn.running_var.uniform_(0.5, 1.5)

        def forward(self, x):
            x = torch.relu(self.bn(self.stem(x)))
            x = torch.relu(self.down(x))
            x = x + self.conv(torch.relu(self.pw(x)))
            x = torch.nn.functional.max_pool2d(x, 2)
            x = torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
            return self.fc(x)

    return _export(Net(), torch.randn(batch, 3, size, size), None if static_batch else {0: "batch"})


def resnet18(size: int = 224, classes: int = 1000, batch: int = 1, static_batch: bool = False, seed=0):
    """ResNet-18 in torchvision's layout (7x7/2 stem, max pool, four stages of two basic blocks, 64-512 channels,
    1x1/2 projection shortcuts), random weights, BatchNorm with random statistics (the exporter folds it into the
    convolutions): the 3x3 convolutions on 56x56 to 7x7 maps that most CNNs spend their time in."""
    import torch
    from torch import nn

    _seed(seed)

    def conv_bn(cin, cout, k, stride):
        bn = nn.BatchNorm2d(cout)
        with torch.no_grad():
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), bn)

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.a, self.b = conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, 3, 1)
            self.short = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

        def forward(self, x):
            return torch.relu(self.b(torch.relu(self.a(x))) + self.short(x))

    widths = [64, 128, 256, 512]
    layers = [conv_bn(3, 64, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    for i, width in enumerate(widths):
        cin = widths[max(i - 1, 0)]
        layers += [Block(cin, width, 1 if i == 0 else 2), Block(width, width, 1)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)]
    net = nn.Sequential(*layers)
    return _export(net, torch.randn(batch, 3, size, size), None if static_batch else {0: "batch"})


def mobile(channels: int = 16, size: int = 32, classes: int = 10, batch: int = 2, static_batch: bool = False,
           seed=0):
    """A MobileNetV2 in miniature (``mobilenet_v2_module``): conv3x3/2 -> [1x1 expand x4 -> ReLU6 -> depthwise 3x3
    (stride 1, then 2) -> ReLU6 -> 1x1 project] twice, the first with its residual -> mean -> fc, random BatchNorm
    statistics: the depthwise convolutions that MobileNet-class models spend much of their time in."""
    import torch

    _seed(seed)
    c = channels
    module = _random_batchnorm(mobilenet_v2_module(stages=((4, c, 1, 1), (4, c, 1, 2)), stem=c, head=None,
                                                   classes=classes))
    return _export(module, torch.randn(batch, 3, size, size), None if static_batch else {0: "batch"})


MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                       (6, 320, 1, 1))  # (expansion, channels, blocks, stride of the first)


def mobilenet_v2_module(stages=MOBILENET_V2_STAGES, stem: int = 32, head: int | None = 1280, classes: int = 1000):
    """MobileNetV2 as a torch module in torchvision's layout (its state-dict keys, so torchvision's ImageNet weights
    load into it with the defaults): a 3x3/2 stem, inverted residual blocks, a 1x1 head (none if ``head`` is None),
    global average pooling and a linear classifier."""
    from torch import nn

    def conv_bn_relu(cin, cout, kernel=3, stride=1, groups=1):
        return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hidden = cin * expand
            layers = [conv_bn_relu(cin, hidden, 1)] if expand != 1 else []
            layers += [conv_bn_relu(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, cout, 1, bias=False),
                       nn.BatchNorm2d(cout)]
            self.conv = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.conv(x) if self.residual else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self):
            super().__init__()
            blocks, cin = [conv_bn_relu(3, stem, 3, 2)], stem
            for expand, cout, repeats, stride in stages:
                for i in range(repeats):
                    blocks.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                    cin = cout
            if head is not None:
                blocks.append(conv_bn_relu(cin, head, 1))
            self.features = nn.Sequential(*blocks)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(head or cin, classes))

        def forward(self, x):
            return self.classifier(self.features(x).mean((2, 3)))

    return MobileNetV2()


def mobilenet_v2(size: int = 224, batch: int = 1, static_batch: bool = False, seed=0):
    """MobileNetV2 (``mobilenet_v2_module``) with random weights and BatchNorm statistics, exported: depthwise
    convolutions, ReLU6 and linear bottlenecks, for latency (its accuracy needs the real weights; bench_obspa)."""
    import torch

    _seed(seed)
    module = _random_batchnorm(mobilenet_v2_module())
    return _export(module, torch.randn(batch, 3, size, size), None if static_batch else {0: "batch"})


def _random_batchnorm(module):
    """Running means in [-0.1, 0.1] and variances in [0.5, 1.5] instead of BatchNorm's identity defaults."""
    import torch

    with torch.no_grad():
        for bn in (m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    return module


def encoder(
    d_model: int = 256,
    heads: int = 4,
    ffn: int = 1024,
    layers: int = 2,
    seq: int = 64,
    batch: int = 1,
    static_batch: bool = False,
    seed=0,
):
    """Post-norm transformer encoder (BERT-style, GELU FFN) on [batch, seq, d_model] float inputs."""
    import torch
    from torch import nn

    _seed(seed)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(d_model, 3 * d_model)
            self.proj = nn.Linear(d_model, d_model)
            self.ln1 = nn.LayerNorm(d_model)
            self.fc1 = nn.Linear(d_model, ffn)
            self.fc2 = nn.Linear(ffn, d_model)
            self.ln2 = nn.LayerNorm(d_model)

        def forward(self, x):
            b, s, d = x.shape
            h = d // heads
            q, k, v = self.qkv(x).split(d, dim=-1)
            q = q.reshape(b, s, heads, h).transpose(1, 2)
            k = k.reshape(b, s, heads, h).transpose(1, 2)
            v = v.reshape(b, s, heads, h).transpose(1, 2)
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(h), dim=-1)
            ctx = (att @ v).transpose(1, 2).reshape(b, s, d)
            x = self.ln1(x + self.proj(ctx))
            return self.ln2(x + self.fc2(torch.nn.functional.gelu(self.fc1(x))))

    model = nn.Sequential(*[Layer() for _ in range(layers)])
    return _export(model, torch.randn(batch, seq, d_model), None if static_batch else {0: "batch"})


def ffn_layer(tokens: int = 128, d_model: int = 768, hidden: int = 3072, seed=0) -> onnx.ModelProto:
    """One BERT-base FFN up-projection: MatMul [tokens, 768] x [768, 3072] (no bias), built with onnx.helper."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((d_model, hidden)) / math.sqrt(d_model)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["output"], name="ffn")],
        "ffn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [tokens, d_model])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [tokens, hidden])],
        [numpy_helper.from_array(w, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def ort_run(model: onnx.ModelProto | str, inputs: dict, threads: int | None = None) -> dict:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    src = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, inputs)))
