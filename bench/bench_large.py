"""Large models (issue 5): a LLaMA-shaped decoder with random weights, larger than 2 GB, analysed, pruned with OBSPA
and written with external data, in a fresh process whose peak resident memory and time per phase are measured.

    python bench/bench_large.py                      # hidden 2048, 20 layers, FFN 5632, vocab 32000: 1.16B params
    python bench/bench_large.py --layers 2 --hidden 256 --ffn 704 --vocab 1000 --keep   # a quick small run

The model is generated into a temporary folder (never the repository), each weight written straight to the
external data file, so generating it never holds more than one weight block in memory. The decoder: token
embedding, per layer RMSNorm (explicit Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul ops) -> Q/K/V MatMuls -> head split
with Reshape/Transpose -> softmax attention -> head merge -> O projection -> residual Add, RMSNorm -> SiLU-gated MLP
(gate, up, down) -> residual Add; final RMSNorm and LM head. No rotary embedding, no causal mask (neither changes
what pruning sees). Peak memory is VmHWM of the child process (ru_maxrss survives exec, see bench_engine.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parent.parent


class _Writer:
    """Appends weights to one external data file and returns TensorProtos that reference them."""

    def __init__(self, path: Path, seed: int):
        self.path = path
        self.handle = open(path, "wb")  # noqa: SIM115 - closed by close() once every weight is written
        self.rng = np.random.default_rng(seed)
        self.count = 0

    def random(self, name: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> TensorProto:
        offset = self.handle.tell()
        total = int(np.prod(shape))
        block = 1 << 24
        for start in range(0, total, block):
            size = min(block, total - start)
            values = self.rng.standard_normal(size, dtype=np.float32) * np.float32(std) + np.float32(mean)
            self.handle.write(values.tobytes())
        self.count += total
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(total * 4))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        return tensor

    def close(self) -> None:
        self.handle.close()


def _rmsnorm(nodes, inits, writer, x: str, prefix: str, hidden: int) -> str:
    inits.append(writer.random(f"{prefix}.weight", (hidden,), 0.1, 1.0))
    steps = [("Pow", [x, "two"], "sq"), ("ReduceMean", None, "ms"), ("Add", None, "var"), ("Sqrt", None, "std"),
             ("Reciprocal", None, "inv"), ("Mul", [x, None], "normed"), ("Mul", [None, f"{prefix}.weight"], "out")]
    previous = x
    for op, inputs, tag in steps:
        out = f"{prefix}.{tag}"
        if op == "ReduceMean":
            nodes.append(helper.make_node(op, [previous], [out], axes=[-1], keepdims=1))
        elif op == "Add":
            nodes.append(helper.make_node(op, [previous, "eps"], [out]))
        elif inputs is None:
            nodes.append(helper.make_node(op, [previous], [out]))
        else:
            nodes.append(helper.make_node(op, [previous if i is None else i for i in inputs], [out]))
        previous = out
    return previous


def _linear(nodes, inits, writer, x: str, name: str, rows: int, cols: int) -> str:
    inits.append(writer.random(f"{name}.weight", (rows, cols), rows ** -0.5))
    nodes.append(helper.make_node("MatMul", [x, f"{name}.weight"], [f"{name}.out"]))
    return f"{name}.out"


def _attention(nodes, inits, writer, x: str, p: str, hidden: int, heads: int) -> str:
    split = []
    for proj in ("q", "k", "v"):
        y = _linear(nodes, inits, writer, x, f"{p}.{proj}_proj", hidden, hidden)
        nodes.append(helper.make_node("Reshape", [y, "heads_shape"], [f"{y}.heads"]))
        perm = [0, 2, 3, 1] if proj == "k" else [0, 2, 1, 3]
        nodes.append(helper.make_node("Transpose", [f"{y}.heads"], [f"{y}.t"], perm=perm))
        split.append(f"{y}.t")
    q, k, v = split
    nodes += [helper.make_node("MatMul", [q, k], [f"{p}.scores"]),
              helper.make_node("Mul", [f"{p}.scores", "scale"], [f"{p}.scaled"]),
              helper.make_node("Softmax", [f"{p}.scaled"], [f"{p}.probs"], axis=-1),
              helper.make_node("MatMul", [f"{p}.probs", v], [f"{p}.ctx"]),
              helper.make_node("Transpose", [f"{p}.ctx"], [f"{p}.ctx.t"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", [f"{p}.ctx.t", "merge_shape"], [f"{p}.merged"])]
    return _linear(nodes, inits, writer, f"{p}.merged", f"{p}.o_proj", hidden, hidden)


def _mlp(nodes, inits, writer, x: str, p: str, hidden: int, ffn: int) -> str:
    gate = _linear(nodes, inits, writer, x, f"{p}.gate_proj", hidden, ffn)
    up = _linear(nodes, inits, writer, x, f"{p}.up_proj", hidden, ffn)
    nodes += [helper.make_node("Sigmoid", [gate], [f"{p}.sig"]),
              helper.make_node("Mul", [gate, f"{p}.sig"], [f"{p}.silu"]),
              helper.make_node("Mul", [f"{p}.silu", up], [f"{p}.gated"])]
    return _linear(nodes, inits, writer, f"{p}.gated", f"{p}.down_proj", ffn, hidden)


def write_decoder(path: Path, hidden: int = 2048, layers: int = 20, ffn: int = 5632, vocab: int = 32000,
                  heads: int = 16, seed: int = 0) -> int:
    """Write the decoder to ``path`` with its weights in ``path.name + '.data'``; return the parameter count."""
    writer = _Writer(path.parent / f"{path.name}.data", seed)
    nodes, inits = [], [writer.random("embed_tokens.weight", (vocab, hidden), 0.02)]
    inits += [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
              helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-6]),
              helper.make_tensor("scale", TensorProto.FLOAT, [], [(hidden // heads) ** -0.5]),
              helper.make_tensor("heads_shape", TensorProto.INT64, [4], [1, -1, heads, hidden // heads]),
              helper.make_tensor("merge_shape", TensorProto.INT64, [3], [1, -1, hidden])]
    nodes.append(helper.make_node("Gather", ["embed_tokens.weight", "input_ids"], ["h0"], axis=0))
    x = "h0"
    for layer in range(layers):
        p = f"layers.{layer}"
        normed = _rmsnorm(nodes, inits, writer, x, f"{p}.input_layernorm", hidden)
        attn = _attention(nodes, inits, writer, normed, f"{p}.self_attn", hidden, heads)
        nodes.append(helper.make_node("Add", [x, attn], [f"{p}.h_attn"]))
        normed = _rmsnorm(nodes, inits, writer, f"{p}.h_attn", f"{p}.post_attention_layernorm", hidden)
        mlp = _mlp(nodes, inits, writer, normed, f"{p}.mlp", hidden, ffn)
        nodes.append(helper.make_node("Add", [f"{p}.h_attn", mlp], [f"{p}.h_out"]))
        x = f"{p}.h_out"
    normed = _rmsnorm(nodes, inits, writer, x, "norm", hidden)
    nodes.append(helper.make_node("MatMul", [normed, _head(inits, writer, hidden, vocab)], ["logits"]))
    writer.close()
    graph = helper.make_graph(nodes, "llama_like", [helper.make_tensor_value_info("input_ids", TensorProto.INT64,
                                                                                   [1, "seq"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq", vocab])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench_large")
    with open(path, "wb") as handle:  # the proto holds references only: a few hundred KB
        handle.write(model.SerializeToString())
    return writer.count


def _head(inits, writer, hidden: int, vocab: int) -> str:
    inits.append(writer.random("lm_head.weight", (hidden, vocab), hidden ** -0.5))
    return "lm_head.weight"


CHILD = r"""
import json, sys, time, resource
import spc

