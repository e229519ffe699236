"""File-system failures end in one line naming the folder and what it needs, with the traceback in a log that exists.

Tests run as root, where permission bits are not enforced: an unwritable folder is a read-only tmpfs mount, a full
disk a small tmpfs (both skipped where `mount` is not allowed), and a file where a folder belongs needs neither.
"""
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest


def medq(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medq", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def tmpfs(folder: Path, options: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip()})")
    return folder


@pytest.fixture
def mounts():
    mounted: list[Path] = []

    def mount(folder: Path, options: str) -> Path:
        mounted.append(tmpfs(folder, options))
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


def films(root: Path, n: int = 6, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for i in range(n):
            folder = root / split / ("PNEUMONIA" if i % 2 else "NORMAL")
            folder.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / f"{split}{i}.png"), rng.integers(0, 255, (size, size), dtype=np.uint8))
    return root


def the_error(result: subprocess.CompletedProcess, command: str) -> str:
    """The one error line, and the log it names (which must exist and hold the traceback)."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "unexpected error" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"medq {command}: error:")]
    assert len(lines) == 1, result.stderr
    log = re.search(r"the traceback is in (\S+)\)$", lines[0])
    assert log, lines[0]
    assert "Traceback (most recent call last)" in Path(log.group(1)).read_text()
    return lines[0]


def test_a_file_where_the_output_folder_belongs_is_named(tmp_path):
    blocker = tmp_path / "output"
    blocker.write_text("not a folder")
    line = the_error(medq("freeze", "--set", f"run.output_dir={blocker}", cwd=tmp_path), "freeze")
    assert f"{blocker}: is a file where a folder is expected" in line


def test_a_read_only_output_folder_is_named_with_the_permission_needed(tmp_path, mounts):
    read_only = mounts(tmp_path / "ro", "ro,size=1m")
    result = medq("data", "--set", f"run.output_dir={read_only / 'out'}", "--set", f"data.root={films(tmp_path / 'x')}",
                  "--set", "data.generate=false", cwd=tmp_path)
    line = the_error(result, "data")
    assert f"{read_only}: is on a read-only file system" in line and "needs write access" in line
    assert not (read_only / "out").exists()


def test_a_full_disk_during_training_names_the_folder_and_leaves_no_partial_checkpoint(tmp_path, mounts):
    """192 KiB hold the split, manifest and logs but not the first epoch's checkpoint (64 3x3 filters + Adam)."""
    disk = mounts(tmp_path / "small", "size=192k")
    run = disk / "out" / "default"
    result = medq("train", "-q", "--set", f"run.output_dir={disk / 'out'}",
                  "--set", f"data.root={films(tmp_path / 'x')}",
                  "--set", "data.generate=false", "--set", f"data.cache_dir={tmp_path / 'cache'}",
                  "--set", "preprocess.image_size=32", "--set", "model.params={blocks: 1, filters: 64, dense_units: 8}",
                  "--set", "train.epochs=1", "--set", "train.batch_size=4", "--set", "train.tensorboard=false",
                  cwd=tmp_path)
    line = the_error(result, "train")
    assert f"{run}: no space left on its disk" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("last-1")) == []
    assert not (run / ".staging").exists()
