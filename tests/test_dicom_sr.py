"""`medq predict --dicom-sr DIR`: a Comprehensive SR per DICOM input, read back with pydicom and highdicom (finding
codes, probabilities, the source instance's SOP Instance UID, patient and study attributes equal to the source's),
and no patient name, ID or birth date in anything medq prints or logs."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medq import artifacts, runrecord
from medq.cli import main

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"  # PS3.4 B.5: Comprehensive SR Storage
PATIENT = {"PatientName": "Doe^Jane^Q", "PatientID": "MRN-0042317", "PatientBirthDate": "19610412", "PatientSex": "F"}


def _source(path: Path, seed: int, patient: dict = PATIENT, **extra) -> Dataset:
    """A CR image as a modality writes it: file meta, patient, study, series, instance, pixels."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "CR", "20261201", "101500", "ACC77", "1"
    ds.SeriesNumber, ds.InstanceNumber, ds.ReferringPhysicianName = 1, 1, ""
    for key, value in {**patient, **extra}.items():
        setattr(ds, key, value)
    pixels = np.random.default_rng(seed).integers(0, 4096, (48, 48), dtype=np.uint16)
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 48, 48, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


def _groups(sr_path: Path):
    import highdicom as hd

    sr = hd.sr.srread(sr_path)
    return sr, sr.content.get_image_measurement_groups()


def _calls(groups) -> dict[str, str]:
    """finding → Present/Absent: the qualitative evaluation named by the group's own finding type."""
    out = {}
    for group in groups:
        (evaluation,) = group.get_qualitative_evaluations()
        assert evaluation.name == group.finding_type
        out[group.finding_type.meaning] = evaluation.value.meaning
    return out


def _text_items(ds: Dataset, code: str) -> tuple[str, ...]:
    """The distinct values of every TEXT content item named ``code``, anywhere in the content tree."""
    found = set()
    for item in ds.get("ContentSequence", []):
        name = item.get("ConceptNameCodeSequence")
        if name and name[0].CodeValue == code and item.ValueType == "TEXT":
            found.add(item.TextValue)
        found.update(_text_items(item, code))
    return tuple(sorted(found))


def test_sr_reads_back_with_findings_probabilities_reference_and_the_sources_patient(tmp_path, caplog):
    from medq.dicomsr import ModelIdentity, write_sr

    source = _source(tmp_path / "chest.dcm", seed=1)
    probabilities = {"NORMAL": 0.27, "PNEUMONIA": 0.73}
    model = ModelIdentity("tiny", "int8", "0123456789abcdef" * 4, "0.1.0")
    target = write_sr(tmp_path / "chest.dcm", tmp_path / "sr" / "chest.sr.dcm", probabilities, "binary", 0.5, model)

    plain = pydicom.dcmread(target)  # pydicom: a Part 10 file of the right class, in the source's study
    assert plain.SOPClassUID == COMPREHENSIVE_SR and plain.Modality == "SR"
    for key, value in PATIENT.items():
        assert str(plain[key].value) == value, key
    assert plain.StudyInstanceUID == source.StudyInstanceUID and plain.AccessionNumber == "ACC77"
    assert plain.SeriesInstanceUID != source.SeriesInstanceUID and plain.SOPInstanceUID != source.SOPInstanceUID
    evidence = plain.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert {s.CodingSchemeDesignator for s in plain.CodingSchemeIdentificationSequence} >= {"99MEDQ"}

    sr, groups = _groups(target)  # highdicom: TID 1500 with one TID 1501 group per class
    assert len(groups) == 2
    by_code = {(g.finding_type.scheme_designator, g.finding_type.value): g for g in groups}
    normal, pneumonia = by_code[("SCT", "17621005")], by_code[("99MEDQ", "PNEUMONIA")]  # SNOMED "Normal"; private
    for group, name in ((normal, "NORMAL"), (pneumonia, "PNEUMONIA")):
        values = {m.name.value: m.value for m in group.get_measurements()}
        assert values["122157"] == pytest.approx(probabilities[name])  # DCM Probability
        # DCM Threshold Value: the positive class's call is p >= 0.5; NORMAL is present iff PNEUMONIA is not
        assert values.get("122411") == (pytest.approx(0.5) if name == "PNEUMONIA" else None)
        (image,) = group.source_images
        assert image.referenced_sop_instance_uid == source.SOPInstanceUID
        assert image.referenced_sop_class_uid == source.SOPClassUID
    algorithm = {_text_items(plain, "111001"), _text_items(plain, "111003")}  # DCM Algorithm Name / Version
    assert algorithm == {("medq run tiny",), ("int8 sha256:0123456789ab medq 0.1.0",)}
    assert _calls(groups) == {"Normal": "Absent", "PNEUMONIA": "Present"}
    assert not [r for r in caplog.records if "more than one" in r.getMessage()], "highdicom found a malformed group"


