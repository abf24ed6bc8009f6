"""A corpus of odd exports, built in code: models made the ways real-world ONNX files are made, each small.

Each :class:`Case` writes one ONNX file (external data beside it where the case is about that) into a folder:

* PyTorch's TorchScript exporter with ``keep_initializers_as_inputs=True`` (the default before PyTorch 1.3, still
  common) at opsets 9, 11, 13 and 17, and the dynamo exporter (``optimize=False``: BN kept, a bias-free conv gets
  a zero bias computed by Shape/Expand nodes);
* an IR 3 graph (every initializer also a graph input) whose weights come from ``Tile``/``Expand`` of small
  initializers, and an opset 9 graph (caffe2 style) whose weights and BN parameters come from
  ``ConstantOfShape``, ``Range``, ``Where``, arithmetic and ``Shape`` of a value with a static shape;
* BN parameters behind ``Constant`` nodes and ``Identity``/``Cast`` chains; nodes out of topological order (also in
  a quantized export whose int8 weights go through ``DequantizeLinear``);
  BN with the pre-opset-9 ``spatial`` attribute; weights in external data; BN inside ``If`` branches and a
  ``Loop`` body; a float16 model.

The PyTorch cases need torch (and onnxscript for dynamo); :func:`cases` leaves them out without it.
"""

from __future__ import annotations

import importlib.util
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, helper, numpy_helper

#: Every corpus output is 4-D (N, C, H, W); the dims are left symbolic.
_NCHW = ["N", "C", "H", "W"]


@dataclass(frozen=True)
class Case:
    name: str
    what: str
    build: Callable[[Path], Path]  # writes the model into the folder, returns its path
    torch: bool = False


def _save(model: ModelProto, folder: Path, name: str) -> Path:
    path = folder / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _bn_values(c: int, rng: np.random.Generator, dtype: Any = np.float32) -> list[np.ndarray]:
    """Trained-looking γ, β, μ, σ² (a wrong fold shows)."""
    return [
        rng.uniform(0.5, 1.5, c).astype(dtype),
        rng.normal(0, 0.2, c).astype(dtype),
        rng.normal(0, 0.3, c).astype(dtype),
        rng.uniform(0.5, 2.0, c).astype(dtype),
    ]


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[tuple[str, list[int]]],
    outputs: list[str],
    inits: list[TensorProto],
    opset: int,
    ir: int | None = None,
    dtype: int = TensorProto.FLOAT,
) -> ModelProto:
    graph = helper.make_graph(
        nodes,
        "corpus",
        [helper.make_tensor_value_info(n, dtype, s) for n, s in inputs],
        [helper.make_tensor_value_info(o, dtype, _NCHW) for o in outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="bnfold-corpus")
    model.ir_version = ir or min(model.ir_version, 10)
    return model


def _t(name: str, value: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


# ----------------------------------------------------------------------------------------------- PyTorch
def _torch_net() -> Any:
    import torch
    from torch import nn

    class Net(nn.Module):
        """Conv(no bias)→BN, Conv→BN, ConvTranspose→BN, Linear→BN1d: the layers a BN follows in practice."""

        def __init__(self) -> None:
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8)
            self.up, self.b3 = nn.ConvTranspose2d(8, 4, 2, stride=2), nn.BatchNorm2d(4)
            self.fc, self.b4 = nn.Linear(4 * 8 * 8, 10), nn.BatchNorm1d(10)

        def forward(self, x: Any) -> Any:
            y = torch.relu(self.b1(self.c1(x)))
            y = torch.relu(self.b2(self.c2(y)))
            y = torch.relu(self.b3(self.up(y)))
            return self.b4(self.fc(torch.flatten(y, 1)))

    torch.manual_seed(0)
    return trained(Net()), torch.randn(2, 3, 4, 4)


def trained(net: Any, bias_std: float = 0.2) -> Any:
    """Trained-looking BatchNorm statistics (a wrong fold shows), eval mode."""
    from torch import nn

    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, bias_std)
    return net.eval()


