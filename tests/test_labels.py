"""Plots and the summary say what was measured (issue 25, items 4, 5 and the `--plot-x lambda` marks): labels from
the rows' method and step, exact zeros of an E-TSDM model as a finding (never noise), its default grid on both
sides of every boundary, and the λ plot's noise direction and t_split / t̃ marks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lipscope import labels, load_model, probe
from lipscope.etsdm import Etsdm
from lipscope.plots import plot_lipschitz
from lipscope.points import crosses_boundary, fd_points, generated_grid, noise_columns
from lipscope.reduction import summary
from lipscope.runs.probe import split_marks
from lipscope.schedules import default_grid


@pytest.fixture(scope="module")
def etsdm_model():
    return load_model("builtin:digits-etsdm")


@pytest.fixture(scope="module")
def fd_jvp(etsdm_model):
    """fd and jvp of the E-TSDM model: FD inside sub-intervals at 5 and 25, crossing 19 → 20; ∂ε/∂τ = 0 at all three."""
    return probe(etsdm_model, "digits", samples=2, timesteps="5,19,25", method="fd,jvp")


def _legend(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_exact_zeros_are_not_noise_limited(fd_jvp):
    fd = fd_jvp[fd_jvp["method"] == "fd-forward"].set_index("t")
    # inside a sub-interval the network is fed one condition: K = 0 in every sample, no rounding noise, no flag
    assert (fd.loc[[5.0, 25.0], "K_max"] == 0).all()
    assert (fd.loc[[5.0, 25.0], "fd_noise_rel"] == 0).all() and not fd.loc[[5.0, 25.0], "fd_noise_limited"].any()
    assert fd.loc[19.0, "K_mean"] > 0 and np.isfinite(fd.loc[19.0, "fd_noise_rel"])
    assert not fd_jvp["fd_noise_limited"].any()
    # nor time- or truncation-limited: they are usable rows of the summary, none left out
    zero = fd.loc[[5.0, 25.0]]
    assert (zero["fd_time_rel"] == 0).all() and not (zero["fd_time_limited"] | zero["fd_trunc_limited"]).any()
    assert not np.isinf(zero["fd_trunc_rel"]).any() and zero["usable"].all()
    assert summary(fd_jvp, 1000)["excluded_rows"] == 0
    # a zero between two different conditions stays what it was: unresolved by rounding, flagged
    rel, limited = noise_columns(np.zeros((2, 1)), np.ones((2, 1)), np.array([False]))
    assert rel[0] == np.inf and limited[0]


def test_summary_says_exact_zeros(fd_jvp):
    line = labels.zero_line(fd_jvp)
    assert line is not None and "2 of 3 fd-forward rows" in line and "3 of 3 jvp rows" in line
    assert "not rounding noise" in line
    assert labels.zero_line(fd_jvp[fd_jvp["K_mean"] > 0]) is None


def test_log_plot_marks_exact_zeros_on_the_floor(fd_jvp):
    fig = plot_lipschitz(fd_jvp[fd_jvp["method"] == "fd-forward"])
    ax = fig.axes[0]
    assert "K = 0 exactly (2 points)" in _legend(fig)
    (pts,) = ax.collections[-1:]
    xy = pts.get_offsets()
    assert sorted(xy[:, 0]) == [5.0, 25.0] and np.allclose(xy[:, 1], ax.get_ylim()[0])
    both = _legend(plot_lipschitz(fd_jvp))
    assert "fd-forward: K = 0 exactly (2 points)" in both and "jvp: K = 0 exactly (3 points)" in both


def test_labels_come_from_the_method(fd_jvp, etsdm_model):
    jvp = fd_jvp[fd_jvp["method"] == "jvp"]
    fig = plot_lipschitz(jvp, labels.title("m", 2, jvp))
    assert fig.axes[0].get_ylabel() == "K per unit τ = E‖∂ε/∂τ‖"
    assert "Δt" not in fig.axes[0].get_title().replace("no Δt", "") and "JVP, exact" in fig.axes[0].get_title()
    assert "jvp: E‖∂ε/∂τ‖, JVP, exact, no Δt" in _legend(fig)
    fig = plot_lipschitz(fd_jvp, labels.title("m", 2, fd_jvp))
    assert "fd-forward: E‖ε(x_t,t+Δt) − ε(x_t,t)‖ / Δτ, Δt = 1" in _legend(fig)
    assert fig.axes[0].get_title() == "m  (n=2; fd-forward Δt = 1; jvp JVP, exact, no Δt)"
    cond = probe(etsdm_model, "digits", samples=2, timesteps="5,25", space="condition")
    assert labels.title("m", 2, cond) == "m  (n=2; fd-condition condition pairs c_b − c_a = 20 steps apart)"
    assert "Δt = 1" not in plot_lipschitz(cond).axes[0].get_title()


def test_speed_line_names_what_it_counts(fd_jvp, etsdm_model):
    line = labels.speed_line(fd_jvp.attrs, ["fd-forward", "jvp"], 1.0)
    assert f"{fd_jvp.attrs['forwards']} FD forwards" in line and f"{fd_jvp.attrs['jvp_items']} JVP evaluations" in line
    jvp = probe(etsdm_model, "digits", samples=2, timesteps="5", method="jvp")
    line = labels.speed_line(jvp.attrs, ["jvp"], 1.0)
    assert line.startswith("2 JVP evaluations (") and "forwards" not in line


def test_etsdm_default_grid_shows_every_jump():
    e = Etsdm(100.0, 5)
    before = fd_points(default_grid(1000, 998.0), 1.0, "forward", 1000)
    assert crosses_boundary(before.t_a, before.t_b, e).sum() == 1  # main's default grid: the jump at 20 only
    g = generated_grid(None, 1000, 0.0, 998.0, e, 1.0, 0.0)
    pts = fd_points(g, 1.0, "forward", 1000)
    cross = crosses_boundary(pts.t_a, pts.t_b, e)
    assert sorted(pts.t_b[cross]) == [20, 40, 60, 80, 100]  # every boundary crossed once
    assert set(e.boundaries()[1:]) <= set(g) and {b - 2 for b in e.boundaries()[1:]} <= set(g)  # and both sides
    c = generated_grid("default", 1000, 1.0, 997.0, e, 2.0, 1.0)  # central, Δt = 2: t = b − 1 crosses b
    pc = fd_points(c, 2.0, "central", 1000)
    for b in e.boundaries()[1:]:  # crossed, and both neighbours (t_b = b − Δt, t_a = b) inside sub-intervals
        assert ((pc.t_a < b) & (b <= pc.t_b)).any() and {b - 3, b + 1} <= set(c)
    assert len(generated_grid("log:8", 1000, 0.0, 998.0, e, 1.0, 0.0)) == 8  # only the default grid grows


def test_lambda_plot_shows_noise_direction_and_split(fd_jvp, etsdm_model):
    marks = split_marks(etsdm_model, 100.0, "lambda")
    lam = float(etsdm_model.schedule.log_snr(torch.tensor([100.0], dtype=torch.float64)))
    assert list(marks) == [f"t_split = E-TSDM t̃ = 100 (λ = {lam:.3g})"] and marks[list(marks)[0]] == lam
    fig = plot_lipschitz(fd_jvp, x="lambda", marks=marks)
    ax = fig.axes[0]
    assert "less noise" in ax.get_xlabel() and list(marks)[0] in _legend(fig)
    assert any(np.allclose(ln.get_xdata(), lam) for ln in ax.get_lines())
    assert ax.get_ylabel() == "K per unit λ (methods: legend)"
    assert split_marks(etsdm_model, 50.0) == {"t_split = 50": 50.0, "E-TSDM t̃ = 100": 100.0}


def test_terminal_summary_prints_the_named_counts_and_the_zeros(fd_jvp, tmp_path, monkeypatch):
    from rich.console import Console

    from lipscope.cli import common
    from lipscope.cli.probe import _print_summary

    monkeypatch.setattr(common, "out", con := Console(record=True, width=200))
    _print_summary("m", summary(fd_jvp, 1000), fd_jvp, tmp_path, 1.0)
    text = con.export_text()
    assert f"{fd_jvp.attrs['jvp_items']} JVP evaluations" in text and "forwards/s" not in text
    assert "K = 0 exactly" in text and "noise-limited" not in text


def test_jvp_at_etsdm_boundaries_is_zero_not_refused(etsdm_model):
    # ε jumps between t = 19 and 20 because the map does, not because t is cast to an integer: ∂ε/∂τ = 0 exactly
    df = probe(etsdm_model, "digits", samples=2, timesteps="20,40", method="jvp", batch_size=2)
    assert (df["K_max"] == 0).all()


def test_tangent_check_still_refuses_an_integer_cast():
    from lipscope.errors import InputError
    from lipscope.fwad import check_tangent_reaches

    x, rows = torch.ones(2, 3), torch.arange(2)
    cast = lambda x, t, rows: x * torch.floor(t)[:, None]  # noqa: E731  t through an integer cast: d/dt = 0 wrongly
    with pytest.raises(InputError, match="does not reach the network differentiably"):
        check_tangent_reaches(cast, "m", x, torch.tensor([5.0, 20.0]), torch.zeros(2, 3), rows)

    class Mapped:  # E-TSDM: ε = x·f(t), f piecewise constant; only the row at the boundary t = 20 moves
        etsdm = Etsdm(100.0, 5)

        def __call__(self, x, t, rows):
            return x * self.etsdm.map(t)[:, None]

    check_tangent_reaches(Mapped(), "m", x, torch.tensor([5.0, 20.0]), torch.zeros(2, 3), rows)

    class MappedCast(Mapped):  # and a cast of f(t): caught above t̃, where f is the identity
        def __call__(self, x, t, rows):
            return x * torch.floor(self.etsdm.map(t))[:, None]

    with pytest.raises(InputError, match="does not reach the network differentiably"):
        check_tangent_reaches(MappedCast(), "m", x, torch.tensor([150.0, 20.0]), torch.zeros(2, 3), rows)
