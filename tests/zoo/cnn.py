"""Small random-weight CNNs that keep the *structural* features of real architectures.

torchvision / timm are not available, so each architecture is re-written here at
reduced width and depth.  What is kept is what matters for channel coupling in a
structured-pruning engine: residual adds, projection shortcuts, depthwise and
grouped convolutions, squeeze-excitation gates, concatenations, channel splits and
shuffles, transposed convolutions, ...

Every builder returns an ``nn.Module`` in eval mode.  Call them under a fixed seed
(``tests.zoo.build`` does this) to get reproducible weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def make_divisible(v: float, divisor: int = 4, min_value: int | None = None) -> int:
    """torchvision's ``_make_divisible`` (rounds to a multiple of ``divisor``)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def conv_bn_act(
    cin: int,
    cout: int,
    k: int = 3,
    stride: int = 1,
    groups: int = 1,
    act: type[nn.Module] | None = nn.ReLU,
    padding: int | None = None,
    eps: float = 1e-5,
) -> nn.Sequential:
    padding = (k - 1) // 2 if padding is None else padding
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False),
        nn.BatchNorm2d(cout, eps=eps),
    ]
    if act is not None:
        layers.append(act(inplace=True) if act in (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU) else act())
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:  # projection shortcut
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)  # stride on 3x3 (v1.5)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, block, layers, widths=(8, 16, 32, 64), stem=8, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = stem
        stages = []
        for i, (w, n) in enumerate(zip(widths, layers)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(cin, w, stride))
                cin = w * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18() -> nn.Module:
    return ResNet(BasicBlock, [2, 2, 2, 2])


def resnet50() -> nn.Module:
    # real depth is [3, 4, 6, 3]; [2, 2, 2, 2] keeps every structural feature
    return ResNet(Bottleneck, [2, 2, 2, 2], widths=(4, 8, 16, 32))