def test_multiclass_marks_the_argmax_and_multilabel_each_label_at_the_threshold(tmp_path):
    from medq.dicomsr import ModelIdentity, write_sr

    _source(tmp_path / "us.dcm", seed=2)
    model = ModelIdentity("bus", "fp32", "f" * 64)
    target = write_sr(tmp_path / "us.dcm", tmp_path / "a.sr.dcm", {"benign": 0.4, "malignant": 0.35, "normal": 0.25},
                      "multiclass", 0.5, model)
    _, groups = _groups(target)
    assert _calls(groups) == {"Benign": "Present", "Malignant": "Absent", "Normal": "Absent"}  # 0.4 < 0.5 but the arg-max
    assert all("122411" not in {m.name.value for m in g.get_measurements()} for g in groups)  # no threshold used
    target = write_sr(tmp_path / "us.dcm", tmp_path / "b.sr.dcm", {"Effusion": 0.35, "Mass": 0.1, "Hernia": 0.02},
                      "multilabel", 0.3, model)
    _, groups = _groups(target)
    assert _calls(groups) == {"Effusion": "Present", "Mass": "Absent", "Hernia": "Absent"}


def test_the_sr_decides_at_the_runs_per_class_thresholds_and_states_them(tmp_path):
    from medq.dicomsr import ModelIdentity, write_sr

    _source(tmp_path / "x.dcm", seed=3)
    model = ModelIdentity("r", "int8", "e" * 64)
    # binary at the run's 0.3: 0.4 is PNEUMONIA although NORMAL's 0.6 is the arg-max
    target = write_sr(tmp_path / "x.dcm", tmp_path / "a.sr.dcm", {"NORMAL": 0.6, "PNEUMONIA": 0.4}, "binary",
                      {"PNEUMONIA": 0.3}, model)
    _, groups = _groups(target)
    assert _calls(groups) == {"Normal": "Absent", "PNEUMONIA": "Present"}
    assert _thresholds(groups) == {"PNEUMONIA": 0.3}
    # multi-label, each label at its own threshold: 0.35 ≥ 0.3 (Effusion) but 0.2 < 0.25 (Mass), 0.05 ≥ 0.04
    probabilities = {"Effusion": 0.35, "Mass": 0.2, "Hernia": 0.05}
    cuts = {"Effusion": 0.3, "Mass": 0.25, "Hernia": 0.04}
    target = write_sr(tmp_path / "x.dcm", tmp_path / "b.sr.dcm", probabilities, "multilabel", cuts, model)
    _, groups = _groups(target)
    assert _calls(groups) == {"Effusion": "Present", "Mass": "Absent", "Hernia": "Present"}
    assert _thresholds(groups) == cuts
    # multiclass: the class whose probability exceeds its threshold by the most, arg-max(p − t) = malignant
    # (0.35 − 0.2 = 0.15 against benign 0.4 − 0.4 = 0), no per-class threshold stated
    target = write_sr(tmp_path / "x.dcm", tmp_path / "c.sr.dcm", {"benign": 0.4, "malignant": 0.35, "normal": 0.25},
                      "multiclass", {"benign": 0.4, "malignant": 0.2, "normal": 0.4}, model)
    _, groups = _groups(target)
    assert _calls(groups) == {"Benign": "Absent", "Malignant": "Present", "Normal": "Absent"}
    assert _thresholds(groups) == {}


def _thresholds(groups) -> dict[str, float]:
    return {g.finding_type.meaning: pytest.approx(m.value) for g in groups for m in g.get_measurements()
            if m.name.value == "122411"}


def test_a_source_without_type_2_study_attributes_still_gets_an_sr_with_them_empty(tmp_path):
    from medq.dicomsr import ModelIdentity, write_sr

    ds = _source(tmp_path / "bare.dcm", seed=3)
    for key in ("AccessionNumber", "StudyID", "ReferringPhysicianName", "PatientBirthDate"):
        delattr(ds, key)
    ds.save_as(tmp_path / "bare.dcm", enforce_file_format=True)
    target = write_sr(tmp_path / "bare.dcm", tmp_path / "bare.sr.dcm", {"NORMAL": 0.9, "PNEUMONIA": 0.1}, "binary",
                      0.5, ModelIdentity("tiny", "fp32", "a" * 64))
    plain = pydicom.dcmread(target)
    assert plain.PatientID == PATIENT["PatientID"] and plain.AccessionNumber in ("", None)


