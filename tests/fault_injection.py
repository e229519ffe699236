"""Fault injection on a small run: SIGKILL `medq train`, `medq tune`, `medq quantize` and `medq benchmark` at many
points, rerun each, and check the run record after every kill and every rerun. Run by hand (pytest does not
collect it; it takes 15-30 minutes on 2 cores):

    .venv/bin/python tests/fault_injection.py [--workdir DIR] [--fractions 0.1,0.3,0.5,0.7,0.9]

Kill points: for each stage, (a) wall-clock points at the given fractions of the stage's measured duration, and
(b) inside the stage's commit, at the 1st, 2nd and 3rd file rename into the run folder (the child process kills
itself from an `os.replace` wrapper, so these land exactly between the renames a commit makes).

After each kill and each rerun:
- consistent: manifest.json parses and loads through medq.runrecord; every artifact it lists exists with its
  recorded sha256 (unless marked stale); every artifact whose recorded inputs no longer match is refused by
  `verified_path` (nothing stale served);
- lost: an artifact that was valid before the kill and is now missing, damaged, or gone from the manifest without a
  rerun having replaced it;
- the rerun exits 0.
Scenarios: two concurrent writers on one run; a dataset folder that grows between `medq train` and `medq benchmark`;
a class folder renamed; a deploy.yaml that makes quantize fail after an earlier success.
Prints a table and exits 1 if any run was left inconsistent, any artifact was lost, or a scenario failed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("train", "tune", "quantize", "benchmark")
TINY = ["preprocess.image_size=32", "train.batch_size=16", "train.epochs=3", "train.tensorboard=false",
        "model.params={blocks: 2, filters: 4, dense_units: 8}", "tune.max_trials=2", "tune.epochs=1",
        "benchmark.latency_iterations=5", "benchmark.throughput_iterations=2", "benchmark.warmup=1",
        "benchmark.batch_sizes=[1, 8]", "benchmark.instances=[]", "benchmark.reference=[]",
        "benchmark.precisions=[fp32, int8]"]
# The child: medq's CLI with os.replace wrapped so the process SIGKILLs itself at the N-th rename into the run folder.
CHILD = """
import os, signal, sys
run_dir, nth = os.path.realpath(sys.argv[1]), int(sys.argv[2])
real, seen = os.replace, [0]
def replace(src, dst, *a, **k):
    if os.path.realpath(os.fspath(dst)).startswith(run_dir + os.sep):
        seen[0] += 1
        if seen[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *a, **k)