def _torch_resnet() -> Any:
    """A small ResNet (stem, three stages of two basic blocks, strided 1×1 downsample convs): 15 BatchNorms,
    residual Adds, global pooling and a Linear head, as detectors' backbones are built."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c_in: int, c_out: int, stride: int) -> None:
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
            self.c2, self.b2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
            self.down = (
                nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                if stride != 1 or c_in != c_out
                else nn.Identity()
            )

        def forward(self, x: Any) -> Any:
            y = torch.relu(self.b1(self.c1(x)))
            return torch.relu(self.b2(self.c2(y)) + self.down(x))

    class ResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
            widths = [(8, 8, 1), (8, 8, 1), (8, 16, 2), (16, 16, 1), (16, 32, 2), (32, 32, 1)]
            self.blocks = nn.Sequential(*(Block(a, b, s) for a, b, s in widths))
            self.fc = nn.Linear(32, 10)

        def forward(self, x: Any) -> Any:
            y = self.blocks(self.stem(x))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))

    torch.manual_seed(0)
    return trained(ResNet()), torch.randn(1, 3, 16, 16)


def _torch_inputs_case(opset: int, net: Callable[[], Any] = _torch_net, name: str = "") -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        import torch

        module, x = net()
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (x,),
                buf,
                opset_version=opset,
                keep_initializers_as_inputs=True,
                do_constant_folding=False,
                dynamo=False,
                input_names=["x"],
            )
        return _save(onnx.load_from_string(buf.getvalue()), folder, name or f"torch_opset{opset}_inputs")

    return build


def _torch_dynamo(folder: Path) -> Path:
    import torch

    net, x = _torch_net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.onnx.export(net, (x,), dynamo=True, optimize=False, verbose=False)
    return _save(exported.model_proto, folder, "torch_dynamo")


def _torch_unsorted(folder: Path) -> Path:
    model = onnx.load(str(_torch_inputs_case(13)(folder)))
    nodes = list(model.graph.node)
    model.graph.ClearField("node")
    model.graph.node.extend(reversed(nodes))  # paddle2onnx-style: ONNX Runtime sorts, onnx.checker refuses
    return _save(model, folder, "unsorted_nodes")


# ----------------------------------------------------------------------------------------------- hand-built
def _conv_bn(
    rng: np.random.Generator, c_in: int, c_out: int, x: str, tag: str, w: str | None = None
) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray]]:
    """Conv(pads 1) → BN reading parameters named ``{tag}_*``; values for the ones not given."""
    values = {f"{tag}_W": rng.normal(0, 0.3, (c_out, c_in, 3, 3)).astype(np.float32)}
    for role, v in zip(("scale", "B", "mean", "var"), _bn_values(c_out, rng), strict=True):
        values[f"{tag}_{role}"] = v
    nodes = [
        helper.make_node("Conv", [x, w or f"{tag}_W"], [f"{tag}_c"], name=f"{tag}_conv", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization",
            [f"{tag}_c", f"{tag}_scale", f"{tag}_B", f"{tag}_mean", f"{tag}_var"],
            [f"{tag}_y"],
            name=f"{tag}_bn",
        ),
    ]
    return nodes, values


def _ir3_tile_expand(folder: Path) -> Path:
    """IR 3, opset 8: every initializer also an input; the conv weights are Tile/Expand of small initializers,
    the BN scale an Expand of a scalar."""
    rng = _rng(1)
    n1, v1 = _conv_bn(rng, 3, 4, "x", "a", w="a_Wt")
    n2, v2 = _conv_bn(rng, 4, 4, "a_y", "b", w="b_We")
    pattern = rng.normal(0, 0.3, (1, 3, 3, 3)).astype(np.float32)
    row = rng.normal(0, 0.3, (1, 1, 1, 3)).astype(np.float32)
    inits = {"a_pat": pattern, "a_reps": np.array([4, 1, 1, 1], np.int64), "b_row": row}
    inits["b_shape"] = np.array([4, 4, 3, 3], np.int64)
    inits["a_gamma"] = np.array([1.25], np.float32)
    inits["a_C"] = np.array([4], np.int64)
    v1.pop("a_W"), v2.pop("b_W"), v1.pop("a_scale")
    nodes = [
        helper.make_node("Tile", ["a_pat", "a_reps"], ["a_Wt"], name="a_tile"),
        helper.make_node("Expand", ["b_row", "b_shape"], ["b_We"], name="b_expand"),
        helper.make_node("Expand", ["a_gamma", "a_C"], ["a_scale"], name="a_gamma_expand"),
        *n1,
        helper.make_node("Relu", ["a_y"], ["a_r"]),
        *n2,
    ]
    nodes[6].input[0] = "a_r"
    tensors = [_t(k, v) for k, v in {**inits, **v1, **v2}.items()]
    model = _model(nodes, [("x", [1, 3, 8, 8])], ["b_y"], tensors, opset=8, ir=3)
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in tensors)
    return _save(model, folder, "ir3_tile_expand")


def _caffe2_constant_of_shape(folder: Path) -> Path:
    """Opset 9 (caffe2 style): bias from ConstantOfShape, BN mean from Range arithmetic, var from Where, the
    scale from ConstantOfShape(Gather(Shape(activation))) where the activation's shape is static."""
    rng = _rng(2)
    nodes, v = _conv_bn(rng, 3, 6, "x", "c")
    nodes[0].input.append("c_bias")
    v.pop("c_mean"), v.pop("c_var"), v.pop("c_scale")
    const = helper.make_tensor("fill", TensorProto.FLOAT, [1], [0.05])
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.1])
    extra = [
        helper.make_node("ConstantOfShape", ["c_C"], ["c_bias"], name="bias_fill", value=const),
        helper.make_node("Cast", ["c_range_i"], ["c_range"], name="range_cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["c_range", "c_step"], ["c_mean"], name="mean_mul"),
        helper.make_node("Greater", ["c_vraw", "c_zero"], ["c_pos"], name="var_positive"),
        helper.make_node("Where", ["c_pos", "c_vraw", "c_floor"], ["c_var"], name="var_where"),
    ]
    after_conv = [
        helper.make_node("Shape", ["c_c"], ["c_shape"], name="act_shape"),
        helper.make_node("Gather", ["c_shape", "c_axis"], ["c_channels"], name="act_channels", axis=0),
        helper.make_node("ConstantOfShape", ["c_channels"], ["c_scale"], name="scale_fill", value=one),
    ]
    # Range is opset 11: the caffe2-era graph carries the range as an initializer of int64 steps instead
    inits = {
        "c_C": np.array([6], np.int64),
        "c_range_i": np.arange(6, dtype=np.int64) - 3,
        "c_step": np.array([0.1], np.float32),
        "c_vraw": np.array([0.8, -1.0, 1.5, 0.6, -0.2, 1.9], np.float32),
        "c_zero": np.array([0.0], np.float32),
        "c_floor": np.array([0.5], np.float32),
        "c_axis": np.array([1], np.int64),
    }
    tensors = [_t(k, x) for k, x in {**v, **inits}.items()]
    model = _model([*extra, nodes[0], *after_conv, nodes[1]], [("x", [1, 3, 8, 8])], ["c_y"], tensors, opset=9)
    return _save(model, folder, "caffe2_constant_of_shape")


def _opset11_range_tile(folder: Path) -> Path:
    """Opset 11: a Conv weight from Reshape(Range)·scale and a BN mean from Tile, a Linear from MatMul+Add
    whose BN1d var is Expand(Sqrt(...)) arithmetic."""
    rng = _rng(3)
    nodes, v = _conv_bn(rng, 2, 4, "x", "r", w="r_Wr")
    v.pop("r_W"), v.pop("r_mean")
    half = helper.make_tensor("h", TensorProto.FLOAT, [], [0.5])
    extra = [
        helper.make_node("Range", ["r_start", "r_limit", "r_delta"], ["r_seq"], name="w_range"),
        helper.make_node("Reshape", ["r_seq", "r_wshape"], ["r_W0"], name="w_reshape"),
        helper.make_node("Sin", ["r_W0"], ["r_Wr"], name="w_sin"),
        helper.make_node("Tile", ["r_mpat", "r_mreps"], ["r_mean"], name="mean_tile"),
        helper.make_node("Constant", [], ["r_half"], name="half", value=half),
    ]
    inits = {
        "r_start": np.array(0.0, np.float32),
        "r_limit": np.array(72.0, np.float32),
        "r_delta": np.array(1.0, np.float32),
        "r_wshape": np.array([4, 2, 3, 3], np.int64),
        "r_mpat": np.array([0.1, -0.2], np.float32),
        "r_mreps": np.array([2], np.int64),
    }
    tensors = [_t(k, x) for k, x in {**v, **inits}.items()]
    model = _model([*extra, *nodes], [("x", [1, 2, 6, 6])], ["r_y"], tensors, opset=11)
    return _save(model, folder, "opset11_range_tile")


def _constant_identity_cast(folder: Path) -> Path:
    """BN parameters in float64 Constant nodes → Cast(float) → Identity; the weight a Constant → Identity."""
    rng = _rng(4)
    nodes, v = _conv_bn(rng, 3, 5, "x", "k", w="k_W_id")
    front = [
        helper.make_node("Constant", [], ["k_W_const"], name="w_const", value=_t("w", v.pop("k_W"))),
        helper.make_node("Identity", ["k_W_const"], ["k_W_id"], name="w_identity"),
    ]
    for role in ("scale", "B", "mean", "var"):
        name = f"k_{role}"
        front += [
            helper.make_node("Constant", [], [f"{name}_64"], value=_t(role, v.pop(name).astype(np.float64))),
            helper.make_node("Cast", [f"{name}_64"], [f"{name}_32"], to=TensorProto.FLOAT),
            helper.make_node("Identity", [f"{name}_32"], [name]),
        ]
    model = _model([*front, *nodes], [("x", [1, 3, 6, 6])], ["k_y"], [], opset=13)
    return _save(model, folder, "constant_identity_cast")


def _quantized_unsorted(folder: Path) -> Path:
    """paddle2onnx-style quantized export: int8 weights through DequantizeLinear, nodes out of order."""
    rng = _rng(10)
    nodes, v = _conv_bn(rng, 3, 6, "x", "q", w="q_Wdq")
    w = v.pop("q_W")
    scale = np.abs(w).max(axis=(1, 2, 3)) / 127
    v["q_W8"] = np.clip(np.round(w / scale[:, None, None, None]), -127, 127).astype(np.int8)
    v["q_Ws"], v["q_Wz"] = scale.astype(np.float32), np.zeros(6, np.int8)
    dq = helper.make_node("DequantizeLinear", ["q_W8", "q_Ws", "q_Wz"], ["q_Wdq"], name="w_dequantize", axis=0)
    relu = helper.make_node("Relu", ["q_y"], ["q_r"], name="relu")
    tensors = [_t(k, x) for k, x in v.items()]
    model = _model([relu, nodes[1], nodes[0], dq], [("x", [1, 3, 6, 6])], ["q_r"], tensors, opset=13)
    return _save(model, folder, "quantized_unsorted")


def _spatial_opset7(folder: Path) -> Path:
    """Opset 7 (IR 3) BatchNormalization with the ``spatial=1`` attribute that opset 9 removed."""
    rng = _rng(5)
    nodes, v = _conv_bn(rng, 3, 4, "x", "s")
    nodes[1].attribute.append(helper.make_attribute("spatial", 1))
    tensors = [_t(k, x) for k, x in v.items()]
    model = _model(nodes, [("x", [1, 3, 6, 6])], ["s_y"], tensors, opset=7, ir=3)
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in tensors)
    return _save(model, folder, "spatial_opset7")


