"""Training under faults (lipscope.training): planted checkpoint files run no code, a resume refuses
changed options or data, bad options are refused before any folder exists, a failed write (disk
full) at any stage leaves no partial checkpoint and resumes to the uninterrupted result, a NaN loss
keeps the last checkpoint, and `lipscope train` killed by SIGINT/SIGTERM/SIGKILL resumes to the
same weights. Runs are tiny (conftest's tiny UNet, 6 steps) and compared bit-exactly on CPU."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import accelerate
import pytest
import safetensors.torch
import torch
from conftest import HANG_S, TINY, tiny_unet
from safetensors.torch import load_file

import lipscope.training as training
from lipscope.data import load_data
from lipscope.errors import InputError
from lipscope.schedules import DEFAULT_SCHEDULER_CONFIG
from lipscope.training import SAFE_TO_CHANGE, TrainConfig, train_loop

ENOSPC = os.strerror(errno.ENOSPC)  # "No space left on device"


def _data(n: int = 64) -> torch.Tensor:
    return load_data("digits", n, 0, (1, 8, 8))


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=8, lr=1e-3, warmup_steps=2, checkpoint_every=2, ema_decay=0.9, seed=3)
    return TrainConfig(**{**base, **kw})


def _train(out: Path, cfg: TrainConfig | None = None, data: torch.Tensor | None = None, sched=None, **kw):
    data = _data() if data is None else data
    return train_loop(tiny_unet(seed=7), sched or DEFAULT_SCHEDULER_CONFIG, data, cfg or _cfg(), out, **kw)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")


def _assert_same_run(run: Path, ref: Path) -> None:
    """Same loss log (9 significant digits) and bit-identical final (EMA) weights."""
    assert (run / "loss.csv").read_text() == (ref / "loss.csv").read_text()
    a, b = _weights(run), _weights(ref)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _leftovers(run: Path) -> list[str]:
    """Unfinished writes: dot-folders and dot-files (``.step-N.tmp``, ``.pipeline.tmp-PID``, …)."""
    return sorted(str(p.relative_to(run)) for p in run.rglob(".*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every faulty one must reproduce."""
    run = tmp_path_factory.mktemp("reference") / "run"
    _train(run)
    return run


# ---------------------------------------------------------------------------------------------
# 1. planted pickles
# ---------------------------------------------------------------------------------------------


class _Evil:
    """Unpickling this runs a shell command: the classic planted-checkpoint payload."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _payloads(marker: Path) -> dict[str, bytes]:
    """A raw pickle and a torch.save zip, each checked to be live (full unpickling runs it)."""
    buf = io.BytesIO()
    torch.save(_Evil(marker), buf)
    out = {"pickle": pickle.dumps(_Evil(marker)), "torch.save": buf.getvalue()}
    pickle.loads(out["pickle"])
    assert marker.exists()
    marker.unlink()
    torch.load(io.BytesIO(out["torch.save"]), weights_only=False)  # what --resume did to ema.pt
    assert marker.exists()
    marker.unlink()
    return out


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's notice about the raw pickle
def test_planted_checkpoint_files_run_no_code(tmp_path, reference):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    payloads = _payloads(marker)
    _train(run, stop_after=2)
    ck = run / "checkpoints" / "step-2"
    pristine = tmp_path / "pristine"
    shutil.copytree(ck, pristine)
    files = sorted(str(p.relative_to(ck)) for p in ck.rglob("*") if p.is_file())
    assert files == [
        "accelerate/model.safetensors",
        "accelerate/optimizer.bin",
        "accelerate/random_states_0.pkl",
        "accelerate/scheduler.bin",
        "ema.json",
        "ema.safetensors",
        "lipscope_step.json",
    ]
    for rel in files:
        for kind, payload in payloads.items():
            shutil.rmtree(ck)
            shutil.copytree(pristine, ck)
            (ck / rel).write_bytes(payload)
            with pytest.raises(InputError) as e:
                _train(run, resume=True)
            msg = str(e.value)
            assert not marker.exists(), f"{kind} in {rel} ran code"
            assert "\n" not in msg and f"{ck / rel} cannot be loaded" in msg, (rel, kind, msg)
            assert f"delete {ck}" in msg and "`out_dir`" in msg
    # an ema.pt (what older versions wrote, a pickle) beside a good checkpoint is never opened
    shutil.rmtree(ck)
    shutil.copytree(pristine, ck)
    (ck / "ema.pt").write_bytes(payloads["torch.save"])
    _train(run, resume=True)
    assert not marker.exists()
    _assert_same_run(run, reference)


def test_accelerate_loader_refuses_pickled_code(tmp_path):
    """accelerate's ``load`` (behind ``load_state``) keeps ``weights_only=True`` by default."""
    from accelerate.utils import load

    marker = tmp_path / "pwned"
    (tmp_path / "optimizer.bin").write_bytes(_payloads(marker)["torch.save"])
    with pytest.raises(pickle.UnpicklingError):
        load(tmp_path / "optimizer.bin")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# 2. resume with other options or data
