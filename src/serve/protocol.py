"""The Open Inference Protocol v2 (KServe / Triton / OpenVINO Model Server REST) bodies: parse an infer request into
the model's input tensor, encode the answer. JSON tensors and the binary-data extension (``Inference-Header-Content-
Length``: the JSON header, then each binary tensor's raw little-endian bytes in input order), which tritonclient uses by
default. Every malformed request is a :class:`BadRequest` with one message saying what is wrong.
"""
from __future__ import annotations

import itertools
import json
import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

HEADER_LENGTH = "inference-header-content-length"
DATATYPE = "FP32"  # every medq graph takes and returns float32
# what a client may send instead, as little-endian numpy types: FP16 converts exactly; FP64 is rounded to the nearest
# float32, as every JSON number is (the model computes in float32); UINT8 only for a model that takes raw 0-255
# pixels (TensorSpec.raw_pixels), where a pixel value is the input itself. Integer pixels for a model that takes
# normalised floats would be silently wrong inputs: refused.
FLOAT_TYPES = {"FP32": "<f4", "FP16": "<f2", "FP64": "<f8"}
PIXEL_TYPES = {"UINT8": "u1"}


class BadRequest(ValueError):
    """The client's request is malformed; the message is the 400's."""


class UnsupportedEncoding(BadRequest):
    """A Content-Encoding the server does not undo; the message is the 415's."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # without the batch dimension
    raw_pixels: bool = False  # the model takes 0-255 pixel values (normalization 'raw'): UINT8 is exact
    # per channel, the smallest and largest value the run's preprocessing gives (medq.preprocess: pixel 0 and 255);
    # None: unchecked
    bounds: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    @property
    def datatypes(self) -> dict[str, str]:
        """v2 datatype → numpy type of what this input accepts."""
        return FLOAT_TYPES | PIXEL_TYPES if self.raw_pixels else FLOAT_TYPES

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": DATATYPE, "shape": [-1, *self.shape]}


@dataclass
class InferRequest:
    id: str | None
    x: np.ndarray  # float32 [N, *input shape]
    binary_outputs: bool  # answer with the binary-data extension
    outputs: list[str]


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """The body a ``Content-Encoding`` of gzip or deflate (tritonclient's request compression) stands for; at most
    ``limit + 1`` bytes are inflated, so a compressed bomb is caught by the caller's size check, not by memory."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedEncoding(f"Content-Encoding {encoding!r} is not accepted; send gzip, deflate or no "
                                  "encoding")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        return inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"the body is not valid {encoding} data ({exc})") from None


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"{what} is not valid JSON ({exc})") from None
    except RecursionError:  # thousands of nested brackets: the parser's stack, not the server, gives out
        raise BadRequest(f"{what} nests deeper than a tensor's JSON does") from None
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value