os.replace = replace
from medq.cli import main
sys.exit(main(sys.argv[3:]))
"""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Harness:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.data = workdir / "data" / "chest_xray"
        self.output = workdir / "output"
        self.sets = [f"run.output_dir={self.output}", f"data.root={self.data}", *TINY]
        self.env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", MEDQ_PROGRESS="0")

    def args(self, stage: str, run: str, *extra: str) -> list[str]:
        out = [stage, "--run-name", run, "--quiet"]
        for value in self.sets:
            out += ["--set", value]
        return out + list(extra)

    def medq(self, stage: str, run: str, *extra: str, timeout: int = 1800) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "medq", *self.args(stage, run, *extra)], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def start(self, stage: str, run: str, kill_at_rename: int | None = None) -> subprocess.Popen:
        if kill_at_rename:
            cmd = [sys.executable, "-c", CHILD, str(self.output / run), str(kill_at_rename), *self.args(stage, run)]
        else:
            cmd = [sys.executable, "-m", "medq", *self.args(stage, run)]
        return subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # its own process group: benchmark workers die with it

    def prepare(self) -> None:
        from medq.data.phantoms import generate_chest_pneumonia

        generate_chest_pneumonia(self.data, 48, 4, 12, 40, 7)

    def copy_run(self, source: str, target: str) -> None:
        shutil.rmtree(self.output / target, ignore_errors=True)
        shutil.copytree(self.output / source, self.output / target, ignore=shutil.ignore_patterns(".lock"))


def check_run(run_dir: Path) -> tuple[list[str], dict[str, str]]:
    """(problems, {key: sha256 of each artifact that may be served})."""
    from medq import runrecord

    problems: list[str] = []
    try:
        manifest = runrecord.load(run_dir)
        json.loads((run_dir / runrecord.MANIFEST).read_text(encoding="utf-8"))
    except Exception as exc:  # noqa: BLE001 - any failure to read is an inconsistency
        return [f"manifest unreadable: {exc}"], {}
    valid: dict[str, str] = {}
    for key, entry in manifest.artifacts.items():
        path = run_dir / entry.path
        stale = manifest.stale_reason(key)
        if stale is None and (not path.is_file() or sha256(path) != entry.sha256):
            problems.append(f"{key}: {'missing' if not path.is_file() else 'sha256 differs'} but not marked stale")
            continue
        inputs_changed = any(manifest.artifacts.get(k) is None or manifest.artifacts[k].sha256 != sha
                             for k, sha in entry.inputs.items())
        try:
            runrecord.verified_path(run_dir, key)
            served = True
        except runrecord.RunError:
            served = False
        if served and (inputs_changed or stale):
            problems.append(f"{key}: served although {'its inputs changed' if inputs_changed else stale}")
        if served:
            valid[key] = entry.sha256
    if (run_dir / runrecord.JOURNAL).exists() and not runrecord.holds_lock(run_dir):
        problems.append("a commit journal is left behind")
    return problems, valid


def lost(before: dict[str, str], run_dir: Path) -> list[str]:
    """Artifacts valid before a kill whose entry, file or content is gone now. One that is now stale (the kill came
    after the stage published a new upstream artifact) is not lost: it is refused, with the stage to rerun."""
    from medq import runrecord

    try:
        manifest = runrecord.load(run_dir)
    except Exception:  # noqa: BLE001 - an unreadable manifest loses everything
        return list(before)
    gone = []
    for key in before:
        entry = manifest.artifacts.get(key)
        path = run_dir / entry.path if entry else None
        if entry is None or not path.is_file() or sha256(path) != entry.sha256:
            gone.append(key)
    return gone


def kill_points(h: Harness, base: str, durations: dict[str, float], fractions: list[float]) -> list[dict]:
    rows = []
    for stage in STAGES:
        points = [("time", f) for f in fractions] + [("rename", n) for n in (1, 2, 3)]
        for kind, where in points:
            run = f"k-{stage}-{kind}-{where}"
            h.copy_run(base, run)
            run_dir = h.output / run
            _, before = check_run(run_dir)
            proc = h.start(stage, run, kill_at_rename=where if kind == "rename" else None)
            if kind == "time":
                try:
                    proc.wait(timeout=durations[stage] * where)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            output = proc.communicate()[0]
            killed = proc.returncode == -signal.SIGKILL
            after_kill, _ = check_run(run_dir)
            gone = lost(before, run_dir) if killed else []
            rerun = h.medq(stage, run)
            after_rerun, _ = check_run(run_dir)
            rows.append({"stage": stage, "point": f"{kind} {where}", "killed": killed,
                         "inconsistent_after_kill": after_kill, "lost": gone,
                         "rerun_ok": rerun.returncode == 0, "inconsistent_after_rerun": after_rerun,
                         "rerun_error": (rerun.stderr or rerun.stdout).strip().splitlines()[-1:] if rerun.returncode
                         else [], "kill_output": output.strip().splitlines()[-1:] if not killed else []})
            print(f"  {stage:9s} {kind} {where}: killed={killed} inconsistent={bool(after_kill or after_rerun)} "
                  f"lost={gone} rerun={'ok' if rerun.returncode == 0 else rows[-1]['rerun_error']}", flush=True)
    return rows


def scenario_concurrent_writers(h: Harness, base: str) -> tuple[bool, str]:
    run = "s-concurrent"
    h.copy_run(base, run)
    first = h.start("train", run)
    lock = h.output / run / ".lock"
    deadline = time.time() + 120
    while time.time() < deadline and not (lock.is_file() and lock.read_text().strip()):
        time.sleep(0.05)  # the holder writes its pid into the lock file once it has the lock
    second = h.medq("data", run)  # the quickest writer to reach the lock
    first_out = first.communicate()[0]
    problems, _ = check_run(h.output / run)
    message = (second.stderr or second.stdout).strip()
    ok = (first.returncode == 0 and second.returncode != 0 and "in use by pid" in message and len(
        message.splitlines()) == 1 and not problems)
    return ok, f"first exit {first.returncode}; second exit {second.returncode}: {message[:160]!r}; {problems}" + (
        "" if first.returncode == 0 else first_out[-300:])


def scenario_growing_dataset(h: Harness, base: str) -> tuple[bool, str]:
    run = "s-grows"
    h.copy_run(base, run)
    pinned_test = sum(1 for s in json.loads((h.output / run / "split.json").read_text())["samples"] if s[1] == "test")
    added = []
    for folder in (h.data / "test" / "NORMAL", h.data / "train" / "PNEUMONIA"):
        for i, image in enumerate(sorted(folder.iterdir())[:5]):
            copy = folder / f"added-later-{i}{image.suffix}"
            shutil.copy(image, copy)
            added.append(copy)
    try:
        bench = h.medq("benchmark", run)
        report = json.loads((h.output / run / "benchmark.json").read_text()) if bench.returncode == 0 else {}
    finally:
        for path in added:
            path.unlink()
    images = report.get("inputs", {}).get("n_images")
    problems, _ = check_run(h.output / run)
    ok = bench.returncode == 0 and images == pinned_test and not problems
    return ok, f"benchmark exit {bench.returncode}; test images {images} (pinned {pinned_test}); {problems}"


def scenario_class_renamed(h: Harness, base: str) -> tuple[bool, str]:
    run = "s-renamed"
    h.copy_run(base, run)
    before = (h.output / run / "manifest.json").read_bytes()
    (h.data / "test" / "PNEUMONIA").rename(h.data / "test" / "VIRAL")
    try:
        bench = h.medq("benchmark", run)
    finally:
        (h.data / "test" / "VIRAL").rename(h.data / "test" / "PNEUMONIA")
    message = (bench.stderr or bench.stdout).strip()
    unchanged = (h.output / run / "manifest.json").read_bytes() == before
    # the layout's own check (a Kaggle split lacks PNEUMONIA/) or the pinned classes (`--resplit`): one line either way
    ok = bench.returncode != 0 and ("--resplit" in message or "PNEUMONIA" in message) and len(
        message.splitlines()) == 1 and unchanged
    return ok, f"exit {bench.returncode}: {message[:200]!r}; manifest unchanged: {unchanged}"


def scenario_failing_deploy(h: Harness, base: str) -> tuple[bool, str]:
    run = "s-deploy"
    h.copy_run(base, run)
    deploy = h.workdir / "deploy-wrong-input.yaml"
    text = Path("configs/deploy.yaml").read_text()
    deploy.write_text(text.replace("inputs: input ", "inputs: image "))
    failed = h.medq("quantize", run, "--set", f"quantize.deploy={deploy}")
    bench = h.medq("benchmark", run)
    report = json.loads((h.output / run / "benchmark.json").read_text()) if bench.returncode == 0 else {}
    rows = {(r.get("engine"), r.get("precision")): r for r in report.get("results", [])}
    skipped = report.get("skipped", [])
    int8_served = ("tensorflow", "int8") in rows
    problems, _ = check_run(h.output / run)
    ok = failed.returncode != 0 and bench.returncode == 0 and not int8_served and not problems
    return ok, (f"quantize exit {failed.returncode}; benchmark exit {bench.returncode}; INT8 row served: "
                f"{int8_served}; skipped: {str(skipped)[:200]}; {problems}")


SCENARIOS = (("two concurrent writers", scenario_concurrent_writers),
             ("dataset grows before benchmark", scenario_growing_dataset),
             ("class folder renamed", scenario_class_renamed),
             ("failing deploy.yaml after success", scenario_failing_deploy))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder, removed at the end")
    parser.add_argument("--scenarios-only", action="store_true",
                        help="only the scenarios, on the base run a previous call left in --workdir")
    parser.add_argument("--fractions", default="0.1,0.3,0.5,0.7,0.9",
                        help="wall-clock kill points as fractions of each stage's measured duration")
    args = parser.parse_args(argv)
    os.chdir(Path(__file__).resolve().parents[1])
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="medq-faults-"))
    h = Harness(workdir)
    durations: dict[str, float] = {}
    if args.scenarios_only:
        results = {name: fn(h, "base") for name, fn in SCENARIOS}
        for name, (ok, detail) in results.items():
            print(f"scenario {name}: {'ok' if ok else 'FAILED'} ({detail})")
        return 0 if all(ok for ok, _ in results.values()) else 1
    h.prepare()
    for stage in ("data", "train", "tune", "freeze", "quantize", "benchmark"):
        start = time.perf_counter()
        done = h.medq(stage, "base")
        durations[stage] = time.perf_counter() - start
        if done.returncode:
            print(f"baseline `medq {stage}` failed: {(done.stderr or done.stdout)[-800:]}")
            return 1
    print("baseline seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in durations.items()), flush=True)
    fractions = [float(f) for f in args.fractions.split(",")]
    rows = kill_points(h, "base", durations, fractions)
    scenarios = {name: fn(h, "base") for name, fn in SCENARIOS}
    killed = [r for r in rows if r["killed"]]
    inconsistent = [r for r in rows if r["inconsistent_after_kill"] or r["inconsistent_after_rerun"]]
    lost_total = sum(len(r["lost"]) for r in rows)
    failed_reruns = [r for r in rows if not r["rerun_ok"]]
    print(f"\nkill points tried: {len(rows)} ({len(killed)} killed mid-stage; the others had finished first)")
    print(f"runs left inconsistent: {len(inconsistent)}; artifacts lost: {lost_total}; reruns failed: "
          f"{len(failed_reruns)}")
    for r in inconsistent + failed_reruns:
        print(f"  {r['stage']} {r['point']}: {r['inconsistent_after_kill']} {r['inconsistent_after_rerun']} "
              f"{r['rerun_error']}")
    for name, (ok, detail) in scenarios.items():
        print(f"scenario {name}: {'ok' if ok else 'FAILED'} ({detail})")
    (workdir / "faults.json").write_text(json.dumps({"durations": durations, "rows": rows, "scenarios": {
        k: {"ok": ok, "detail": d} for k, (ok, d) in scenarios.items()}}, indent=1))
    print(f"details: {workdir / 'faults.json'}")
    if not args.workdir and not (inconsistent or failed_reruns):
        shutil.rmtree(workdir / "output", ignore_errors=True)
    bad = inconsistent or lost_total or failed_reruns or not all(ok for ok, _ in scenarios.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
