"""``precision``: the network cast for the run (weights restored exactly), and the accuracy guard K_rel_err_est
checked against an independent measurement: the same probe run on separately loaded low- and reference-precision
copies of the model, restricted to the guard samples."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from conftest import HANG_S

from lipscope import load_model, probe
from lipscope.errors import InputError
from lipscope.models import from_callable
from lipscope.precision import guard_samples

GRID = "0,2,10,100,500"


def test_guard_samples_are_few_and_spread():
    assert guard_samples(2).tolist() == [0, 1]
    assert guard_samples(16).tolist() == [0, 15]
    assert guard_samples(64).tolist() == [0, 21, 42, 63]
    assert len(guard_samples(10_000)) == 8


@pytest.mark.parametrize("precision,ref", [("bf16", "float32"), ("fp32", "float64")])
def test_k_rel_err_est_is_the_measured_error_of_the_guard_samples(precision, ref):
    m = load_model("builtin:digits-ddpm")
    before = {k: v.clone() for k, v in m.module.state_dict().items()}
    df = probe(m, "digits", timesteps=GRID, samples=16, method="jvp", precision=precision, batch_size="16")
    assert all(torch.equal(before[k], v) for k, v in m.module.state_dict().items())  # weights put back exactly
    assert next(m.module.parameters()).dtype == torch.float32
    rep = df.attrs["precision"]
    assert rep["reference"] == ref and rep["guard_samples"] == [0, 15]
    # independently: both precisions loaded as their own models, probed on the guard samples alone
    from lipscope.data import load_data

    x0 = load_data("digits", 16, 0, (1, 8, 8))
    low_dtype = {"bf16": "bfloat16", "fp32": "float32"}[precision]
    k_lo = probe(load_model("builtin:digits-ddpm", dtype=low_dtype), x0, timesteps=GRID, samples=16, method="jvp",
                 batch_size="16").attrs["K_samples"][[0, 15]]  # fmt: skip
    k_hi = probe(load_model("builtin:digits-ddpm", dtype=ref), x0, timesteps=GRID, samples=16, method="jvp",
                 batch_size="16").attrs["K_samples"][[0, 15]]  # fmt: skip
    want = np.abs(k_lo.sum(0) - k_hi.sum(0)) / k_hi.sum(0)
    # the low-precision pass is the same arithmetic (all samples, same batches); the reference pass ran on the guard
    # samples alone, so its float32 (float64) kernels may round differently: a few u32 (u64) of K, relative
    tol = 1e-5 if precision == "bf16" else 1e-9
    np.testing.assert_allclose(df["K_rel_err_est"].to_numpy(), want, rtol=0, atol=tol)
    assert rep["max_K_rel_err_est"] == pytest.approx(float(want.max()), abs=tol)
    if precision == "fp32":
        assert rep["max_K_rel_err_est"] < 1e-4 and rep["within_tolerance"]


def test_a_breach_is_reported_with_the_fix(caplog):
    m = load_model("builtin:digits-ddpm")
    with caplog.at_level(logging.WARNING, logger="lipscope"):
        df = probe(m, "digits", timesteps="10", samples=4, method="jvp", precision="bf16", precision_tolerance=1e-9)
    assert not df.attrs["precision"]["within_tolerance"]
    assert "use a higher `precision`" in caplog.text


def test_precision_refusals():
    m = load_model("builtin:digits-ddpm")
    with pytest.raises(InputError, match="`precision` 'int8' not known"):
        probe(m, "digits", timesteps="10", samples=2, method="jvp", precision="int8")
    f = from_callable(lambda x, t: x, sample_shape=(1, 8, 8))
    with pytest.raises(InputError, match="no nn.Module to cast: use `dtype`"):
        probe(f, "digits", timesteps="10", samples=2, method="jvp", precision="bf16")


def test_cli_precision_is_recorded(tmp_path):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "lipscope", "probe", "--precision", "bf16", "--method", "jvp", "--samples", "4",
         "--timesteps", "0,10", "--out", str(tmp_path / "r"), "--no-progress"],
        capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "", "COLUMNS": "200"}, timeout=HANG_S,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "r" / "run.json").read_text())
    assert meta["precision"]["precision"] == "bf16" and meta["options"]["precision"] == "bf16"
    import pandas as pd

    assert pd.read_csv(tmp_path / "r" / "lipschitz.csv")["K_rel_err_est"].notna().all()


def test_cast_restores_every_tensor_exactly_with_its_own_dtype():
    """Parameters, persistent and non-persistent buffers (DiT/PixArt's pos_embed is one), mixed dtypes."""
    from lipscope.precision import cast

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.register_buffer("pos", torch.linspace(0, 1, 7) + 1e-3, persistent=False)
            self.register_buffer("steps", torch.arange(5))  # integer: untouched by a float cast

        def forward(self, x, t):
            return x

    net = Net()
    net.lin.bias.data = net.lin.bias.data.double()  # a deliberately mixed-dtype module
    m = from_callable(net, sample_shape=(4,))
    before = [t.clone() for t in (*net.parameters(), *net.buffers())]
    with cast(m, torch.bfloat16) as low:
        assert low.dtype == torch.bfloat16 and net.pos.dtype == torch.bfloat16
    after = list((*net.parameters(), *net.buffers()))
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(after, before, strict=True))
