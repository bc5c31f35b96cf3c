"""Attribution (lipscope.attribution) on a hand-built network whose split is known analytically, on the built-in
E-TSDM digits model (∂ε/∂t = 0 inside its sub-intervals), and its refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lipscope import rng
from lipscope.errors import InputError
from lipscope.models import from_callable
from lipscope.probe import probe
from lipscope.schedules import default_schedule

OMEGA = torch.tensor([0.01, 0.3], dtype=torch.float64)


class Fourier(nn.Module):
    def forward(self, t: torch.Tensor) -> torch.Tensor:
        ang = t[:, None] * OMEGA[None]
        return torch.cat([ang.sin(), ang.cos()], 1)


class Hand(nn.Module):
    """ε(x, t) = x ⊙ A e(t) + (B e(t))², e(t) = [sin ωt, cos ωt]: t enters at `a` and `b` only."""

    time_consumers = ["a", "b"]
    time_embeddings = ["embed"]

    def __init__(self, d: int = 4):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = Fourier()
        self.a, self.b = nn.Linear(4, d).double(), nn.Linear(4, d).double()
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g, dtype=torch.float64)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        e = self.embed(t.double())
        return x * self.a(e) + self.b(e) ** 2


def _analytic(net: Hand, x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(part a, part b, ė) per unit τ (×T = 1000), written from the formula."""
    tt = torch.full((x.shape[0],), t, dtype=torch.float64)
    ang = tt[:, None] * OMEGA[None]
    e = torch.cat([ang.sin(), ang.cos()], 1)
    de = torch.cat([OMEGA * ang.cos(), -OMEGA * ang.sin()], 1)
    with torch.no_grad():
        pa = x * (de @ net.a.weight.T)
        pb = 2 * net.b(e) * (de @ net.b.weight.T)
    return pa * 1000, pb * 1000, de * 1000


def test_hand_built_network_attribution_is_the_analytic_split():
    net = Hand()
    m = from_callable(net, default_schedule(), sample_shape=(4,), name="hand", dtype="float64")
    x0 = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grid = [2.0, 30.5, 400.0]
    df = probe(m, x0, timesteps=grid, method="jvp", samples=5, data_range=None, attribute="layers")
    att = df.attrs["attribution"]
    noise = rng.noise(0, 5, (4,), dtype=torch.float64)
    sched = default_schedule()
    for t in grid:
        k = torch.tensor(t, dtype=torch.float64)
        x = sched.alpha(k) * x0 + sched.sigma(k) * noise
        pa, pb, de = _analytic(net, x, t)
        tot = pa + pb
        row = att[att["t"] == t].set_index("part")
        for name, p in (("a", pa), ("b", pb)):
            assert row.loc[name, "K_part"] == pytest.approx(float(p.norm(dim=1).mean()), rel=1e-12)
            assert row.loc[name, "share"] == pytest.approx(float((p * tot).sum() / (tot * tot).sum()), rel=1e-10)
        assert row.loc["outside", "K_part"] == 0  # ε-prediction, t only through `a` and `b`
        assert row.loc["total", "K_part"] == pytest.approx(float(tot.norm(dim=1).mean()), rel=1e-12)
        assert row.loc["embedding embed", "K_part"] == pytest.approx(float(de.norm(dim=1).mean()), rel=1e-12)
    jvp_rows = df[df["method"] == "jvp"].set_index("t")["K_mean"]
    totals = att[att["part"] == "total"].set_index("t")["K_part"]
    assert np.allclose(totals.to_numpy(), jvp_rows.to_numpy(), rtol=1e-12)


def test_etsdm_network_has_no_t_derivative_inside_its_sub_intervals():
    """builtin:digits-etsdm is fed f(t), constant on [20k, 20k + 20): every part is 0 there and the shares are n/a;
    above t̃ = 100 the parts sum to the JVP row."""
    from lipscope.loading import load_model

    m = load_model("builtin:digits-etsdm")
    df = probe(m, "digits", timesteps=[5.0, 150.0], method="jvp", samples=4, attribute="blocks", batch_size=32)
    att = df.attrs["attribution"]
    low = att[(att["t"] == 5.0) & att["kind"].isin(["part", "outside", "total"])]
    assert (low["K_part"] == 0).all() and low["share"].isna().all()
    high = att[(att["t"] == 150.0) & (att["part"] == "total")]
    # float32 network: the same forward-AD arithmetic in another batch layout (P + 1 copies), summed over 6 parts;
    # BLAS blocking changes the rounding: a few hundred u₃₂ of K
    assert float(high["K_part"].iloc[0]) == pytest.approx(float(df["K_mean"].iloc[1]), rel=512 * 2.0**-24)


def test_refusals():
    m = from_callable(lambda x, t: x * t[:, None], default_schedule(), sample_shape=(3,), name="lam")
    with pytest.raises(InputError, match="`attribute` needs to know where lam consumes its time embedding"):
        probe(m, torch.zeros(2, 3), timesteps=[1.0], method="jvp", samples=2, data_range=None, attribute="blocks")
    with pytest.raises(InputError, match="`attribute` 'rows': use blocks or layers"):
        probe(m, torch.zeros(2, 3), timesteps=[1.0], method="jvp", samples=2, data_range=None, attribute="rows")
    net = Hand()
    net.time_consumers = ["nope"]
    bad = from_callable(net, default_schedule(), sample_shape=(4,), name="hand", dtype="float64")
    with pytest.raises(InputError, match="time_consumers names 'nope', which is no submodule"):
        probe(bad, torch.zeros(2, 4), timesteps=[1.0], method="jvp", samples=2, data_range=None, attribute="blocks")
