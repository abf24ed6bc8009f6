"""Reading and writing ONNX files: clear errors for bad input, atomic output, external data both ways."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import onnx
from google.protobuf.message import DecodeError, Message
from onnx import GraphProto, ModelProto, TensorProto
from onnx.external_data_helper import load_external_data_for_model

from converter import prepare
from converter.errors import InputError
from converter.errors import first_line as _first_line

#: Models whose serialised size passes this are written with their tensors in a side file (`OUT.data`):
#: protobuf cannot hold more than 2 GiB in one message.
EXTERNAL_DATA_THRESHOLD = 1 << 30


@dataclass
class Loaded:
    model: ModelProto
    path: Path
    external_data: bool  # the file kept (some) tensors in external data files
    notes: list[str] = dataclasses.field(default_factory=list)  # what loading changed (nodes sorted)


#: The report's line for a model whose nodes were sorted on the way in.
SORTED_NOTE = "nodes were not in topological order: sorted as ONNX Runtime sorts them (the output is written sorted)"
#: The report's line for graph outputs declared without a shape (followed by their names).
SHAPED_NOTE = "graph outputs declared without a shape (onnx.checker refuses them) given their inferred shapes: "


def load(path: str | os.PathLike[str]) -> Loaded:
    """Load and check an ONNX file; any defect of the file is an :class:`InputError` with one line.

    onnx.checker reads the file itself (in C++, external data and > 2 GiB models included) before Python parses
    it, so its copy of the model is gone before ours exists: the peak is one model, not three.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, not an ONNX file")
    problem: Exception | None = None
    try:
        onnx.checker.check_model(str(p))
    except Exception as exc:  # classified below, once we know whether the file parses at all
        problem = exc
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{p}: not an ONNX model ({_first_line(exc) or 'protobuf parse failed'})") from None
    except OSError as exc:
        raise InputError(f"{p}: cannot read ({exc.strerror or exc})") from None
    if not model.HasField("graph") or model.ir_version == 0:
        raise InputError(f"{p}: not an ONNX model (no graph or IR version)")
    external = any(_is_external(t) for t in model.graph.initializer)
    if external:
        try:
            load_external_data_for_model(model, str(p.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise InputError(f"{p}: external data cannot be loaded ({_first_line(exc)})") from None
    notes: list[str] = []
    if problem is not None:
        notes = repair(model, str(p))
        problem = None if notes else problem
    if problem is not None:
        raise InputError(f"{p}: invalid ONNX model ({_first_line(problem)})")
    return Loaded(model, p, external, notes)


def repair(model: ModelProto, what: str) -> list[str]:
    """Fix in place what onnx.checker refuses but ONNX Runtime runs, then check the model; return the report's
    notes (empty when nothing needed fixing). Unsorted nodes are sorted as ONNX Runtime sorts them; a graph output
    declared without a shape gets the one shape inference finds. A node reading a value that nothing produces, or
    a cycle, is an InputError naming the node."""
    was_sorted = prepare.is_sorted(model.graph)
    try:
        prepare.sort_nodes(model.graph)
    except InputError as exc:
        raise InputError(f"{what}: {exc}") from None
    notes = [] if was_sorted else [SORTED_NOTE]
    shaped = prepare.infer_output_shapes(model)
    if shaped:
        notes.append(SHAPED_NOTE + ", ".join(shaped))
    if notes:
        check(model, what)
    return notes


def check_sorted(model: ModelProto, what: str = "model") -> list[str]:
    """:func:`check`, after :func:`repair` (sorting the nodes, shapes for shapeless graph outputs) where needed."""
    notes = repair(model, what)
    if not notes:
        check(model, what)
    return notes


def weights_size(model: ModelProto) -> int:
    """Serialised size of the initializers, tensor by tensor (``model.ByteSize()`` would serialise it all)."""
    return sum(t.ByteSize() for t in model.graph.initializer)


def check(model: ModelProto, what: str = "model") -> None:
    """onnx.checker on an in-memory model; a failure is an InputError naming the first problem."""
    try:
        if weights_size(model) < (1 << 31) - (64 << 20):  # the checker takes the model as one protobuf message
            onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        raise InputError(f"{what}: invalid ONNX model ({_first_line(exc)})") from None


def _is_external(t: TensorProto) -> bool:
    return t.HasField("data_location") and t.data_location == TensorProto.EXTERNAL


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


_GRAPH = _varint(7 << 3 | 2)  # ModelProto.graph: field 7, length-delimited
_INITIALIZER = _varint(5 << 3 | 2)  # GraphProto.initializer: field 5, length-delimited


def _copy_except(src: Message, dst: Message, skip: str) -> None:
    """Copy every set field of ``src`` but ``skip`` into ``dst``."""
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        repeated = getattr(field, "is_repeated", None)  # protobuf >= 5.28; `label` before (and gone in 7)
        if repeated is None:
            repeated = field.label == field.LABEL_REPEATED
        if repeated:
            getattr(dst, field.name).extend(value)
        elif field.message_type is not None:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def write_model(model: ModelProto, out: BinaryIO) -> None:
    """Serialise ``model`` one initializer at a time: the same message a parser reads back as ``model``, without
    ever holding a second copy of the weights (``SerializeToString`` would briefly need two)."""
    shell, graph = ModelProto(), GraphProto()
    _copy_except(model, shell, skip="graph")
    _copy_except(model.graph, graph, skip="initializer")
    head = graph.SerializeToString()
    sizes = [t.ByteSize() for t in model.graph.initializer]
    length = len(head) + sum(len(_INITIALIZER) + len(_varint(n)) + n for n in sizes)
    out.write(shell.SerializeToString())
    out.write(_GRAPH + _varint(length) + head)
    for tensor, size in zip(model.graph.initializer, sizes, strict=True):
        out.write(_INITIALIZER + _varint(size))
        out.write(tensor.SerializeToString())


class Staged:
    """A model written beside its destination under a temporary name; :meth:`commit` renames it into place."""

    def __init__(self, final: Path, tmpdir: Path) -> None:
        self.final = final
        self.dir = tmpdir
        self.path = tmpdir / final.name
        self.data_name: str | None = None

    def write(self, model: ModelProto, external_data: bool | None = None) -> None:
        """Serialise ``model``; with external data when asked, or when it is too large for one message."""
        if external_data is None:
            external_data = weights_size(model) > EXTERNAL_DATA_THRESHOLD
        try:
            if external_data:
                self.data_name = f"{self.final.name}.data"
                onnx.save_model(
                    model,
                    str(self.path),
                    save_as_external_data=True,
                    all_tensors_to_one_file=True,
                    location=self.data_name,
                    size_threshold=1024,
                )
            else:
                with open(self.path, "wb") as f:
                    write_model(model, f)
        except OSError as exc:
            raise InputError(f"{self.final}: cannot write ({exc.strerror or exc})") from None

    def commit(self) -> None:
        if self.data_name:
            os.replace(self.dir / self.data_name, self.final.parent / self.data_name)
        os.replace(self.path, self.final)


@contextlib.contextmanager
def staged(final: str | os.PathLike[str]) -> Iterator[Staged]:
    """Stage an output file; whatever is not committed is removed, so no half-written file is ever left."""
    dest = Path(final)
    if dest.is_dir():
        raise InputError(f"{dest}: is a directory; give the output file name")
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{parent}: output directory does not exist")
    tmpdir: Path | None = None
    try:
        with _signals_deferred():  # no Ctrl-C/SIGTERM between the directory's creation and ``tmpdir`` holding it
            try:
                tmpdir = Path(tempfile.mkdtemp(prefix=".bnfold-", dir=parent))
            except OSError as exc:
                raise InputError(f"{parent}: cannot write ({exc.strerror or exc})") from None
        yield Staged(dest, tmpdir)
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM arriving inside are delivered again on the way out, to the handlers that were in place.

    Python runs a signal handler between any two bytecodes, so a KeyboardInterrupt could otherwise land after
    ``mkdtemp`` made the directory and before anything could remove it. Only the main thread sets handlers; in
    another thread (and for a handler not set from Python) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    deferred = {s: h for s, h in previous.items() if h is not None}
    for sig in deferred:
        signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in deferred.items():
            signal.signal(sig, handler)
        for signum in pending:
            signal.raise_signal(signum)