# ---------------------------------------------------------------------------------------------


def test_resume_refuses_changed_options_and_data(tmp_path, reference):
    run = tmp_path / "run"
    _train(run, stop_after=2)
    refused = [
        (dict(cfg=_cfg(seed=4)), ["`seed` 3 → 4"]),
        (dict(cfg=_cfg(lr=2e-3, steps=8)), ["`steps` 6 → 8", "`lr` 0.001 → 0.002"]),
        (dict(cfg=_cfg(etsdm=True)), ["`etsdm` False → True", "the model config"]),
        (dict(cfg=_cfg(mixed_precision="bf16")), ["`mixed_precision` 'no' → 'bf16'"]),
        (dict(data=_data(32)), ["`data`", "[64, 1, 8, 8]", "[32, 1, 8, 8]"]),
        (dict(data=_data() + 1e-3), ["`data`", "sha256"]),
        (dict(source="finetune of other"), ["model source '' → 'finetune of other'"]),
        (dict(sched={**DEFAULT_SCHEDULER_CONFIG, "beta_schedule": "squaredcos_cap_v2"}), ["the scheduler"]),
    ]
    for kw, expect in refused:
        with pytest.raises(InputError) as e:
            _train(run, resume=True, **kw)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("`resume`:"), msg
        assert "rerun with the original values or start a new `out_dir`" in msg
        for part in expect:
            assert part in msg, (part, msg)
    # a checkpoint of an older lipscope (an ema.pt pickle, no record of its options) is refused
    step = run / "checkpoints" / "step-2" / "lipscope_step.json"
    kept = step.read_text()
    step.write_text(json.dumps({k: v for k, v in json.loads(kept).items() if k != "run"}))
    with pytest.raises(InputError, match="written by an older lipscope .*start a new `out_dir`"):
        _train(run, resume=True)
    step.write_text(kept)
    assert SAFE_TO_CHANGE == ("checkpoint_every", "keep_checkpoints")
    # what only decides when checkpoints are written may change: the result is the same
    _train(run, _cfg(checkpoint_every=1, keep_checkpoints=3), resume=True)
    _assert_same_run(run, reference)
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-4", "step-5", "step-6"]


# ---------------------------------------------------------------------------------------------
# 4. options validated before anything is written
# ---------------------------------------------------------------------------------------------

BAD = [
    ("steps", 0),
    ("steps", 2.0),
    ("steps", True),
    ("batch_size", 0),
    ("checkpoint_every", 0),
    ("keep_checkpoints", 0),
    ("lr", 0.0),
    ("lr", -1e-3),
    ("lr", float("nan")),
    ("lr", float("inf")),
    ("warmup_steps", -1),
    ("grad_clip", float("inf")),
    ("grad_clip", -1.0),
    ("ema_decay", 1.0),
    ("ema_decay", -0.1),
    ("mixed_precision", "fp8"),
    ("seed", -1),
    ("t_tilde", 0.0),
    ("n", 0),
    ("n", 2.5),
    ("weight_decay", float("nan")),
    ("lr_schedule", "sawtooth"),
]


