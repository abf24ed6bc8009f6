"""service/grpc/protos: the committed module is what the .proto generates, and every message is wire-compatible
with tritonclient's generated ``inference.*`` messages (same field numbers, types, labels, nested types)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from tritonclient.grpc import model_config_pb2, service_pb2

ROOT = Path(__file__).resolve().parents[2]
PROTO = "service/grpc/protos/grpc_predict_v2.proto"
#: the lines a different grpcio-tools version writes differently (version stamps, not content)
STAMPS = re.compile(r"^(# Protobuf Python Version: .*|    \d+,)$", re.M)


def generate(out: Path, *flags: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT}", *flags, str(ROOT / PROTO)],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )


def test_regenerating_changes_nothing(tmp_path: Path) -> None:
    """The module is byte for byte what protoc writes, version stamps aside (its descriptor is the whole
    content); the typing stub's style varies by grpcio-tools version, so only its names are compared."""
    generate(tmp_path, f"--python_out={tmp_path}", f"--pyi_out={tmp_path}")
    fresh, committed = tmp_path / "service" / "grpc" / "protos", ROOT / "service" / "grpc" / "protos"
    module = "grpc_predict_v2_pb2.py"
    assert STAMPS.sub("", (fresh / module).read_text()) == STAMPS.sub("", (committed / module).read_text()), (
        "regenerate service/grpc/protos (see its __init__.py)"
    )
    names = re.compile(r"^\s*(class \w+|\w+_FIELD_NUMBER)", re.M)
    stub = "grpc_predict_v2_pb2.pyi"
    assert names.findall((fresh / stub).read_text()) == names.findall((committed / stub).read_text())


def ours(tmp_path: Path) -> dict[str, descriptor_pb2.DescriptorProto | descriptor_pb2.EnumDescriptorProto]:
    """Our messages by unqualified name, read from protoc's descriptor set (never imported: no pool clash)."""
    out = tmp_path / "set.pb"
    generate(tmp_path, f"--descriptor_set_out={out}")
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    (file,) = files
    assert file.package == "bnfold.inference" and not file.service
    found: dict[str, descriptor_pb2.DescriptorProto | descriptor_pb2.EnumDescriptorProto] = {}

    def walk(message: descriptor_pb2.DescriptorProto, prefix: str) -> None:
        found[prefix + message.name] = message
        for nested in message.nested_type:
            walk(nested, prefix + message.name + ".")

    for message in file.message_type:
        walk(message, "")
    for enum in file.enum_type:
        found[enum.name] = enum
    return found


def triton(name: str) -> Descriptor | EnumDescriptor:
    top, *nested = name.split(".")
    for module in (service_pb2, model_config_pb2):
        pool = module.DESCRIPTOR
        if top in pool.message_types_by_name:
            d: Descriptor = pool.message_types_by_name[top]
            for part in nested:
                d = d.nested_types_by_name[part]
            return d
        if top in pool.enum_types_by_name:
            return pool.enum_types_by_name[top]
    raise KeyError(name)


def test_every_message_is_wire_compatible_with_tritons(tmp_path: Path) -> None:
    messages = ours(tmp_path)
    assert "ModelInferRequest.InferInputTensor" in messages and "DataType" in messages
    for name, mine in messages.items():
        theirs = triton(name)
        if isinstance(mine, descriptor_pb2.EnumDescriptorProto):
            assert isinstance(theirs, EnumDescriptor)
            assert {v.name: v.number for v in mine.value} == {v.name: v.number for v in theirs.values}, name
            continue
        assert isinstance(theirs, Descriptor)
        if mine.options.map_entry:
            continue
        for field in mine.field:
            other: FieldDescriptor = theirs.fields_by_name[field.name]
            assert (field.number, field.type) == (other.number, other.type), f"{name}.{field.name}"
            assert (field.label == field.LABEL_REPEATED) == other.is_repeated, f"{name}.{field.name}"
            if field.type_name:
                referenced = (other.message_type or other.enum_type).full_name
                assert field.type_name.removeprefix(".bnfold.") == referenced, f"{name}.{field.name}"
        for oneof in mine.oneof_decl:
            assert oneof.name in theirs.oneofs_by_name, f"{name}.{oneof.name}"