def _external_data(folder: Path) -> Path:
    """Two Conv→BN blocks whose tensors all live in a side file."""
    rng = _rng(6)
    n1, v1 = _conv_bn(rng, 3, 8, "x", "e1")
    n2, v2 = _conv_bn(rng, 8, 8, "e1_y", "e2")
    tensors = [_t(k, x) for k, x in {**v1, **v2}.items()]
    model = _model([*n1, *n2], [("x", [1, 3, 6, 6])], ["e2_y"], tensors, opset=13)
    path = folder / "external_data.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="external_data.onnx.data", size_threshold=0)
    return path


def _body(nodes: list[onnx.NodeProto], name: str, out: str, inits: list[TensorProto], inputs: Any = ()) -> Any:
    return helper.make_graph(
        nodes, name, list(inputs), [helper.make_tensor_value_info(out, TensorProto.FLOAT, _NCHW)], inits
    )


def _if_branches(folder: Path) -> Path:
    """If(cond) with Conv→BN in each branch: the then-branch weight lives in the outer graph."""
    rng = _rng(7)
    nt, vt = _conv_bn(rng, 3, 4, "x", "t")
    ne, ve = _conv_bn(rng, 3, 4, "x", "e")
    then = _body(nt, "then", "t_y", [_t(k, x) for k, x in vt.items() if k != "t_W"])
    other = _body(ne, "else", "e_y", [_t(k, x) for k, x in ve.items()])
    node = helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then, else_branch=other)
    model = _model([node], [("x", [1, 3, 6, 6])], ["y"], [_t("t_W", vt["t_W"])], opset=13)
    model.graph.input.insert(0, helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    return _save(model, folder, "if_branches")


def _loop_body(folder: Path) -> Path:
    """Loop (2 iterations) whose body runs Conv→BN→Relu on the carried tensor."""
    rng = _rng(8)
    nb, vb = _conv_bn(rng, 3, 3, "h_in", "l")
    inputs = [
        helper.make_tensor_value_info("iter", TensorProto.INT64, []),
        helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
        helper.make_tensor_value_info("h_in", TensorProto.FLOAT, _NCHW),
    ]
    body_nodes = [
        *nb,
        helper.make_node("Relu", ["l_y"], ["h_out"]),
        helper.make_node("Identity", ["cond_in"], ["cond_out"]),
    ]
    body = helper.make_graph(
        body_nodes,
        "body",
        inputs,
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, _NCHW),
        ],
        [_t(k, x) for k, x in vb.items()],
    )
    loop = helper.make_node("Loop", ["trips", "keep_going", "x"], ["y"], name="loop", body=body)
    inits = [_t("trips", np.array(2, np.int64)), _t("keep_going", np.array(True))]
    model = _model([loop], [("x", [1, 3, 6, 6])], ["y"], inits, opset=13)
    return _save(model, folder, "loop_body")