@pytest.mark.parametrize("field,value", BAD, ids=[f"{f}={v}" for f, v in BAD])
def test_bad_options_refused_before_any_folder(tmp_path, field, value):
    with pytest.raises(InputError, match=f"^`{field}` must be") as e:
        TrainConfig(**{field: value})
    assert "\n" not in str(e.value)
    cfg = _cfg()
    setattr(cfg, field, value)  # changed after construction: train_loop checks again, first
    with pytest.raises(InputError, match=f"^`{field}` must be"):
        _train(tmp_path / "out", cfg)
    assert not (tmp_path / "out").exists()


def test_edge_options_accepted(tmp_path):
    TrainConfig(ema_decay=0.0, grad_clip=0.0, warmup_steps=0, seed=0, weight_decay=0.0, mixed_precision="bf16")
    with pytest.raises(InputError, match="^`stop_after` must be"):
        _train(tmp_path / "out", stop_after=0)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# 3. failed writes: nothing partial left, and the resumed run equals the uninterrupted one
# ---------------------------------------------------------------------------------------------


def _in_step4(path) -> bool:
    return ".step-4.tmp" in str(path)


def _into(name: str):
    return lambda p: Path(p).name == name


def _loss_after(step: int):  # the loss.csv written after checkpoint `step`
    return lambda p: Path(p).name == "loss.csv" and (Path(p).parent / "checkpoints" / f"step-{step}").exists()


# stage → (object, attribute, index of the path argument, fail when the path …, write first, error)
STAGES = {
    "accelerate-state": (accelerate.Accelerator, "save_state", 1, _in_step4, True, OSError),
    "optimizer-torch.save": (torch, "save", 1, lambda p: _in_step4(p) and "optimizer" in str(p), True, RuntimeError),
    "ema-safetensors": (safetensors.torch, "save_file", 1, _in_step4, False, OSError),
    "step-json": (Path, "write_text", 0, lambda p: _in_step4(p) and p.name == "lipscope_step.json", False, OSError),
    "rename": (os, "replace", 1, _into("step-4"), False, OSError),
    "loss.csv": (os, "replace", 1, _loss_after(4), False, OSError),
    "loss.csv-last": (os, "replace", 1, _loss_after(6), False, OSError),  # the resume runs no step
    "pipeline-weights": (safetensors.torch, "save_file", 1, lambda p: ".pipeline.tmp" in str(p), True, OSError),
    "pipeline-rename": (os, "replace", 1, _into("pipeline"), False, OSError),
    "train.json": (os, "replace", 1, _into("train.json"), False, OSError),
}
CHECKPOINT_STAGES = ["accelerate-state", "optimizer-torch.save", "ema-safetensors", "step-json", "rename"]


@pytest.mark.parametrize("stage", list(STAGES))
def test_failed_write_leaves_nothing_partial_and_resumes(tmp_path, monkeypatch, reference, stage):
    target, attr, at, when, write_first, kind = STAGES[stage]
    original = getattr(target, attr)
    failed = []

    def failing(*a, **k):
        if len(a) <= at or not when(a[at]):
            return original(*a, **k)
        if write_first:  # a partial folder is left on disk for the cleanup to remove
            original(*a, **k)
        failed.append(stage)
        if kind is RuntimeError:  # what torch.save raises on a full disk
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0\nframes")
        raise OSError(errno.ENOSPC, ENOSPC)

    run = tmp_path / "run"
    monkeypatch.setattr(target, attr, failing)
    with pytest.raises(InputError) as e:
        _train(run)
    monkeypatch.undo()
    msg = str(e.value)
    assert failed and "\n" not in msg and msg.startswith("could not write"), msg
    assert (ENOSPC if kind is OSError else "unexpected pos") in msg
    assert _leftovers(run) == []
    if stage in CHECKPOINT_STAGES:  # the last complete checkpoint is the one before
        assert sorted(os.listdir(run / "checkpoints")) == ["step-2"]
    _train(run, resume=True)
    assert _leftovers(run) == []
    _assert_same_run(run, reference)


