"""No run deletes or writes into what it reads (issue 26): every input of every command, planted inside ``--out``,
makes ``--overwrite`` (``--resume`` for train/finetune) refuse in one line, with the input untouched.

The inputs are enumerated from the commands themselves: every option that takes a value is either planted here or
listed in NOT_INPUTS, so a new file option cannot slip past the one output-folder check
(:func:`lipscope.runs.common.input_paths`)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from test_bad_inputs import BASE, assert_one_line_refusal, run_inprocess, snapshot

# options whose value names nothing read from disk (a number, a choice, a name, a prompt, a sub-path of --model)
NOT_INPUTS = frozenset(
    "--out --model-arg --prediction-type --timesteps --dt --scheme --method --space --samples --seed --batch-size "
    "--device --dtype "
    "--compile --precision --revision --subfolder --t-split --data-range --target --class-label --prompt "
    "--negative-prompt --guidance-scale --plot-x --dim --mean --var --mixture --schedule --steps --grad-accum --lr "
    "--warmup --ema-decay --grad-clip --mixed-precision --checkpoint-every --t-tilde --n --caption-dropout "
    "--weighting --lora-rank --lora-alpha --lora-targets --scheduler --num --seeds --sampler --reference "
    "--attribute --process --rank --floor --rho --sigma-min --sigma-max --finetune-steps --nfe --arch --size --threads "
    "--finetune-lr --etsdm-from --train --eval-samples --samplers --rtol".split()
)
RESUMES = {"train", "finetune"}  # written into --out as they go: --resume, not --overwrite, lets them into a full one

Plant = Callable[[Path, Path], str]  # (out, pipe) → the option's value, planted inside out


def _pipe(name: str) -> Plant:
    def plant(out: Path, pipe: Path) -> str:
        shutil.copytree(pipe, out / name)
        return str(out / name)

    return plant


def _file(name: str, data: bytes | str | Callable[[Path], bytes]) -> Plant:
    def plant(out: Path, pipe: Path) -> str:
        body = data(pipe) if callable(data) else data
        (out / name).write_bytes(body.encode() if isinstance(body, str) else body)
        return str(out / name)

    return plant


def _npy(name: str, a: np.ndarray) -> Plant:
    def plant(out: Path, pipe: Path) -> str:
        np.save(out / name, a)
        return str(out / name)

    return plant


def _py_package(attr: str) -> Plant:
    """``out`` is itself the package the py: spec imports (``py:<out name>.mod:f``)."""

    def plant(out: Path, pipe: Path) -> str:
        (out / "__init__.py").write_text("")
        (out / "mod.py").write_text("def f():\n    return lambda x, t: x\n")
        return f"py:{out.name}.mod:{attr}"

    return plant


def _features_folder(out: Path, pipe: Path) -> str:
    (out / "feat").mkdir()
    (out / "feat" / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    return str(out / "feat")


def _lora_run(out: Path, pipe: Path) -> str:
    """A LoRA run folder elsewhere whose recorded base model lies inside ``out``."""
    shutil.copytree(pipe, out / "base")
    run = out.parent / "lora-run"
    (run / "lora").mkdir(parents=True)
    (run / "lora" / "lipscope.json").write_text(json.dumps({"training": {"base_model": str(out / "base")}}))
    return str(run)


def _mixture_npz() -> bytes:
    from lipscope.mixtures import mixture_npz, parse_density

    return mixture_npz(parse_density("gmm:2:1x2x2").mixture)


UNET_CONFIG = _file("cfg.json", lambda pipe: (pipe / "unet" / "config.json").read_bytes())
SCHEDULER_CONFIG = _file("s.json", lambda pipe: (pipe / "scheduler" / "scheduler_config.json").read_bytes())
DATA = _npy("x.npy", np.zeros((4, 1, 8, 8), np.float32))
PROMPTS = _file("p.txt", "a cat\n")
EMBEDS = _file("e.safetensors", b"not read: refused before")

# command → (flag, how to plant its value inside --out, id); every input option of every command
PLANTS: dict[str, list[tuple[str, Plant, str]]] = {
    "probe": [
        ("--model", _pipe("m"), "pipeline-folder"),
        ("--model", _py_package("f"), "py-package"),
        ("--model", _lora_run, "lora-run-base"),
        ("--data", DATA, "data"),
        ("--config", UNET_CONFIG, "config"),
        ("--scheduler-config", SCHEDULER_CONFIG, "scheduler-config"),
        ("--prompt-file", PROMPTS, "prompt-file"),
        ("--prompt-embeds", EMBEDS, "prompt-embeds"),
        ("--train-timesteps", _npy("t.npy", np.array([1.0, 5.0, 500.0])), "train-timesteps"),
    ],
    "theory": [("--cov", _npy("cov.npy", np.eye(2)), "cov")],
    "groundtruth": [
        ("--data", _file("m.npz", lambda pipe: _mixture_npz()), "mixture"),
        ("--model-config", UNET_CONFIG, "model-config"),
    ],
    "train": [
        ("--config", UNET_CONFIG, "config"),
        ("--data", DATA, "data"),
        ("--scheduler-config", SCHEDULER_CONFIG, "scheduler-config"),
    ],
    "finetune": [
        ("--model", _pipe("m"), "pipeline-folder"),
        ("--config", UNET_CONFIG, "config"),
        ("--scheduler-config", SCHEDULER_CONFIG, "scheduler-config"),
        ("--data", DATA, "data"),
        ("--captions", _file("c.jsonl", '{"file_name": "a.png", "text": "a cat"}\n'), "captions"),
    ],
    "sample": [
        ("--model", _pipe("m"), "pipeline-folder"),
        ("--model", _py_package("f"), "py-package"),
        ("--prompt-file", PROMPTS, "prompt-file"),
        ("--prompt-embeds", EMBEDS, "prompt-embeds"),
    ],
    "evaluate": [
        ("--model", _pipe("m"), "pipeline-folder"),
        ("--baseline", _pipe("b"), "baseline"),
        ("--data", DATA, "data"),
        ("--features", _features_folder, "features-folder"),
        ("--features", _py_package("f"), "features-py-package"),
        ("--inception-weights", _file("w.pth", b"weights"), "inception-weights"),
        ("--prompt-file", PROMPTS, "prompt-file"),
        ("--prompt-embeds", EMBEDS, "prompt-embeds"),
    ],
}
CASES = [(cmd, f, plant, i) for cmd, rows in PLANTS.items() for f, plant, i in rows]


def _value_options(cmd) -> set[str]:
    return {p.opts[0] for p in cmd.params if p.opts[0].startswith("--") and not getattr(p, "is_flag", False)}


def test_every_input_option_is_planted():
    """Each command's value options are planted here or named as no input: a new file option fails this test."""
    import typer.main

    from lipscope.cli import app

    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        if name in ("compare", "report", "models"):  # one file (refused inside a run it reads); models: no file
            continue
        planted = {f for f, _, _ in PLANTS[name]}
        unknown = _value_options(cmd) - NOT_INPUTS - planted
        assert not unknown, f"{name}: plant these inputs inside --out here, or add them to NOT_INPUTS: {unknown}"


