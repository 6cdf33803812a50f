"""The ``spc`` command: a thin layer that parses arguments, calls the Python API and prints tables or JSON.

Problems with the input (files, nodes, arguments) print one line on stderr and exit with code 2; no output file is
written then.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import SpcError


def _dims(values: list[str] | None) -> dict[str, int]:
    """``--dim seq=128 --dim batch=4``: sizes for dynamic axes."""
    result = {}
    for item in values or []:
        name, _, size = item.partition("=")
        if not name or not size.isdigit() or int(size) < 1:
            raise SpcError(f"--dim: '{item}' is not NAME=SIZE with a positive size")
        result[name] = int(size)
    return result


class Progress:
    """Step lines with elapsed time on stderr; silent with --json or --quiet so stdout stays machine-readable."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[{time.perf_counter() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)


def _ratio(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise SpcError(f"--ratio: '{text}' is not a number") from None


def cmd_analyze(args) -> int:
    from . import api
    from .analysis import analyze
    from .report import analysis_summary, analysis_text

    model = api.load(args.model)
    summary = analysis_summary(analyze(model, allow_inexact=args.allow_inexact), _dims(args.dim))
    if args.json:
        print(json.dumps({"model": str(args.model), **summary}, indent=2))
    else:
        print(analysis_text(summary, str(args.model)))
    return 0


def cmd_prune(args) -> int:
    from . import api
    from .evaluate import load_npz, predict, score
    from .report import human, table

    from .passes import importance_pass
    from .plan import check_budget

    progress = Progress(not (args.json or args.quiet))
    ratio = _ratio(args.ratio)
    check_budget(ratio, args.by)
    importance_pass(args.criterion)
    output = Path(args.output) if args.output else Path(args.model).with_suffix(".pruned.onnx")
    if output.resolve() == Path(args.model).resolve():
        raise SpcError(f"-o: '{output}' is the input file; spc never modifies its input")
    progress(f"loading {args.model}")
    model = api.load(args.model)
    calibration = load_npz(args.calib, model)[0] if args.calib else None
    evaluation = load_npz(args.eval, model) if args.eval else None
    latency = None
    if args.speedup is not None:  # budget: measured latency on --target (spc/speedup.py)
        from .speedup import cli_prune

        result, latency = cli_prune(args, model, calibration, progress, args.target)
    else:
        from .analysis import analyze

        progress("analysing channel coupling")
        analysis = analyze(model, allow_inexact=args.allow_inexact)  # of the loaded model: normalised once
        result = api.prune(analysis, ratio=ratio, by=args.by, criterion=args.criterion, round_to=args.round_to,
                           seed=args.seed, allow_inexact=args.allow_inexact, dim_values=_dims(args.dim),
                           calibration=calibration, progress=progress)
    summary = result.summary()
    if evaluation is not None:
        progress(f"evaluating on {args.eval}")
        feeds, labels = evaluation
        reference = predict(model, feeds) if labels is None else None
        metric = "accuracy" if labels is not None else "top1_agreement"
        summary["eval"] = {"metric": metric, "before": score(model, feeds, labels, reference),
                           "after": score(result.model, feeds, labels, reference)}
    progress(f"writing {output}")
    api.save(result.model, output, source=args.model)
    summary["output"] = str(output)
    if latency is not None:
        summary["latency"] = {"file": str(output.with_suffix(".latency.json")), **latency["result"]}
        output.with_suffix(".latency.json").write_text(json.dumps(latency, indent=2) + "\n")
    if args.summary_json:
        Path(args.summary_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary_json).write_text(json.dumps(summary, indent=2))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    rows = [["MACs", human(summary["macs"]["before"]), human(summary["macs"]["after"]),
             f"{summary['reduction']['macs']:.1%}"],
            ["params", human(summary["params"]["before"]), human(summary["params"]["after"]),
             f"{summary['reduction']['params']:.1%}"]]
    if "eval" in summary:
        ev = summary["eval"]
        rows.append([ev["metric"], f"{ev['before']:.4f}", f"{ev['after']:.4f}", f"{ev['after'] - ev['before']:+.4f}"])
    print(table(["", "before", "after", "change"], rows, {1, 2, 3}))
    budget = (f"run {args.speedup}x faster on {args.target} (measured {latency['result']['measured_speedup']}x)"
              if latency is not None else f"remove {ratio:.0%} of {args.by}")
    print(f"\n{len(summary['groups'])} groups pruned by '{summary['criterion']}' to {budget}"
          f" ({summary['speedup_macs']}x fewer MACs); {summary['validation']}")
    print(f"wrote {output}")
    return 0


def cmd_compile(args) -> int:
    from .compile import compile_cli

    return compile_cli(args, Progress(not (args.json or args.quiet)))


def cmd_run(args) -> int:
    from .compile import run_cli

    return run_cli(args)


def cmd_sensitivity(args) -> int:
    from .sensitivity import sensitivity_cli

    return sensitivity_cli(args, Progress(not (args.json or args.quiet)))


def cmd_report(args) -> int:
    from .report_html import report_cli

    return report_cli(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spc", description="Graph-level structured pruning compiler for ONNX.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, progress=True):
        p.add_argument("model", help="input ONNX file (never modified)")
        p.add_argument("--json", action="store_true", help="print a JSON document instead of tables")
        p.add_argument("--dim", action="append", metavar="NAME=SIZE", help="size of a dynamic axis for costs")
        p.add_argument("--allow-inexact", action="store_true",
                       help="also prune channels normalised over by LayerNorm/softmax (changes their statistics)")
        if progress:
            p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")

    def pruning(p):
        p.add_argument("--ratio", default="0.5", help="fraction of --by to remove, in [0, 1) (default 0.5)")
        p.add_argument("--by", default="macs", choices=["macs", "params", "channels"])
        p.add_argument("--criterion", default="obspa",
                       help="obspa (default, no data), obs, activation, wanda (need --calib), l1, l2, random")
        p.add_argument("--round-to", type=int, default=None,
                       help="keep channel counts multiples of N (default: the CPU's vector width; 1 opts out)")
        p.add_argument("--calib", help=".npz of calibration inputs for data-driven criteria")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--speedup", type=float, default=None,
                       help="instead of --ratio: prune until the model measured on --target runs S times faster")
        p.add_argument("--rpc", metavar="HOST:PORT", help="with --speedup: measure on a device via a TVM RPC server "
                       "(or a tracker, with --rpc-key)")
        p.add_argument("--rpc-key", help="with --rpc: the device's key at the RPC tracker")
        p.add_argument("--latency-widths", type=int, default=3, help="with --speedup: widths measured per axis of "
                       "each layer's latency table (default 3)")
        p.add_argument("--min-efficiency", type=float, default=0.0,
                       help="with --speedup: remove at most S / E times the MACs (1: no more compute than the "
                       "speed-up; default 0: least importance per second saved alone, which keeps more accuracy)")

    p = sub.add_parser("analyze", help="list prunable groups and what is pinned, and why")
    common(p, progress=False)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("prune", help="remove channels and write a smaller dense ONNX model")
    common(p)
    pruning(p)
    p.add_argument("-o", "--output", help="output ONNX file (default: MODEL.pruned.onnx)")
    p.add_argument("--target", help="with --speedup: the target whose measured latency is the budget (x86, arm, cuda)")
    p.add_argument("--summary-json", help="also write the --json summary to this file (for spc report)")
    p.add_argument("--eval", help=".npz with model inputs (and 'label') to report accuracy before and after")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("compile", help="prune, sparsify and compile with TVM into a deployable bundle")
    common(p)
    pruning(p)
    p.set_defaults(ratio="0.0")
    p.add_argument("--target", required=True, help="x86, arm or cuda")
    p.add_argument("--sparsity", type=float, default=0.0, help="fraction of weight blocks to zero (default 0)")
    p.add_argument("--block", default="4x1", help="sparse block RxC (default 4x1)")
    p.add_argument("--sparse-layers", action="store_true",
                   help="with --speedup: also let layers run block-sparse where that was measured to pay (blocks "
                        "priced, chosen and the rest re-fitted by OBS with the criterion's moments; can still cost "
                        "accuracy on small trained models)")
    p.add_argument("-o", "--output", required=True, help="bundle directory")
    p.add_argument("--bind-dims", action="store_true",
                   help="compile with the --dim sizes fixed (static shapes: the kernels specialise to them, e.g. "
                        "one parallel loop over the whole batch, as --speedup measured); the bundle then accepts "
                        "only those sizes")
    p.add_argument("--no-winograd", action="store_true",
                   help="compute every product of 3x3 convolutions as given (results as close to ONNX Runtime's as "
                        "the direct sums) instead of by Winograd's algorithm, faster with errors of about 1e-5 of "
                        "the sums' magnitude")
    p.add_argument("--eval", help=".npz with model inputs (and 'label'): accuracy of the model and of the bundle's")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("run", help="run a compiled bundle (x86 here; cuda on a machine with a GPU)")
    p.add_argument("bundle", help="bundle directory written by spc compile")
    p.add_argument("--input", action="append", metavar="NAME=FILE.npy", required=True)
    p.add_argument("--output", required=True, help=".npz to write the outputs to")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sensitivity", help="fidelity of the model as each group alone is pruned further")
    common(p)
    p.add_argument("--fractions", help="comma-separated fractions of each group to remove (default 0,0.1,...,0.9)")
    p.add_argument("--criterion", help="importance criterion (default obspa, or obs with --calib)")
    p.add_argument("--calib", help=".npz of calibration inputs (data-driven criteria; default criterion obs)")
    p.add_argument("--eval", help=".npz of inputs (and 'label' for accuracy) to measure on (default: Gaussian)")
    p.add_argument("--samples", type=int, default=64, help="synthetic inputs when there is no --eval (default 64)")
    p.add_argument("--group", type=int, action="append", help="only this group id (repeatable; see spc analyze)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", help="also write the JSON here (e.g. BUILD/sensitivity.json for spc report)")
    p.set_defaults(func=cmd_sensitivity)

    p = sub.add_parser("report", help="write an HTML report of a build directory (BUILD/report.html)")
    p.add_argument("build", help="directory written by spc compile (or holding summary.json / sensitivity.json)")
    p.add_argument("-o", "--output", help="HTML file to write (default BUILD/report.html)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SpcError as error:
        print(f"spc: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("spc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
