"""model_tools/build.py: the build command, on the fake TensorRT and GPU of tests/tensorrt_fakes.py.

The builder it drives is tested in tests/test_tensorrt_api.py against the same fakes.
"""

from __future__ import annotations

import hashlib

import pytest

from engines.tensorrt import builder as builder_mod
from engines.tensorrt.options import Profile
from engines.tensorrt.plan import read_sidecar
from model_tools import build
from tests import tensorrt_fakes as fakes
from tests.tensorrt_models import image_classifier


@pytest.fixture
def fake_build(monkeypatch):
    fakes.FakeCuda().install(monkeypatch)

    def install(**kw):
        fb = fakes.FakeBuild(**kw)
        monkeypatch.setattr(builder_mod, "import_tensorrt", lambda lean_ok=False: fb.module)
        return fb
    return install


def test_build_command_writes_plan_and_sidecar(fake_build, tmp_path, capsys):
    fake_build()
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(image_classifier())
    out = tmp_path / "m.plan"
    assert build.main(["--onnx", str(onnx_path), "--output", str(out), "--fp16", "--profile", "1,4,8",
                       "--profile", "9,16,32"]) == 0
    info = read_sidecar(str(out))
    assert info.profiles == (Profile(1, 4, 8), Profile(9, 16, 32)) and info.precision == "fp16"
    assert info.onnx_sha256 == hashlib.sha256(image_classifier()).hexdigest()
    assert out.read_bytes()[:4] == b"ftrt"
    assert build.main(["--onnx", str(onnx_path), "--output", str(out), "--profile", "1,4,8", "--max_batch", "9"]) == 2
    assert "Use either --profile MIN,OPT,MAX" in capsys.readouterr().err


def test_build_command_defaults():
    options = build.options_from_args(build.parse_args(["--onnx", "m", "--output", "p"]))
    assert options.profiles == (Profile(1, 64, 256),) and options.precision == "fp32"
    options = build.options_from_args(build.parse_args(["--onnx", "m", "--output", "p", "--max_batch", "32"]))
    assert options.profiles == (Profile(1, 32, 32),)
