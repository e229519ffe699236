"""RSNA's DICOM header metadata (PatientSex, PatientAge, ViewPosition) is read once and kept in the data cache
(medq.data.headers): a later read of the dataset opens no DICOM, a changed file is read again, an unwritable or
damaged cache never changes a value. Oracles: the headers read back with pydicom itself, and the calls of
pydicom.dcmread counted (a read that the cache serves makes none)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from pydicom.filereader import dcmread as real_dcmread

import medq.data.headers as headers
from medq.config import load_config
from medq.data import pinned
from medq.data.cache import cache_root
from medq.data.readers import read_dataset
from test_failures import mounts  # noqa: F401  (a read-only tmpfs: as root, permission bits are not enforced)

N = 12  # phantoms: 9 + 1 + 2


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from medq.data.phantoms_rsna import generate_rsna_dicom

    root = tmp_path_factory.mktemp("rsna") / "rsna"
    generate_rsna_dicom(root, n_train=9, n_val=1, n_test=2, size=32, seed=11)
    return root


@pytest.fixture
def rsna(phantoms, tmp_path) -> Path:
    """A fresh copy of the phantoms per test (tests rewrite files)."""
    import shutil

    return Path(shutil.copytree(phantoms, tmp_path / "rsna"))


@pytest.fixture
def settled(monkeypatch):
    """Files written a moment ago count as settled (the racy-timestamp rule has its own test)."""
    monkeypatch.setattr(headers, "SETTLE_NS", 0)


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Every DICOM pydicom.dcmread opens, whichever name it is called by."""
    calls: list[str] = []

    def counting(path, *args, **kwargs):
        calls.append(os.path.realpath(path))
        return real_dcmread(path, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    monkeypatch.setattr(pydicom.filereader, "dcmread", counting)
    return calls


def config_for(root: Path, tmp_path: Path, *more: str):
    return load_config(None, [f"run.output_dir={tmp_path / 'out'}", f"data.root={root}", "data.generate=false",
                              *more])


def truth(root: Path) -> dict[str, tuple[str, str, str]]:
    """file name → (sex, age, view) as pydicom reads the header (ages above 120 are data-entry errors: unknown)."""
    out = {}
    for path in (root / "stage_2_train_images").glob("*.dcm"):
        ds = real_dcmread(path)
        age = ds.PatientAge if int(ds.PatientAge) <= 120 else "unknown"
        out[path.name] = (ds.PatientSex, age, ds.ViewPosition)
    return out


def metadata(index) -> dict[str, tuple[str, ...]]:
    return {Path(s.path).name: s.metadata for split in index.splits.values() for s in split}


def read(config):
    return read_dataset(config.data, seed=config.run.seed, cache_root=cache_root(config))


def cache_files(config) -> list[Path]:
    return sorted((cache_root(config) / headers.FOLDER).glob("*.json"))


def rewrite_sex(path: Path, keep_times: bool) -> str:
    """Flip PatientSex in place (same length, so the same size); ``keep_times``: restore atime and mtime, as
    ``rsync -t`` or ``touch -r`` would. Returns the new value."""
    before = path.stat()
    ds = real_dcmread(path)
    ds.PatientSex = "F" if ds.PatientSex == "M" else "M"
    ds.save_as(path)
    assert path.stat().st_size == before.st_size
    if keep_times:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert path.stat().st_mtime_ns == before.st_mtime_ns
    return ds.PatientSex


def header_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == headers.__name__ and r.levelno == logging.WARNING]


# --- read once --------------------------------------------------------------------------------------------------

def test_a_second_read_of_the_dataset_opens_no_dicom_and_gives_the_headers_values(rsna, tmp_path, settled, opened):
    config = config_for(rsna, tmp_path)
    first = pinned.run_index(config, stage="data")  # pins the split, as `medq data` does
    assert len(set(opened)) == N  # the count sees pydicom's reads
    expected = truth(rsna)
    assert metadata(first) == expected
    opened.clear()
    again = pinned.run_index(config, stage="train")  # a later stage: the pinned split, the dataset read again
    assert opened == []
    assert metadata(again) == expected
    assert [p.parent for p in cache_files(config)] == [tmp_path / "out" / "cache" / headers.FOLDER]
    assert any(f"DICOM headers: {N} from the header cache" in note for note in again.notes)


def test_without_the_data_cache_every_read_opens_the_headers(rsna, tmp_path, settled, opened):
    config = config_for(rsna, tmp_path, "data.cache=false")
    read(config)
    opened.clear()
    assert metadata(read(config)) == truth(rsna)
    assert len(opened) == N and not (tmp_path / "out" / "cache").exists()


