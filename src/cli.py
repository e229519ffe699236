"""`medq` command line: parses arguments, loads the config, calls one stage function. Nothing else lives here."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from medq.config import dataset_formats
from medq.errors import MedqError, first_line

DEFAULT_CONFIG = "configs/default.yaml"
DATA_VARIANTS = ("binary", "3-class", "14-label")  # every reader's documented variants (medq.data.*)
log = logging.getLogger("medq")


def _quiet_tensorflow(verbose: bool) -> None:
    """Keep TF/oneDNN/INC start-up chatter out of the terminal unless --verbose (must run before TF is imported)."""
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        os.environ.setdefault("KMP_WARNINGS", "0")


def _setup_logging(verbose: bool, quiet: bool, log_file: Path | None = None) -> Path | None:
    """Console logging, and the command's log file; returns the log file actually used (a temporary file when
    ``log_file``'s folder cannot be created or written: its path is printed)."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    root = logging.getLogger("medq")
    root.setLevel(logging.DEBUG)
    root.handlers.clear()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(level)
    console.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(console)
    root.propagate = False
    if log_file is None:
        return None
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = _LogFile(log_file)
    except OSError as exc:
        import tempfile

        fd, name = tempfile.mkstemp(prefix=f"medq-{log_file.stem}-", suffix=".log")
        os.close(fd)
        print(f"medq: note: cannot write the log {log_file} ({exc.strerror or exc}); logging to {name}",
              file=sys.stderr)
        log_file, handler = Path(name), _LogFile(name)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.addHandler(handler)
    return log_file


class _LogFile(logging.FileHandler):
    """The command's log file; a failed write (a full disk) marks it broken instead of printing logging's own
    traceback, and the traceback of the failure then goes to a temporary file (:func:`_log_traceback`)."""

    broken = False

    def handleError(self, record: logging.LogRecord) -> None:
        self.broken = True

    def flush(self) -> None:
        try:
            super().flush()
        except OSError:
            self.broken = True

    def close(self) -> None:
        try:
            super().close()
        except OSError:
            self.broken = True


def _read_config(args: argparse.Namespace):
    """The config from --config/--set/--run-name, without a log file (for commands that only read runs)."""
    from medq.config import load_config

    path = args.config
    if path is None and Path(DEFAULT_CONFIG).is_file():
        path = DEFAULT_CONFIG
    overrides = list(args.set or [])
    if getattr(args, "run_name", None) is not None:  # '' is an unset shell variable, not "the default run"
        from medq.config import check_run_name

        overrides.append(f"run.name={check_run_name(args.run_name, '--run-name')}")
    return load_config(path, overrides)


# The command's log file and whether its run folder existed before it: a failed command leaves no new empty run
# folder behind, and an unexpected error names the log that holds the traceback.
_SESSION: dict[str, Any] = {}


def _load(args: argparse.Namespace):
    config = _read_config(args)
    _SESSION["run_dir"], _SESSION["existed"] = config.run_dir, config.run_dir.exists()
    _SESSION["log"] = _setup_logging(args.verbose, args.quiet, config.run_dir / "logs" / f"{args.command}.log")
    return config


# --- stage commands: each loads the config and calls one function ----------------------------------------------

def cmd_data(args: argparse.Namespace) -> int:
    if args.action == "check":
        from medq.data.cache import cache_root
        from medq.data.check import check_dataset, format_check_report

        if not args.path:
            raise MedqError("medq data check: give the dataset folder, e.g. medq data check data/chest_xray")
        if args.config or args.set:  # split the folder exactly as that config's run does
            config = _read_config(args)
            data = config.data
            report = check_dataset(Path(args.path), format=args.format or data.format,
                                   variant=args.variant or data.variant, seed=config.run.seed,
                                   val_fraction=data.val_fraction, test_fraction=data.test_fraction,
                                   val_split=data.val_split, max_megapixels=data.max_megapixels,
                                   bit_depth=data.bit_depth,
                                   cross_split_copies=data.cross_split_copies,
                                   label_conflicts=data.label_conflicts,
                                   metadata_columns=data.metadata_columns, cache_root=cache_root(config))
        else:
            report = check_dataset(Path(args.path), format=args.format or "auto", variant=args.variant)
        print(json.dumps(report, indent=2, default=str) if args.json else format_check_report(report))
        return 0
    from medq.pipeline import run_data

    config = _load(args)
    index = run_data(config, resplit=args.resplit, phantoms=args.phantoms)
    if args.cache:
        from medq.pipeline import build_cache

        build_cache(config, index)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from medq.selection import at_chance
    from medq.train import run_train

    config = _load(args)
    result = run_train(config, verbose=2 if args.verbose else 0, resume=args.resume)
    log.info("best epoch %d: validation %s", result.best_epoch, _short_metrics(result.val_metrics))
    if at_chance(result.val_metrics):
        log.warning("  at chance: its validation AUC interval reaches 0.5, so the model is not shown to have learned "
                    "anything (the chance guard kept the first such epoch); train longer or on more data")
    log.info("model: %s", config.run_dir / "model.keras")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.run or args.data:
        return _evaluate_external(args)
    from medq.train import run_evaluate

    report = run_evaluate(_load(args), split=args.split, ten_crop=args.ten_crop, threshold=args.threshold)
    print("\n".join(_evaluation_lines(report)))
    return 0


