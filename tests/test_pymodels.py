"""``py:`` models: the process and prediction type they carry or are given, ``--prediction-type``, class labels;
each checked against a loop written from diffusers' flow scheduler (tests/reference_processes.py)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from pyflow_fixtures import FLOW_SCHEDULER_CONFIG, make
from reference_processes import flow_fd_reference

from lipscope import rng
from lipscope.data import load_data
from lipscope.errors import InputError
from lipscope.loading import load_model
from lipscope.probe import probe
from lipscope.processes import FlowProcess

U32 = 2.0**-24


class _Sample(torch.nn.Module):
    """A py: network seen as a diffusers denoiser (``.sample``), for the reference loop."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x, t):
        return type("Out", (), {"sample": self.net(x, t)})()


def _reference_K(k: int, n: int) -> np.ndarray:
    x0 = load_data("digits", n, 0, (1, 8, 8), (-1.0, 1.0))
    noise = rng.noise(0, n, (1, 8, 8), dtype=x0.dtype)
    sched = FlowMatchEulerDiscreteScheduler.from_config(FLOW_SCHEDULER_CONFIG)
    return flow_fd_reference(_Sample(make()), sched, x0, noise, k, 1).numpy()


def _check_flow_K(model, n: int = 8, k: int = 500) -> None:
    """K of ``model`` (float64) at k equals the diffusers loop per sample, to the float32 rounding of σ inside
    FlowMatchEulerDiscreteScheduler (≤ u₃₂ on x_k, amplified by the network: 8·u₃₂·(‖ε_a‖ + ‖ε_b‖)/Δτ as in
    tests/test_processes.py)."""
    df = probe(model, "digits", timesteps=[k], samples=n)
    K, ref = df.attrs["K_samples"][:, 0], _reference_K(k, n)
    eps_scale = 2 * np.sqrt(64) * 3  # ‖ε‖ ≤ ‖x‖ + ‖u‖ on 64 values of size ≤ 3, at both points
    assert np.all(np.abs(K - ref) <= 8 * U32 * eps_scale * model.T), (K, ref)
    assert np.all(np.abs(K - ref) <= 1e-4 * ref)


@pytest.fixture()
def pyflow(monkeypatch):
    import pathlib

    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parent))


def test_py_model_takes_the_prediction_type_of_its_scheduler_config(pyflow):
    """Issue 24 case 1: a flow scheduler config made the process flow but left ε as the prediction type (K read a
    velocity as ε: 95 instead of 49 at t = 500)."""
    m = load_model("py:pyflow_fixtures:make", scheduler_config=FLOW_SCHEDULER_CONFIG, dtype="float64")
    assert isinstance(m.schedule, FlowProcess)
    assert m.prediction_type == "flow_prediction" == m.schedule.prediction_type
    _check_flow_K(m)


def test_py_module_carrying_a_flow_process_is_honoured(pyflow, caplog):
    """Issue 23 §1: `.schedule = FlowProcess()` on the module was dropped (probed as VP-ε)."""
    with caplog.at_level(logging.WARNING, logger="lipscope"):
        m = load_model("py:pyflow_fixtures:make_with_process", dtype="float64")
    assert isinstance(m.schedule, FlowProcess) and m.prediction_type == "flow_prediction"
    assert "DDPM default" not in caplog.text
    _check_flow_K(m)


def test_prediction_type_given_and_contradictions_refused(pyflow, tmp_path):
    vp = load_model("py:pyflow_fixtures:make", prediction_type="v_prediction")  # the DDPM default states none
    assert vp.prediction_type == "v_prediction" == vp.schedule.prediction_type and vp.schedule.kind == "vp-discrete"
    flow = {"scheduler_config": FLOW_SCHEDULER_CONFIG}
    same = load_model("py:pyflow_fixtures:make", **flow, prediction_type="flow_prediction")
    assert same.prediction_type == "flow_prediction"
    with pytest.raises(InputError, match=r"`prediction_type` epsilon contradicts .*flow_prediction"):
        load_model("py:pyflow_fixtures:make", scheduler_config=FLOW_SCHEDULER_CONFIG, prediction_type="epsilon")
    with pytest.raises(InputError, match=r"`prediction_type` v_prediction contradicts .*flow_prediction"):
        load_model("py:pyflow_fixtures:make_with_process", prediction_type="v_prediction")
    cfg = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "prediction_type": "epsilon"}
    with pytest.raises(InputError, match=r"`prediction_type` sample contradicts .*epsilon"):
        load_model("py:pyflow_fixtures:make", scheduler_config=cfg, prediction_type="sample")
    with pytest.raises(InputError, match="`prediction_type` 'velocity' not known"):
        load_model("py:pyflow_fixtures:make", prediction_type="velocity")


def test_prediction_type_only_for_py_specs(pipeline_dir):
    with pytest.raises(InputError, match="`prediction_type` is for py: models"):
        load_model(str(pipeline_dir), prediction_type="v_prediction")


def test_py_module_process_and_scheduler_config_disagreeing_is_refused(pyflow):
    ddpm = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000}
    with pytest.raises(InputError, match=r"own process \(flow, .*`scheduler_config` gives another \(vp-discrete"):
        load_model("py:pyflow_fixtures:make_with_process", scheduler_config=ddpm)
    m = load_model("py:pyflow_fixtures:make_with_process", scheduler_config=FLOW_SCHEDULER_CONFIG)  # the same: fine
    assert isinstance(m.schedule, FlowProcess)


