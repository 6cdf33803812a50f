#!/usr/bin/env python3
"""Train the small reference models used by the spc demo and tests.

Everything here is deterministic (fixed seeds, fixed thread count) and runs on
CPU in well under a minute on 2 cores.  Data come from scikit-learn's bundled
copy of the UCI ML hand-written digits dataset (``sklearn.datasets.load_digits``,
1797 8x8 grayscale images, 10 classes); nothing is downloaded.

Outputs (written next to this script):

* ``digits_cnn.onnx``          small ResNet-style CNN, explicit BatchNormalization
* ``digits_transformer.onnx``  2-layer pre-LN transformer encoder over 8 row tokens
* ``digits_eval.npz``          test split: ``image`` float32 [M,1,8,8], ``label`` int64 [M]
* ``digits_calib.npz``         256 training samples: ``image`` (+ ``label``) for calibration

Both ONNX models: opset 17, input ``image`` float32 [batch,1,8,8] (pixels in
[0,1]), output ``logits`` float32 [batch,10], weights stored inside the file.

Usage: ``python models/train_digits.py``
"""

from __future__ import annotations

import collections
import os
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 0
OPSET = 17
N_CALIB = 256


# --------------------------------------------------------------------------- data
def load_data():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]  # [N,1,8,8] in [0,1]
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=0.3, stratify=y, random_state=SEED, shuffle=True
    )
    return (np.ascontiguousarray(x_tr), y_tr), (np.ascontiguousarray(x_te), y_te)


def random_shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each image by up to +-max_shift pixels (zero fill)."""
    n, p = x.shape[0], max_shift
    xp = F.pad(x, (p, p, p, p))
    dy = torch.randint(0, 2 * p + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=g)
    out = torch.empty_like(x)
    for oy in range(2 * p + 1):
        for ox in range(2 * p + 1):
            sel = (dy == oy) & (dx == ox)
            out[sel] = xp[sel, :, oy : oy + 8, ox : ox + 8]
    return out


# --------------------------------------------------------------------------- models
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class DigitsCNN(nn.Module):
    """stem(32) -> block(32) -> block(64, stride 2, 1x1 proj) -> block(64) -> GAP -> fc(10)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.layer1 = BasicBlock(32, 32, 1)
        self.layer2 = BasicBlock(32, 64, 2)
        self.layer3 = BasicBlock(64, 64, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, image):
        x = self.stem(image)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


class MultiHeadSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, seq_len: int):
        super().__init__()
        assert dim % heads == 0
        self.dim, self.heads, self.head_dim, self.seq_len = dim, heads, dim // heads, seq_len
        self.scale = self.head_dim ** -0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def _split(self, t):  # [B,S,C] -> [B,S,H,D] -> [B,H,S,D]
        return t.reshape(-1, self.seq_len, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x):
        q = self._split(self.q_proj(x))
        k = self._split(self.k_proj(x))
        v = self._split(self.v_proj(x))
        att = torch.matmul(q, k.transpose(-2, -1)) * self.scale  # [B,H,S,S]
        att = torch.softmax(att, dim=-1)
        out = torch.matmul(att, v)  # [B,H,S,D]
        out = out.transpose(1, 2).reshape(-1, self.seq_len, self.dim)  # [B,S,C]
        return self.o_proj(out)


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, seq_len: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = MultiHeadSelfAttention(dim, heads, seq_len)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        x = x + self.fc2(self.act(self.fc1(self.ln2(x))))
        return x


class DigitsTransformer(nn.Module):
    """8 row tokens of 8 pixels -> Linear(8,64) + pos-emb -> 2 pre-LN layers -> LN -> mean -> fc(10)."""

    def __init__(self, dim=64, heads=4, mlp_dim=256, depth=2, seq_len=8, token_dim=8, num_classes=10):
        super().__init__()
        self.seq_len, self.token_dim = seq_len, token_dim
        self.embed = nn.Linear(token_dim, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, seq_len, dim))
        nn.init.normal_(self.pos_embed, std=0.02)
        self.layers = nn.ModuleList([EncoderLayer(dim, heads, mlp_dim, seq_len) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, image):
        x = image.reshape(-1, self.seq_len, self.token_dim)  # [B,8,8]: rows are tokens
        x = self.embed(x) + self.pos_embed
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x).mean(dim=1)
        return self.head(x)


