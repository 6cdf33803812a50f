"""spc.to_torch: the torch module computes what ONNX Runtime computes, before and after pruning, and it trains."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

import spc
from spc.validate import run
from tests.helpers import GraphBuilder, close, conv_bn_relu

MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small tensors: a second thread only adds contention (and on a busy machine, a lot of it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _eval_images(n: int = 32) -> np.ndarray:
    return np.load(MODELS / "digits_eval.npz")["image"][:n]


def _torch_outputs(module, feeds) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def _assert_matches_ort(model: onnx.ModelProto, feeds, rtol: float = 1e-4):
    expected = list(run(model, feeds).values())
    got = _torch_outputs(spc.to_torch(model), feeds)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert close(a, b, rtol=rtol), float(np.abs(a - b).max())


@pytest.mark.parametrize("name", ["digits_cnn", "digits_transformer"])
@pytest.mark.parametrize("criterion", [None, "l1", "obspa"])
def test_digits_models_match_onnxruntime_before_and_after_pruning(name, criterion):
    model = spc.load(MODELS / f"{name}.onnx")
    if criterion:
        model = spc.prune(model, ratio=0.5, criterion=criterion).model
    _assert_matches_ort(model, {"image": _eval_images()})


@pytest.mark.parametrize("zoo_name", ["resnet18", "vit", "llama", "lstm"])
def test_pruned_zoo_models_match_onnxruntime(zoo_name, tmp_path):
    from tests.zoo import export

    feeds = export(zoo_name, tmp_path / f"{zoo_name}.onnx")
    result = spc.prune(spc.load(tmp_path / f"{zoo_name}.onnx"), ratio=0.4, criterion="l1", round_to=1)
    assert result.plan.after.macs < result.plan.before.macs
    _assert_matches_ort(result.model, feeds)


def test_every_weight_is_a_parameter_and_running_stats_are_buffers():
    model = spc.load(MODELS / "digits_transformer.onnx")
    module = spc.to_torch(model)
    float_weights = sum(int(np.prod(i.dims)) for i in model.graph.initializer
                        if i.data_type == TensorProto.FLOAT and np.prod(i.dims) > 1)
    assert sum(p.numel() for p in module.parameters()) == float_weights == 101834
    cnn = spc.to_torch(MODELS / "digits_cnn.onnx")
    assert sum(p.numel() for p in cnn.parameters()) == 151274
    assert sum(b.numel() for b in cnn.buffers()) == 832  # 8 BNs x (mean, var)


@pytest.mark.parametrize("name", ["digits_cnn", "digits_transformer"])
def test_fine_tuning_lowers_the_loss_and_to_onnx_carries_the_weights(name):
    torch.manual_seed(0)
    data = np.load(MODELS / "digits_calib.npz")
    images, labels = data["image"][:96], data["label"][:96]
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    module = spc.to_torch(spc.prune(spc.load(MODELS / f"{name}.onnx"), ratio=0.7, criterion="l1").model)
    loss_fn = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    module.eval()
    with torch.no_grad():
        before = float(loss_fn(module(x), y))
    module.train()
    for _ in range(12):
        optimizer.zero_grad()
        loss_fn(module(x), y).backward()
        optimizer.step()
    module.eval()
    with torch.no_grad():
        after = float(loss_fn(module(x), y))
    assert after < 0.7 * before
    trained = module.to_onnx()
    _assert_matches_ort(trained, {"image": images})
    assert close(run(trained, {"image": images})["logits"], module(x).detach().numpy(), rtol=1e-4)


def test_batchnorm_uses_batch_statistics_when_training():
    module = spc.to_torch(MODELS / "digits_cnn.onnx")
    stats = {k: v.clone() for k, v in module.state.named_buffers()}
    module.train()
    module(torch.from_numpy(_eval_images()))
    changed = [k for k, v in module.state.named_buffers() if not torch.equal(v, stats[k])]
    assert len(changed) == 16
    module.eval()
    module(torch.from_numpy(_eval_images()))
    assert all(torch.equal(v, dict(module.state.named_buffers())[k]) for k, v in module.state.named_buffers())


def _slicing_graph():
    b = GraphBuilder(opset=17)
    x = b.input("x", [2, 6, 8])
    s = b.op("Slice", [x, b.ints(-1, 7), b.ints(-100, 0), b.ints(1, 2), b.ints(-2, -3)])
    parts = b.op("Split", [x, b.ints(2, 4)], outputs=2, axis=1)
    p = b.op("Pad", [parts[0], b.ints(0, 1, 2, 0, 0, 1)], mode="reflect")
    g = b.op("Gather", [x, b.ints(-1, 0)], axis=2)
    r = b.op("ReduceMean", [b.op("Transpose", [g], perm=[2, 0, 1])], axes=[0, 2], keepdims=0)
    e = b.op("Expand", [b.op("Unsqueeze", [r, b.ints(0)]), b.ints(3, 1)])
    c = b.op("Concat", [b.op("Flatten", [s], axis=1), b.op("Flatten", [p], axis=1)], axis=1)
    return b.model(c, e, b.op("Softmax", [parts[1]], axis=1), b.op("CumSum", [x, b.const(np.array(2))],
                                                                    reverse=1))


def _layers_graph():
    b = GraphBuilder(opset=17)
    x = b.input("x", [2, 3, 9, 9])
    y = conv_bn_relu(b, x, 3, 4, group=1, strides=[2, 2])
    y = b.op("MaxPool", [y], kernel_shape=[3, 3], pads=[0, 0, 1, 1], strides=[2, 2])
    z = b.op("ConvTranspose", [y, b.w(4, 2, 3, 3), b.w(2)], strides=[2, 2], pads=[1, 0, 0, 1],
             output_padding=[1, 1])
    z = b.op("AveragePool", [z], kernel_shape=[2, 2], pads=[1, 1, 1, 1], count_include_pad=0)
    z = b.op("InstanceNormalization", [z, b.w(2), b.w(2)])
    g = b.op("Gemm", [b.op("Flatten", [y]), b.w(16, 5), b.w(5)], alpha=0.5, beta=2.0)
    h = b.op("HardSigmoid", [b.op("LeakyRelu", [g], alpha=0.2)], alpha=0.3)
    return b.model(z, b.op("ReduceMax", [h], axes=[1]), b.op("Conv", [x, b.w(3, 1, 2, 2)], group=3,
                                                              auto_pad="SAME_UPPER"))


def _lstm_graph():
    b = GraphBuilder(opset=17)
    x = b.input("x", [5, 2, 3])  # [seq, batch, input]
    h0, c0 = b.w(2, 2, 4), b.w(2, 2, 4)
    y, h, c = b.op("LSTM", [x, b.w(2, 16, 3), b.w(2, 16, 4), b.w(2, 32), "", h0, c0], outputs=3, hidden_size=4,
                   direction="bidirectional")
    return b.model(y, h, c)


def test_batch_first_lstm_is_the_sequence_first_one_transposed():
    from spc.backends.torch_rnn import lstm

    g = torch.Generator().manual_seed(0)
    x, w, r, b, h0, c0 = (torch.randn(*s, generator=g) for s in [(5, 2, 3), (2, 16, 3), (2, 16, 4), (2, 32),
                                                                  (2, 2, 4), (2, 2, 4)])
    attrs = {"direction": "bidirectional"}
    seq_first = lstm(attrs, x, w, r, b, None, h0, c0)
    batch_first = lstm({**attrs, "layout": 1}, x.transpose(0, 1), w, r, b, None, h0.transpose(0, 1),
                       c0.transpose(0, 1))
    assert torch.allclose(batch_first[0], seq_first[0].permute(2, 0, 1, 3))
    assert all(torch.allclose(a.transpose(0, 1), e) for a, e in zip(batch_first[1:], seq_first[1:]))


@pytest.mark.parametrize("graph", [_slicing_graph, _layers_graph, _lstm_graph])
def test_op_table_matches_onnxruntime_on_awkward_attributes(graph):
    model = graph()
    x = np.random.default_rng(0).standard_normal([d.dim_value for d in model.graph.input[0].type.tensor_type
                                                  .shape.dim]).astype(np.float32)
    _assert_matches_ort(model, {"x": x})


def test_unknown_op_names_the_node_and_op():
    b = GraphBuilder()
    x = b.input("x", [1, 4])
    y = b.op("Relu", [b.op("Mystery", [x], domain="example.custom")])
    model = b.model(y, shapes={y: [1, 4]})
    with pytest.raises(spc.SpcError, match=r"node 'n_Mystery_\d+'.*'example.custom::Mystery'"):
        spc.to_torch(model)


def test_bad_argument_is_a_one_line_error():
    with pytest.raises(spc.SpcError, match="expected a path"):
        spc.to_torch(42)
    with pytest.raises(spc.SpcError, match="missing model input"):
        spc.to_torch(MODELS / "digits_cnn.onnx")()


def test_importing_spc_does_not_import_torch():
    code = "import sys, spc; assert 'torch' not in sys.modules; spc.to_torch; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=MODELS.parent)