def test_unfinished_writes_are_ignored_and_removed(tmp_path, reference):
    """What a SIGKILL mid-write leaves: a complete-looking ``.step-6.tmp`` (killed before its rename)
    must not be resumed from, and it and the other dot-leftovers are removed."""
    run = tmp_path / "run"
    _train(run, stop_after=4)
    cks = run / "checkpoints"
    shutil.copytree(cks / "step-4", cks / ".step-6.tmp")
    meta = json.loads((cks / ".step-6.tmp" / "lipscope_step.json").read_text())
    (cks / ".step-6.tmp" / "lipscope_step.json").write_text(json.dumps({**meta, "step": 6}))
    (cks / ".step-0.old" / "accelerate").mkdir(parents=True)  # killed while dropping an old checkpoint
    (run / ".pipeline.tmp-99999" / "unet").mkdir(parents=True)
    (run / ".pipeline.old-99999").mkdir()
    (run / ".loss.csv.k3j2.tmp").write_text("step,loss")
    (cks / "step-x").mkdir()  # not a checkpoint name: ignored, left alone
    _train(run, resume=True)
    assert _leftovers(run) == []
    _assert_same_run(run, reference)


# ---------------------------------------------------------------------------------------------
# 5. NaN loss
# ---------------------------------------------------------------------------------------------


def test_nan_loss_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    calls = []
    original = training.diffusion_loss

    def poisoned(*a, **k):
        calls.append(1)
        loss = original(*a, **k)
        return loss * float("nan") if len(calls) == 4 else loss  # step 3

    monkeypatch.setattr(training, "diffusion_loss", poisoned)
    run = tmp_path / "run"
    with pytest.raises(InputError) as e:
        _train(run)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("loss became nan at step 3 (last checkpoint: step-2)"), msg
    assert "lower `lr`" in msg and "new `out_dir`" in msg
    assert sorted(os.listdir(run / "checkpoints")) == ["step-2"] and _leftovers(run) == []
    assert len((run / "loss.csv").read_text().splitlines()) == 3  # header, steps 0 and 1
    assert not (run / "pipeline").exists()


# ---------------------------------------------------------------------------------------------
# 6. signals: `lipscope train` killed mid-run resumes to the same weights
# ---------------------------------------------------------------------------------------------


