"""The output head: medq graphs return probabilities, so a model that ends in logits gets an activation appended.

What the source model ends with (found in its ONNX graph) and the task decide the steps:

| model ends in | outputs | task (None = inferred)        | appended                         |
|---------------|---------|-------------------------------|----------------------------------|
| Sigmoid       | N ≥ 2   | multilabel                    | nothing                          |
| Sigmoid       | 1       | binary                        | two-column: [1 - p, p]           |
| Softmax       | N ≥ 2   | binary (N = 2) / multiclass   | nothing                          |
| LogSoftmax    | N ≥ 2   | binary (N = 2) / multiclass   | exp                              |
| logits        | N ≥ 2   | binary/multiclass (required)  | softmax                          |
| logits        | N ≥ 2   | multilabel (required)         | sigmoid                          |
| logits        | 1       | binary                        | sigmoid, two-column              |
| probabilities (declared) | N ≥ 2 | any (required)           | nothing                          |
| probabilities (declared) | 1   | binary                        | two-column                       |

A graph that ends in none of the activations may still end in probabilities: a softmax written out (Exp / ReduceSum),
a sigmoid then a Clip, a softmax then a Slice of one column. A second activation on top of those is a silently wrong
model (answers squeezed towards the middle, the class ranking changed), so ``check_outputs`` refuses such outputs
unless the user declares what they are (``model_output``: ``logits`` or ``probabilities``).

Binary is two one-hot columns everywhere in medq, hence the two-column step for single-output models.
The same steps exist three times: as ONNX nodes (``append_head``, in ``model.onnx``), as TensorFlow ops
(``tf_head``, added when freezing, so the SavedModel keeps the network's own outputs and the parity check can compare
logits) and in numpy (``apply_head``, the reference side of the parity check). They are recorded in the manifest.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from medq.errors import MedqError

TASKS = ("binary", "multiclass", "multilabel")
MODEL_OUTPUTS = ("logits", "probabilities")  # what a user may declare the model's outputs to be
# ONNX ops that end a network in probabilities, and ops that may sit between them and the graph output.
_ENDINGS = {"Sigmoid": "sigmoid", "Softmax": "softmax", "LogSoftmax": "log-softmax"}
_PASS_THROUGH = {"Identity", "Flatten", "Reshape", "Squeeze", "Cast"}


@dataclass(frozen=True)
class HeadPlan:
    model_ends_in: str  # 'sigmoid' | 'softmax' | 'log-softmax' | 'logits' | 'probabilities' (declared)
    task: str
    appended: tuple[str, ...]  # steps from: 'exp', 'softmax', 'sigmoid', 'two-column'
    num_classes: int


def model_ending(model, where: str | Path = "model") -> str:
    """Walk back from the graph output through shape-only ops to the op that makes it. A softmax over the batch axis
    (axis 0) is refused: each image's answer would depend on the others in its batch (1.0 for a lone image)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    name = model.graph.output[0].name
    while name in producers:
        node = producers[name]
        if node.op_type in _ENDINGS:
            axis = next((a.i for a in node.attribute if a.name == "axis"), None)
            if node.op_type != "Sigmoid" and axis == 0:
                raise MedqError(f"{where}: the model ends in a {node.op_type} over axis 0, the batch: each image's "
                                "probabilities would depend on the other images of its batch; export it with the "
                                "softmax over the classes (dim=1)")
            return _ENDINGS[node.op_type]
        if node.op_type not in _PASS_THROUGH or not node.input:
            break
        name = node.input[0]
    return "logits"


def plan_head(model_ends_in: str, num_outputs: int, task: str | None, where: str | Path,
              declared: str | None = None) -> HeadPlan:
    """``declared``: what the user says the outputs are (``model_output``), None to go by the graph."""
    if task is not None and task not in TASKS:
        raise MedqError(f"{where}: unknown task {task!r}; use one of {', '.join(TASKS)}")
    if declared is not None and declared not in MODEL_OUTPUTS:
        raise MedqError(f"{where}: unknown model output {declared!r}; use one of {', '.join(MODEL_OUTPUTS)}")
    if declared == "logits" and model_ends_in != "logits":
        raise MedqError(f"{where}: the model's graph ends in {model_ends_in}, so its outputs are not logits; drop "
                        "--model-output logits")
    if declared == "probabilities" and model_ends_in == "logits":
        model_ends_in = "probabilities"

    def wrong(why: str) -> MedqError:
        return MedqError(f"{where}: the model has {num_outputs} output(s) ending in {model_ends_in}; {why}")

    if model_ends_in == "probabilities":
        if num_outputs == 1:
            if task not in (None, "binary"):
                raise wrong(f"one output is a binary classifier, not {task}: pass --task binary")
            return HeadPlan(model_ends_in, "binary", ("two-column",), 2)
        if task is None:
            raise wrong("pass --task: binary or multiclass if they sum to 1 per image, else multilabel")
        if task == "binary" and num_outputs != 2:
            raise wrong("binary means 2 classes: pass --task multiclass or --task multilabel")
        return HeadPlan(model_ends_in, task, (), num_outputs)

    if num_outputs == 1:
        if task not in (None, "binary"):
            raise wrong(f"one output is a binary classifier, not {task}: pass --task binary")
        if model_ends_in in ("softmax", "log-softmax"):
            raise wrong("a softmax over one value is always 1; export the logits instead")
        steps = () if model_ends_in == "sigmoid" else ("sigmoid",)
        return HeadPlan(model_ends_in, "binary", steps + ("two-column",), 2)
    if model_ends_in == "sigmoid":
        if task not in (None, "multilabel"):
            raise wrong(f"that is multi-label, and {task} needs a softmax: pass --task multilabel, or export the "
                        "logits")
        return HeadPlan(model_ends_in, "multilabel", (), num_outputs)
    if task is None:
        if model_ends_in == "logits":
            raise wrong("pass --task: binary or multiclass appends a softmax, multilabel a sigmoid")
        task = "binary" if num_outputs == 2 else "multiclass"
    if task == "binary" and num_outputs != 2:
        raise wrong("binary means 2 classes: pass --task multiclass or --task multilabel")
    if model_ends_in in ("softmax", "log-softmax"):
        if task == "multilabel":
            raise wrong("that is single-label: pass --task multiclass (or binary)")
        return HeadPlan(model_ends_in, task, ("exp",) if model_ends_in == "log-softmax" else (), num_outputs)
    return HeadPlan(model_ends_in, task, ("sigmoid",) if task == "multilabel" else ("softmax",), num_outputs)


