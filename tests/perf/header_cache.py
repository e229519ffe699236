"""What the DICOM header cache (medq.data.headers) saves on a read of an RSNA-layout dataset (run by hand; pytest
does not collect it).

    .venv/bin/python tests/perf/header_cache.py [--files 2000] [--size 64] [--folder /tmp/x] [--repeat 3]

Generates ``--files`` RSNA-layout DICOM phantoms (or reuses them in ``--folder``), then times the whole index read
(`read_dataset`: class table, folder listing, header sniff, PatientSex/PatientAge/ViewPosition, patient split)
three ways, the median of ``--repeat`` each: without the cache (``data.cache: false``), cold (the cache file
removed before each read: every header read and the file written) and warm (every header from the cache file).
Prints each time, the per-file cost of the header part and the extrapolation to RSNA's 26,684 files. The page cache
is warm throughout: a cold disk adds its seek time to the uncached reads only.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from medq.config import DataConfig
from medq.data import headers
from medq.data.readers import read_dataset

RSNA_FILES = 26_684


def timed(fn, repeat: int, before=lambda: None) -> float:
    times = []
    for _ in range(repeat):
        before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64, help="image side of the phantoms (pixels)")
    parser.add_argument("--folder", default=None, help="where the phantoms are (made there if missing)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(args.folder or tempfile.mkdtemp(prefix="medq-headers-"))
    root, cache = work / "rsna", work / "cache"
    if not root.exists():
        from medq.data.phantoms_rsna import generate_rsna_dicom

        start = time.perf_counter()
        generate_rsna_dicom(root, n_train=args.files, n_val=0, n_test=0, size=args.size, seed=1)
        print(f"generated {args.files} phantoms ({args.size}² px) in {time.perf_counter() - start:.1f} s: {root}")
        time.sleep(headers.SETTLE_NS / 1e9)  # files younger than that are read but not kept
    data = DataConfig(root=str(root), format="rsna-pneumonia", generate=False)
    index = read_dataset(data, cache_root=cache)
    n = sum(map(len, index.splits.values()))

    def drop_cache() -> None:
        shutil.rmtree(cache, ignore_errors=True)

    plain = timed(lambda: read_dataset(data, cache_root=None), args.repeat)
    cold = timed(lambda: read_dataset(data, cache_root=cache), args.repeat, before=drop_cache)
    read_dataset(data, cache_root=cache)
    warm = timed(lambda: read_dataset(data, cache_root=cache), args.repeat)
    (file,) = (cache / headers.FOLDER).glob("*.json")
    print(f"{n} DICOM files, median of {args.repeat}; cache file {file.stat().st_size / 1e6:.2f} MB")
    for name, seconds in (("no cache", plain), ("cold cache", cold), ("warm cache", warm)):
        print(f"  {name:<10} {seconds:7.3f} s  ({seconds / n * 1e3:.3f} ms a file; RSNA's {RSNA_FILES:,} files: "
              f"~{seconds / n * RSNA_FILES:.1f} s)")
    print(f"  headers alone: ~{(plain - warm) / n * 1e3:.3f} ms a file uncached; warm read {plain / warm:.1f}x faster")
    if not args.folder:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