def _cli(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    cfg = tmp_path / "tiny.json"
    if not cfg.exists():
        tiny = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}
        cfg.write_text(json.dumps({"_class_name": "UNet2DModel", **tiny}))
    args = ["--data", "digits", "--steps", "200", "--checkpoint-every", "5", "--batch-size", "8", "--no-progress"]
    return [sys.executable, "-m", "lipscope", "train", "--config", "tiny.json", *args, "--out", str(out), *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _steps(out: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step-*") if p.name[5:].isdigit())


def _interrupt(tmp_path: Path, out: Path, sig: int, after: int, resume: bool) -> tuple[int, str]:
    """Start (or resume) the run, wait for a checkpoint past ``after``, send ``sig``; (code, stderr)."""
    cmd = _cli(tmp_path, out, *(["--resume"] if resume else []))
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + HANG_S
    while not [s for s in (_steps(out) if out.exists() else []) if s > after]:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no checkpoint past step {after}: {proc.communicate()[1][-2000:]}")
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=HANG_S)
    assert max(_steps(out)) < 200, "the run ended before the signal"
    return proc.returncode, err


@pytest.mark.slow
def test_signals_then_resume_give_the_uninterrupted_weights(tmp_path):
    """One run of 200 steps, interrupted three times (SIGINT, SIGTERM, SIGKILL) and resumed each
    time; an uninterrupted run goes alongside (one core each). Same loss log and weights."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    reference = subprocess.Popen(
        _cli(tmp_path, ref), cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        rc, err = _interrupt(tmp_path, out, signal.SIGINT, 0, resume=False)
        assert rc == 130 and "interrupted" in err and "Traceback" not in err, err[-2000:]
        assert not [p for p in _leftovers(out) if ".tmp" in p]
        rc, err = _interrupt(tmp_path, out, signal.SIGTERM, max(_steps(out)), resume=True)
        # without a handler Python dies by the signal (no cleanup, no traceback); with the CLI's
        # SIGTERM → KeyboardInterrupt handler it exits like SIGINT and leaves nothing partial
        assert rc in (-signal.SIGTERM, 130, 128 + signal.SIGTERM) and "Traceback" not in err, (rc, err[-2000:])
        if rc != -signal.SIGTERM:
            assert not [p for p in _leftovers(out) if ".tmp" in p]
        rc, _ = _interrupt(tmp_path, out, signal.SIGKILL, max(_steps(out)), resume=True)
        assert rc == -signal.SIGKILL  # may leave a .step-N.tmp: the resume ignores and removes it
        done = subprocess.run(_cli(tmp_path, out, "--resume"), cwd=tmp_path, env=ENV, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        assert _leftovers(out) == []
    finally:
        _, ref_err = reference.communicate(timeout=HANG_S)
    assert reference.returncode == 0, ref_err[-2000:]
    _assert_same_run(out, ref)


# ---------------------------------------------------------------------------------------------
# 7. killed inside the first checkpoint, --resume with nothing to resume (issue 23 §2, §3)
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _warnings():
    """The messages lipscope's logger warns with inside the block (whatever handlers a CLI run left on it)."""
    got: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(record.getMessage())

    lg, h = logging.getLogger("lipscope"), Keep(logging.WARNING)
    lg.addHandler(h)
    try:
        yield got
    finally:
        lg.removeHandler(h)


def _tiny_config(tmp_path: Path) -> Path:
    """The conftest UNet's config.json, for `lipscope train --config`."""
    _cli(tmp_path, tmp_path / "unused")  # writes tmp_path/tiny.json
    return tmp_path / "tiny.json"


def _two_steps(tmp_path: Path) -> list[str]:
    """`lipscope train` of the tiny UNet for 2 steps, without warm-up (no warm-up warning line) or progress bar."""
    cfg = str(_tiny_config(tmp_path))
    return ["train", "--config", cfg, "--steps", "2", "--warmup", "0", "--batch-size", "4", "--no-progress"]


def test_killed_inside_the_first_checkpoint_continues_from_step_0(tmp_path, reference, capfd, monkeypatch):
    """SIGKILL while `.step-2.tmp` was written (the first checkpoint): no complete checkpoint, a folder that is not
    empty. A fresh start is refused naming --resume (train has no --overwrite); --resume ignores the unfinished
    folder, says it starts at step 0, removes it, and ends with the uninterrupted run."""
    from test_bad_inputs import assert_one_line_refusal, run_inprocess

    run = tmp_path / "run"
    _train(run, stop_after=2)
    cks = run / "checkpoints"
    os.replace(cks / "step-2", cks / ".step-2.tmp")  # what the kill left: the folder before its rename
    (cks / ".step-2.tmp" / "ema.safetensors").write_bytes(b"cut sho")
    (run / "loss.csv").unlink()  # written after the checkpoint: never reached
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _tiny_config(tmp_path)
    argv = ["train", "--config", str(cfg), "--steps", "2", "--batch-size", "8", "--no-progress", "--out", str(run)]
    line = assert_one_line_refusal(run_inprocess(argv, capfd, monkeypatch), ("--out", "--resume"))
    assert "--overwrite" not in line
    res = _train(run, resume=True)  # the Python API: the same loop
    assert res["steps"] == 6 and _leftovers(run) == []
    _assert_same_run(run, reference)


def test_resume_with_nothing_to_resume_starts_fresh_and_says_so(tmp_path, reference):
    """A pre-emptible job passes --resume on every start: with no checkpoint the run starts at step 0 (one warning);
    a checkpoint of other options is still refused."""
    run = tmp_path / "run"
    with _warnings() as said:
        _train(run, resume=True)
    assert any("no complete checkpoint" in w and "step 0" in w for w in said), said
    _assert_same_run(run, reference)
    with pytest.raises(InputError, match="`seed` 3 → 4"):
        _train(run, _cfg(seed=4), resume=True)


def test_cli_resume_with_nothing_to_resume_is_a_fresh_run(tmp_path, capfd, monkeypatch):
    """The same through `lipscope train --resume` on an --out that does not exist: exit 0, the warning is the only
    stderr line."""
    from test_bad_inputs import ANSI, run_inprocess

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = [*_two_steps(tmp_path), "--resume"]
    res = run_inprocess([*argv, "--out", str(tmp_path / "run")], capfd, monkeypatch)
    assert res.code == 0, res.stderr + res.exc
    lines = [ln for ln in ANSI.sub("", res.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: --resume:") and "step 0" in lines[0], lines
    assert (tmp_path / "run" / "pipeline").is_dir()


def test_a_torch_message_during_resume_is_not_turned_into_flags(tmp_path, capfd, monkeypatch):
    """A pickle planted in the optimizer state: torch's refusal quotes `weights_only` and `False`; the line keeps
    them as they are (they are no lipscope parameters), instead of --weights-only … --False."""
    from test_bad_inputs import assert_one_line_refusal, run_inprocess

    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = [*_two_steps(tmp_path), "--checkpoint-every", "1", "--out", str(run)]
    assert run_inprocess(argv, capfd, monkeypatch).code == 0
    (run / "checkpoints" / "step-2" / "accelerate" / "optimizer.bin").write_bytes(_payloads(marker)["torch.save"])
    argv.append("--resume")
    line = assert_one_line_refusal(run_inprocess(argv, capfd, monkeypatch), ("optimizer.bin", "--out"))
    assert not marker.exists()
    assert "`weights_only`" in line and "--weights-only" not in line and "--False" not in line, line


# ---------------------------------------------------------------------------------------------
# 8. latent models: the latent cache is a cache, LoRA options are checked before it is written
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny text-conditioned SD pipeline folder and a folder of six 16×16 images."""
    import numpy as np
    from PIL import Image
    from text_fixtures import save_sd_text_pipeline

    root = tmp_path_factory.mktemp("sd")
    imgs = root / "imgs"
    imgs.mkdir()
    rs = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rs.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(imgs / f"im{i}.png")
    return save_sd_text_pipeline(root / "sd"), imgs


def _finetune_sd(sd, out: Path, **kw):
    from lipscope.runs import TrainOptions, run_training

    cfg = TrainConfig(**{**dict(steps=2, batch_size=2, warmup_steps=0, checkpoint_every=1, seed=3), **kw})
    return run_training(TrainOptions(model=str(sd[0]), data=str(sd[1]), out=str(out), training=cfg,
                                     resume=(out / "checkpoints").is_dir()))  # fmt: skip


def test_a_damaged_latent_cache_is_encoded_again(tmp_path, sd):
    run = tmp_path / "run"
    first = _finetune_sd(sd, run)
    lat = run / "latents.safetensors"
    good, kept = lat.read_bytes(), load_file(lat)["latents"].clone()  # (load_file maps the file)
    lat.write_bytes(good[: len(good) // 2])
    with _warnings() as said:
        res = _finetune_sd(sd, run)  # a resume of the finished run: reads the cache, finds it damaged
    assert any("latent cache" in w and "again" in w for w in said), said
    assert res["latents"]["cache"] == "written" and torch.equal(load_file(lat)["latents"], kept)
    assert res["final_loss_mean_last_100"] == first["final_loss_mean_last_100"]


def test_a_full_disk_while_caching_latents_is_one_line_and_leaves_no_folder(tmp_path, sd, monkeypatch):
    import safetensors.torch as st

    real = st.save_file

    def full(tensors, filename, *a, **k):
        if "latents" in str(filename):
            raise OSError(errno.ENOSPC, ENOSPC)
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(st, "save_file", full)
    with pytest.raises(InputError) as e:
        _finetune_sd(sd, tmp_path / "run")
    msg = str(e.value)
    assert "\n" not in msg and "latents.safetensors" in msg and ENOSPC in msg, msg
    assert not (tmp_path / "run").exists()
