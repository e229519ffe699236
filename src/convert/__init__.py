"""Bring models in and out of medq, with the numerics proven on every conversion.

In:  a PyTorch checkpoint + architecture name, a TorchScript file, or an ONNX file
     → torch.onnx.export (dynamic batch) → onnx2tf (NHWC SavedModel) → frozen ``model_fp32.pb`` + ``model.onnx``,
     with the source's preprocessing, classes and task in the run's manifest, so ``medq quantize`` / ``benchmark`` /
     ``predict`` run on it like on any medq model.
Out: a medq run's frozen graph or Keras model → ``model_fp32.onnx`` (tf2onnx).
Both check every engine against the source on phantom radiographs and fail above the tolerance (``parity.json``).

torch/torchvision are the optional extra ``pip install -r env/requirements-convert.txt``; ONNX input and the export
direction work without them.

Security: checkpoints load with ``torch.load(weights_only=True)`` (tensors only, no code). A TorchScript file is a
program: ``torch.jit.load`` runs code stored in it, so only load TorchScript you trust, and medq requires
``trust_torchscript=True`` (``--trust-torchscript``) to do so.
"""
from medq.convert.api import CHEXNET_CLASSES, PARITY_TOLERANCE, ConvertResult, ExportResult, convert, export_onnx
from medq.convert.head import TASKS
from medq.convert.torch_models import ARCHITECTURES  # the registry; importing it does not import torch

__all__ = ["ARCHITECTURES", "CHEXNET_CLASSES", "ConvertResult", "ExportResult", "PARITY_TOLERANCE", "TASKS",
           "convert", "export_onnx"]
