"""Issue 23 §2: malformed `--prompt-embeds`, `--precision` messages and runs, an overflowing `--guidance-scale`: each
is one line naming the flag (and file) that causes it, exit 2, never a traceback or a wrong culprit."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from family_fixtures import SD_CROSS_ATTENTION_DIM, save_sd_pipeline
from safetensors.torch import save_file

from lipscope.errors import InputError
from lipscope.families import resolve_conditioning
from lipscope.loading import load_model
from lipscope.models import from_unet
from lipscope.probe import probe

D = SD_CROSS_ATTENTION_DIM


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return save_sd_pipeline(tmp_path_factory.mktemp("sd") / "sd")


def _embeds(path, **tensors) -> str:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def _randn(*shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


ONE = torch.tensor([1])
BAD = {  # file contents, guidance scale, what the one line must say
    "zero-rows": ({"prompt_embeds": _randn(0, 5, D)}, None, "prompt_embeds has no rows"),
    "integer": ({"prompt_embeds": torch.ones(2, 5, D, dtype=torch.int64)}, None, "prompt_embeds is int64"),
    "nan": ({"prompt_embeds": _randn(2, 5, D) * math.nan}, None, "prompt_embeds holds NaN/inf"),
    "rows": (
        {"prompt_embeds": _randn(2, 5, D), "negative_prompt_embeds": _randn(3, 5, D)},
        2.0,
        "prompt_embeds has 2 rows and negative_prompt_embeds 3",
    ),
    "tokens": (
        {"prompt_embeds": _randn(2, 5, D), "negative_prompt_embeds": _randn(2, 7, D)},
        2.0,
        "prompt_embeds has 5 tokens and negative_prompt_embeds 7",
    ),
    "negative-nan": (
        {"prompt_embeds": _randn(2, 5, D), "negative_prompt_embeds": _randn(2, 5, D).index_fill(0, ONE, math.inf)},
        2.0,
        "negative_prompt_embeds holds NaN/inf",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_prompt_embeds_are_named(sd, tmp_path, case):
    tensors, w, words = BAD[case]
    path = _embeds(tmp_path / f"{case}.safetensors", **tensors)
    m = load_model(str(sd))
    with pytest.raises(InputError) as e:
        resolve_conditioning(m, None, path, w)
    msg = str(e.value)
    assert msg.startswith(f"`prompt_embeds` {path}: ") and words in msg and "\n" not in msg, msg


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "lipscope", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_cli_names_flag_and_file_for_mismatched_rows(sd, tmp_path):
    path = _embeds(tmp_path / "rows.safetensors", **BAD["rows"][0])
    r = _cli("probe", "--model", str(sd), "--prompt-embeds", path, "--guidance-scale", "2", "--samples", "2",
             "-t", "5", "--out", str(tmp_path / "r"))  # fmt: skip
    line = _one_error_line(r)
    assert f"--prompt-embeds {path}" in line and "2 rows" in line and not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------
# --precision messages and runs
# ---------------------------------------------------------------------------------------------


def test_precision_refusals_name_precision_not_dtype(unet):
    """A noise-limited FD run under `precision` fp16 was refused naming `dtype` float16 and suggesting `dtype`
    float32, flags the user never gave."""
    m = from_unet(unet, {"num_train_timesteps": 1000})
    with pytest.raises(InputError) as e:
        probe(m, "digits", timesteps="3", dt=2e-5, samples=2, precision="fp16")
    msg = str(e.value)
    assert msg.startswith("`precision` fp16:") and "`dtype`" not in msg and "`precision` fp32" in msg, msg


def test_fp16_overflow_names_precision(unet):
    """An fp16 overflow (inf in the network's output) under `precision` fp16 said to check the weights or try
    `dtype` float32; it is the precision's range."""
    m = from_unet(unet, {"num_train_timesteps": 1000})
    with torch.no_grad():
        saved = [p.detach().clone() for p in unet.parameters()]
        unet.conv_out.weight.mul_(1e6)  # outputs beyond fp16's 65504, fine in float32
    try:
        probe(m, "digits", timesteps="5", samples=2)  # float32: finite
        with pytest.raises(InputError) as e:
            probe(m, "digits", timesteps="5", samples=2, precision="fp16")
    finally:
        with torch.no_grad():
            for p, v in zip(unet.parameters(), saved, strict=True):
                p.copy_(v)
    msg = str(e.value)
    assert msg.startswith("`precision` fp16: ") and "overflows" in msg and "weights" not in msg, msg
    assert "65504" in msg and "`precision` bf16" in msg


def test_fp16_jvp_runs_under_the_guard(unet):
    """`precision` fp16 with `method` jvp was refused although a JVP has no cancellation to fear: it runs, and the
    guard measures it against float32."""
    m = from_unet(unet, {"num_train_timesteps": 1000})
    df = probe(m, "digits", timesteps="5,500", samples=4, method="jvp", precision="fp16")
    ref = probe(m, "digits", timesteps="5,500", samples=4, method="jvp")
    assert df.attrs["precision"]["reference"] == "float32"
    rel = (df["K_mean"] / ref["K_mean"] - 1).abs()
    assert (rel <= df["K_rel_err_est"].max() * 4 + 2**-10).all(), (rel, df["K_rel_err_est"])


# ---------------------------------------------------------------------------------------------
# an overflowing guidance scale
# ---------------------------------------------------------------------------------------------


def test_guidance_scale_overflow_is_named(sd, tmp_path):
    """`guidance_scale` 1e308 made ε_u + w(ε_c − ε_u) inf, reported as NaN/inf from the weights."""
    path = _embeds(tmp_path / "ok.safetensors", prompt_embeds=_randn(2, 5, D), negative_prompt_embeds=_randn(2, 5, D))
    m = load_model(str(sd))
    cond = resolve_conditioning(m, None, path, 1e308)
    with pytest.raises(InputError) as e:
        probe(m, "digits", timesteps="5", samples=2, conditioning=cond)
    msg = str(e.value)
    assert "`guidance_scale` 1e+308 overflows" in msg and "weights" not in msg, msg
    r = _cli("probe", "--model", str(sd), "--prompt-embeds", path, "--guidance-scale", "1e308", "--samples", "2",
             "-t", "5", "--out", str(tmp_path / "r"))  # fmt: skip
    assert "--guidance-scale 1e+308 overflows" in _one_error_line(r)