def _evaluate_external(args: argparse.Namespace) -> int:
    """`medq evaluate --run NAME --config OTHER.yaml | --data ROOT`: the run's model on another dataset."""
    from medq.external import report_lines, run_external
    from medq.labelmap import parse_map
    from medq.runs import resolve_run

    if not args.run:
        raise MedqError("--data names the external dataset; add --run NAME for the run whose model to evaluate on it")
    if args.run_name is not None:
        raise MedqError(f"--run {args.run} and --run-name {args.run_name} both name the run; give one of them")
    if args.ten_crop:
        raise MedqError("--ten-crop is not offered for an external evaluation; drop it")
    overrides = [f"data.root={args.data}"] if args.data else []
    overrides += [f"data.format={args.format}"] if args.format else []
    overrides += [f"data.variant={args.variant}"] if args.variant else []
    args.set = [*(args.set or []), *overrides]
    other = _read_config(args)  # only its data: and external: sections are used; the run keeps its own settings
    if not Path(other.data.root).exists():
        from medq.pipeline import ensure_phantoms

        ensure_phantoms(other)  # the config's built-in phantoms; anywhere else a missing folder is an error
    run_dir = resolve_run(args.run, other)
    _SESSION["run_dir"], _SESSION["existed"] = run_dir, run_dir.exists()
    _SESSION["log"] = _setup_logging(args.verbose, args.quiet, run_dir / "logs" / "evaluate-external.log")
    result = run_external(run_dir, other, split=args.split, threshold=args.threshold,
                          mapping=parse_map(args.map) if args.map else None)
    print("\n".join(report_lines(result)))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from medq.tune import run_tune

    run_tune(_load(args))
    return 0