def test_an_sr_failure_names_the_file_without_patient_data(tmp_path, monkeypatch):
    from medq import dicomsr
    from medq.errors import MedqError

    _source(tmp_path / "x.dcm", seed=4)

    def failing(source, *args):
        raise ValueError(f"bad value for patient {source.PatientName} born {source.PatientBirthDate}")

    monkeypatch.setattr(dicomsr, "build_sr", failing)
    with pytest.raises(MedqError) as caught:
        dicomsr.write_sr(tmp_path / "x.dcm", tmp_path / "x.sr.dcm", {"A": 1.0}, "binary", 0.5,
                         dicomsr.ModelIdentity("r", "fp32", "0" * 64))
    text = str(caught.value)
    assert "x.dcm" in text and "ValueError" in text
    assert "Doe" not in text and "19610412" not in text
    assert not (tmp_path / "x.sr.dcm").exists()


# --- through `medq predict` -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run holding a tiny frozen FP32 graph (a fixed linear head on the image mean): what predict needs."""
    import tensorflow as tf

    from medq.graph import freeze_keras

    folder = tmp_path_factory.mktemp("srrun") / "tiny"
    inputs = tf.keras.Input((32, 32, 1))
    pooled = tf.keras.layers.GlobalAveragePooling2D()(inputs)
    outputs = tf.keras.layers.Dense(2, activation="softmax", kernel_initializer=tf.keras.initializers.Constant(
        [[4.0, -4.0]]), bias_initializer="zeros")(pooled)
    graph_def = freeze_keras(tf.keras.Model(inputs, outputs))
    pb = artifacts.write_bytes(runrecord.staging_path(folder, "model_fp32.pb"), graph_def.SerializeToString())
    runrecord.commit(folder, "freeze", artifacts={"fp32_pb": pb}, facts={
        "classes": ["NORMAL", "PNEUMONIA"], "task": "binary", "input_name": "input", "output_name": "output",
        "preprocess": {"image_size": 32, "channels": 1, "normalization": "unit", "bit_depth": "auto"},
        "data_source": "synthetic phantoms (kaggle-pneumonia layout)"})
    return folder


def test_predict_writes_an_sr_per_dicom_input_and_prints_no_patient_data(run, tmp_path, capsys, caplog):
    images = tmp_path / "in"
    (images / "ward").mkdir(parents=True)
    sources = [_source(images / "a.dcm", 5), _source(images / "ward" / "b.dcm", 6,
                                                        {**PATIENT, "PatientName": "Roe^Richard", "PatientID": "MRN-9"})]
    (images / "photo.png").write_bytes(_png())
    out = tmp_path / "sr"
    caplog.set_level(logging.DEBUG, logger="medq")
    code = main(["predict", "--run", str(run), str(images), "--dicom-sr", str(out), "-o", str(tmp_path / "p.jsonl"),
                 "--threshold", "0.3"])  # every class at 0.3 instead of the run's thresholds
    printed = capsys.readouterr()
    assert code == 0, printed.err
    records = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    by_name = {Path(r["file"]).name: r for r in records}
    assert "dicom_sr" not in by_name["photo.png"]  # no study to reference
    assert Path(by_name["a.dcm"]["dicom_sr"]) == out / "a.sr.dcm"
    assert Path(by_name["b.dcm"]["dicom_sr"]) == out / "ward" / "b.sr.dcm"
    for source, name in zip(sources, ("a.dcm", "b.dcm")):
        sr, groups = _groups(Path(by_name[name]["dicom_sr"]))
        assert sr.PatientName == source.PatientName and sr.PatientID == source.PatientID
        assert {g.source_images[0].referenced_sop_instance_uid for g in groups} == {source.SOPInstanceUID}
        probs = {g.finding_type.meaning.upper(): [m.value for m in g.get_measurements()
                                                  if m.name.value == "122157"][0] for g in groups}
        assert probs == pytest.approx(by_name[name]["probabilities"], abs=1e-6)
        assert [c.upper() for c, call in _calls(groups).items() if call == "Present"] == [by_name[name]["prediction"]]
        assert _thresholds(groups) == {"PNEUMONIA": 0.3} == by_name[name]["thresholds"]
    assert "2 DICOM SR files" in printed.err
    seen = printed.out + printed.err + caplog.text + (tmp_path / "p.jsonl").read_text()
    for source in sources:
        for key in ("PatientName", "PatientID", "PatientBirthDate"):
            assert str(source[key].value) not in seen, key
    assert "Doe" not in seen and "Roe" not in seen


