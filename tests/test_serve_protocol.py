"""The Open Inference Protocol v2 bodies medq serve parses, with the datatypes, shapes and parameters real clients
send: what is converted (and to what, checked against numpy's own conversion), what is refused with a 400 message.
No model: medq.serve.protocol alone."""
from __future__ import annotations

import json

import numpy as np
import pytest

from medq.serve.protocol import BadRequest, InferRequest, TensorSpec, encode_infer, parse_infer

INPUT = TensorSpec("input", (2, 2, 1))
OUTPUT = TensorSpec("output", (3,))


def _json_body(data, datatype="FP32", shape=(1, 2, 2, 1), **head) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "datatype": datatype, "shape": list(shape), "data": data}],
                       **head}).encode()


def _binary_body(array: np.ndarray, datatype: str) -> tuple[bytes, str]:
    raw = array.tobytes()
    head = json.dumps({"inputs": [{"name": "input", "datatype": datatype, "shape": list(array.shape),
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return head + raw, str(len(head))


def _parse(body: bytes, length: str | None = None, tensor: TensorSpec = INPUT) -> InferRequest:
    return parse_infer(body, length, tensor, OUTPUT, max_batch_size=4)


def test_fp16_and_fp64_tensors_are_converted_to_the_float32_the_model_takes():
    x64 = np.random.default_rng(0).random((2, 2, 2, 1))  # float64, as numpy makes them
    x16 = x64.astype(np.float16)
    for array, datatype in ((x16, "FP16"), (x64, "FP64")):
        want = array.astype(np.float32)  # numpy's own conversion: exact for FP16, nearest float32 for FP64
        body, length = _binary_body(array.astype(array.dtype.newbyteorder("<")), datatype)
        got = _parse(body, length).x
        assert got.dtype == np.float32 and np.array_equal(got, want), datatype
        got = _parse(_json_body(array.ravel().tolist(), datatype, array.shape)).x
        assert got.dtype == np.float32 and np.array_equal(got, want), datatype


def test_an_fp64_value_beyond_float32_is_refused_not_served_as_infinity():
    body, length = _binary_body(np.full((1, 2, 2, 1), 1e300, "<f8"), "FP64")
    with pytest.raises(BadRequest, match="infinite"):
        _parse(body, length)


def test_integer_and_other_datatypes_are_refused_naming_the_expected_one():
    """UINT8 pixels are not the preprocessed floats a normalising model takes (0..255 read as if 0..1 would answer
    for another image), so every integer type, BOOL and BYTES is a 400 naming FP32."""
    for datatype in ("UINT8", "INT8", "INT16", "INT32", "INT64", "UINT16", "BOOL", "BYTES"):
        with pytest.raises(BadRequest, match=f"datatype '{datatype}', expected FP32"):
            _parse(_json_body([1, 0, 1, 0], datatype))


def test_uint8_pixels_are_exact_for_a_model_that_takes_raw_pixels():
    raw = TensorSpec("input", (2, 2, 1), raw_pixels=True)
    pixels = np.array([0, 17, 128, 255], np.uint8).reshape(1, 2, 2, 1)
    body, length = _binary_body(pixels, "UINT8")
    assert np.array_equal(_parse(body, length, raw).x, pixels.astype(np.float32))
    assert np.array_equal(_parse(_json_body([0, 17, 128, 255], "UINT8"), tensor=raw).x, pixels.astype(np.float32))
    for data in ([0, 17, 128, 256], [0, 17, 128, -1], [0, 17, 128, 1.5]):  # not a uint8
        with pytest.raises(BadRequest, match="whole numbers from 0 to 255"):
            _parse(_json_body(data, "UINT8"), tensor=raw)


def test_json_data_must_be_numbers_flat_or_nested_exactly_as_the_shape():
    flat = [0.1, 0.2, 0.3, 0.4]
    nested = np.array(flat, np.float32).reshape(1, 2, 2, 1)
    assert np.array_equal(_parse(_json_body(nested.tolist())).x, nested)  # nested as the shape: accepted
    cases = {"numbers only": [["0.1", "0.2", "0.3", "0.4"],  # strings numpy would parse as numbers
                              [True, False, True, False],  # booleans numpy would read as 1.0 and 0.0
                              [[0.1, 0.2], [0.3]]],  # ragged
             "nested 'data' of shape": [nested.reshape(1, 2, 1, 2).tolist(),  # the same count, other dimensions
                                        nested.reshape(4, 1).tolist()]}
    for message, bad in cases.items():
        for data in bad:
            with pytest.raises(BadRequest, match=message):
                _parse(_json_body(data))


@pytest.mark.parametrize("data", [[0.1, True, 0.3, 0.4], [[[[0.1], [0.2]], [[0.3], [False]]]], [1, 0, 1, True]])
def test_a_boolean_among_numbers_is_refused_naming_the_input(data):
    """numpy reads [0.1, true, ...] as [0.1, 1.0, ...]: a stray true would be a pixel of 1.0, answered silently."""
    assert np.asarray(data).dtype.kind in "if"  # what numpy alone makes of it: numbers
    with pytest.raises(BadRequest, match=r"input 'input': 'data' holds a boolean \(true/false\)"):
        _parse(_json_body(data))


def test_an_empty_outputs_list_is_every_output_and_classification_is_refused():
    y = np.array([[0.2, 0.3, 0.5]], np.float32)
    request = _parse(_json_body([0.0] * 4, outputs=[]))
    content, _ = encode_infer("m", "v", request, y)
    assert json.loads(content)["outputs"][0] == {"name": "output", "datatype": "FP32", "shape": [1, 3],
                                                 "data": pytest.approx([0.2, 0.3, 0.5])}
    with pytest.raises(BadRequest, match="classification extension"):
        _parse(_json_body([0.0] * 4, outputs=[{"name": "output", "parameters": {"classification": 2}}]))


def test_batch_sizes_and_header_lengths_outside_what_the_body_allows_are_refused():
    """Batch 0, a batch above serve.max_batch_size (4 here: the client must split it, never a hang in the queue),
    and an Inference-Header-Content-Length that is negative, zero or past the body's end."""
    cases = {"with N ≥ 1": _json_body([], shape=(0, 2, 2, 1)),
             "5 images in one request, above serve.max_batch_size 4": _json_body([0.0] * 20, shape=(5, 2, 2, 1))}
    for message, body in cases.items():
        with pytest.raises(BadRequest, match=message):
            _parse(body)
    body, length = _binary_body(np.zeros((1, 2, 2, 1), "<f4"), "FP32")
    for wrong in ("-5", "0", str(len(body) + 1)):
        with pytest.raises(BadRequest, match=f"Inference-Header-Content-Length {wrong} is outside the body"):
            _parse(body, wrong)


def test_values_the_preprocessing_never_gives_are_refused():
    """0-255 pixels sent to a model that takes pixel / 255 ('unit': [0, 1]) would be answered for another image;
    the client's own rounding (a hair outside) still passes."""
    unit = TensorSpec("input", (2, 2, 1), bounds=((0.0,), (1.0,)))
    assert np.array_equal(_parse(_json_body([0.0, 0.5, 1.0, 1.0004]), tensor=unit).x.ravel(),
                          np.array([0.0, 0.5, 1.0, 1.0004], np.float32))
    for data in ([0.0, 12.0, 128.0, 255.0], [-0.5, 0.1, 0.2, 0.3]):
        with pytest.raises(BadRequest, match="outside what the run's preprocessing gives"):
            _parse(_json_body(data), tensor=unit)


def test_shared_memory_is_refused_for_inputs_and_outputs():
    """An output the client asked to find in its shared-memory region would be read from a region nobody wrote."""
    region = {"shared_memory_region": "out0", "shared_memory_byte_size": 12}
    with pytest.raises(BadRequest, match="output 'output': the shared-memory extension is not offered"):
        _parse(_json_body([0.0] * 4, outputs=[{"name": "output", "parameters": region}]))
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 2, 2, 1],
                                   "parameters": {"shared_memory_region": "in0", "shared_memory_byte_size": 16}}]})
    with pytest.raises(BadRequest, match="input 'input': the shared-memory extension is not offered"):
        _parse(body.encode())


def test_json_nested_past_the_parsers_depth_is_a_400_not_a_500():
    with pytest.raises(BadRequest, match="nests deeper"):
        _parse(b"[" * 100_000 + b"]" * 100_000)


def test_each_channel_is_held_to_its_own_range():
    """Per channel, as ImageNet's normalisation gives each its own: 0.9 is fine in the first channel, not in the
    third, whose range is [-1, 0]."""
    rgb = TensorSpec("input", (1, 2, 3), bounds=((0.0, 0.0, -1.0), (1.0, 1.0, 0.0)))
    good = [0.9, 0.5, -0.5, 0.0, 1.0, -1.0]  # pixel (0, 0) then (0, 1), channels last
    assert np.array_equal(_parse(_json_body(good, shape=(1, 1, 2, 3)), tensor=rgb).x.ravel(), np.float32(good))
    with pytest.raises(BadRequest, match="outside what the run's preprocessing gives"):
        _parse(_json_body([0.9, 0.5, -0.5, 0.0, 1.0, 0.9], shape=(1, 1, 2, 3)), tensor=rgb)
