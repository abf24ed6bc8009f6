"""convert_torch on nn.Modules: every foldable BatchNorm folded, the result equal to PyTorch's eval output."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from converter import VerificationError, convert_torch
from converter.frontends import torch as torch_frontend
from tests.torch.nets import ARCHITECTURES, assert_close, batchnorms, inputs, op_types, run_onnx, trained

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PRODUCERS = {"resnet": "Conv", "mobilenet": "Gemm", "decoder": "ConvTranspose", "conv1d": "Conv", "conv3d": "Conv"}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_folds_everything_foldable_and_matches_pytorch(arch: str) -> None:
    module, shape, kept = ARCHITECTURES[arch]()
    trained(module, shape)
    total = len(batchnorms(module))
    result = convert_torch(module, inputs(shape, seed=1))
    report = result.report

    assert len(report.layers) == total
    assert len(report.folded) == total - kept
    assert report.before is not None and report.before.batchnorms == total
    assert op_types(result.model).count("BatchNormalization") == kept
    if arch in PRODUCERS:
        assert {r.into.split()[0] for r in report.folded if r.into} >= {PRODUCERS[arch]}
    else:  # pre-activation: the kept ones run in inference mode (one output, no training_mode)
        assert {r.reason for r in report.kept} and all(r.reason for r in report.kept)
        for node in result.model.graph.node:
            if node.op_type == "BatchNormalization":
                assert len(node.output) == 1
                assert all(a.name != "training_mode" or a.i == 0 for a in node.attribute)

    # verified twice: against the exported ONNX (ORT) and against PyTorch's eval outputs
    assert report.verification is not None and report.verification.passed
    [check] = report.extra_verifications
    assert check.passed and check.reference == "PyTorch eval on the example inputs"
    assert (check.atol, check.rtol) == torch_frontend.TOLERANCE
    assert "verification passed against PyTorch eval" in report.to_text()

    # and on inputs neither verification saw
    x = inputs(shape, seed=2)
    with torch.no_grad():
        want = module(x).numpy()
    [got] = run_onnx(result.model, {result.model.graph.input[0].name: x.numpy()})
    assert_close(got, want)


def test_training_flag_and_statistics_are_left_as_they_were() -> None:
    module, shape, _ = ARCHITECTURES["resnet"]()
    trained(module, shape).train()
    stats = [bn.running_mean.clone() for bn in batchnorms(module)]  # type: ignore[union-attr]
    convert_torch(module, inputs(shape, seed=1))
    assert module.training and all(m.training for m in module.modules())
    for bn, before in zip(batchnorms(module), stats, strict=True):
        assert torch.equal(bn.running_mean, before)  # type: ignore[arg-type]


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.b = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8))

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.a(image)
        return y, y.mean((2, 3)) + self.b(features)


def test_several_inputs_and_outputs_keep_forward_names() -> None:
    module = TwoInputs()
    torch.manual_seed(0)
    module.train()
    with torch.no_grad():
        for _ in range(3):
            module(torch.randn(8, 3, 8, 8), torch.randn(8, 6) + 1)
    module.eval()
    result = convert_torch(module, (inputs((2, 3, 8, 8), 1), inputs((2, 6), 2)))
    assert [i.name for i in result.model.graph.input] == ["image", "features"]
    assert [o.name for o in result.model.graph.output] == ["output0", "output1"]
    assert "BatchNormalization" not in op_types(result.model)
    assert [o.name for o in result.report.extra_verifications[0].outputs] == ["output0", "output1"]


def test_keep_mode_and_fp16_are_verified_against_pytorch_too() -> None:
    module, shape, _ = ARCHITECTURES["conv1d"]()
    trained(module, shape)
    kept = convert_torch(module, inputs(shape, 1), bn="keep")
    assert op_types(kept.model).count("BatchNormalization") == 3
    assert kept.report.extra_verifications[0].passed
    half = convert_torch(module, inputs(shape, 1), fp16=True)
    check = half.report.extra_verifications[0]
    assert check.passed and (check.atol, check.rtol) == (1e-3, 2e-2)


class ExportsSomethingElse(nn.Module):
    """Its ONNX export computes something else than its eval forward: only the PyTorch comparison sees it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return y * 1.001 if torch.onnx.is_in_onnx_export() else y


def test_a_pytorch_mismatch_fails_verification_with_exit_code_3() -> None:
    module = trained(ExportsSomethingElse(), (2, 3, 8, 8))
    with pytest.raises(VerificationError, match="verification against PyTorch failed") as info:
        convert_torch(module, inputs((2, 3, 8, 8), 1))
    assert info.value.exit_code == 3
    report = info.value.report
    assert report.verification.passed  # the fold itself is fine
    assert not report.extra_verifications[0].passed
    assert "verification FAILED against PyTorch eval" in report.to_text()


def test_the_default_exporter_settings_would_have_folded_bn_themselves() -> None:
    """Why the torch front end passes do_constant_folding=False: torch's own default folds Conv+BN in float32."""
    import io

    import onnx

    module, shape, _ = ARCHITECTURES["resnet"]()
    trained(module, shape)
    buffer = io.BytesIO()
    torch.onnx.export(module, (inputs(shape, 1),), buffer, dynamo=False)
    default = op_types(onnx.load_from_string(buffer.getvalue()))
    exported = torch_frontend.export_module(module, inputs(shape, 1))
    assert default.count("BatchNormalization") < len(batchnorms(module))
    assert op_types(exported.model).count("BatchNormalization") == len(batchnorms(module))