def test_data_check_with_a_config_uses_the_runs_data_cache(rsna, tmp_path, settled, opened):
    from medq.data.check import check_dataset

    config = config_for(rsna, tmp_path)
    read(config)  # a stage of the run filled the cache
    opened.clear()
    report = check_dataset(rsna, format="rsna-pneumonia", cache_root=cache_root(config), verify_all_up_to=0,
                           sample_per_split=0)
    assert opened == []
    by_sex: dict[str, int] = {}
    for sex, _, _ in truth(rsna).values():
        by_sex[sex] = by_sex.get(sex, 0) + 1
    counted: dict[str, int] = {}
    for split in report["splits"].values():
        for sex, n in split["metadata"]["sex"].items():
            counted[sex] = counted.get(sex, 0) + n
    assert counted == by_sex


# --- a changed file is read again -------------------------------------------------------------------------------

@pytest.mark.parametrize("keep_times", [False, True], ids=["rewritten", "rewritten-mtime-restored"])
def test_a_file_rewritten_with_another_sex_is_read_again(rsna, tmp_path, settled, opened, keep_times):
    config = config_for(rsna, tmp_path)
    read(config)
    changed = sorted((rsna / "stage_2_train_images").glob("*.dcm"))[3]
    sex = rewrite_sex(changed, keep_times)
    opened.clear()
    index = read(config)
    assert opened == [os.path.realpath(changed)]  # that file alone
    assert metadata(index)[changed.name][0] == sex
    assert metadata(index) == truth(rsna)
    opened.clear()
    assert metadata(read(config)) == truth(rsna) and opened == []  # and kept again


def test_a_file_younger_than_the_settle_time_is_read_but_not_kept(rsna, tmp_path, opened, monkeypatch):
    """A rewrite within the file system's timestamp tick keeps size, mtime and ctime: a file that young is not
    kept, so a rewrite that follows cannot be served stale."""
    config = config_for(rsna, tmp_path)
    for path in (rsna / "stage_2_train_images").glob("*.dcm"):
        path.touch()  # written just now
    read(config)
    opened.clear()
    read(config)
    assert len(opened) == N  # nothing was kept
    later = time.time_ns() + headers.SETTLE_NS + 1_000_000_000
    monkeypatch.setattr(headers, "time", SimpleNamespace(time_ns=lambda: later))
    read(config)
    opened.clear()
    assert metadata(read(config)) == truth(rsna) and opened == []


def test_a_header_that_could_not_be_read_once_is_read_again_not_kept_as_unknown(rsna, tmp_path, settled,
                                                                               monkeypatch):
    config = config_for(rsna, tmp_path)
    victim = sorted((rsna / "stage_2_train_images").glob("*.dcm"))[0]
    real = headers.header_values
    monkeypatch.setattr(headers, "header_values",  # a passing I/O error on one file
                        lambda path, tags: None if Path(path) == victim else real(path, tags))
    assert metadata(read(config))[victim.name] == ("unknown", "unknown", "unknown")
    monkeypatch.setattr(headers, "header_values", real)
    assert metadata(read(config)) == truth(rsna)


def test_a_file_that_changes_while_its_header_is_read_is_not_kept(rsna, tmp_path, settled, opened, monkeypatch):
    config = config_for(rsna, tmp_path)
    victim = sorted((rsna / "stage_2_train_images").glob("*.dcm"))[1]
    real = headers.header_values
    state = {}

    def racing(path, tags):
        found = real(path, tags)  # the old header is read ...
        if Path(path) == victim and not state:
            state["sex"] = rewrite_sex(victim, keep_times=False)  # ... and the file replaced meanwhile
        return found

    monkeypatch.setattr(headers, "header_values", racing)
    read(config)
    monkeypatch.setattr(headers, "header_values", real)
    opened.clear()
    index = read(config)
    assert opened == [os.path.realpath(victim)] and metadata(index)[victim.name][0] == state["sex"]


# --- an unwritable or damaged cache -----------------------------------------------------------------------------

