"""Where an INT8 graph's time goes (run by hand; pytest does not collect it): per-op time of a run's frozen graphs
from TensorFlow's step stats, grouped into INT8 convolutions, the FP32 ops INC left (BatchNorm, ReLU, ConcatV2), the
Quantize/Dequantize around them and the rest; and from oneDNN's verbose log, which ISA each primitive ran on
(AVX512-VNNI, AMX, ...) and how much time went to layout reorders.

    .venv/bin/python tests/perf/int8_profile.py output/chexnet-cpu [--batch 32] [--threads 2] [--runs 5]

Each graph is measured in its own process (the step-stats pass, then the oneDNN pass), on the same random batch.
Traced op times are larger than the untraced wall time (tracing costs per op): read them as shares.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

GROUPS = [  # first match wins; matched against the kernel's op type (TensorFlow's _Mkl* names included)
    ("INT8 BatchNorm+ReLU (medq's fused depthwise)", r"_FusedQuantizedDepthwiseConv2D"),
    ("INT8 conv / matmul", r"Quantized(Conv|DepthwiseConv|MatMul)|_FusedQuantized"),
    ("FP32 conv / matmul", r"Conv2D|MatMul|DepthwiseConv"),
    ("BatchNorm (+ReLU)", r"BatchNorm"),
    ("ReLU", r"^(_Mkl)?(Native)?Relu"),
    ("INT8 concat", r"QuantizedConcat"),
    ("FP32 concat", r"Concat"),
    ("Quantize", r"QuantizeV2"),
    ("Dequantize", r"Dequantize"),
    ("Requantize", r"Requantize"),
    ("Pooling", r"Pool"),
    ("other", r"."),
]


def _group(op_type: str) -> str:
    return next(name for name, pattern in GROUPS if re.search(pattern, op_type))


def step_stats(graph: str, batch: int, threads: int, runs: int) -> dict:
    """In this process: median untraced wall time, then per-group traced time averaged over ``runs`` runs."""
    import time

    import numpy as np
    import tensorflow as tf

    from medq.graph import FrozenGraph

    with FrozenGraph(graph, intra_op_threads=threads, inter_op_threads=1) as frozen:
        size = frozen.input.shape[1:]
        x = np.random.default_rng(0).normal(size=(batch, *size)).astype(np.float32)
        for _ in range(3):
            frozen.run(x)
        walls = []
        for _ in range(runs):
            start = time.perf_counter()
            frozen.run(x)
            walls.append(time.perf_counter() - start)
        options = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE)
        per_group, per_op = collections.Counter(), collections.Counter()
        for _ in range(runs):
            metadata = tf.compat.v1.RunMetadata()
            frozen.session.run(frozen.output, {frozen.input: x}, options=options, run_metadata=metadata)
            for device in metadata.step_stats.dev_stats:
                for node in device.node_stats:
                    label = node.timeline_label
                    op_type = label.split("=", 1)[1].split("(")[0].strip() if "=" in label else node.node_name
                    ms = node.op_end_rel_micros / 1000 / runs
                    per_group[_group(op_type)] += ms
                    per_op[op_type] += ms
    return {"wall_ms_p50": 1000 * float(np.median(walls)), "traced_ms": dict(per_group),
            "top_ops": dict(per_op.most_common(12))}


def onednn_primitives(graph: str, batch: int, threads: int) -> dict:
    """A child process with ONEDNN_VERBOSE=1 runs the graph twice; the second run's primitives, by kind and ISA."""
    code = ("import sys, numpy as np; from medq.graph import FrozenGraph\n"
            "g = FrozenGraph(sys.argv[1], intra_op_threads=int(sys.argv[3]))\n"
            "x = np.random.default_rng(0).normal(size=(int(sys.argv[2]), *g.input.shape[1:])).astype(np.float32)\n"
            "g.run(x); print('MEDQ-MARK', flush=True); g.run(x)\n")
    env = dict(os.environ, ONEDNN_VERBOSE="1", TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run([sys.executable, "-c", code, graph, str(batch), str(threads)], env=env, text=True,
                         capture_output=True, check=True).stdout
    lines = out.split("MEDQ-MARK", 1)[1].splitlines()
    kinds: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    for line in lines:
        fields = line.split(",")
        # onednn_verbose,exec,cpu,<kind>,<impl>,<prop>,<formats: src_u8::... dst_s8::...>,...,<time ms>
        if len(fields) > 5 and fields[0] == "onednn_verbose" and fields[1] == "exec":
            kind, impl, formats = fields[3], fields[4], fields[6]
            types = dict(re.findall(r"\b(src|data|dst)_([a-z0-9]+)", formats))
            src, dst = types.get("src", types.get("data", "?")), types.get("dst", types.get("data", "?"))
            key = f"{kind} {src}→{dst} [{impl}]"
            kinds[key] += float(fields[-1])
            counts[key] += 1
    return {key: {"ms": round(ms, 2), "calls": counts[key]} for key, ms in kinds.most_common()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run folder (model_fp32.pb, model_int8.pb), or one .pb file")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: profile this graph in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(step_stats(args.one, args.batch, args.threads, args.runs)))
        return 0
    graphs = [args.run] if args.run.suffix == ".pb" else [p for p in (args.run / "model_fp32.pb",
                                                                      args.run / "model_int8.pb") if p.is_file()]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "unknown CPU")
    flags = open("/proc/cpuinfo").read()
    isa = [name for name, flag in (("AMX", "amx_int8"), ("AVX512-BF16", "avx512_bf16"), ("VNNI", "avx512_vnni"))
           if flag in flags]
    report = {"cpu": cpu, "isa": isa, "batch": args.batch, "threads": args.threads, "graphs": {}}
    for graph in graphs:
        stats = subprocess.run([sys.executable, __file__, str(args.run), "--one", str(graph), "--batch",
                                str(args.batch), "--threads", str(args.threads), "--runs", str(args.runs)],
                               env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), text=True, capture_output=True,
                               check=True).stdout.strip().splitlines()[-1]
        report["graphs"][graph.name] = json.loads(stats) | {"onednn": onednn_primitives(str(graph), args.batch,
                                                                                        args.threads)}
    print(json.dumps(report, indent=1))
    print(table(report))
    return 0


def table(report: dict) -> str:
    lines = [f"CPU: {report['cpu']} ({', '.join(report['isa']) or 'no VNNI/BF16/AMX'}), batch {report['batch']}, "
             f"{report['threads']} threads"]
    for name, stats in report["graphs"].items():
        total = sum(stats["traced_ms"].values())
        lines.append(f"\n{name}: {stats['wall_ms_p50']:.1f} ms per batch (p50, untraced)")
        lines.append("| op group | traced ms | share |\n|---|---|---|")
        for group, _ in GROUPS:
            if group in stats["traced_ms"]:
                ms = stats["traced_ms"][group]
                lines.append(f"| {group} | {ms:.1f} | {ms / total:.0%} |")
        lines.append("| oneDNN primitive (dtype, implementation) | ms | calls |\n|---|---|---|")
        for key, value in list(stats["onednn"].items())[:8]:
            lines.append(f"| {key} | {value['ms']:.1f} | {value['calls']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
