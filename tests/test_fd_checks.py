"""How far an FD row can be trusted beyond its rounding noise: the network's time resolution (issue 24, case 2), the
FD step's truncation (issue 23), and the summary over usable rows only; each checked against the JVP."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import pathlib

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_unet

from lipscope.errors import InputError
from lipscope.loading import load_model
from lipscope.models import from_callable, from_unet
from lipscope.probe import probe
from lipscope.reduction import summary
from lipscope.resolution import CHUNK, STEPS, spacing, time_resolution

TESTS = pathlib.Path(__file__).parent


@pytest.fixture()
def logs(caplog, monkeypatch):
    """lipscope's warnings, also after a CLI test in this process turned their propagation off."""
    monkeypatch.setattr(logging.getLogger("lipscope"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="lipscope")
    return caplog


def _x(model) -> torch.Tensor:
    return torch.randn((1, *model.sample_shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# the network's time resolution
# ---------------------------------------------------------------------------------------------


def _smooth(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x) * torch.sin(t / 300).to(x.dtype).view(-1, 1, 1, 1)


def _cast_to(dtype: torch.dtype):
    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _smooth(x, t.to(dtype).to(x.dtype))

    return net


def test_time_resolution_is_probed():
    """diffusers' sinusoidal embedding computes in float32 even in a float64 UNet; a callable that casts t to
    bfloat16/float16 is found to; a float64 callable resolves float64; a float32 model is fed float32 t."""
    unet64 = from_unet(copy.deepcopy(tiny_unet()), dtype="float64")
    assert time_resolution(unet64, _x(unet64)) == (torch.float32, time_resolution(unet64, _x(unet64))[1])
    assert "probed" in time_resolution(unet64, _x(unet64))[1]
    assert time_resolution(from_unet(tiny_unet()), _x(unet64))[0] == torch.float32
    smooth = from_callable(_smooth, sample_shape=(1, 8, 8), dtype="float64")
    assert time_resolution(smooth, _x(smooth))[0] is None
    for d in (torch.bfloat16, torch.float16):
        for dt in ("float32", "float64"):
            m = from_callable(_cast_to(d), sample_shape=(1, 8, 8), dtype=dt)
            assert time_resolution(m, _x(m))[0] == d, (d, dt)
    # Flux casts t/1000 to bfloat16 and multiplies back: a scaling of t does not hide the rounding
    flux = from_callable(
        lambda x, t: _smooth(x, (t / 1000).to(torch.bfloat16).to(t.dtype) * 1000), sample_shape=(1, 8, 8)
    )
    assert time_resolution(flux, _x(flux))[0] == torch.bfloat16
    # whole steps are 4× finer than bfloat16 at 0.64·T (its ulp is 4 there), coarser than float16 (0.5): float16
    whole = from_callable(lambda x, t: _smooth(x, t.round()), sample_shape=(1, 8, 8), dtype="float64")
    assert time_resolution(whole, _x(whole))[0] == torch.float16


def test_time_resolution_probe_survives_overflow_batches_and_whole_steps():
    """A float16 the network's input overflows (T = 200000: u = 128000 > 65504) is skipped, not taken for a network
    that rounds to float16; the probe feeds the network at most CHUNK inputs per call (a large network's batch of 99
    may not fit); an adapter found to round t to whole steps is not probed (its FD pairs are whole steps)."""
    cfg = {"_class_name": "DDPMScheduler", "num_train_timesteps": 200000}

    def slow(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) * torch.sin(t / 30000).to(x.dtype).view(-1, 1, 1, 1)

    sizes: list[int] = []

    def exact(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sizes.append(len(x))
        return slow(x, t)

    m = from_callable(exact, sample_shape=(1, 8, 8), dtype="float64", scheduler_config=cfg)
    assert time_resolution(m, _x(m))[0] is None
    assert max(sizes) <= CHUNK and sum(sizes) == 2 * (STEPS + 1), sizes  # bf16 and fp32; fp16 skipped
    f32 = from_callable(
        lambda x, t: slow(x, t.to(torch.float32).to(x.dtype)),
        sample_shape=(1, 8, 8),
        dtype="float64",
        scheduler_config=cfg,
    )
    assert time_resolution(f32, _x(f32))[0] == torch.float32
    whole = dataclasses.replace(from_callable(_cast_to(torch.bfloat16), sample_shape=(1, 8, 8)), rounds_timesteps=True)
    assert time_resolution(whole, _x(whole)) == (torch.float32, time_resolution(whole, _x(whole))[1])
    assert time_resolution(whole, _x(whole))[1].startswith("not probed: the adapter rounds t to whole steps")


def test_spacing_is_the_ulp():
    u = torch.tensor([0.0, 1.0, 3.0, 103.0, 900.0], dtype=torch.float64)
    for d in (torch.float16, torch.float32):
        np_d = {torch.float16: np.float16, torch.float32: np.float32}[d]
        want = np.spacing(u.numpy().astype(np_d)).astype(np.float64)
        np.testing.assert_array_equal(spacing(u, d).numpy()[1:], want[1:])
    assert spacing(torch.tensor([900.0], dtype=torch.float64), torch.bfloat16).item() == 4.0


def test_dt_below_the_time_resolution_is_flagged_and_left_out(logs):
    """Issue 24 case 2: `dt` 1e-5 on a diffusers UNet in float64. The network rounds t to float32, so FD was 40 %
    below the JVP at t = 103 on builtin:digits-ddpm, unflagged, and K = 0 at t = 900 entered the summary. Now rows
    above 10 % are flagged (fd_time_limited), never enter the summary, and a run with no usable FD row is refused."""
    m = from_unet(copy.deepcopy(tiny_unet()), dtype="float64")
    df = probe(m, "digits", timesteps="3,103,900", dt=1e-5, method="fd,jvp", samples=4)
    fd, jvp = df[df["method"] == "fd-forward"], df[df["method"] == "jvp"]
    assert fd["fd_time_limited"].tolist() == [False, True, True] and not jvp["fd_time_limited"].any()
    assert fd["usable"].tolist() == [True, False, False] and jvp["usable"].all()
    assert "below the time resolution" in logs.text and "2 of 3 FD rows are flagged" in logs.text
    # the usable row's FD agrees with the JVP within its estimated time rounding
    k_fd, k_jvp = fd["K_mean"].to_numpy(), jvp["K_mean"].to_numpy()
    assert abs(k_fd[0] - k_jvp[0]) <= fd["fd_time_rel"].iloc[0] * k_jvp[0]
    assert abs(k_fd[1] / k_jvp[1] - 1) > 0.1  # the flagged row is wrong indeed
    s = summary(df, m.T, method="fd-forward")
    assert s["excluded_rows"] == 2 and math.isnan(s["median_K_above"])
    assert summary(df, m.T, method="jvp")["median_K_above"] == pytest.approx(float(np.median(k_jvp[1:])))
    with pytest.raises(InputError, match=r"`dt` 1e-05 is below the time resolution .* float32.*use `dt` ≥ ") as e:
        probe(m, "digits", timesteps="103,900", dt=1e-5, samples=4)
    need = float(str(e.value).split("use `dt` ≥ ")[1].split(",")[0])
    assert not probe(m, "digits", timesteps="103,900", dt=need, samples=4)["fd_time_limited"].any()  # it is enough


def test_fd_time_rel_bounds_the_fd_error():
    """|K_FD − K_JVP| stays within the rows' own estimates (time rounding + output rounding + truncation) on a float64
    UNet for steps from 10⁻² to 3·10⁻⁵ (central: the JVP is its limit), and the time rounding is the dominant term
    where it is flagged."""
    m = from_unet(copy.deepcopy(tiny_unet()), dtype="float64")
    grid = "3,30,103,900"
    k_jvp = probe(m, "digits", timesteps=grid, method="jvp", samples=4)["K_mean"].to_numpy()
    seen = False
    for dt in (1e-2, 1e-4, 3e-5):
        df = probe(m, "digits", timesteps=grid, dt=dt, scheme="central", samples=4)
        err = np.abs(df["K_mean"].to_numpy() - k_jvp)
        est = df["fd_time_rel"] + df["fd_noise_rel"].fillna(0) + df["fd_trunc_rel"].fillna(0)
        assert np.all(err <= est.to_numpy() * k_jvp), (dt, err / k_jvp, est.to_numpy())
        seen |= bool(((err / k_jvp > 0.1) & df["fd_time_limited"]).any())
    assert seen  # the bound is not vacuous: some flagged row is off by more than 10 %


def test_cli_refuses_and_records(tmp_path):
    from typer.testing import CliRunner

    from lipscope.cli import app

    base = ["probe", "--model", "builtin:digits-ddpm", "--dtype", "float64", "--samples", "2", "--no-progress"]
    r = CliRunner().invoke(app, [*base, "--timesteps", "103,900", "--dt", "1e-5", "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "--dt 1e-05 is below the time resolution of --model" in r.output
    assert not (tmp_path / "a").exists()
    r = CliRunner().invoke(app, [*base, "--timesteps", "3,103", "--dt", "1e-5", "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "b" / "run.json").read_text())
    assert meta["fd_time"]["dtype"] == "float32" and meta["fd_time"]["rows_limited"] == 1
    assert meta["summary"]["excluded_rows"] == 1
    assert pd.read_csv(tmp_path / "b" / "lipschitz.csv")["usable"].tolist() == [True, False]


def test_summary_leaves_unusable_rows_out():
    df = pd.DataFrame(
        {"t": [1.0, 5.0, 200.0, 900.0], "method": "fd-forward", "K_mean": [50.0, 40.0, 10.0, 0.0]}
        | {"usable": [True, False, True, False]}
    )
    s = summary(df, 1000)
    assert (s["peak_K"], s["median_K_above"], s["mean_K_below"], s["excluded_rows"]) == (50.0, 10.0, 50.0, 2)
    none = summary(df.assign(usable=False), 1000)
    assert math.isnan(none["peak_K"]) and math.isnan(none["singularity_ratio"]) and none["excluded_rows"] == 4
    old = summary(df.drop(columns="usable"), 1000)  # a table written before the column existed
    assert old["median_K_above"] == 5.0 and old["excluded_rows"] == 0


# ---------------------------------------------------------------------------------------------
# the FD step's truncation
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def flow(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    return load_model("py:pyflow_fixtures:make_with_process")


def test_fd_truncation_is_estimated_and_flagged(flow, logs):
    """Issue 23: on a flow network with Gaussian Fourier time features, FD with Δt = 1 is 11 % (forward) and 18 %
    (central) below the JVP at t = 10, unflagged before; the Richardson estimate (K(Δt) vs K(Δt/2) on 4 samples)
    now flags that row and no other, and with Δt = 0.1 nothing."""
    grid = "10,20,50,100,500"
    k_jvp = probe(flow, "digits", timesteps=grid, method="jvp", samples=64)["K_mean"].to_numpy()
    for scheme in ("forward", "central"):
        logs.clear()
        df = probe(flow, "digits", timesteps=grid, dt=1.0, scheme=scheme, samples=64)
        err = df["K_mean"].to_numpy() / k_jvp - 1
        assert err[0] < -0.1 and np.all(np.abs(err[1:]) < 0.05), err
        assert df["fd_trunc_limited"].tolist() == [True, False, False, False, False]
        assert df["fd_trunc_rel"].iloc[0] >= abs(err[0]) and df["usable"].all()  # flagged, kept in the summary
        if scheme == "central":  # order 2: the estimate tracks the error itself
            np.testing.assert_allclose(df["fd_trunc_rel"], np.abs(err), rtol=0.5, atol=2e-3)
        assert "truncation error of its FD step" in logs.text
        fine = probe(flow, "digits", timesteps=grid, dt=0.1, scheme=scheme, samples=64)
        assert not fine["fd_trunc_limited"].any()
    assert df.attrs["fd_truncation"]["order"] == 2 and df.attrs["fd_truncation"]["samples"] == [0, 21, 42, 63]


def test_truncation_not_estimated_where_undefined():
    """E-TSDM's piecewise-constant condition below t̃ and condition-space pairs: NaN, never a number."""
    m = load_model("builtin:digits-etsdm")
    df = probe(m, "digits", timesteps="5,200", samples=2)
    below = df["t"] < m.etsdm.t_tilde
    assert below.tolist() == [True, False]
    assert df.loc[below, "fd_trunc_rel"].isna().all() and df.loc[~below, "fd_trunc_rel"].notna().all()
    cond = probe(m, "digits", timesteps="5,200", samples=2, space="condition")
    assert cond["fd_trunc_rel"].isna().all() and "not estimated" in cond.attrs["fd_truncation"]["method"]
