"""Scale benchmark (run by hand; pytest does not collect it): NIH ChestX-ray14-layout phantoms at 1024×1024 for
N images, and for each N the peak RSS and time of `medq data`, `medq train` (1 epoch of a small CNN at 224×224×3),
`medq quantize` and `medq benchmark`; the input pipeline's images/s (first pass from PNG, later passes from the
cache, OpenCV alone on the same files and cores); the fraction of the training step spent waiting for input.

    .venv/bin/python tests/perf/scale.py [--sizes 1000,4000,16000] [--workdir /tmp/medq-scale]

The N images are hard links to a few distinct phantom films (drawing a 1024² film takes ~1 s), each listed once in
a full-size Data_Entry_2017.csv of 112,120 rows (the rest of the rows have no file, as with some archives not
unpacked). Hard links share their bytes in the page cache: "first pass from PNG" measures decoding, not the disk.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NIH_ROWS = 112_120
STAGE_SETS = ["preprocess.image_size=224", "preprocess.channels=3", "preprocess.normalization=imagenet",
              "model.name=refkit-cnn", "model.params={blocks: 3, filters: 8, dense_units: 32}", "train.epochs=1",
              "train.batch_size=32", "train.tensorboard=false", "train.low_res.epochs=0", "tune.enabled=false",
              "benchmark.precisions=[fp32, int8]", "benchmark.reference=[]", "benchmark.instances=[]",
              "benchmark.batch_sizes=[1, 32]", "benchmark.latency_iterations=20", "benchmark.throughput_iterations=3",
              "quantize.precisions=[fp32, int8]",
              # one epoch on hard-linked films learns nothing; the scale run measures time and memory, not accuracy,
              # so quantize's chance guard (an FP32 model at chance has nothing for INT8 to preserve) is waived
              "quantize.allow_chance=true"]


def base_films(folder: Path, n: int) -> list[tuple[Path, str]]:
    """``n`` distinct 1024² NIH phantom films: (png, 'Finding Labels')."""
    from medq.data.phantoms_nih import generate_chest_multilabel

    if not (folder / "Data_Entry_2017.csv").is_file():
        generate_chest_multilabel(folder, n, 0, 0, size=1024, seed=11)
    rows = (folder / "Data_Entry_2017.csv").read_text().splitlines()[1:]
    files = {p.name: p for p in folder.rglob("*.png")}
    return [(files[r.split(",")[0]], r.split(",")[1]) for r in rows if r.split(",")[0] in files]


def nih_layout(root: Path, n: int, films: list[tuple[Path, str]]) -> None:
    """NIH's layout with ``n`` image files (hard links to ``films``) and the full 112,120-row label table."""
    from medq.data.nih import CSV_COLUMNS, TEST_LIST, TRAIN_VAL_LIST

    if (root / TEST_LIST).is_file():
        return
    images = root / "images_001" / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows, train_val, test = [], [], []
    for i in range(NIH_ROWS):
        name = f"{i + 1:08d}_000.png"
        source, labels = films[i % len(films)]
        if i < n:
            os.link(source, images / name)
        rows.append(f"{name},{labels},0,{i + 1},50,M,PA,2500,2048,0.143,0.143,")
        (test if i % 5 == 4 else train_val).append(name)  # patient-disjoint: one film per patient
    (root / "Data_Entry_2017.csv").write_text(",".join(CSV_COLUMNS) + ",\n" + "\n".join(rows) + "\n")
    (root / TRAIN_VAL_LIST).write_text("\n".join(train_val) + "\n")
    (root / TEST_LIST).write_text("\n".join(test) + "\n")


def measured(args: list[str], log: Path) -> dict[str, float]:
    """Run a command under GNU time: wall seconds and peak RSS (the largest of the process and its children)."""
    stats = log.with_suffix(".time")
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(stats), *args], capture_output=True, text=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", MEDQ_PROGRESS="0"), cwd=REPO)
    seconds = time.perf_counter() - start
    log.write_text(done.stdout + done.stderr)
    if done.returncode:
        raise SystemExit(f"{' '.join(args[:4])} failed ({done.returncode}); see {log}")
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(int(stats.read_text().split()[-1]) / 1024)}