def check_outputs(plan: HeadPlan, y: np.ndarray, where: str | Path) -> None:
    """Refuse outputs that look like probabilities when the plan appends an activation to them.

    ``y``: the source's own outputs on the probe images. Logits of a real network spread beyond [0, 1] on phantoms
    and noise; outputs that all stay inside are taken for probabilities (a false alarm costs the user one flag).
    """
    activation = next((s for s in plan.appended if s in ("sigmoid", "softmax")), None)
    if plan.model_ends_in != "logits" or activation is None:
        return
    y = np.asarray(y, dtype=np.float64)
    if not (np.isfinite(y).all() and y.min() >= 0.0 and y.max() <= 1.0):
        return
    sums = " and sum to 1 per image" if y.shape[1] > 1 and np.allclose(y.sum(axis=1), 1.0, atol=1e-3) else ""
    raise MedqError(f"{where}: the model's outputs on {len(y)} probe images all lie in [0, 1]{sums}, yet its graph "
                    f"does not end in Sigmoid or Softmax: they look like probabilities already, and a {activation} on "
                    "top would silently squeeze every answer; pass --model-output probabilities to keep them as they "
                    "are, or --model-output logits if they really are logits")


def apply_head(plan: HeadPlan, y: np.ndarray) -> np.ndarray:
    y = np.asarray(y, dtype=np.float32)
    for step in plan.appended:
        if step == "exp":
            y = np.exp(y)
        elif step == "sigmoid":
            y = 0.5 * (1.0 + np.tanh(0.5 * y))  # the logistic function, without overflow for large |y|
        elif step == "softmax":
            e = np.exp(y - y.max(axis=1, keepdims=True))
            y = e / e.sum(axis=1, keepdims=True)
        elif step == "two-column":
            y = np.concatenate([1.0 - y, y], axis=1)
    return y.astype(np.float32)


def tf_head(plan: HeadPlan) -> Callable:
    """The plan's steps as TensorFlow ops, ``y → probabilities``."""
    import tensorflow as tf

    ops = {"exp": tf.exp, "sigmoid": tf.sigmoid, "softmax": lambda y: tf.nn.softmax(y, axis=-1),
           "two-column": lambda y: tf.concat([1.0 - y, y], axis=1)}

    def apply(y):
        for step in plan.appended:
            y = ops[step](y)
        return y

    return apply


def append_head(model, plan: HeadPlan, output_name: str = "output"):
    """A copy of ``model`` with the plan's steps as ONNX nodes after the graph output (renamed ``<output>_model``)."""
    import onnx
    from onnx import TensorProto, helper

    from medq.onnxio import rename_tensor

    model = onnx.ModelProto.FromString(model.SerializeToString())
    if not plan.appended:
        return model
    graph = model.graph
    current = f"{output_name}_model"
    rename_tensor(graph, output_name, current, "model.onnx")
    graph.output.pop()
    for i, step in enumerate(plan.appended):
        out = output_name if i == len(plan.appended) - 1 else f"medq_head_{i}"
        if step == "two-column":
            one = f"medq_head_{i}_one"
            graph.initializer.append(helper.make_tensor(one, TensorProto.FLOAT, [], [1.0]))
            graph.node.append(helper.make_node("Sub", [one, current], [f"{out}_neg"], name=f"medq_head_{i}_sub"))
            graph.node.append(helper.make_node("Concat", [f"{out}_neg", current], [out], axis=1,
                                               name=f"medq_head_{i}_concat"))
        else:
            op = {"exp": "Exp", "sigmoid": "Sigmoid", "softmax": "Softmax"}[step]
            attrs = {"axis": 1} if op == "Softmax" else {}
            graph.node.append(helper.make_node(op, [current], [out], name=f"medq_head_{i}_{step}", **attrs))
        current = out
    graph.output.append(helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", plan.num_classes]))
    onnx.checker.check_model(model)
    return model