# --------------------------------------------------------------------------- training
def train(model, x_tr, y_tr, *, epochs, lr, wd, batch=64, augment=True, seed=SEED):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    steps_per_epoch = (len(x_tr) + batch - 1) // batch
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15
    )
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    model.train()
    for ep in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        tot = 0.0
        for i in range(0, len(xt), batch):
            idx = perm[i : i + batch]
            xb, yb = xt[idx], yt[idx]
            if augment:
                xb = random_shift(xb, g)
            loss = F.cross_entropy(model(xb), yb, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(idx)
        if (ep + 1) % 10 == 0 or ep == 0:
            print(f"  epoch {ep + 1:3d}/{epochs}  loss {tot / len(xt):.4f}", flush=True)
    model.eval()
    return model


@torch.no_grad()
def torch_predict(model, x):
    model.eval()
    return model(torch.from_numpy(x)).numpy()


# --------------------------------------------------------------------------- export
def export_onnx(model, path, *, keep_bn: bool):
    """Legacy TorchScript exporter (dynamo=False).

    ``do_constant_folding=False`` keeps BatchNormalization explicit (with folding
    on, the legacy exporter fuses eval-mode BN into the preceding Conv).  For the
    transformer, folding is left on so that transposed Linear weights become plain
    initializers instead of Transpose nodes on weights.
    """
    model.eval()
    dummy = torch.zeros(2, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation warnings
        torch.onnx.export(
            model,
            (dummy,),
            path,
            dynamo=False,
            export_params=True,
            opset_version=OPSET,
            do_constant_folding=not keep_bn,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        )
    import onnx

    m = onnx.load(path)
    _tidy_legacy_export(m)
    onnx.save(m, path)  # < 2 GB, so weights stay inside the .onnx file
    onnx.checker.check_model(m, full_check=True)
    assert not os.path.exists(path + ".data"), "unexpected external data file"
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in m.graph.initializer)
    size = os.path.getsize(path)
    assert size < 1 << 20, f"{path} is {size} bytes (>= 1 MiB)"
    ops = collections.Counter(n.op_type for n in m.graph.node)
    if keep_bn:
        assert ops.get("BatchNormalization", 0) > 0, f"BN was folded away: {ops}"
    assert "Identity" not in ops, ops
    assert not any(t.name.startswith("onnx::") for t in m.graph.initializer)
    return m, ops, size


def _tidy_legacy_export(m) -> None:
    """Two cosmetic, numerically exact clean-ups of the legacy exporter's output.

    1. The exporter de-duplicates bit-identical initializers and re-creates the
       dropped name as ``Identity(<kept initializer>)``.  In the CNN this happens
       for ``layer2.shortcut.1.bias`` vs ``layer2.bn2.bias``: both BN biases feed
       the same residual Add, start at 0 and receive identical AdamW updates, so
       they stay bit-identical.  Replace such Identity nodes by a real copy of the
       initializer so every BatchNormalization reads initializers directly.
    2. ``nn.Linear`` on 3-D input is exported as ``MatMul`` (+``Add``) with the
       pre-transposed weight stored as ``onnx::MatMul_<n>``; rename it to
       ``<module>.weight_t`` (shape [in, out]) using the MatMul node's scope name.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in m.graph.initializer}
    keep = []
    for node in m.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            arr = numpy_helper.to_array(inits[node.input[0]])
            m.graph.initializer.append(numpy_helper.from_array(arr.copy(), node.output[0]))
        else:
            keep.append(node)
    del m.graph.node[:]
    m.graph.node.extend(keep)

    inits = {t.name: t for t in m.graph.initializer}
    renames = {}
    for node in m.graph.node:
        if node.op_type != "MatMul" or not node.name.endswith("/MatMul"):
            continue
        w = node.input[1]
        if w in inits and w.startswith("onnx::") and w not in renames:
            scope = node.name[: -len("/MatMul")].lstrip("/").replace("/", ".")
            new = f"{scope}.weight_t"
            if new not in inits:
                renames[w] = new
    for t in m.graph.initializer:
        if t.name in renames:
            t.name = renames[t.name]
    for node in m.graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]


def ort_predict(path, x):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"image": x})[0]


# --------------------------------------------------------------------------- main
def main():
    t_start = time.time()
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    # Fixed thread count: results are bit-reproducible for a given thread count.
    torch.set_num_threads(int(os.environ.get("SPC_TRAIN_THREADS", "1")))
    torch.use_deterministic_algorithms(True)

    (x_tr, y_tr), (x_te, y_te) = load_data()
    print(f"train {x_tr.shape}  test {x_te.shape}")

    rng = np.random.default_rng(SEED)
    calib_idx = np.sort(rng.choice(len(x_tr), size=N_CALIB, replace=False))
    np.savez_compressed(os.path.join(HERE, "digits_eval.npz"), image=x_te.astype(np.float32), label=y_te.astype(np.int64))
    np.savez_compressed(
        os.path.join(HERE, "digits_calib.npz"),
        image=x_tr[calib_idx].astype(np.float32),
        label=y_tr[calib_idx].astype(np.int64),
    )

    specs = [
        ("digits_cnn", DigitsCNN, dict(epochs=40, lr=3e-3, wd=5e-4), True),
        ("digits_transformer", DigitsTransformer, dict(epochs=100, lr=2e-3, wd=0.05), False),
    ]
    summary = []
    for name, cls, hp, keep_bn in specs:
        torch.manual_seed(SEED)
        model = cls()
        n_params = sum(p.numel() for p in model.parameters())
        print(f"[{name}] params={n_params}  {hp}")
        t0 = time.time()
        train(model, x_tr, y_tr, **hp)
        t_train = time.time() - t0
        logits_t = torch_predict(model, x_te)
        acc_t = float((logits_t.argmax(1) == y_te).mean())

        path = os.path.join(HERE, f"{name}.onnx")
        _, ops, size = export_onnx(model, path, keep_bn=keep_bn)
        logits_o = ort_predict(path, x_te)
        acc_o = float((logits_o.argmax(1) == y_te).mean())
        max_diff = float(np.abs(logits_o - logits_t).max())
        print(
            f"[{name}] train {t_train:.1f}s  torch acc {acc_t:.4f}  onnxruntime acc {acc_o:.4f}  "
            f"max|dlogits| {max_diff:.2e}  size {size} B"
        )
        print(f"[{name}] ops {dict(ops)}")
        assert acc_o == acc_t, "ONNX accuracy differs from torch accuracy"
        summary.append((name, n_params, acc_t, acc_o, t_train, size))

    print("\nsummary:")
    for name, n_params, acc_t, acc_o, t_train, size in summary:
        print(f"  {name:20s} params {n_params:7d}  test acc torch {acc_t:.4f} / ort {acc_o:.4f}  train {t_train:.1f}s  {size} B")
    print(f"total time {time.time() - t_start:.1f}s")


if __name__ == "__main__":
    main()