def test_py_module_schedule_that_is_no_process_is_refused(pyflow, tmp_path, monkeypatch):
    (tmp_path / "lm_badsched.py").write_text(
        "from pyflow_fixtures import FourierFlow\n"
        "def make():\n"
        "    net = FourierFlow()\n"
        "    net.schedule = 'flow'\n"
        "    return net\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(InputError, match=r"\.schedule is a str, not a lipscope NoiseProcess"):
        load_model("py:lm_badsched:make")


def test_py_module_with_a_diffusers_scheduler_uses_its_config(pyflow, tmp_path, monkeypatch):
    (tmp_path / "lm_dsched.py").write_text(
        "from diffusers import FlowMatchEulerDiscreteScheduler\n"
        "from pyflow_fixtures import FourierFlow\n"
        "def make():\n"
        "    net = FourierFlow()\n"
        "    net.schedule = FlowMatchEulerDiscreteScheduler(shift=3.0)\n"
        "    return net\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    m = load_model("py:lm_dsched:make")
    assert isinstance(m.schedule, FlowProcess) and m.schedule.shift == 3.0 and m.prediction_type == "flow_prediction"


def test_cli_records_one_prediction_type(pyflow, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lipscope.cli import app

    (tmp_path / "flow.json").write_text(json.dumps(FLOW_SCHEDULER_CONFIG))
    out = tmp_path / "run"
    args = ["probe", "--model", "py:pyflow_fixtures:make", "--scheduler-config", str(tmp_path / "flow.json")]
    args += ["--data", "digits", "--timesteps", "500", "--samples", "4", "--out", str(out), "--no-progress"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "run.json").read_text())
    assert meta["model"]["prediction_type"] == meta["model"]["process"]["prediction_type"] == "flow_prediction"
    r = CliRunner().invoke(app, [*args[:-3], "--out", str(tmp_path / "r2"), "--prediction-type", "epsilon"])
    assert r.exit_code == 2 and "--prediction-type epsilon contradicts" in r.output


# ---------------------------------------------------------------------------------------------
# class labels for conditional py: networks (issue 23 §1)
# ---------------------------------------------------------------------------------------------


def test_py_network_taking_class_labels_is_conditioned_per_sample(pyflow):
    """A py: network whose call takes ``class_labels`` gets sample i's label i mod P (one ``--model-arg`` could only
    give every sample the same): K per sample equals K of a network with that label fixed."""
    from pyflow_fixtures import make_labelled

    from lipscope.families import resolve_conditioning
    from lipscope.models import from_callable

    m = load_model("py:pyflow_fixtures:make_labelled", dtype="float64")
    assert m.config["class_labels"] == {"num_classes": 4, "null_class": 4, "required": True}
    df = probe(m, "digits", timesteps=[10, 500], samples=4, conditioning=resolve_conditioning(m, [1, 3], None, None))
    assert df.attrs["conditioning"]["class_labels"] == [1, 3]
    net = make_labelled().double()
    for label, rows in ((1, [0, 2]), (3, [1, 3])):
        fixed = from_callable(
            lambda x, t, c=label: net(x, t, torch.full_like(t, c).long()), FlowProcess(), dtype="float64"
        )
        ref = probe(fixed, "digits", timesteps=[10, 500], samples=4).attrs["K_samples"]
        np.testing.assert_allclose(df.attrs["K_samples"][rows], ref[rows], rtol=1e-12)
    # no label: the null class (unconditional); CFG against it; labels out of range or text refused
    plain = probe(m, "digits", timesteps=[500], samples=2).attrs["conditioning"]
    assert plain["conditioning"] == "unconditional (null class 4)"
    guided = resolve_conditioning(m, [2], None, 3.0)
    assert guided.uncond["class_labels"].tolist() == [4] and guided.guidance_scale == 3.0
    with pytest.raises(InputError, match="`class_labels` 4 is out of range: .* has 4 classes"):
        resolve_conditioning(m, [4], None, None)
    with pytest.raises(InputError, match="class-conditional.*`prompt_embeds`"):
        resolve_conditioning(m, [], "embeds.safetensors", None)


def test_py_network_without_null_class(pyflow, tmp_path, monkeypatch):
    (tmp_path / "lm_labels.py").write_text(
        "import torch\n"
        "from pyflow_fixtures import FourierFlow\n"
        "class Net(FourierFlow):\n"
        "    def forward(self, x, t, class_labels=None):\n"
        "        return super().forward(x, t) * (1 if class_labels is None else 1 + class_labels.view(-1, 1, 1, 1))\n"
        "class Needs(Net):\n"
        "    def forward(self, x, t, class_labels):\n"
        "        return super().forward(x, t, class_labels)\n"
        "def make():\n"
        "    return Net()\n"
        "def needs():\n"
        "    return Needs()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from lipscope.families import resolve_conditioning

    m = load_model("py:lm_labels:make")
    assert resolve_conditioning(m) is None  # its own default (class_labels=None)
    assert resolve_conditioning(m, [7], None, None).cond["class_labels"].tolist() == [7]  # no num_classes: any label
    with pytest.raises(InputError, match="`guidance_scale` needs an unconditional branch: give the network a null_"):
        resolve_conditioning(m, [7], None, 2.0)
    needs = load_model("py:lm_labels:needs")  # loads (the rounding check feeds label 0)
    with pytest.raises(InputError, match="takes `class_labels` and has no default"):
        resolve_conditioning(needs)
