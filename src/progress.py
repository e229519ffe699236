"""Progress bars for long loops: one tqdm wrapper every stage can use.

    from medq.progress import progress
    for path in progress(paths, desc="predict", unit="img", quiet=args.quiet):
        ...
    with progress(total=n, desc="calibrate", quiet=quiet) as bar:
        bar.update(batch_size)

Bars go to stderr (stdout stays clean for JSON and reports). ``quiet=True`` turns them off; otherwise a bar is drawn
only when stderr is a terminal, so logs, CI output and piped runs get no carriage-return noise.
``MEDQ_PROGRESS=0`` turns bars off everywhere, ``MEDQ_PROGRESS=1`` forces them on (e.g. under ``docker compose run``
without a TTY).
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, Iterable, TypeVar

T = TypeVar("T")


def progress_enabled(quiet: bool = False) -> bool | None:
    """False: off. True: on. None: on only if stderr is a terminal (tqdm's own check)."""
    if quiet:
        return False
    forced = os.environ.get("MEDQ_PROGRESS", "").strip().lower()
    if forced in ("0", "false", "no", "off"):
        return False
    if forced in ("1", "true", "yes", "on"):
        return True
    return None


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str | None = None,
             unit: str = "it", quiet: bool = False, leave: bool = False):
    """A tqdm bar on stderr (iterate it, or use it as a context manager and call ``update(n)``)."""
    from tqdm import tqdm

    enabled = progress_enabled(quiet)
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, leave=leave, dynamic_ncols=True,
                disable=None if enabled is None else not enabled, mininterval=0.5)


def counting(fn: Callable[..., T], bar: Any) -> Callable[..., T]:
    """``fn`` advancing ``bar`` by one per call (a loop that is not ours: INC calls eval_func once per trial)."""
    def counted(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        finally:
            bar.update(1)

    return counted