def test_a_read_only_cache_folder_still_gives_the_headers_values_and_says_so_once(rsna, tmp_path, mounts, caplog,
                                                                                 settled):
    read_only = mounts(tmp_path / "ro", "ro,size=1m")
    config = config_for(rsna, tmp_path, f"data.cache_dir={read_only}")
    with caplog.at_level(logging.WARNING, logger="medq"):
        first = pinned.run_index(config, stage="data")  # the stage goes on
        second = pinned.run_index(config, stage="train")
    expected = truth(rsna)
    assert metadata(first) == expected and metadata(second) == expected
    (line,) = header_warnings(caplog)
    assert f"{read_only / headers.FOLDER}: cannot write the DICOM header cache" in line and "data.cache_dir" in line


@pytest.mark.parametrize("damage", ["truncated", "not-utf8", "a-list", "entry-of-another-shape", "a-number-as-value",
                                    "other-tags"])
def test_a_damaged_cache_file_is_ignored_and_rebuilt_with_one_warning(rsna, tmp_path, settled, opened, caplog,
                                                                      damage):
    config = config_for(rsna, tmp_path)
    read(config)
    (file,) = cache_files(config)
    text = file.read_text()
    body = json.loads(text)
    some = next(iter(body["entries"]))
    file.write_bytes({
        "truncated": text[: len(text) // 2].encode(),
        "not-utf8": b"\xff\xfe\x00garbage",
        "a-list": b"[]",
        "entry-of-another-shape": json.dumps({**body, "entries": {**body["entries"], some: ["F"]}}).encode(),
        "a-number-as-value": json.dumps({**body, "entries": {**body["entries"], some: [*body["entries"][some][:3],
                                                                                      [1, "50", "PA"]]}}).encode(),
        "other-tags": json.dumps({**body, "tags": ["PatientSex"]}).encode(),
    }[damage])
    opened.clear()
    with caplog.at_level(logging.WARNING, logger="medq"):
        index = read(config)
    assert metadata(index) == truth(rsna) and len(opened) == N  # nothing trusted from it
    (line,) = header_warnings(caplog)
    assert f"{file}: damaged DICOM header cache" in line and "rebuilt" in line
    caplog.clear()
    opened.clear()
    with caplog.at_level(logging.WARNING, logger="medq"):
        assert metadata(read(config)) == truth(rsna)
    assert opened == [] and header_warnings(caplog) == []  # rebuilt


_WRITER = """
import json, os, sys
import medq.data.headers as headers
from medq.config import load_config
from medq.data.cache import cache_root
from medq.data.readers import read_dataset
headers.SETTLE_NS = 0
config = load_config(None, sys.argv[2:])
for path in sorted(os.scandir(sys.argv[1]), key=lambda e: e.name):  # each file changed, then the dataset read
    os.utime(path.path)
    index = read_dataset(config.data, seed=config.run.seed, cache_root=cache_root(config))
print(json.dumps({s.path: s.metadata for split in index.splits.values() for s in split}))
"""


def test_two_processes_rewriting_the_cache_never_leave_a_damaged_file(rsna, tmp_path, settled, opened, caplog):
    """Two stages read the dataset at once, each rewriting the cache after every change, while a third process
    (this one) loads it over and over: it never finds a partial file (temp file + rename), and what is left is
    whole. The cache is padded with entries of 4,000 other files so that each write takes a while."""
    from medq.data.rsna import HEADER_TAGS

    config = config_for(rsna, tmp_path)
    read(config)
    (file,) = cache_files(config)
    body = json.loads(file.read_text())
    padding = tmp_path / "padding"
    padding.mkdir()
    for i in range(4000):
        (padding / f"{i}.dcm").touch()
        body["entries"][str(padding / f"{i}.dcm")] = [0, 0, 0, ["M", "50", "PA"]]
    file.write_text(json.dumps(body))
    images = rsna / "stage_2_train_images"
    args = [str(images), f"run.output_dir={tmp_path / 'out'}", f"data.root={rsna}", "data.generate=false"]
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    loads = 0
    with caplog.at_level(logging.WARNING, logger="medq"):
        while any(w.poll() is None for w in writers):
            headers.HeaderCache(cache_root(config), images, HEADER_TAGS)  # warns if it finds a damaged file
            loads += 1
        results = [w.communicate(timeout=300) for w in writers]
        assert header_warnings(caplog) == [], f"after {loads} loads"
        expected = truth(rsna)
        for writer, (out, err) in zip(writers, results):
            assert writer.returncode == 0, err
            assert {Path(p).name: tuple(m) for p, m in json.loads(out).items()} == expected
        opened.clear()
        assert metadata(read(config)) == expected
    assert opened == [] and header_warnings(caplog) == []
    assert [p.name for p in (cache_root(config) / headers.FOLDER).iterdir()] == [file.name]  # no temp file left