def _fp16(folder: Path) -> Path:
    """A float16 model (inputs, weights, outputs): Conv→BN→Relu→Conv→BN."""
    rng = _rng(9)
    n1, v1 = _conv_bn(rng, 3, 8, "x", "h1")
    n2, v2 = _conv_bn(rng, 8, 4, "h1_r", "h2")
    nodes = [*n1, helper.make_node("Relu", ["h1_y"], ["h1_r"]), *n2]
    tensors = [_t(k, x.astype(np.float16)) for k, x in {**v1, **v2}.items()]
    model = _model(nodes, [("x", [1, 3, 6, 6])], ["h2_y"], tensors, opset=13, dtype=TensorProto.FLOAT16)
    return _save(model, folder, "fp16")


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


CASES: tuple[Case, ...] = (
    *(
        Case(f"torch_opset{v}_inputs", f"torch.onnx.export opset {v}, keep_initializers_as_inputs", b, True)
        for v, b in ((v, _torch_inputs_case(v)) for v in (9, 11, 13, 17))
    ),
    Case(
        "torch_resnet_opset9_inputs",
        "15-BN ResNet, opset 9, keep_initializers_as_inputs",
        _torch_inputs_case(9, _torch_resnet, "torch_resnet_opset9_inputs"),
        True,
    ),
    Case("torch_dynamo", "torch.onnx.export(dynamo=True, optimize=False)", _torch_dynamo, True),
    Case("unsorted_nodes", "opset 13 export, nodes in reverse order", _torch_unsorted, True),
    Case("ir3_tile_expand", "IR 3: weights from Tile/Expand, initializers as inputs", _ir3_tile_expand),
    Case("caffe2_constant_of_shape", "ConstantOfShape/Where/Shape-of-static params", _caffe2_constant_of_shape),
    Case("opset11_range_tile", "weight from Range/Reshape/Sin, mean from Tile", _opset11_range_tile),
    Case("constant_identity_cast", "Constant nodes → Cast → Identity params", _constant_identity_cast),
    Case("quantized_unsorted", "int8 weight via DequantizeLinear, unsorted", _quantized_unsorted),
    Case("spatial_opset7", "opset 7 BN with spatial=1", _spatial_opset7),
    Case("external_data", "weights in external data", _external_data),
    Case("if_branches", "Conv→BN inside If branches", _if_branches),
    Case("loop_body", "Conv→BN inside a Loop body", _loop_body),
    Case("fp16", "float16 model", _fp16),
)


def cases() -> list[Case]:
    """The corpus cases this environment can build (the PyTorch ones need torch; dynamo needs onnxscript)."""
    torch_ok = _have("torch")
    return [c for c in CASES if not c.torch or (torch_ok and (c.name != "torch_dynamo" or _have("onnxscript")))]


def build(folder: Path) -> dict[str, Path]:
    """Write every available case into ``folder``: name → path."""
    folder.mkdir(parents=True, exist_ok=True)
    return {c.name: c.build(folder) for c in cases()}