def parse_infer(body: bytes, header_length: str | None, tensor: TensorSpec, output: TensorSpec,
                max_batch_size: int) -> InferRequest:
    """The request's one input tensor, checked against the model's name, datatype and shape."""
    if header_length is None:
        head, binary = _json(body, "the request body"), b""
    else:
        try:
            size = int(header_length)
        except ValueError:
            raise BadRequest(f"Inference-Header-Content-Length {header_length!r} is not a number") from None
        if not 0 < size <= len(body):
            raise BadRequest(f"Inference-Header-Content-Length {size} is outside the body's {len(body)} bytes")
        # a view, not a copy: the tensor is read in place from the request's bytes
        head, binary = _json(body[:size], "the request's JSON header"), memoryview(body)[size:]
    inputs = head.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest(f"'inputs' must be a list holding one tensor, {tensor.name!r}")
    item = inputs[0]
    if item.get("name") != tensor.name:
        raise BadRequest(f"input {item.get('name')!r}: this model's input is {tensor.name!r}")
    datatype = item.get("datatype")
    if datatype not in tensor.datatypes:
        raise BadRequest(f"input {tensor.name!r}: datatype {datatype!r}, expected {DATATYPE} (also accepted: "
                         f"{', '.join(d for d in tensor.datatypes if d != DATATYPE)}): the model takes float32 "
                         "images preprocessed as GET /v2/models/{name} describes")
    dtype = np.dtype(tensor.datatypes[datatype])
    shape = item.get("shape")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
        raise BadRequest(f"input {tensor.name!r}: 'shape' must be a list of integers")
    if len(shape) != 1 + len(tensor.shape) or tuple(shape[1:]) != tensor.shape or shape[0] < 1:
        raise BadRequest(f"input {tensor.name!r}: shape {shape}, expected [N, {', '.join(map(str, tensor.shape))}] "
                         f"with N ≥ 1")
    if shape[0] > max_batch_size:
        raise BadRequest(f"input {tensor.name!r}: {shape[0]} images in one request, above serve.max_batch_size "
                         f"{max_batch_size}; split the request")
    count = math.prod(shape)
    parameters = item.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest(f"input {tensor.name!r}: 'parameters' must be an object")
    _refuse_shared_memory(parameters, f"input {tensor.name!r}")
    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if size != count * dtype.itemsize or size != len(binary):
            raise BadRequest(f"input {tensor.name!r}: binary_data_size {size} with {len(binary)} binary bytes "
                             f"in the body; shape {shape} of {datatype} needs {count * dtype.itemsize}")
        with np.errstate(over="ignore"):  # an FP64 value beyond float32's range becomes inf: refused below
            x = np.frombuffer(binary, dtype=dtype).reshape(shape).astype(np.float32, copy=False)  # FP32: a view
    else:
        if binary:
            raise BadRequest(f"input {tensor.name!r}: the body carries binary data but the input has no "
                             "binary_data_size parameter")
        if item.get("data") is None:
            raise BadRequest(f"input {tensor.name!r}: no 'data' and no binary_data_size")
        x = _json_data(item["data"], tensor.name, datatype, dtype, shape)
    if not np.isfinite(x).all():
        raise BadRequest(f"input {tensor.name!r}: holds NaN or infinite values")
    _check_range(x, tensor)
    return InferRequest(_request_id(head), np.ascontiguousarray(x),
                        *_requested_outputs(head, output))


def _check_range(x: np.ndarray, tensor: TensorSpec) -> None:
    """Refuse values the run's preprocessing can never give: 0-255 pixels sent to a model that takes them divided by
    255 (the classic integration slip) would be answered for another, washed-out image. A margin of 0.1 % of each
    channel's range allows a client's own float rounding."""
    if tensor.bounds is None:
        return
    low, high = (np.asarray(b, np.float32) for b in tensor.bounds)
    margin = 1e-3 * (high - low)
    # rows of [W × C] reduced down the rows first (vectorised), then per channel: 50x faster than min over [-1, C]
    rows = x.reshape(-1, x.shape[-2] * x.shape[-1])
    seen_low = rows.min(axis=0).reshape(-1, x.shape[-1]).min(axis=0)
    seen_high = rows.max(axis=0).reshape(-1, x.shape[-1]).max(axis=0)
    if (seen_low < low - margin).any() or (seen_high > high + margin).any():
        span = ", ".join(f"[{lo:.4g}, {hi:.4g}]" for lo, hi in zip(low, high))
        raise BadRequest(f"input {tensor.name!r}: values from {seen_low.min():.4g} to {seen_high.max():.4g}, outside "
                         f"what the run's preprocessing gives (per channel {span}); send images preprocessed as "
                         "GET /v2/models/{name} parameters.preprocessing describes (e.g. 8-bit pixels / 255 for "
                         "'unit')")


