"""The piecewise writer produces exactly the message SerializeToString would."""

from __future__ import annotations

import io

import onnx

from converter import zoo
from converter.modelio import weights_size, write_model


def test_write_model_round_trips_every_field() -> None:
    m = zoo.mobilenet_v2(classes=3, image=32)
    m.doc_string, m.graph.doc_string, m.model_version = "doc", "graph doc", 7
    m.metadata_props.add(key="k", value="v")
    m.graph.value_info.add().name = "extra"
    buf = io.BytesIO()
    write_model(m, buf)
    data = buf.getvalue()
    assert len(data) == m.ByteSize()
    assert onnx.load_from_string(data) == m


def test_write_model_without_initializers() -> None:
    m = onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], []))
    buf = io.BytesIO()
    write_model(m, buf)
    assert onnx.load_from_string(buf.getvalue()) == m


def test_weights_size_counts_the_initializers() -> None:
    m = zoo.resnet(blocks=(1,), classes=5, image=16)
    assert weights_size(m) <= m.ByteSize() < weights_size(m) + 20_000
