"""The speed paths (lipscope.speed) change how fast, never what is measured, and are undone after the run; on CPU
their code paths run (TF32 is a flag, channels-last and torch.compile run CPU kernels; compile with the "eager"
backend exercises the same wrapping without a C++ compiler)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import HANG_S

from lipscope import load_model, probe
from lipscope.errors import InputError
from lipscope.speed import Speed, accelerated

GRID = "0,10,100"


@pytest.fixture(scope="module")
def m64():
    return load_model("builtin:digits-ddpm", dtype="float64")


def _k(m) -> np.ndarray:
    return probe(m, "digits", timesteps=GRID, samples=4, batch_size="8").attrs["K_samples"]


def test_tf32_and_channels_last_are_undone_and_change_nothing_in_float64(m64):
    ref = _k(m64)
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with accelerated(m64, Speed(tf32=True, channels_last=True)) as fast:
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        convs = [p for p in m64.module.parameters() if p.dim() == 4]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
        got = _k(fast)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags
    assert all(p.is_contiguous() for p in m64.module.parameters())
    # other convolution kernels, float64: rounding of a difference of two O(1) outputs, relative to K·Δτ
    np.testing.assert_allclose(got, ref, rtol=1e-9)


def test_compile_wraps_the_network_call_and_is_fd_only(m64):
    ref = _k(m64)
    with accelerated(m64, Speed(compile="default", compile_backend="eager")) as fast:
        assert fast.net is not m64.net
        got = _k(fast)
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    with pytest.raises(InputError, match="`compile` is for `method` fd"):
        Speed(compile="default").check(["fd", "jvp"])
    with pytest.raises(InputError, match="`compile` 'fast' not known"):
        Speed(compile="fast").check(["fd"])


def test_cli_records_the_speed_options(tmp_path):
    import json
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "lipscope", "probe", "--tf32", "--channels-last", "--samples", "2", "--timesteps",
         "0,10", "--out", str(tmp_path / "r"), "--no-progress"],
        capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "", "COLUMNS": "200"}, timeout=HANG_S,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    o = json.loads((tmp_path / "r" / "run.json").read_text())["options"]
    assert o["tf32"] and o["channels_last"] and o["compile"] is None
    r = subprocess.run(
        [sys.executable, "-m", "lipscope", "probe", "--compile", "default", "--method", "jvp", "--out",
         str(tmp_path / "j")], capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""}, timeout=HANG_S,
    )  # fmt: skip
    assert r.returncode == 2 and "--compile is for --method fd" in r.stderr and not (tmp_path / "j").exists()