def input_pipeline(root: Path, cache_dir: Path, limit: int) -> dict[str, float]:
    """images/s of the training input (decode + resize + normalise, 2 threads): first pass from PNG into an empty
    cache, then from the cache; OpenCV's imread + resize alone on the same files and threads; and the fraction of a
    training step spent waiting for input, from one epoch fed by the cache vs the same steps fed from memory."""
    from concurrent.futures import ThreadPoolExecutor

    import cv2
    import numpy as np
    import tensorflow as tf

    from medq.data.cache import ImageCache
    from medq.models import build_model
    from medq.preprocess import PreprocessSpec
    from medq.tfdata import image_dataset

    paths = sorted(str(p) for p in (root / "images_001" / "images").iterdir())[:limit]
    labels = np.zeros((len(paths), 14), np.float32)
    spec = PreprocessSpec(224, 3, "imagenet")
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache = ImageCache(cache_dir, spec)

    def rate(ds) -> float:
        """images/s from the iterator's start to its last batch; tearing the iterator down (tf.data sometimes takes
        several seconds to, once per epoch, whatever the epoch's size) is reported apart."""
        start, n = time.perf_counter(), 0
        iterator = iter(ds)
        for x, _ in iterator:
            n += int(x.shape[0])
        delivered = time.perf_counter()
        del iterator
        out.setdefault("iterator_teardown_s", []).append(round(time.perf_counter() - delivered, 2))
        return n / (delivered - start)

    out: dict = {"images": len(paths)}
    out["first_pass_png_per_s"] = rate(image_dataset(paths, labels, spec, batch_size=32, cache=cache))
    out["cached_per_s"] = rate(image_dataset(paths, labels, spec, batch_size=32, cache=cache))

    def opencv(path: str):
        return cv2.resize(cv2.imread(path, cv2.IMREAD_UNCHANGED), (224, 224), interpolation=cv2.INTER_AREA)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        start = time.perf_counter()
        list(pool.map(opencv, paths))
        out["opencv_alone_per_s"] = len(paths) / (time.perf_counter() - start)
    out["first_pass_vs_opencv"] = out["first_pass_png_per_s"] / out["opencv_alone_per_s"]

    model = build_model("refkit-cnn", spec.input_shape, 14, "multilabel", blocks=3, filters=8, dense_units=32)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    fed = image_dataset(paths, labels, spec, batch_size=32, shuffle=True, cache=cache)
    steps = len(paths) // 32
    model.fit(fed.take(2), verbose=0)  # warm-up: graph building
    start = time.perf_counter()
    model.fit(fed.take(steps), verbose=0)
    with_input = time.perf_counter() - start
    in_memory = fed.take(1).cache().repeat(steps)
    model.fit(in_memory.take(2), verbose=0)
    start = time.perf_counter()
    model.fit(in_memory, verbose=0)
    model_only = time.perf_counter() - start
    out["train_step_ms"] = 1000 * with_input / steps
    out["waiting_for_input_fraction"] = max(0.0, 1 - model_only / with_input)
    tf.keras.backend.clear_session()
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,4000,16000")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "medq-scale")
    parser.add_argument("--films", type=int, default=120, help="distinct 1024² films to draw (~1 s each)")
    parser.add_argument("--pipeline-images", type=int, default=2000, help="images in the input-pipeline measurement")
    parser.add_argument("--stages", default="data,train,freeze,quantize,benchmark",
                        help="stages to measure (the earlier ones must have run in --workdir)")
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    films = base_films(work / "films", args.films)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    # INC stops at its first trial: the quantize row measures the stage's data handling, not the number of trials
    deploy = work / "deploy-one-trial.yaml"
    deploy.write_text((REPO / "configs" / "deploy.yaml").read_text().replace("relative: 0.01", "absolute: 0.5")
                      .replace("max_trials: 50", "max_trials: 1"))
    saved = work / "scale.json"
    results: dict = json.loads(saved.read_text()) if saved.is_file() else {"sizes": {}}
    results |= {"cpu": cpu, "cores": os.cpu_count()}
    for n in [int(s) for s in args.sizes.split(",")]:
        root = work / f"nih-{n}" / "ChestXray-NIHCC"
        nih_layout(root, n, films)
        out = work / f"nih-{n}" / "output"
        sets = [f"data.root={root}", f"run.output_dir={out}", "data.format=nih-chestxray14", "data.generate=false",
                f"quantize.deploy={deploy}", *STAGE_SETS]
        flags = [a for s in sets for a in ("--set", s)]
        row = results["sizes"].setdefault(str(n), {})
        for stage in args.stages.split(","):
            row[stage] = measured([sys.executable, "-m", "medq", stage, "--config", "configs/chestxray14.yaml",
                                   *flags], work / f"nih-{n}" / f"{stage}.log")
            print(f"N={n} {stage}: {row[stage]}", flush=True)
            saved.write_text(json.dumps(results, indent=1))
    largest = max(int(s) for s in args.sizes.split(","))
    results["input_pipeline"] = input_pipeline(work / f"nih-{largest}" / "ChestXray-NIHCC", work / "pipeline-cache",
                                               min(args.pipeline_images, largest))
    print(json.dumps(results["input_pipeline"]), flush=True)
    (work / "scale.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


def table(results: dict) -> str:
    sizes = list(results["sizes"])
    lines = [f"CPU: {results['cpu']} ({results['cores']} cores)", "",
             "| stage | " + " | ".join(f"N={int(n):,} peak RSS MB / s" for n in sizes) + " | RSS growth |",
             "|---|" + "---|" * (len(sizes) + 1)]
    for stage in ("data", "train", "freeze", "quantize", "benchmark"):
        if not all(stage in results["sizes"][n] for n in sizes):
            continue
        cells = [f"{results['sizes'][n][stage]['peak_rss_mb']} / {results['sizes'][n][stage]['seconds']}"
                 for n in sizes]
        growth = results["sizes"][sizes[-1]][stage]["peak_rss_mb"] - results["sizes"][sizes[0]][stage]["peak_rss_mb"]
        lines.append(f"| {stage} | " + " | ".join(cells) + f" | {growth:+d} MB |")
    p = results["input_pipeline"]
    lines += ["", f"input pipeline on {p['images']} images (224×224×3, 2 threads): first pass from 1024² PNG "
              f"{p['first_pass_png_per_s']:.0f} img/s ({p['first_pass_vs_opencv']:.0%} of OpenCV alone, "
              f"{p['opencv_alone_per_s']:.0f} img/s); from the cache {p['cached_per_s']:.0f} img/s; training step "
              f"{p['train_step_ms']:.0f} ms, waiting for input {p['waiting_for_input_fraction']:.0%}; iterator teardown "
              f"{' / '.join(f'{t} s' for t in p.get('iterator_teardown_s', []))}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
