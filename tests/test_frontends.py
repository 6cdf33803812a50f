"""spc.from_* front-ends: a small real model from each framework converts through the framework's own exporter,
ONNX Runtime matches the framework's output, and spc analyses and prunes the result exactly (mask oracle).

The frameworks are in the [test] extra, so they are imported plainly: a missing one fails here, never skips.
Order matters: PaddlePaddle's native library crashes the process when it is loaded after TensorFlow's, so the
paddle test runs before the keras test (spc.from_paddle refuses that order with an SpcError instead).
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest

import spc
from spc.validate import run
from tests.helpers import check_oracle

RNG = np.random.default_rng(0)
IMAGE_NHWC = RNG.standard_normal((2, 12, 12, 3)).astype(np.float32)
IMAGE_NCHW = np.ascontiguousarray(IMAGE_NHWC.transpose(0, 3, 1, 2))


def _bn_stats(channels: int) -> tuple[np.ndarray, ...]:
    """Scale, shift, mean and variance far from the identity, so a BatchNorm is not a no-op."""
    rng = np.random.default_rng(channels)
    return (rng.uniform(0.5, 1.5, channels).astype(np.float32), rng.normal(0, 0.2, channels).astype(np.float32),
            rng.normal(0, 0.2, channels).astype(np.float32), rng.uniform(0.5, 2.0, channels).astype(np.float32))


def check_converted(model: onnx.ModelProto, feeds: dict, reference: list[np.ndarray], *, min_groups: int = 2):
    """The converted model matches the framework, has prunable groups, prunes exactly and validates."""
    assert isinstance(model, onnx.ModelProto)
    outputs = list(run(model, feeds).values())
    for got, want in zip(outputs, reference):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    analysis = spc.analyze(model)
    assert len([g for g in analysis.prunable_groups if g.size > 1]) >= min_groups
    check_oracle(model, min_groups=min_groups)
    result = spc.prune(model, ratio=0.3, criterion="l1", round_to=1)
    assert "ONNX Runtime passed" in result.validation
    assert result.plan.reduction("macs") >= 0.3
    pruned = list(run(result.model, feeds).values())
    assert [p.shape for p in pruned] == [o.shape for o in outputs]
    return analysis


def test_from_sklearn_digits_pipeline():
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features, labels = load_digits(return_X_y=True)
    features = features.astype(np.float32)
    pipeline = make_pipeline(StandardScaler(), MLPClassifier((32, 16), max_iter=60, random_state=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipeline.fit(features[:1000], labels[:1000])
    model = spc.from_sklearn(pipeline, features[:1])
    test = features[1000:1100]
    check_converted(model, {"X": test}, [pipeline.predict(test), pipeline.predict_proba(test)])


def test_from_torch_cnn():
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            conv, bn = torch.nn.Conv2d, torch.nn.BatchNorm2d
            self.c1, self.b1, self.c2, self.b2 = conv(3, 8, 3, padding=1), bn(8), conv(8, 8, 3, padding=1), bn(8)
            self.c3, self.b3, self.fc = conv(8, 16, 3, padding=1), bn(16), torch.nn.Linear(16, 10)

        def forward(self, x):
            h = torch.relu(self.b1(self.c1(x)))
            h = torch.relu(h + self.b2(self.c2(h)))
            return self.fc(torch.relu(self.b3(self.c3(h))).mean(dim=(2, 3)))

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        for bn in (net.b1, net.b2, net.b3):
            for tensor, value in zip((bn.weight, bn.bias, bn.running_mean, bn.running_var), _bn_stats(bn.num_features)):
                tensor.copy_(torch.from_numpy(value))
        reference = net(torch.from_numpy(IMAGE_NCHW)).numpy()
    model = spc.from_torch(net, torch.from_numpy(IMAGE_NCHW))
    check_converted(model, {model.graph.input[0].name: IMAGE_NCHW}, [reference])


def test_from_jax_flax_cnn_and_mlp():
    import jax
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.c1, self.b1 = nnx.Conv(3, 8, (3, 3), rngs=rngs), nnx.BatchNorm(8, rngs=rngs)
            self.c2, self.b2 = nnx.Conv(8, 8, (3, 3), rngs=rngs), nnx.BatchNorm(8, rngs=rngs)
            self.c3, self.b3 = nnx.Conv(8, 16, (3, 3), rngs=rngs), nnx.BatchNorm(16, rngs=rngs)
            self.fc = nnx.Linear(16, 10, rngs=rngs)

        def __call__(self, x):
            h = nnx.relu(self.b1(self.c1(x)))
            h = nnx.relu(h + self.b2(self.c2(h)))
            return self.fc(nnx.relu(self.b3(self.c3(h))).mean(axis=(1, 2)))

    net = Net(nnx.Rngs(0))
    net.eval()
    for bn in (net.b1, net.b2, net.b3):
        bn.scale.value, bn.bias.value, bn.mean.value, bn.var.value = map(jax.numpy.asarray, _bn_stats(bn.num_features))
    graphdef, state = nnx.split(net)

    def apply(state, x):
        return nnx.merge(graphdef, state)(x)

    model = spc.from_jax(apply, state, ("B", 12, 12, 3))
    reference = np.asarray(apply(state, IMAGE_NHWC))
    check_converted(model, {model.graph.input[0].name: IMAGE_NHWC}, [reference])

    params = {"w1": RNG.standard_normal((20, 32)).astype(np.float32), "b1": np.zeros(32, np.float32),
              "w2": RNG.standard_normal((32, 5)).astype(np.float32)}

    def mlp(p, x):
        return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]

    x = RNG.standard_normal((4, 20)).astype(np.float32)
    model = spc.from_jax(mlp, params, x)
    check_converted(model, {model.graph.input[0].name: x}, [np.asarray(mlp(params, x))], min_groups=1)


def test_from_paddle_cnn():
    import paddle

    class Net(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            conv, bn = paddle.nn.Conv2D, paddle.nn.BatchNorm2D
            self.c1, self.b1, self.c2, self.b2 = conv(3, 8, 3, padding=1), bn(8), conv(8, 8, 3, padding=1), bn(8)
            self.c3, self.b3, self.fc = conv(8, 16, 3, padding=1), bn(16), paddle.nn.Linear(16, 10)

        def forward(self, x):
            relu = paddle.nn.functional.relu
            h = relu(self.b1(self.c1(x)))
            h = relu(h + self.b2(self.c2(h)))
            return self.fc(relu(self.b3(self.c3(h))).mean(axis=[2, 3]))

    paddle.seed(0)
    net = Net()
    net.eval()
    for bn in (net.b1, net.b2, net.b3):
        for tensor, value in zip((bn.weight, bn.bias, bn._mean, bn._variance), _bn_stats(bn._num_features)):
            tensor.set_value(value)
    reference = net(paddle.to_tensor(IMAGE_NCHW)).numpy()
    model = spc.from_paddle(net, paddle.static.InputSpec([None, 3, 12, 12], "float32", "image"))
    assert "BatchNormalization" in {node.op_type for node in model.graph.node}
    check_converted(model, {"image": IMAGE_NCHW}, [reference])


def test_exporter_failure_is_one_line_naming_the_framework():
    import paddle
    import torch

    # paddle2onnx logs its failures and calls sys.exit: the tracer's own message must come through instead
    with pytest.raises(spc.SpcError, match=r"^PaddlePaddle \(paddle2onnx\) export failed: ValueError: .*matmul"):
        spc.from_paddle(paddle.nn.Linear(4, 2), paddle.static.InputSpec([None, 5], "float32", "x"))
    with pytest.raises(spc.SpcError, match=r"^PyTorch \(torch.onnx\) export failed: ") as caught:
        spc.from_torch(torch.nn.Linear(4, 2), torch.zeros(3, 5))  # 5 features into a 4-feature layer
    assert "\n" not in str(caught.value)
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    with pytest.raises(spc.SpcError, match=r"^scikit-learn \(skl2onnx\) export failed: ") as caught:
        spc.from_sklearn(make_pipeline(StandardScaler()), np.zeros((1, 3), np.float32))  # never fitted
    assert "\n" not in str(caught.value)


def test_from_keras_cnn():
    import tensorflow as tf

    layers = tf.keras.layers
    image = tf.keras.Input((12, 12, 3), name="image")
    h = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(8, 3, padding="same")(image)))
    r = layers.BatchNormalization()(layers.Conv2D(8, 3, padding="same")(h))
    h = layers.ReLU()(layers.Add()([h, r]))
    h = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(16, 3, padding="same")(h)))
    net = tf.keras.Model(image, layers.Dense(10)(layers.GlobalAveragePooling2D()(h)))
    for layer in net.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.set_weights(list(_bn_stats(layer.get_weights()[0].shape[0])))
    model = spc.from_keras(net)
    reference = net(IMAGE_NHWC, training=False).numpy()
    check_converted(model, {"image": IMAGE_NHWC}, [reference])


@pytest.mark.parametrize("frontend,module,extra", [
    ("from_torch", "torch", "torch"), ("from_keras", "tensorflow", "keras"), ("from_jax", "jax", "jax"),
    ("from_paddle", "paddle", "paddle"), ("from_sklearn", "skl2onnx", "sklearn"),
])
def test_missing_framework_names_the_extra(monkeypatch, frontend, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    args = {"from_torch": (None, ()), "from_keras": (None,), "from_jax": (None, None, (1,)),
            "from_paddle": (None, []), "from_sklearn": (None, np.zeros((1, 2)))}[frontend]
    with pytest.raises(spc.SpcError) as caught:
        getattr(spc, frontend)(*args)
    message = str(caught.value)
    assert message.startswith(f"{frontend}: ") and f"pip install 'spc[{extra}]'" in message and "\n" not in message


def test_importing_spc_imports_no_framework():
    code = ("import sys, spc, spc.frontends; spc.from_keras; "
            "print(sorted(m for m in ('torch', 'tensorflow', 'jax', 'paddle', 'skl2onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_from_paddle_refuses_to_load_paddle_after_tensorflow(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", sys.modules.get("tensorflow") or object())
    monkeypatch.delitem(sys.modules, "paddle", raising=False)
    with pytest.raises(spc.SpcError, match="import paddle before tensorflow"):
        spc.from_paddle(None, [])
