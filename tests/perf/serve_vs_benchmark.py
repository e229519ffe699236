"""`medq serve` against `medq benchmark` on the same graph, in one sitting (run by hand; pytest does not collect it).

For a finished run: `medq benchmark` restricted to the TensorFlow rows at batch 1 and 32 (no reference engines, no
multi-instance layouts), then for each served precision `medq serve` in a child process and `medq loadtest` from this
process: a tensor sweep, a JPEG sweep, 10 % bad requests at full load, and the overload level (4x the saturating
concurrency, 20,000 requests, the server's RSS before and after). Prints the CPU, the thread settings, the load
average beside every table, and the comparison the serve targets are stated in (README "Serve"):

- throughput at concurrency 32 (tensor input) / the benchmark's batch-32 img/s (target ≥ 0.85);
- p50 at concurrency 1 (tensor input) - the benchmark's batch-1 p50 (target ≤ 2 ms).

    OUTPUT_DIR=/work/preset/output DATA_DIR=/work/preset/data \\
        .venv/bin/python tests/perf/serve_vs_benchmark.py -c configs/chexnet-cpu.yaml
    OUTPUT_DIR=/tmp/out .venv/bin/python tests/perf/serve_vs_benchmark.py --run-name default

The client's own CPU (this process) and the server's (from /proc) are columns of every table: on a 2-core machine
the load generator takes CPU the server would otherwise have, while the benchmark's rows had both cores. Everything
else running on the machine shows in the load average; numbers taken beside other jobs are noise, say so.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import requests

from medq.config import load_config
from medq.hwinfo import cpu_features, thread_environment
from medq.loadtest import format_report, run_loadtest, saturating
from medq.precision import describe_cpu

REPO = Path(__file__).resolve().parents[2]
MEDQ = [sys.executable, "-m", "medq"]
SWEEP = (1, 2, 4, 8, 16, 32, 64)


def loadavg() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def medq_args(args: argparse.Namespace) -> list[str]:
    return [*(["-c", args.config] if args.config else []), "--run-name", args.run_name,
            *[x for s in args.set for x in ("--set", s)]]


def run_benchmark(args: argparse.Namespace) -> None:
    precisions = sorted({"fp32", "int8", *args.model})  # INT8 beside its FP32 baseline, and whatever is served
    sets = ["benchmark.precisions=[" + ", ".join(precisions) + "]", "benchmark.batch_sizes=[1, 32]",
            "benchmark.batch_size=32", "benchmark.reference=[]", "benchmark.instances=[]"]
    command = [*MEDQ, "benchmark", *medq_args(args), *[x for s in sets for x in ("--set", s)], "--quiet"]
    print(f"$ {' '.join(command)}   ({loadavg()})", flush=True)
    subprocess.run(command, check=True, cwd=REPO)


def benchmark_report(run_dir: Path) -> tuple[dict, dict[str, dict]]:
    report = json.loads((run_dir / "benchmark.json").read_text())
    return report, {r["precision"]: r for r in report["results"] if r["engine"] == "tensorflow"}


# The benchmark's batch-32 call timed for CPU as well as wall time, in a fresh process with the same threads: the CPU
# milliseconds one image costs the engine, to set beside the server's CPU per request (both unaffected by how much of
# the machine other jobs took, unlike any img/s measured on a shared machine).
CPU_PROBE = """
import json, sys, time
import numpy as np
from medq.graph import FrozenGraph
pb, npy, name_in, name_out, intra, inter = sys.argv[1:]
x = np.load(npy, mmap_mode="r")
batch = np.ascontiguousarray(x[np.arange(32) % len(x)])
with FrozenGraph(pb, name_in, name_out, intra_op_threads=int(intra), inter_op_threads=int(inter)) as graph:
    for _ in range(3):
        graph.run(batch)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(10):
        graph.run(batch)
    print(json.dumps({"cpu_ms": (time.process_time() - cpu) * 1000 / 320,
                      "ips": 320 / (time.perf_counter() - wall)}))