@pytest.mark.parametrize(("cmd", "opt", "plant", "what"), CASES, ids=[f"{c[0]}-{c[3]}" for c in CASES])
def test_an_input_inside_out_is_never_overwritten(cmd, opt, plant, what, tmp_path, pipeline_dir, capfd, monkeypatch):
    work = tmp_path / "w"
    out = work / ("lspkg_" + what.replace("-", "_"))  # a py: package needs an importable name
    out.mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"command": cmd}))  # a run folder the option lets one replace
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    value = plant(out, pipeline_dir)
    base = [a.format(pipe=pipeline_dir) for a in BASE.get(cmd, ["--arch", "unet"])]  # groundtruth: its defaults
    if opt in base:  # the planted value replaces the base's
        i = base.index(opt)
        del base[i : i + 2]
    argv = [cmd, *base, opt, value, "--out", str(out), "--resume" if cmd in RESUMES else "--overwrite"]
    argv += ["--no-progress"] if cmd in RESUMES else []
    before = snapshot(out)
    capfd.readouterr()
    line = assert_one_line_refusal(run_inprocess(argv, capfd, monkeypatch), ("--out", "which this run reads"))
    assert snapshot(out) == before, f"{out} changed"
    print(line)


def test_hub_ids_protect_the_hugging_face_cache(tmp_path, monkeypatch):
    """A hub id is read from the local Hugging Face cache: an --out that holds it is refused too."""
    from huggingface_hub import constants

    from lipscope.errors import InputError
    from lipscope.runs.common import check_out_dir

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(InputError, match="Hugging Face cache"):
        check_out_dir(tmp_path / "hf", overwrite=True, inputs=("google/ddpm-cifar10-32",))
    assert check_out_dir(tmp_path / "elsewhere", overwrite=True, inputs=("google/ddpm-cifar10-32",))