def peak():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) * 1024

phases, clock = [], [time.perf_counter()]
def mark(name):
    now = time.perf_counter()
    phases.append({"phase": name, "s": round(now - clock[0], 2), "peak_rss_bytes": peak()})
    clock[0] = now

base = peak()
model = spc.load(sys.argv[1]); mark("load")
names = iter(["analyse", "score", "plan", "rewrite + compensate"])
result = spc.prune(model, ratio=float(sys.argv[3]), progress=lambda m: mark(next(names)) if not m.startswith(
    "analysing") else None)
mark("validate")
spc.save(result.model, sys.argv[2]); mark("write")
summary = result.summary()
print(json.dumps({"phases": phases, "baseline_rss_bytes": base, "params": summary["params"],
                  "macs": summary["macs"], "validation": summary["validation"]}))
"""


def run_child(model: Path, out: Path, ratio: float) -> dict:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, str(model), str(out), str(ratio)], capture_output=True,
                          text=True, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"prune failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["total_s"] = round(time.perf_counter() - start, 1)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--dir", help="work folder (default: a fresh temporary one, deleted afterwards)")
    parser.add_argument("--keep", action="store_true", help="keep the generated and pruned files")
    args = parser.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="spc-bench-large-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        clock = time.perf_counter()
        path = work / "decoder.onnx"
        params = write_decoder(path, args.hidden, args.layers, args.ffn, args.vocab, args.heads)
        data = path.parent / f"{path.name}.data"
        generated = time.perf_counter() - clock
        report = run_child(path, work / "decoder.pruned.onnx", args.ratio)
        weights = data.stat().st_size
        peak = max(p["peak_rss_bytes"] for p in report["phases"])
        out_data = work / "decoder.pruned.onnx.data"
        report.update({"config": vars(args) | {"dir": str(work)}, "params": params, "weights_bytes": weights,
                       "generate_s": round(generated, 1), "peak_rss_bytes": peak,
                       "peak_over_weights": round(peak / weights, 3),
                       "output_weights_bytes": out_data.stat().st_size if out_data.exists() else None})
        print(json.dumps(report, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