def test_a_dicom_image_without_its_uids_is_predicted_and_its_sr_failure_reported(run, tmp_path, capsys):
    images = tmp_path / "in"
    images.mkdir()
    ds = _source(images / "a.dcm", 9)
    del ds.StudyInstanceUID
    ds.save_as(images / "a.dcm", enforce_file_format=True)
    _source(images / "b.dcm", 10)
    out = tmp_path / "p.jsonl"
    assert main(["predict", "--run", str(run), str(images), "--dicom-sr", str(tmp_path / "sr"), "-o", str(out)]) == 0
    records = {Path(r["file"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert "probabilities" in records["a.dcm"] and "StudyInstanceUID" in records["a.dcm"]["dicom_sr_error"]
    assert "dicom_sr" not in records["a.dcm"] and Path(records["b.dcm"]["dicom_sr"]).is_file()
    err = capsys.readouterr().err
    assert "1 DICOM SR file in" in err and "1 could not be built" in err and "a.dcm" in err
    assert PATIENT["PatientName"] not in err and PATIENT["PatientID"] not in err


def test_existing_sr_files_are_refused_before_any_work(run, tmp_path, capsys):
    images = tmp_path / "in"
    images.mkdir()
    _source(images / "a.dcm", 7)
    (tmp_path / "sr").mkdir()
    (tmp_path / "sr" / "a.sr.dcm").write_bytes(b"someone else's file")
    assert main(["predict", "--run", str(run), str(images), "--dicom-sr", str(tmp_path / "sr")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a.sr.dcm: already exists" in err[0] and "--overwrite" in err[0]
    assert (tmp_path / "sr" / "a.sr.dcm").read_bytes() == b"someone else's file"
    assert main(["predict", "--run", str(run), str(images), "--dicom-sr", str(tmp_path / "sr"), "--overwrite"]) == 0
    assert pydicom.dcmread(tmp_path / "sr" / "a.sr.dcm").SOPClassUID == COMPREHENSIVE_SR


def _png() -> bytes:
    import cv2

    ok, data = cv2.imencode(".png", np.full((40, 40), 128, np.uint8))
    return data.tobytes()


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) not installed")
def test_dciodvfy_finds_no_error_in_the_sr(tmp_path):
    """David Clunie's IOD verifier (dicom3tools): the SR conforms to the Comprehensive SR IOD."""
    from medq.dicomsr import ModelIdentity, write_sr

    _source(tmp_path / "chest.dcm", seed=8)
    target = write_sr(tmp_path / "chest.dcm", tmp_path / "chest.sr.dcm", {"NORMAL": 0.6, "PNEUMONIA": 0.4}, "binary",
                      0.5, ModelIdentity("tiny", "fp32", "c" * 64))
    result = subprocess.run(["dciodvfy", str(target)], capture_output=True, text=True, timeout=60)
    report = result.stdout + result.stderr
    assert "ComprehensiveSR" in report, report
    assert not [line for line in report.splitlines() if line.startswith("Error")], report


@pytest.mark.parametrize("extra", [
    {"PhotometricInterpretation": "MONOCHROME1"},
    {"NumberOfFrames": 3},
    {"patient": {**PATIENT, "PatientName": "Müller^Jürgen", "PatientSex": "O"}, "SpecificCharacterSet": "ISO_IR 100"},
    {"patient": {**PATIENT, "PatientName": "山田^太郎"}, "SpecificCharacterSet": "ISO_IR 192"},
], ids=["monochrome1", "multi-frame", "latin-1 name, sex O", "utf-8 name"])
def test_sources_of_other_kinds_get_an_sr_with_their_patient_read_back_equal(tmp_path, extra):
    from medq.dicomsr import ModelIdentity, write_sr

    extra = dict(extra)
    source = _source(tmp_path / "img.dcm", 3, extra.pop("patient", PATIENT), **extra)
    out = write_sr(tmp_path / "img.dcm", tmp_path / "img.sr.dcm", {"NORMAL": 0.3, "PNEUMONIA": 0.7}, "binary",
                   {"PNEUMONIA": 0.5}, ModelIdentity("r", "fp32", "ab" * 32))
    sr = pydicom.dcmread(out)
    for key in ("PatientName", "PatientID", "PatientSex", "StudyInstanceUID"):
        assert str(sr[key].value) == str(source[key].value), key
    assert _calls(_groups(out)[1]) == {"Normal": "Absent", "PNEUMONIA": "Present"}