def cmd_freeze(args: argparse.Namespace) -> int:
    from medq.freeze import run_freeze

    log.info("frozen graph: %s", run_freeze(_load(args)))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from medq.quantize import run_quantize

    if args.deploy:
        args.set = [*(args.set or []), f"quantize.deploy={args.deploy}"]
    if args.allow_chance:
        args.set = [*(args.set or []), "quantize.allow_chance=true"]
    log.info("INT8 graph: %s", run_quantize(_load(args), verbose=args.verbose))
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from medq.benchmark import run_benchmark, summary_text

    if args.preset:
        if args.config:
            raise MedqError("medq benchmark: --preset NAME brings its own config (configs/NAME.yaml); "
                            "drop --config and change values with --set")
        from medq.benchmark.presets import preset_path
        from medq.pipeline import run_preset

        overrides = list(args.set or []) + ([f"run.name={args.run_name}"] if args.run_name else [])
        args.config = str(preset_path(args.preset))
        report = run_preset(args.preset, _load(args), overrides, verbose=args.verbose)
    else:
        report = run_benchmark(_load(args), verbose=args.verbose)
    print(summary_text(report))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from medq.benchmark import summary_text
    from medq.pipeline import run_all

    config = _load(args)
    report = run_all(config, verbose=args.verbose, phantoms=args.phantoms)
    print(summary_text(report))
    print(f"report: {config.run_dir / 'benchmark.md'}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from medq.convert import convert

    config = _load(args)  # only for the run folder (--run-name, --set run.output_dir=...)
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    result = convert(args.source, run_dir=config.run_dir, arch=args.arch, classes=classes, task=args.task,
                     image_size=args.image_size, normalization=args.normalization, opset=args.opset,
                     tolerance=args.tolerance, parity_images=args.parity_images,
                     trust_torchscript=args.trust_torchscript, trust_pickle=args.trust_pickle,
                     model_output=args.model_output,
                     verbose=not args.quiet)
    log.info("frozen graph: %s (%s, %d classes, preprocessing %s)", result.fp32_pb, result.task,
             len(result.classes), result.preprocess.to_dict())
    return 0


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from medq.convert import export_onnx

    config = _load(args)
    result = export_onnx(config.run_dir, source=args.source, opset=args.opset, tolerance=args.tolerance,
                         parity_images=args.parity_images, verbose=not args.quiet)
    log.info("ONNX model: %s", result.onnx)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from medq.hwinfo import thread_environment
    from medq.predict import run_predict
    from medq.runs import resolve_run

    if args.run and args.run_name is not None:
        raise MedqError(f"--run {args.run} and --run-name {args.run_name} both name the run; give one of them")
    config = _read_config(args)  # no log file: the run folder may be a read-only mount
    run_dir = resolve_run(args.run, config)
    for key, value in thread_environment(config.runtime).items():
        os.environ.setdefault(key, value)  # before TensorFlow starts; the user's own settings win
    summary = run_predict(run_dir, args.inputs, model=args.model, model_file=args.model_file, output=args.output,
                          ten_crop=args.ten_crop, heatmap_dir=args.heatmap,
                          heatmap_classes=args.heatmap_classes or "all",
                          heatmap_layer=args.heatmap_layer, batch_size=args.batch_size, threshold=args.threshold,
                          quiet=args.quiet, overwrite=args.overwrite,
                          intra_op_threads=config.runtime.intra_op_threads,
                          inter_op_threads=config.runtime.inter_op_threads, trust_model_file=args.trust_model_file,
                          dicom_sr_dir=args.dicom_sr)
    print(f"medq predict: {summary.line()}", file=sys.stderr)
    return summary.exit_code


def cmd_serve(args: argparse.Namespace) -> int:
    from medq.hwinfo import thread_environment
    from medq.runs import resolve_run

    config = _read_config(args)  # no log file: the run folders may be read-only mounts
    settings = config.serve
    for key in ("runs", "model", "engine", "host", "port", "token_file", "tls_cert", "tls_key"):
        if getattr(args, key) is not None:
            setattr(settings, key, getattr(args, key))
    for key, value in thread_environment(config.runtime).items():
        os.environ.setdefault(key, value)  # before TensorFlow starts; the user's own settings win
    if args.ray:  # the same app as a Ray Serve deployment (medq.serve.ray_serve)
        from medq.serve.ray_serve import run_ray_serve

        return run_ray_serve(config, [resolve_run(run, config) for run in settings.runs], address=args.ray,
                             replicas=args.replicas)
    from medq.serve import run_serve

    return run_serve(config, [resolve_run(run, config) for run in settings.runs])


def cmd_loadtest(args: argparse.Namespace) -> int:
    from medq.artifacts import write_json
    from medq.loadtest import format_report, run_loadtest

    report = run_loadtest(args.url, args.model, input_kind=args.input, images=[Path(p) for p in args.images],
                          image_size=args.image_size, concurrency=args.concurrency, requests=args.requests,
                          seconds=args.seconds, bad_fraction=args.bad_fraction, overload=args.overload,
                          tolerance=args.tolerance, timeout=args.timeout, server_pid=args.server_pid,
                          token_file=args.token_file, overload_requests=args.overload_requests,
                          images_per_request=args.images_per_request, cacert=args.cacert)
    print(format_report(report))
    if args.output:
        write_json(args.output, report.as_json())
    return 1 if report.problems else 0


def cmd_card(args: argparse.Namespace) -> int:
    from medq.modelcard import write_card
    from medq.runs import resolve_run

    written = write_card(resolve_run(args.name, _read_config(args)))
    print(f"medq card: {written['md']} and {written['json']}", file=sys.stderr)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from medq.runs import format_run, format_runs, list_runs, resolve_run, run_summary

    config = _read_config(args)
    if args.action == "list":
        rows = list_runs(config.run.output_dir)
        print(json.dumps(rows, indent=2, default=str) if args.json else format_runs(rows, config.run.output_dir))
        return 0
    if not args.name and args.run_name is None:
        raise MedqError("medq runs show: give a run name or folder, e.g. medq runs show default")
    summary = run_summary(resolve_run(args.name or args.run_name, config))
    print(json.dumps(summary, indent=2, default=str) if args.json else format_run(summary))
    return 0


def _short_metrics(metrics: dict[str, Any]) -> str:
    """'accuracy 0.8100 [0.7500, 0.8600], auc …' (95% intervals where the metrics carry them)."""
    from medq.metrics import with_ci

    ci = metrics.get("ci") or {}
    return ", ".join(f"{k} {with_ci(metrics[k], ci.get(k), 4) or 'undefined'}" for k in ("accuracy", "auc")
                     if isinstance(metrics.get(k), float))


def _evaluation_lines(report: dict[str, Any]) -> list[str]:
    """Each view's metrics with 95% intervals, sensitivity/specificity at the threshold, operating points."""
    from medq.metrics import with_ci

    lines = [f"objective: {report.get('objective')}; {report['n_images']} {report['split']} images"]
    for name in ("single_crop", "ten_crop"):
        m = report.get(name)
        if not m:
            continue
        ci = m.get("ci") or {}
        parts = [_short_metrics(m)]
        for key in ("sensitivity", "specificity"):
            value = m.get(key)
            if isinstance(value, float):
                parts.append(f"{key} {with_ci(value, ci.get(key), 4)}")
            elif isinstance(value, dict):
                parts.append(f"{key} " + " ".join(f"{c} {with_ci(v, (ci.get(key) or {}).get(c), 3)}"
                                                  for c, v in value.items() if v is not None))
        clinical = m.get("clinical") or {}
        points = clinical.get("sensitivity_at_specificity") or {}
        if points:
            parts.append("sensitivity at specificity " + ", ".join(f"{k} {_f4(v)}" for k, v in points.items()))
        parts.append(f"Brier {_f4(clinical.get('brier'))}, ECE {_f4(clinical.get('ece'))}")
        lines.append(f"{name.replace('_', '-'):12s} " + "; ".join(parts))
        lines += _operating_lines(m.get("operating_points"), report["split"])
    table = (report.get("single_crop") or {}).get("subgroups")
    if table:
        from medq.subgroups import markdown

        lines += ["subgroups (single-crop):", *markdown(table)]
    return lines


def _operating_lines(points: dict[str, Any] | None, split: str) -> list[str]:
    """Per thresholded class: the threshold, sensitivity/specificity at it on the split with 95% intervals, and the
    validation figures it was chosen at."""
    from medq.metrics import with_ci

    from medq.thresholds import at

    if not points:
        return []
    lines = [f"  operating thresholds ({points['source']}; {points['decision_rule']}):"]
    for c, p in points["classes"].items():
        val = p.get("validation") or {}
        chosen = (f"; chosen on validation at sensitivity {_f4(val.get('sensitivity'))}, specificity "
                  f"{_f4(val.get('specificity'))}") if val else ""
        lines.append(f"    {at(points.get('task'), c, p['threshold'])}: {split} sensitivity "
                     f"{with_ci(p['sensitivity'], p['sensitivity_ci'], 3) or 'n/a'} ({p['n_positive']}+), "
                     f"specificity {with_ci(p['specificity'], p['specificity_ci'], 3) or 'n/a'} "
                     f"({p['n_negative']}-){chosen}")
    lines += [f"  note: {n}" for n in points["notes"]]
    return lines


def _f4(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) and value == value else "n/a"


# --- parser -----------------------------------------------------------------------------------------------------

def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", metavar="YAML",
                        help=f"config file (default: {DEFAULT_CONFIG} if present, else built-in defaults)")
    parser.add_argument("--set", "-s", action="append", metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=3 (repeatable)")
    parser.add_argument("--run-name", help="shorthand for --set run.name=NAME (the folder under run.output_dir)")
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("--verbose", "-v", action="store_true", help="show TF/INC logs and per-epoch Keras output")
    noise.add_argument("--quiet", "-q", action="store_true", help="only warnings, errors and final results")


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "data": (cmd_data, "generate the phantom dataset or read and report a dataset (`medq data check PATH`)"),
    "train": (cmd_train, "train the configured model; the best validation epoch is kept"),
    "evaluate": (cmd_evaluate, "the run's model on a split (default test), optionally with 10-crop averaging; with "
                 "--run NAME --config OTHER.yaml (or --data ROOT): on another dataset (external validation)"),
    "tune": (cmd_tune, "keras-tuner search; the best trial becomes the run's model if it beats it"),
    "freeze": (cmd_freeze, "Keras model → frozen GraphDef model_fp32.pb (input:0 → output:0), parity-checked"),
    "quantize": (cmd_quantize, "INC post-training static quantization driven by deploy.yaml → model_int8.pb"),
    "benchmark": (cmd_benchmark, "FP32 vs INT8 (and BF16) latency, throughput and test metric, each in its own process"),
    "run": (cmd_run, "all stages in order on the config's data (the main job)"),
    "convert": (cmd_convert, "PyTorch checkpoint / TorchScript / ONNX → model_fp32.pb + model.onnx in a run folder, "
                "parity-checked against the source"),
    "export-onnx": (cmd_export_onnx, "the run's model_fp32.pb (or Keras model) → model_fp32.onnx with tf2onnx, "
                    "parity-checked in onnxruntime"),
    "predict": (cmd_predict, "class probabilities (JSON lines) for image files or folders from a run's model, "
                             "optional ten-crop averaging and Grad-CAM heatmaps"),
    "serve": (cmd_serve, "serve runs' models over HTTP: Open Inference Protocol v2 (KServe/Triton clients) and "
                         "PNG/JPEG/DICOM in, dynamic batching, Prometheus /metrics"),
    "loadtest": (cmd_loadtest, "closed-loop load on a medq server on this machine: a concurrency sweep's throughput, "
                 "latency percentiles, answers by status and wrong answers, perf_analyzer style"),
    "card": (cmd_card, "write the run's model card (model_card.md + .json) from its manifest and benchmark"),
    "runs": (cmd_runs, "list the runs under run.output_dir (`medq runs list`) or show one (`medq runs show NAME`)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medq", description="Train, quantize (Intel Neural Compressor) and "
                                     "benchmark medical image classifiers on Intel Xeon CPUs.")
    from medq import __version__

    parser.add_argument("--version", action="version", version=f"medq {__version__}")
    formats = dataset_formats()
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (fn, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _common(p)
        p.set_defaults(func=fn)
        if name == "data":
            p.add_argument("action", nargs="?", choices=["prepare", "check"], default="prepare",
                           help="prepare (default): generate phantoms if needed and report; check PATH: inspect a folder")
            p.add_argument("path", nargs="?", help="with check: the dataset folder (with --config/--set: split as "
                           "that config's runs split it)")
            p.add_argument("--format", choices=formats, metavar="FORMAT",
                           help=f"with check: the layout, one of {', '.join(formats)} (default: auto, detect)")
            p.add_argument("--variant", choices=DATA_VARIANTS, metavar="VARIANT",
                           help=f"with check: one of {', '.join(DATA_VARIANTS)} (kaggle-pneumonia: binary, 3-class; "
                           "busi: binary, 3-class; rsna-pneumonia: 3-class, binary; nih-chestxray14: 14-label)")
            p.add_argument("--json", action="store_true", help="with check: print JSON")
        if name in ("data", "run"):
            p.add_argument("--phantoms", action="store_true", help="generate the built-in synthetic phantoms at "
                           "data.root if it is missing, wherever it points (without the flag only at the config's "
                           "built-in location; elsewhere a missing folder is an error)")
        if name == "data":
            p.add_argument("--resplit", action="store_true", help="split the dataset again for this run (the run's "
                           "pinned split.json is replaced; its models become stale and must be retrained)")
            p.add_argument("--cache", action="store_true", help="fill the preprocessed-image cache (data.cache_dir) "
                           "for every split now, ahead of training; safe to interrupt and rerun")
        if name == "train":
            p.add_argument("--resume", action="store_true", help="continue an interrupted training from its last "
                           "checkpoint in <run>/checkpoints/")
        if name == "evaluate":
            p.add_argument("--split", choices=["train", "val", "test", "all"], default="test",
                           help="default: test; with --run, the external dataset's split (all: every image of it)")
            p.add_argument("--ten-crop", action="store_true", help="also report 10-crop averaging (CheXNet's TTA)")
            p.add_argument("--threshold", type=_probability, default=None,
                           help="decide every class at this probability instead of the run's operating thresholds "
                           "(chosen on validation by train, see `thresholds:`)")
            p.add_argument("--run", metavar="DIR_OR_NAME",
                           help="external validation: this run's model (with its own preprocessing and thresholds) "
                           "on the dataset of --config (its data: section) or --data")
            p.add_argument("--data", metavar="ROOT", help="with --run: the external dataset's folder")
            p.add_argument("--format", choices=formats, metavar="FORMAT",
                           help=f"with --run: the external dataset's layout, one of {', '.join(formats)}")
            p.add_argument("--variant", choices=DATA_VARIANTS, metavar="VARIANT",
                           help="with --run: the external dataset's variant (e.g. rsna-pneumonia binary)")
            p.add_argument("--map", action="append", metavar="MODEL=EXTERNAL",
                           help="with --run: model class → external class(es) joined by '|' (repeatable), or one "
                           "built-in mapping's name (e.g. kaggle:rsna), or a YAML file of MODEL: EXTERNAL lines; "
                           "default: external.label_map, else the built-in for the two class lists")
        if name == "benchmark":
            p.add_argument("--preset", metavar="NAME", choices=["chexnet-cpu"],
                           help="run a preset end to end (data → train → freeze → quantize → benchmark); "
                           "chexnet-cpu: DenseNet121 at 224x224, 14 labels")
        if name == "quantize":
            p.add_argument("--deploy", metavar="YAML", help="INC deploy.yaml (default: quantize.deploy in the config)")
            p.add_argument("--allow-chance", action="store_true",
                           help="quantize even when the FP32 model is not above chance on validation (it stops "
                           "otherwise: INT8 would have nothing to preserve)")
        if name in ("convert", "export-onnx"):
            _convert_arguments(p, name)
        if name == "predict":
            _predict_arguments(p)
        if name == "serve":
            _serve_arguments(p)
        if name == "loadtest":
            _loadtest_arguments(p)
        if name == "card":
            p.add_argument("name", nargs="?", help="the run name (or its folder); default: the config's run")
        if name == "runs":
            p.add_argument("action", nargs="?", choices=["list", "show"], default="list",
                           help="list (default): every run under run.output_dir; show NAME: one run in detail")
            p.add_argument("name", nargs="?", help="with show: the run name (or its folder)")
            p.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _convert_arguments(p: argparse.ArgumentParser, name: str) -> None:
    if name == "convert":
        p.add_argument("source", help="PyTorch checkpoint (.pt/.pth/.pth.tar, with --arch), TorchScript file "
                       "(with --trust-torchscript) or .onnx file")
        p.add_argument("--arch", help="architecture of a checkpoint: chexnet, densenet121, vgg16, vgg16_bn, googlenet, "
                       "resnet18, resnet34, resnet50, resnet101")
        p.add_argument("--task", choices=["binary", "multiclass", "multilabel"],
                       help="needed when the model ends in logits: binary/multiclass append a softmax, "
                       "multilabel a sigmoid")
        p.add_argument("--classes", metavar="A,B,...", help="class names in output order (default: CheXNet's 14 for "
                       "chexnet, else class_0..N-1)")
        p.add_argument("--image-size", type=int,
                       help="input size in pixels (default 224; ONNX: the file's, required when dynamic)")
        p.add_argument("--normalization", choices=["imagenet", "symmetric", "unit", "raw"],
                       help="the preprocessing the model was trained with (default for chexnet: imagenet; a model "
                       "that rescales its input itself: what its first ops expect)")
        p.add_argument("--trust-torchscript", action="store_true",
                       help="allow loading a TorchScript file, which runs code stored in it: only for files you trust")
        p.add_argument("--trust-pickle", action="store_true",
                       help="allow a checkpoint that pickles more than tensors (numpy scalars, a whole model), which "
                       "runs code stored in it when loaded: only for files you trust; tensors still load into --arch")
        p.add_argument("--model-output", choices=["logits", "probabilities"],
                       help="what the model's outputs are, when its graph does not end in Sigmoid/Softmax to say so "
                       "(probabilities get no activation appended)")
    else:
        p.add_argument("--source", help="a frozen .pb or Keras model to export instead of the run's model_fp32.pb")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 13-17 (default 17)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest difference allowed between engines on probabilities (default 1e-4)")
    p.add_argument("--parity-images", type=int, default=8, help="phantom images in the parity check (default 8)")


def _probability(text: str) -> float:
    """A threshold on a probability: strictly between 0 and 1 (0 or 1 would call every image, or none)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text}: must be between 0 and 1 (a probability)")
    return value


def _predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER",
                   help="PNG/JPEG/DICOM files, or folders searched recursively for them")
    p.add_argument("--run", metavar="DIR_OR_NAME",
                   help="the run folder (output/<name>) or a run name under run.output_dir (default: the config's run)")
    p.add_argument("--model", choices=["fp32", "int8", "keras"], default="fp32",
                   help="which of the run's models: model_fp32.pb (default), model_int8.pb or model.keras")
    p.add_argument("--model-file", metavar="PATH",
                   help="a .pb frozen graph or .keras model to use instead; classes and preprocessing still come "
                        "from --run's manifest")
    p.add_argument("--trust-model-file", action="store_true",
                   help="allow an HDF5 (.h5) or SavedModel --model-file: Keras' legacy loader can run code stored in "
                        "it, so only for a file you trust")
    p.add_argument("--output", "-o", metavar="FILE.jsonl",
                   help="write JSON lines here (atomically) instead of stdout")
    p.add_argument("--ten-crop", action="store_true",
                   help="average ten crops (resize to S*256/224; corners, centre and their flips), as CheXNet did")
    p.add_argument("--heatmap", metavar="DIR",
                   help="write a Grad-CAM overlay PNG per image and class here (uses the run's Keras model)")
    p.add_argument("--overwrite", action="store_true",
                   help="let --heatmap / --dicom-sr replace files already in their folder (without it an existing "
                        "file is an error before any work starts)")
    p.add_argument("--heatmap-classes", choices=["all", "predicted"],
                   help="heatmaps for every class (default) or only the predicted class / findings")
    p.add_argument("--heatmap-layer", metavar="NAME",
                   help="the Keras layer Grad-CAM reads (default: the last convolutional feature map)")
    p.add_argument("--dicom-sr", metavar="DIR",
                   help="write a DICOM Comprehensive SR per DICOM input here (findings, probabilities, threshold, "
                        "model; references the source image, patient and study copied from it)")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    p.add_argument("--threshold", type=_probability, default=None,
                   help="decide every class at this probability instead of the run's operating thresholds (chosen "
                        "on validation by train, see `thresholds:`)")


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", dest="runs", action="append", metavar="DIR_OR_NAME",
                   help="a run to serve (repeatable; a run name under run.output_dir or a run folder); the model is "
                        "named by the run (default: serve.runs)")
    p.add_argument("--model", choices=["int8", "fp32", "bf16", "keras", "int8-bf16"],
                   help="which of each run's models: model_int8.pb (default), model_fp32.pb, model_fp32.pb under the "
                        "BF16 rewrite, or model.keras; with another --engine, that engine's model of this precision")
    p.add_argument("--engine", choices=["tensorflow", "onnxruntime", "openvino"],
                   help="tensorflow (default: the run's graphs), or onnxruntime / openvino: the model `medq benchmark` "
                        "built for the run's reference row of that engine and precision (the reference extra)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, help="port (default 8080)")
    p.add_argument("--token-file", help="require `Authorization: Bearer <token>` with the token in this file on "
                   "every request but /v2/health/*")
    p.add_argument("--tls-cert", help="PEM certificate: serve HTTPS (with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--ray", metavar="ADDRESS", help="run as a Ray Serve deployment on the Ray cluster at ADDRESS "
                   "(host:6379 of `ray start --head`; the serve-ray extra)")
    p.add_argument("--replicas", type=int, default=1, help="with --ray: replicas of the server (default 1)")


def _loadtest_arguments(p: argparse.ArgumentParser) -> None:
    def concurrencies(text: str) -> list[int]:
        try:
            return [int(c) for c in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give concurrencies as 1,2,4") from None

    p.add_argument("url", help="the server, on a loopback address only: http://127.0.0.1:PORT")
    p.add_argument("--model", required=True, help="the model's name on the server (GET /v2/models/NAME)")
    p.add_argument("--input", choices=["tensor", "image"], default="tensor",
                   help="tensor: v2 /infer with the model's input tensor (default); image: /v1/.../predict with "
                        "JPEG files (--images, or synthetic radiographs of --image-size²)")
    p.add_argument("--images", nargs="*", default=[], metavar="FILE", help="image files to send with --input image")
    p.add_argument("--image-size", type=int, default=1024, help="side of the synthetic JPEGs (default 1024)")
    p.add_argument("--concurrency", type=concurrencies, default=[1, 2, 4, 8, 16, 32, 64],
                   help="requests in flight at each level (default 1,2,4,8,16,32,64)")
    p.add_argument("--requests", type=int, default=200, help="requests per level at most (default 200)")
    p.add_argument("--seconds", type=float, default=30.0, help="seconds per level at most (default 30)")
    p.add_argument("--bad-fraction", type=float, default=0.0,
                   help="share of bad requests mixed in (garbage bytes, truncated JPEG, wrong tensor shape, DICOM "
                        "without pixels), each of which must be answered 400 (e.g. 0.1)")
    p.add_argument("--overload", action="store_true",
                   help="after the sweep, one level at 4x the saturating concurrency: only 200 and 503 may come back")
    p.add_argument("--images-per-request", type=int, default=1,
                   help="images in each tensor request ([N, H, W, C]; default 1): req/s times N is img/s")
    p.add_argument("--overload-requests", type=int,
                   help="requests in the overload level (default: --requests), e.g. 20000 to watch the server's RSS")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest difference from the probabilities given alone that counts as the same (default 1e-4)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a request counts as unanswered")
    p.add_argument("--server-pid", type=int,
                   help="read the server's RSS and CPU time from /proc/PID (default: its /metrics)")
    p.add_argument("--token-file", help="the server's bearer token file (serve.token_file), sent with every request")
    p.add_argument("--cacert", metavar="PEM",
                   help="with an https:// URL: the certificate to verify the server against (its serve.tls_cert when "
                        "self-signed; default: the system's CAs)")
    p.add_argument("--output", "-o", metavar="FILE.json", help="also write the table and the failures as JSON")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    _quiet_tensorflow(args.verbose)
    if args.quiet:
        os.environ.setdefault("MEDQ_PROGRESS", "0")  # medq.progress: no bars under --quiet
    _setup_logging(args.verbose, args.quiet)
    _SESSION.clear()
    with _terminate_as_interrupt():
        return _run(args, argv)


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    """The error boundary: every way a command ends, as an exit code and at most one line on stderr."""
    try:
        _refuse_unused_options(args)
        return args.func(args)
    except MedqError as exc:
        _forget_new_run_folder()
        print(f"medq {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: stages unwind without committing; the run is as it was
        _forget_new_run_folder()
        how = "terminated" if isinstance(exc, Terminated) else "interrupted"
        print(f"medq {args.command}: {how}; {_continue_hint(args.command, argv)}", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except BrokenPipeError:  # `medq runs show X | head`: the reader has all it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's flush at exit must not fail again on the closed pipe
        return 141
    except Exception as exc:  # a bug or an environment problem: one line here, the traceback in the log
        from medq.oserrors import explain, file_system_error

        failure = file_system_error(exc, _SESSION.get("run_dir"))
        log_file = _log_traceback(args.command)
        if args.verbose:
            import traceback

            traceback.print_exc()
        if failure is not None:  # a full disk, a read-only or unwritable folder: the folder and what it needs
            print(f"medq {args.command}: error: {explain(*failure)} (the traceback is in {log_file})",
                  file=sys.stderr)
            return 1
        print(f"medq {args.command}: unexpected error: {type(exc).__name__}: {first_line(exc)}; the traceback is in "
              f"{log_file} (rerun with --verbose to see it here)", file=sys.stderr)
        return 1


def _refuse_unused_options(args: argparse.Namespace) -> None:
    """An option that does nothing where it was given is refused, never silently ignored."""
    command = args.command
    if command == "data":
        given = [flag for flag, on in (("--format", args.format), ("--variant", args.variant), ("--json", args.json))
                 if on]
        if args.action != "check" and given:
            raise MedqError(f"{_flags(given)} without `check PATH` (`medq data check` options); drop "
                            f"{_them(given)}, or run `medq data check PATH`")
        given = [flag for flag, on in (("--phantoms", args.phantoms), ("--resplit", args.resplit),
                                       ("--cache", args.cache), ("--run-name", args.run_name is not None)) if on]
        if args.action == "check" and given:
            raise MedqError(f"{_flags(given)} with `check` (check only reads the folder); drop "
                            f"{_them(given)}, or run `medq data` without check")
    if command == "predict" and args.heatmap is None:
        given = [flag for flag, on in (("--heatmap-classes", args.heatmap_classes),
                                       ("--heatmap-layer", args.heatmap_layer)) if on is not None]
        if given:
            raise MedqError(f"{_flags(given)} without --heatmap DIR (heatmap options); "
                            f"add --heatmap DIR or drop {_them(given)}")
    if command == "evaluate" and not (args.run or args.data):
        given = [flag for flag, on in (("--format", args.format), ("--variant", args.variant), ("--map", args.map),
                                       ("--split all", args.split == "all")) if on]
        if given:
            raise MedqError(f"{_flags(given)} without --run (external validation options); add --run NAME, or "
                            f"drop {_them(given)}")
    if command == "runs" and args.action == "list" and args.run_name is not None:
        raise MedqError("--run-name does nothing with `runs list`, which lists every run under "
                        "run.output_dir; drop it, or use `medq runs show NAME`")
    if command == "runs" and args.action == "show" and args.name and args.run_name is not None:
        raise MedqError(f"`runs show {args.name}` and --run-name {args.run_name} both name the run; give one of them")
    if command in ("convert", "export-onnx"):
        unused = [item for item in args.set or [] if not item.strip().startswith("run.")]
        if unused:
            raise MedqError(f"--set {unused[0]} does nothing with `{command}`, which reads only the run folder "
                            "from the config (run.output_dir, run.name); drop it")


def _flags(given: list[str]) -> str:
    return f"{given[0]} does nothing" if len(given) == 1 else f"{', '.join(given)} do nothing"


def _them(given: list[str]) -> str:
    return "it" if len(given) == 1 else "them"


class Terminated(KeyboardInterrupt):
    """SIGTERM (``docker stop``, a scheduler's kill): unwinds like Ctrl-C, so a stage leaves the run as it was."""


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    def terminate(signum, frame):
        raise Terminated()

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _continue_hint(command: str, argv: list[str]) -> str:
    """What continues the interrupted work, with the user's own flags."""
    import shlex

    if command == "train":
        flags = [a for a in argv[argv.index(command) + 1:] if a != "--resume"]
        return (f"the last finished epoch is kept in the run's checkpoints/; "
                f"`{shlex.join(['medq', 'train', *flags, '--resume'])}` continues the training from there")
    return f"finished artifacts are kept; `{shlex.join(['medq', *argv])}` starts this step again"


def _log_traceback(command: str) -> Path:
    """Write the current exception's traceback to the command's log (a temporary file when there is none, when
    writing it failed, or when the run folder is removed because the command created it and left nothing)."""
    import tempfile
    import traceback

    text = traceback.format_exc()
    log.debug("%s", text)
    log_file = _SESSION.get("log")
    written = log_file is not None and Path(log_file).is_file() and any(
        isinstance(h, _LogFile) and not h.broken and h.baseFilename == os.path.abspath(log_file) for h in log.handlers)
    if _forget_new_run_folder() or not written:
        fd, name = tempfile.mkstemp(prefix=f"medq-{command}-", suffix=".log")
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        return Path(name)
    return Path(log_file)


def _forget_new_run_folder() -> bool:
    """Remove the run folder a failed command created, when it holds nothing but its lock and logs."""
    import shutil

    run_dir = _SESSION.get("run_dir")
    if run_dir is None or _SESSION.get("existed") or not run_dir.is_dir():
        return False
    if any(p.name not in ("logs", ".lock") for p in run_dir.iterdir()):
        return False
    for handler in list(log.handlers):
        if isinstance(handler, logging.FileHandler):
            handler.close()
            log.removeHandler(handler)
    shutil.rmtree(run_dir, ignore_errors=True)
    return True


if __name__ == "__main__":
    sys.exit(main())
