"""What finding byte-identical copies costs (run by hand; pytest does not collect it), extrapolated to NIH
ChestX-ray14 (112,120 PNGs, ~45 GB, ~400 KB each).

    .venv/bin/python tests/perf/hash_copies.py [--files 400] [--kb 400] [--folder /tmp/x]

Writes ``--files`` files of ``--kb`` KiB of incompressible bytes (a compressed PNG is near that), then times, on the
warm page cache and then per byte: a stat of every file, the three 4 KiB blocks medq reads of a size-colliding
file, and a full blake2b and sha256 of every file. Prints each rate and the NIH extrapolation: the worst case (every
file's size collides with another's, so every file gets the block read) and a full hash of all 45 GB for
comparison. Disk reads of a cold dataset are slower than the page cache: the full-hash line is a lower bound.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

from medq.data.duplicates import BLOCK, _blocks, identical_files

NIH_FILES, NIH_BYTES = 112_120, 45e9


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=400)
    parser.add_argument("--kb", type=int, default=400)
    parser.add_argument("--folder", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        paths = []
        for i in range(args.files):
            path = Path(tmp) / f"{i:06d}.png"
            path.write_bytes(os.urandom(args.kb * 1024))
            paths.append(str(path))
        total = args.files * args.kb * 1024
        t_stat = timed(lambda: [os.stat(p) for p in paths])
        size = args.kb * 1024
        t_blocks = timed(lambda: [_blocks(p, size) for p in paths])
        t_all = timed(lambda: identical_files(paths))  # every size collides here: the worst case

        def full(algorithm: str) -> None:
            for p in paths:
                with open(p, "rb") as fh:
                    hashlib.file_digest(fh, algorithm)

        t_blake, t_sha = timed(lambda: full("blake2b"), 1), timed(lambda: full("sha256"), 1)
    print(f"{args.files} files of {args.kb} KiB ({total / 1e6:.0f} MB), warm page cache, best of 3:")
    print(f"  stat:                 {args.files / t_stat:,.0f} files/s")
    print(f"  3 × {BLOCK} B blocks:     {args.files / t_blocks:,.0f} files/s")
    print(f"  identical_files (all sizes equal, no copies): {args.files / t_all:,.0f} files/s")
    print(f"  full blake2b:         {total / t_blake / 1e6:,.0f} MB/s")
    print(f"  full sha256:          {total / t_sha / 1e6:,.0f} MB/s")
    print("NIH ChestX-ray14 (112,120 files, 45 GB), extrapolated:")
    print(f"  medq's check, worst case (every size collides): {NIH_FILES / (args.files / t_all):,.1f} s")
    print(f"  stat only (no size collides):                  {NIH_FILES / (args.files / t_stat):,.1f} s")
    print(f"  full blake2b of every file, for comparison:    {NIH_BYTES / (total / t_blake):,.0f} s")
    print(f"  full sha256 of every file, for comparison:     {NIH_BYTES / (total / t_sha):,.0f} s")


if __name__ == "__main__":
    main()