# ----------------------------------------------------------------------- MobileNetV2
class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_act(cin, hidden, 1, act=nn.ReLU6))
        layers += [
            conv_bn_act(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),  # depthwise
            nn.Conv2d(hidden, cout, 1, bias=False),  # linear bottleneck
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    # (expand t, channels c, repeats n, stride s) -- torchvision's table at ~1/4 width and
    # fewer repeats; keeps the t=1 block, residual repeats, stride-1 channel changes
    CFG = [(1, 8, 1, 1), (6, 12, 2, 2), (6, 16, 2, 2), (6, 24, 1, 1), (6, 32, 2, 2)]

    def __init__(self, num_classes: int = 10, stem: int = 8, last: int = 64):
        super().__init__()
        layers: list[nn.Module] = [conv_bn_act(3, stem, 3, 2, act=nn.ReLU6)]
        cin = stem
        for t, c, n, s in self.CFG:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(conv_bn_act(cin, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenetv2() -> nn.Module:
    return MobileNetV2()


# ----------------------------------------------------------------------- MobileNetV3
class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: pool -> 1x1 conv -> act -> 1x1 conv -> gate -> mul."""

    def __init__(self, c: int, squeeze: int, activation=nn.ReLU, scale_activation=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, c, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def forward(self, x):
        s = self.avgpool(x)
        s = self.scale_activation(self.fc2(self.activation(self.fc1(s))))
        return s * x


class MBv3Block(nn.Module):
    def __init__(self, cin: int, k: int, exp: int, cout: int, se: bool, act, stride: int):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if exp != cin:
            layers.append(conv_bn_act(cin, exp, 1, act=act))
        layers.append(conv_bn_act(exp, exp, k, stride, groups=exp, act=act))
        if se:
            layers.append(SqueezeExcitation(exp, make_divisible(exp // 4, 8), nn.ReLU, nn.Hardsigmoid))
        layers.append(conv_bn_act(exp, cout, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        out = self.block(x)
        return out + x if self.use_res_connect else out


class MobileNetV3(nn.Module):
    RE, HS = nn.ReLU, nn.Hardswish
    # (kernel, expanded, out, SE, activation, stride) -- mobilenet_v3_small at ~1/2 width,
    # 6 of its 11 blocks (SE / no SE, ReLU / hardswish, residual / strided / widening)
    CFG = [
        (3, 16, 8, True, RE, 2),
        (3, 32, 12, False, RE, 2),
        (3, 40, 12, False, RE, 1),
        (5, 48, 20, True, HS, 2),
        (5, 96, 20, True, HS, 1),
        (5, 64, 24, True, HS, 1),
    ]

    def __init__(self, num_classes: int = 10, stem: int = 8, last: int = 96, head: int = 64):
        super().__init__()
        layers: list[nn.Module] = [conv_bn_act(3, stem, 3, 2, act=nn.Hardswish, eps=1e-3)]
        cin = stem
        for k, e, c, se, act, s in self.CFG:
            layers.append(MBv3Block(cin, k, e, c, se, act, s))
            cin = c
        layers.append(conv_bn_act(cin, last, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(last, head), nn.Hardswish(inplace=True), nn.Dropout(0.2), nn.Linear(head, num_classes)
        )

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def mobilenetv3() -> nn.Module:
    return MobileNetV3()


# -------------------------------------------------------------------- EfficientNet-B0
class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, se_ratio: float = 0.25):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn_act(cin, hidden, 1, act=nn.SiLU))
        layers.append(conv_bn_act(hidden, hidden, k, stride, groups=hidden, act=nn.SiLU))
        # SE squeeze width is computed from the *block input* channels, as in EfficientNet
        layers.append(SqueezeExcitation(hidden, max(1, int(cin * se_ratio)), nn.SiLU, nn.Sigmoid))
        layers.append(conv_bn_act(hidden, cout, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        out = self.block(x)
        return out + x if self.use_res_connect else out  # stochastic depth is identity in eval


class EfficientNet(nn.Module):
    # (expand, kernel, stride, out channels, repeats) -- B0 table at 1/2..1/4 width
    CFG = [(1, 3, 1, 8, 1), (6, 3, 2, 12, 2), (6, 5, 2, 20, 2), (6, 3, 2, 40, 2), (6, 5, 1, 56, 2), (6, 5, 2, 96, 2), (6, 3, 1, 160, 1)]

    def __init__(self, num_classes: int = 10, stem: int = 16, last: int = 320):
        super().__init__()
        layers: list[nn.Module] = [conv_bn_act(3, stem, 3, 2, act=nn.SiLU)]
        cin = stem
        for e, k, s, c, n in self.CFG:
            for i in range(n):
                layers.append(MBConv(cin, c, k, s if i == 0 else 1, e))
                cin = c
        layers.append(conv_bn_act(cin, last, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def efficientnet_b0() -> nn.Module:
    return EfficientNet()


# ---------------------------------------------------------------------------- RegNet
class RegNetBlock(nn.Module):
    """RegNetY ``ResBottleneckBlock``: 1x1 -> grouped 3x3 (fixed group width) -> SE -> 1x1."""

    def __init__(self, cin: int, cout: int, stride: int, group_width: int, bottleneck: float = 1.0, se_ratio: float | None = 0.25):
        super().__init__()
        wb = int(round(cout * bottleneck))
        groups = wb // group_width
        layers: list[nn.Module] = [
            conv_bn_act(cin, wb, 1),
            conv_bn_act(wb, wb, 3, stride, groups=groups),
        ]
        if se_ratio:
            layers.append(SqueezeExcitation(wb, int(round(se_ratio * cin)), nn.ReLU, nn.Sigmoid))
        layers.append(conv_bn_act(wb, cout, 1, act=None))
        self.f = nn.Sequential(*layers)
        self.proj = None
        if cin != cout or stride != 1:
            self.proj = conv_bn_act(cin, cout, 1, stride, act=None)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x):
        sc = x if self.proj is None else self.proj(x)
        return self.activation(sc + self.f(x))


class RegNet(nn.Module):
    def __init__(self, widths=(16, 32, 64, 128), depths=(1, 2, 2, 1), group_width: int = 8, stem: int = 16, se_ratio: float | None = 0.25, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn_act(3, stem, 3, 2)
        cin = stem
        stages = []
        for w, d in zip(widths, depths):
            blocks = []
            for j in range(d):
                blocks.append(RegNetBlock(cin, w, 2 if j == 0 else 1, group_width, se_ratio=se_ratio))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.trunk_output = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.avgpool(self.trunk_output(self.stem(x)))
        return self.fc(x.flatten(start_dim=1))


def regnet() -> nn.Module:
    """RegNetY (with SE); group width 8 -> 2, 4, 8, 16 groups per stage."""
    return RegNet()


# -------------------------------------------------------------------------- DenseNet
class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bn_size: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(inputs, 1)  # torchvision concatenates the whole feature list per layer
        x = self.conv1(self.relu1(self.norm1(x)))  # pre-activation: BN can't fold into a conv
        return self.conv2(self.relu2(self.norm2(x)))


class DenseBlock(nn.ModuleDict):
    def __init__(self, n: int, cin: int, growth: int, bn_size: int):
        super().__init__()
        for i in range(n):
            self.add_module(f"denselayer{i + 1}", DenseLayer(cin + i * growth, growth, bn_size))

    def forward(self, x):
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, cout, 1, bias=False), nn.AvgPool2d(2, 2)
        )


class DenseNet(nn.Module):
    def __init__(self, growth: int = 8, blocks=(2, 3, 4, 2), init: int = 16, bn_size: int = 2, num_classes: int = 10):
        super().__init__()
        feats: list[nn.Module] = [
            nn.Conv2d(3, init, 7, 2, 3, bias=False),
            nn.BatchNorm2d(init),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        ]
        c = init
        for i, n in enumerate(blocks):
            feats.append(DenseBlock(n, c, growth, bn_size))
            c += n * growth
            if i != len(blocks) - 1:
                feats.append(Transition(c, c // 2))
                c //= 2
        feats.append(nn.BatchNorm2d(c))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        x = F.relu(self.features(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)
        return self.classifier(x)


def densenet121() -> nn.Module:
    # real densenet121: growth 32, blocks (6, 12, 24, 16), init 64, bn_size 4
    return DenseNet()


# ---------------------------------------------------------------------- ShuffleNetV2
def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        bf = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                conv_bn_act(cin, cin, 3, stride, groups=cin, act=None),
                conv_bn_act(cin, bf, 1),
            )
        else:
            assert cin == bf * 2
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            conv_bn_act(cin if stride > 1 else bf, bf, 1),
            conv_bn_act(bf, bf, 3, stride, groups=bf, act=None),
            conv_bn_act(bf, bf, 1),
        )

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)  # channel split
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, repeats=(2, 3, 2), channels=(8, 16, 32, 64, 128), num_classes: int = 10):
        super().__init__()
        self.conv1 = conv_bn_act(3, channels[0], 3, 2)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = channels[0]
        stages = []
        for n, c in zip(repeats, channels[1:4]):
            units = [ShuffleUnit(cin, c, 2)] + [ShuffleUnit(c, c, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*units))
            cin = c
        self.stage2, self.stage3, self.stage4 = stages
        self.conv5 = conv_bn_act(cin, channels[-1], 1)
        self.fc = nn.Linear(channels[-1], num_classes)

    def forward(self, x):
        x = self.maxpool(self.conv1(x))
        x = self.conv5(self.stage4(self.stage3(self.stage2(x))))
        return self.fc(x.mean([2, 3]))  # global pool, as torchvision


def shufflenetv2() -> nn.Module:
    return ShuffleNetV2()


# ------------------------------------------------------------------------- GoogLeNet
def basic_conv(cin: int, cout: int, k: int, stride: int = 1, padding: int = 0) -> nn.Sequential:
    return conv_bn_act(cin, cout, k, stride, padding=padding, eps=1e-3)


class Inception(nn.Module):
    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, pp: int):
        super().__init__()
        self.branch1 = basic_conv(cin, c1, 1)
        self.branch2 = nn.Sequential(basic_conv(cin, c3r, 1), basic_conv(c3r, c3, 3, padding=1))
        # torchvision uses a 3x3 (not 5x5) in the "5x5" branch
        self.branch3 = nn.Sequential(basic_conv(cin, c5r, 1), basic_conv(c5r, c5, 3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), basic_conv(cin, pp, 1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class GoogLeNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        # torchvision's channel table divided by ~8; 4 of its 9 inception modules
        self.conv1 = basic_conv(3, 8, 7, 2, 3)
        self.maxpool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = basic_conv(8, 8, 1)
        self.conv3 = basic_conv(8, 24, 3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.inception3a = Inception(24, 8, 12, 16, 2, 4, 4)  # -> 32
        self.inception3b = Inception(32, 16, 16, 24, 4, 12, 8)  # -> 60
        self.maxpool3 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.inception4a = Inception(60, 24, 12, 26, 2, 6, 8)  # -> 64
        self.maxpool4 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.inception5a = Inception(64, 32, 20, 40, 4, 16, 16)  # -> 104
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(104, num_classes)

    def forward(self, x):
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.maxpool4(self.inception4a(x))
        x = self.inception5a(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


def googlenet() -> nn.Module:
    return GoogLeNet()


# -------------------------------------------------------------------------- ConvNeXt
class LayerNorm2d(nn.LayerNorm):
    """torchvision's LayerNorm2d: LayerNorm over channels of an NCHW tensor, via permutes."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    def __init__(self, dim: int, layer_scale: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim, bias=True)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)  # NCHW -> NHWC
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        y = y.permute(0, 3, 1, 2)  # NHWC -> NCHW
        return x + self.layer_scale * y  # stochastic depth is identity in eval


class ConvNeXt(nn.Module):
    def __init__(self, dims=(8, 16, 32, 64), depths=(2, 2, 2, 2), num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))
        ]
        for i, (d, n) in enumerate(zip(dims, depths)):
            layers.append(nn.Sequential(*[CNBlock(d) for _ in range(n)]))
            if i + 1 < len(dims):
                layers.append(nn.Sequential(LayerNorm2d(d, eps=1e-6), nn.Conv2d(d, dims[i + 1], 2, 2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1), nn.Linear(dims[-1], num_classes))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


def convnext() -> nn.Module:
    # real convnext_tiny: dims (96, 192, 384, 768), depths (3, 3, 9, 3)
    return ConvNeXt()


# ------------------------------------------------------------------------------ UNet
class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(conv_bn_act(cin, cout, 3), conv_bn_act(cout, cout, 3))


class UNet(nn.Module):
    def __init__(self, cin: int = 3, num_classes: int = 4, widths=(8, 16, 32, 64)):
        super().__init__()
        self.inc = DoubleConv(cin, widths[0])
        self.downs = nn.ModuleList(DoubleConv(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(b, a, 2, stride=2) for a, b in zip(widths[:-1], widths[1:])
        )[::-1]
        self.up_convs = nn.ModuleList(DoubleConv(2 * a, a) for a in widths[:-1])[::-1]
        self.outc = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x):
        x = self.inc(x)
        skips = []
        for down in self.downs:
            skips.append(x)
            x = down(F.max_pool2d(x, 2))
        for up, conv, skip in zip(self.ups, self.up_convs, reversed(skips)):
            x = conv(torch.cat([skip, up(x)], dim=1))  # skip concat
        return self.outc(x)


def unet() -> nn.Module:
    return UNet()