"""


def engine_cpu(run_dir: Path, row: dict, report: dict, metadata: dict, runtime) -> dict:
    env = {**os.environ, **thread_environment(runtime)}
    command = [sys.executable, "-c", CPU_PROBE, str(run_dir / row["model"]), str(run_dir / report["inputs"]["path"]),
               metadata["inputs"][0]["name"], metadata["outputs"][0]["name"], str(row["intra_op_threads"]),
               str(row["inter_op_threads"])]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_dir_of(args: argparse.Namespace) -> Path:
    config = load_config(args.config, [*args.set, f"run.name={args.run_name}"])
    return Path(config.run_dir)


class Server:
    """`medq serve` on the run in a child process, its output in a log file beside the run."""

    def __init__(self, args: argparse.Namespace, model: str, log: Path):
        self.url = f"http://127.0.0.1:{args.port}"
        command = [*MEDQ, "serve", *(["-c", args.config] if args.config else []),
                   *[x for s in args.set for x in ("--set", s)],
                   *[x for s in args.serve_set for x in ("--set", s)],
                   "--run", args.run_name, "--model", model, "--port", str(args.port)]
        print(f"$ {' '.join(command)}", flush=True)
        self.log = open(log, "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + 600
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"medq serve exited: {log.read_text()[-2000:]}")
            try:
                if requests.get(f"{self.url}/v2/health/ready", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"medq serve did not become ready; {log}")
            time.sleep(1)
        self.metadata = requests.get(f"{self.url}/v2/models/{args.run_name}", timeout=30).json()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(120)
        self.log.close()


def loadtest(server: Server, model: str, title: str, **options):
    print(f"\n### {title}   ({loadavg()} before)", flush=True)
    report = run_loadtest(server.url, model, server_pid=server.process.pid, **options)
    print(format_report(report))
    print(f"({loadavg()} after)", flush=True)
    return report


def level(report, concurrency: int):
    return next((lv for lv in report.levels if lv.concurrency == concurrency and not lv.label), None)


def comparison(precision: str, row: dict, tensor, probe: dict) -> list[str]:
    """The targets' lines for one precision: the benchmark's figure beside the load test's, and the same in CPU
    time per image (the engine alone vs the server + this client per request at concurrency 32)."""
    p50_bench, ips_bench = row["latency_ms"]["p50"], row["throughput_by_batch"]["32"]
    one, full = level(tensor, 1), level(tensor, 32)
    lines = [f"| {precision} | batch 1 p50 {p50_bench:.1f} ms | concurrency 1 p50 "
             f"{'-' if one is None or one.p50_ms is None else f'{one.p50_ms:.1f}'} ms | "
             f"{'-' if one is None or one.p50_ms is None else f'{one.p50_ms - p50_bench:+.1f} ms (target ≤ +2)'} |"]
    if full is not None:
        cpu = (f"client {full.client_cpu:.2f} cores, server {full.server_cpu:.2f} cores"
               if full.server_cpu is not None else "")
        lines.append(f"| {precision} | batch 32 {ips_bench:.1f} img/s | concurrency 32 {full.throughput:.1f} req/s "
                     f"(batch mean {full.batch_mean or 0:.1f}, engine {full.engine_ips or 0:.1f} img/s; {cpu}) | "
                     f"{full.throughput / ips_bench:.0%} (target ≥ 85%) |")
        if full.server_cpu is not None:
            per_request = (full.server_cpu + full.client_cpu) * full.seconds / full.requests * 1000
            lines.append(f"| {precision} | engine alone {probe['cpu_ms']:.2f} CPU ms/img at batch 32 "
                         f"({probe['ips']:.1f} img/s in this probe) | server + client {per_request:.2f} CPU ms/req "
                         f"at concurrency 32 | {probe['cpu_ms'] / per_request:.0%} (what the ratio is on cores given "
                         "to this alone) |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "-c", help="the run's config (default: configs/default.yaml)")
    parser.add_argument("--run-name", help="the run (default: the config's run.name)")
    parser.add_argument("--set", action="append", default=[], help="config overrides for every command")
    parser.add_argument("--serve-set", action="append", default=[], help="overrides for medq serve only")
    parser.add_argument("--model", action="append", help="precisions served (default: int8)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--requests", type=int, default=400, help="tensor requests per level")
    parser.add_argument("--image-requests", type=int, default=200, help="image requests per level")
    parser.add_argument("--overload-requests", type=int, default=20000)
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds per level at most")
    parser.add_argument("--skip-benchmark", action="store_true", help="use the run's benchmark.json as it is")
    args = parser.parse_args(argv)
    args.model = args.model or ["int8"]
    if args.run_name is None:
        args.run_name = load_config(args.config, args.set).run.name
    run_dir = run_dir_of(args)
    features = cpu_features()
    config = load_config(args.config, [*args.set, *args.serve_set])
    runtime, settings = config.runtime, config.serve
    print(f"# serve vs benchmark: {run_dir}\nCPU: {describe_cpu(features)}, {features['physical_cores']} physical "
          f"cores, {features['logical_cpus']} logical\nthreads: {thread_environment(runtime)}\n{loadavg()}",
          flush=True)
    if not args.skip_benchmark:
        run_benchmark(args)
    report, bench = benchmark_report(run_dir)
    lines = ["| precision | benchmark | load test | vs target |", "|---|---|---|---|"]
    for model in args.model:
        server = Server(args, model, run_dir / f"serve_vs_benchmark_{model}.log")
        try:
            print(f"served: {json.dumps(server.metadata['parameters'].get('threads'))} threads, "
                  f"{server.metadata['parameters'].get('precision')}", flush=True)
            tensor = loadtest(server, args.run_name, f"{model}: tensor input (binary-data extension)",
                              concurrency=SWEEP, requests=args.requests, seconds=args.seconds)
            loadtest(server, args.run_name, f"{model}: image input (JPEG 1024², decoded in the server)",
                     input_kind="image", concurrency=(1, 8, 32), requests=args.image_requests,
                     seconds=args.seconds)
            loadtest(server, args.run_name, f"{model}: 10% bad requests at full load (image input)",
                     input_kind="image", concurrency=(32,), requests=args.image_requests, seconds=args.seconds,
                     bad_fraction=0.1)
            saturation = saturating(tensor.levels)  # the sweep's; the overload level runs at 4x it
            overload = loadtest(server, args.run_name, f"{model}: overload (tensor input, "
                                f"{args.overload_requests} requests at 4x the sweep's saturating concurrency)",
                                concurrency=(saturation,), requests=args.requests,
                                seconds=max(args.seconds, args.overload_requests / 10),  # all of them, not a time cut
                                overload=True, overload_requests=args.overload_requests)
            last = overload.levels[-1]
            # an accepted request waits behind at most max_queue_size / max_batch_size batches, then runs in its own;
            # a full batch takes what the benchmark's batch-32 row took
            batch_ms = settings.max_batch_size / bench[model]["throughput_by_batch"]["32"] * 1000
            bound = (settings.max_queue_size / settings.max_batch_size + 1) * batch_ms + settings.max_queue_delay_ms
            print(f"overload: {last.concurrency} clients, {last.requests} requests, statuses {last.statuses}, "
                  f"server RSS {last.rss_before_mb:.0f} → {last.rss_after_mb:.0f} MB "
                  f"({last.rss_after_mb - last.rss_before_mb:+.1f} MB), p99 of 200s {last.p99_ms:.0f} ms; the queue's "
                  f"bound ({settings.max_queue_size}/{settings.max_batch_size} + 1) x {batch_ms:.0f} ms per batch of "
                  f"{settings.max_batch_size} (the benchmark's) = {bound:.0f} ms")
            probe = engine_cpu(run_dir, bench[model], report, server.metadata, runtime)
            lines += comparison(model, bench[model], tensor, probe)
        finally:
            server.stop()
    print(f"\n## benchmark rows beside the load test ({loadavg()})\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