def _json_data(data: Any, name: str, datatype: str, dtype: np.dtype, shape: list[int]) -> np.ndarray:
    """The JSON 'data' of an input: numbers only (no strings, no booleans, which numpy would convert), flat or nested
    exactly as 'shape' says (a nested array of another shape is a mix-up of dimensions, not a tensor to reshape), and
    for an integer datatype whole numbers in its range."""
    try:
        values = np.asarray(data)
    except ValueError:  # ragged nesting
        values = None
    if values is None or values.dtype.kind not in "iuf":
        raise BadRequest(f"input {name!r}: 'data' must hold numbers only, as a flat list or nested as the shape "
                         f"{shape}")
    if _holds_boolean(data, values.ndim):  # numpy reads a true among numbers as 1.0: a wrong pixel, not an error
        raise BadRequest(f"input {name!r}: 'data' holds a boolean (true/false) among its numbers; send numbers only")
    count = math.prod(shape)
    if values.ndim > 1 and list(values.shape) != shape:
        raise BadRequest(f"input {name!r}: nested 'data' of shape {list(values.shape)}, but 'shape' is {shape}; "
                         "send the data flat (row-major) or nested as the shape")
    if values.size != count:
        raise BadRequest(f"input {name!r}: 'data' holds {values.size} values, shape {shape} needs {count}")
    if dtype.kind in "iu":
        limits = np.iinfo(dtype)
        if values.dtype.kind == "f" or values.min() < limits.min or values.max() > limits.max:
            raise BadRequest(f"input {name!r}: {datatype} data must be whole numbers from {limits.min} to "
                             f"{limits.max}")
    with np.errstate(over="ignore"):  # beyond float32's range: inf, refused by the caller
        return values.reshape(shape).astype(np.float32)


def _holds_boolean(data: Any, depth: int) -> bool:
    """Whether JSON ``data`` nested ``depth`` lists deep holds a true or false (one pass at C speed: a type set)."""
    flat = data if depth else [data]
    for _ in range(depth - 1):
        flat = itertools.chain.from_iterable(flat)
    return bool in set(map(type, flat))


def _request_id(head: dict[str, Any]) -> str | None:
    value = head.get("id")
    if value is not None and not isinstance(value, str):
        raise BadRequest("'id' must be a string")
    return value


def _requested_outputs(head: dict[str, Any], output: TensorSpec) -> tuple[bool, list[str]]:
    parameters = head.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest("'parameters' must be an object")
    binary = parameters.get("binary_data_output") is True
    outputs = head.get("outputs")
    if not outputs:  # absent or empty: every output, as Triton answers
        return binary, [output.name]
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise BadRequest("'outputs' must be a list of objects")
    names = []
    for o in outputs:
        if o.get("name") != output.name:
            raise BadRequest(f"output {o.get('name')!r}: this model's output is {output.name!r}")
        names.append(output.name)
        asked = o.get("parameters") or {}
        if not isinstance(asked, dict):
            raise BadRequest(f"output {output.name!r}: 'parameters' must be an object")
        _refuse_shared_memory(asked, f"output {output.name!r}")
        if asked.get("classification"):  # Triton's classification extension: labels instead of the tensor
            raise BadRequest(f"output {output.name!r}: the classification extension is not offered; ask for the "
                             "probabilities (no 'classification' parameter), the classes are in GET "
                             "/v2/models/{name}")
        binary = binary or asked.get("binary_data") is True
    return binary, names


def _refuse_shared_memory(parameters: dict[str, Any], what: str) -> None:
    """Triton's shared-memory extension is not offered: an output the client would read from its region, which this
    server never writes, would be the region's old contents."""
    if "shared_memory_region" in parameters:
        raise BadRequest(f"{what}: the shared-memory extension is not offered (GET /v2 lists the extensions); send "
                         "the tensor in the body and read the answer from it")


def encode_infer(model: str, version: str, request: InferRequest, y: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """(body, extra headers) of the answer; binary outputs go after the JSON header as raw float32."""
    y = np.ascontiguousarray(y, dtype="<f4")
    out: dict[str, Any] = {"name": request.outputs[0], "datatype": DATATYPE, "shape": list(y.shape)}
    head: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": [out]}
    if request.id is not None:
        head["id"] = request.id
    if not request.binary_outputs:
        out["data"] = y.ravel().tolist()
        return json.dumps(head).encode(), {"content-type": "application/json"}
    raw = y.tobytes()
    out["parameters"] = {"binary_data_size": len(raw)}
    header = json.dumps(head).encode()
    return header + raw, {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
