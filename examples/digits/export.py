"""The trained numpy model as ONNX (opset 17) with explicit inference-mode BatchNormalization nodes, and back.

Graph (node names)::

    pixels ─ Mul scale (×1/16) ─ Conv conv1 ─ BatchNormalization bn1 ─ Relu relu1
           ─ Conv conv2 (stride 2) ─ BatchNormalization bn2 ─ Relu relu2 ─ Flatten flatten
           ─ Gemm fc1 (transB=1) ─ BatchNormalization bn3 ─ Relu relu3 ─ Gemm fc2 (transB=1) ─ logits

This is the "before" model: ``bnfold convert`` folds bn1/bn2/bn3 into conv1/conv2/fc1.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from converter.reference import BatchNormParams
from examples.digits.model import BATCHNORMS, CLASSES, CONV1_STRIDE, CONV2_STRIDE, KERNEL, PAD, PIXEL_SCALE, Params

OPSET = 17
IR_VERSION = 8
INPUT, OUTPUT = "pixels", "logits"
LABELS = [str(d) for d in range(CLASSES)]


def _init(name: str, value: NDArray[np.floating]) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _bn_node(name: str, x: str, y: str, bn: BatchNormParams) -> tuple[onnx.NodeProto, list[TensorProto]]:
    names = [f"{name}.{part}" for part in ("scale", "bias", "mean", "var")]
    inits = [_init(n, v) for n, v in zip(names, (bn.gamma, bn.beta, bn.running_mean, bn.running_var), strict=True)]
    node = helper.make_node(
        "BatchNormalization", [x, *names], [y], name=name, epsilon=bn.eps, momentum=bn.momentum, training_mode=0
    )
    return node, inits


def _conv_node(name: str, x: str, y: str, stride: int) -> onnx.NodeProto:
    return helper.make_node(
        "Conv",
        [x, f"{name}.weight"],
        [y],
        name=name,
        kernel_shape=[KERNEL, KERNEL],
        pads=[PAD] * 4,
        strides=[stride, stride],
    )


def to_onnx(p: Params) -> onnx.ModelProto:
    """Build the model with onnx.helper; parameters are stored as float32."""
    inits = [
        _init("scale.factor", np.array(PIXEL_SCALE)),
        _init("conv1.weight", p.conv1),
        _init("conv2.weight", p.conv2),
        _init("fc1.weight", p.fc1),
        _init("fc2.weight", p.fc2),
        _init("fc2.bias", p.fc2_bias),
    ]
    nodes = [
        helper.make_node("Mul", [INPUT, "scale.factor"], ["scaled"], name="scale"),
        _conv_node("conv1", "scaled", "conv1.out", CONV1_STRIDE),
    ]
    bn, extra = _bn_node("bn1", "conv1.out", "bn1.out", p.bn1)
    nodes += [bn, helper.make_node("Relu", ["bn1.out"], ["relu1.out"], name="relu1")]
    inits += extra
    nodes.append(_conv_node("conv2", "relu1.out", "conv2.out", CONV2_STRIDE))
    bn, extra = _bn_node("bn2", "conv2.out", "bn2.out", p.bn2)
    nodes += [bn, helper.make_node("Relu", ["bn2.out"], ["relu2.out"], name="relu2")]
    inits += extra
    nodes += [
        helper.make_node("Flatten", ["relu2.out"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc1.weight"], ["fc1.out"], name="fc1", transB=1),
    ]
    bn, extra = _bn_node("bn3", "fc1.out", "bn3.out", p.bn3)
    nodes += [bn, helper.make_node("Relu", ["bn3.out"], ["relu3.out"], name="relu3")]
    inits += extra
    nodes.append(helper.make_node("Gemm", ["relu3.out", "fc2.weight", "fc2.bias"], [OUTPUT], name="fc2", transB=1))
    graph = helper.make_graph(
        nodes,
        "digits",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=inits,
        doc_string="8x8 digits (sklearn load_digits) classifier; input: raw pixel values 0..16; output: logits",
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="bnfold examples.digits",
        ir_version=IR_VERSION,
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def from_onnx(model: onnx.ModelProto) -> Params:
    """The numpy parameters (float32 values widened to float64) back from a model written by :func:`to_onnx`."""
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    bns = {}
    for name in BATCHNORMS:
        attrs = {a.name: helper.get_attribute_value(a) for a in nodes[name].attribute}
        bns[name] = BatchNormParams(
            gamma=inits[f"{name}.scale"],
            beta=inits[f"{name}.bias"],
            running_mean=inits[f"{name}.mean"],
            running_var=inits[f"{name}.var"],
            eps=float(attrs.get("epsilon", 1e-5)),
            momentum=float(attrs.get("momentum", 0.9)),
        )
    return Params(
        conv1=inits["conv1.weight"],
        bn1=bns["bn1"],
        conv2=inits["conv2.weight"],
        bn2=bns["bn2"],
        fc1=inits["fc1.weight"],
        bn3=bns["bn3"],
        fc2=inits["fc2.weight"],
        fc2_bias=inits["fc2.bias"],
    )


def run_onnx(model: onnx.ModelProto | str | os.PathLike[str], pixels: NDArray[np.floating]) -> NDArray[np.float32]:
    """Logits from ONNX Runtime on the CPU with graph optimisations off (ORT would fuse Conv+BN itself)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else os.fspath(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    (logits,) = session.run([OUTPUT], {INPUT: np.asarray(pixels, dtype=np.float32)})
    return np.asarray(logits, dtype=np.float32)


def correct(logits: NDArray[np.floating], labels: Sequence[int] | NDArray[np.integer]) -> int:
    """How many rows' argmax equals the label."""
    return int((np.argmax(logits, axis=1) == np.asarray(labels)).sum())
