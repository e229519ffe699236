"""What checking a v2 infer request costs before it queues (run by hand; pytest does not collect it): medq.serve.protocol
.parse_infer on a binary FP32 batch and on a JSON batch of CheXNet's input, with the per-channel range check of the
run's preprocessing (ImageNet) on and off.

    .venv/bin/python tests/perf/serve_parse.py [--batch 32] [--json-batch 4] [--size 224] [--repeat 20]

Best of ``--repeat`` calls. Set beside the engine's time for the same batch (DenseNet121 INT8, batch 32, 224², 2 cores:
seconds) to see what the checks add.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from medq.preprocess import PreprocessSpec, normalization_affine
from medq.serve.protocol import TensorSpec, parse_infer


def best_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--json-batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    spec = PreprocessSpec(args.size, 3, "imagenet")
    scale, offset = normalization_affine(spec)
    checked = TensorSpec("input", spec.input_shape, bounds=(tuple(offset), tuple(255 * scale + offset)))
    unchecked = TensorSpec("input", spec.input_shape)
    output = TensorSpec("output", (14,))
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (args.batch, *spec.input_shape)).astype(np.float32)
    x = (pixels * scale + offset).astype("<f4")  # inputs as the preprocessing gives them
    raw = x.tobytes()
    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    small = x[:args.json_batch]
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(small.shape),
                                   "data": small.ravel().tolist()}]}).encode()
    for label, tensor in (("range check on", checked), ("range check off", unchecked)):
        binary_ms = best_ms(lambda: parse_infer(head + raw, str(len(head)), tensor, output, args.batch), args.repeat)
        json_ms = best_ms(lambda: parse_infer(body, None, tensor, output, args.batch), max(3, args.repeat // 4))
        print(f"{label:16s} binary [{args.batch}, {args.size}, {args.size}, 3]: {binary_ms:7.1f} ms   "
              f"JSON [{args.json_batch}, {args.size}, {args.size}, 3]: {json_ms:7.1f} ms")


if __name__ == "__main__":
    main()
