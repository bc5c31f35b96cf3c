"""From a recording (:mod:`.capture`) to a replayable step (:class:`.replay.CapturedCall`), every finding checked:

1. each denoiser call of a step: its latent, timestep and per-row inputs (:mod:`.inputs`), the per-row reading
   chosen as the first that reproduces the recorded outputs when replayed for other rows;
2. how the calls' outputs became what the pipeline handed ``scheduler.step`` (a linear combination fitted over the
   steps — CFG, a sign — or a CFG rescaled along the last dimension), reduced to the conditional branch when no
   guidance scale was asked for;
3. the whole replayed step against the recorded model outputs;
4. the prediction convention: the scheduler's own ``step`` on the recorded output against the step lipscope's
   conversion (process α, σ and prediction type) implies.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from ..errors import short_error
from ..targets import from_epsilon
from .capture import Recording, call_root, first_output
from .inputs import (
    Unidentified,
    batch_candidates,
    check_constant_across_steps,
    find_latent,
    find_timestep,
    relative_error,
    unit_roundoff,
)
from .replay import CapturedCall, Combination, Template, as_rows, slice_like, to_sample


def replay_tolerance(dtype: torch.dtype) -> float:
    """√u of float32 (of the dtype, if coarser): half of float32's digits. Replaying a call at another batch
    composition changes the output by rounding only — float32 rounding even in a float64 run where a network keeps
    parts in float32 (rotary tables, upcast norms): ≤ 3e-6 relative on every tested pipeline — while a misread input
    changes it by O(1)."""
    return math.sqrt(max(unit_roundoff(dtype), unit_roundoff(torch.float32)))


STEP_TOLERANCE = 1e-3  # scheduler (float32 ᾱ: a product of up to T float32 factors) vs lipscope (float64)


def _check_rows(rec: Recording) -> tuple[torch.Tensor, list[int], list[int]]:
    """Two rows to replay: (step 0, condition 0) and (step 1, condition 1 mod P)."""
    p = rec.steps[0].sample.shape[0]
    steps, q = [0, 1], [0, 1 % p]
    x = torch.stack([rec.steps[s].sample[c] for s, c in zip(steps, q, strict=True)])
    return x, steps, q


def _template(rec: Recording, position: int, ks: list[float], dtype: torch.dtype, denoiser: Any) -> Template:
    calls = [rec.calls_of(i)[position] for i in range(len(rec.steps))]
    p = rec.steps[0].sample.shape[0]
    latent = find_latent(calls[0], rec.steps[0].sample)
    for i, c in enumerate(calls[1:], 1):
        if find_latent(c, rec.steps[i].sample).path != latent.path:
            raise Unidentified("the noisy latent moves between the denoiser's inputs from step to step")
    time = find_timestep(calls, ks, latent.path, dtype)
    check_constant_across_steps(calls, (latent.path, time.path))
    root = call_root(calls[0].args, calls[0].kwargs)
    x, steps, q = _check_rows(rec)
    k = torch.tensor([ks[s] for s in steps], dtype=torch.float64)
    qq = torch.tensor(q)
    m = latent.blocks
    want = torch.cat([torch.stack([as_rows(calls[s].output)[j * p + c] for s, c in zip(steps, q, strict=True)])
                      for j in range(m)])  # fmt: skip
    tol, best, errors = replay_tolerance(dtype), math.inf, []
    for cand in batch_candidates(root, m * p, (latent.path, time.path)):
        tpl = Template(root, cand, latent, time, p, _dtype_at(root, latent))
        try:
            with torch.no_grad():
                got = tpl.call(denoiser, x, k, qq)
        except Exception as e:  # a wrong reading of the inputs may fail inside the denoiser: try the next
            errors.append(short_error(e))
            continue
        if got.shape == want.shape:
            err = relative_error(got, want)
            best = min(best, err)
            if err <= tol:
                return tpl
    raise Unidentified(
        "replaying the recorded denoiser call for other rows does not reproduce its outputs under any reading of its "
        f"per-row inputs (best relative difference {best:.3g}, tolerance {tol:.2g}"
        + (f"; the denoiser raised {errors[0]}" if errors else "")
        + ")"
    )


def _dtype_at(root: dict[str, Any], latent: Any) -> torch.dtype:
    from .capture import get_at

    node = get_at(root, latent.path)
    return (node[0] if isinstance(node, list) else node).dtype


def _parts(rec: Recording, step: int, sample_row: tuple[int, ...], blocks: list[int]) -> list[list[torch.Tensor]]:
    p = rec.steps[0].sample.shape[0]
    out = []
    for i, call in enumerate(rec.calls_of(step)):
        raw = slice_like(as_rows(call.output), sample_row).to(torch.float64)
        out.append([raw[j * p : (j + 1) * p] for j in range(blocks[i])])
    return out


def _fit(rec: Recording, sample_row: tuple[int, ...], blocks: list[int], dtype: torch.dtype,
         cfg_value: float | None) -> Combination:  # fmt: skip
    """The combination that turns the calls' outputs into the recorded model outputs, over every step."""
    idx = [(i, j) for i, b in enumerate(blocks) for j in range(b)]
    cols, ys, scales = [], [], []
    for s in range(len(rec.steps)):
        parts = _parts(rec, s, sample_row, blocks)
        cols.append(torch.stack([parts[i][j].reshape(-1) for i, j in idx], dim=1))
        out = slice_like(rec.steps[s].model_output.to(torch.float64), sample_row)
        ys.append(out.reshape(-1))
    a, y = torch.cat(cols), torch.cat(ys)
    coef = torch.linalg.lstsq(a, y[:, None]).solution[:, 0]
    for c in range(a.shape[1]):
        scales.append(abs(float(coef[c])) * float(torch.linalg.vector_norm(a[:, c])))
    # the combination's arithmetic is rounded in the coarsest dtype it saw (pipelines upcast or downcast outputs)
    seen = [rec.steps[0].model_output.dtype, *(as_rows(c.output).dtype for c in rec.calls_of(0)), dtype]
    u = max(unit_roundoff(t) for t in seen if t.is_floating_point)
    ynorm = float(torch.linalg.vector_norm(y))
    res = float(torch.linalg.vector_norm(a @ coef - y)) / ynorm
    bound = 64 * u * sum(scales) / ynorm
    total = float(coef.sum())
    weights = [[0.0] * b for b in blocks]
    if res <= bound and abs(abs(total) - 1) <= 64 * u * max(1.0, float(coef.abs().sum())):
        sign = 1.0 if total > 0 else -1.0
        for (i, j), c in zip(idx, coef.tolist(), strict=True):
            weights[i][j] = _snap_weight(sign * c, 64 * u * max(1.0, abs(c)), cfg_value)
        return Combination(tuple(tuple(w) for w in weights), None, sign, res)
    if len(idx) == 2 and cfg_value is not None:
        return _fit_normalised(rec, sample_row, blocks, idx, cfg_value, u, res)
    raise Unidentified(
        f"the pipeline's model output is no fixed linear combination of its denoiser outputs (relative residual "
        f"{res:.2g}, rounding bound {bound:.2g}): a guidance that changes between steps or a nonlinear one"
    )


def _snap_weight(w: float, tol: float, cfg: float | None) -> float:
    """A fitted weight snapped to what a guidance combination writes (w, 1 − w, 1 + w, −w for the pipeline's scale,
    0, ±1, or a multiple of 1/8) where it lies within the fit's rounding, else kept."""
    exact = [0.0, 1.0, -1.0] + ([cfg, 1 - cfg, 1 + cfg, -cfg] if cfg is not None else [])
    for r in [*exact, round(w * 8) / 8]:
        if abs(r - w) <= tol:
            return r
    return w


def _fit_normalised(rec, sample_row, blocks, idx, w: float, u: float, linear_res: float) -> Combination:
    """CFG rescaled along the last dimension to the conditional output's norm (Qwen-Image, Lumina 2):
    out = ±comb·‖R_c‖/‖comb‖ with comb = R_u + w (R_c − R_u)."""
    for keep in range(2):
        weights = [[0.0] * b for b in blocks]
        (ci, cj), (ui, uj) = idx[keep], idx[1 - keep]
        weights[ci][cj], weights[ui][uj] = w, 1 - w
        for sign in (1.0, -1.0):
            comb = Combination(tuple(tuple(x) for x in weights), (ci, cj), sign)
            errs = [relative_error(comb.apply(_parts(rec, s, sample_row, blocks)).reshape(-1),
                                   slice_like(rec.steps[s].model_output, sample_row).reshape(-1))
                    for s in range(len(rec.steps))]  # fmt: skip
            if max(errs) <= 256 * u * (1 + abs(w)):
                return replace(comb, residual=max(errs))
    raise Unidentified(
        f"the pipeline's model output is neither a linear combination of its denoiser outputs (relative residual "
        f"{linear_res:.2g}) nor a CFG rescaled to the conditional output's norm"
    )


def conditional_only(comb: Combination) -> Combination:
    """The conditional branch alone (no guidance asked for): the part a CFG weights up (or keeps the norm of)."""
    parts = [(i, j, w) for i, ws in enumerate(comb.weights) for j, w in enumerate(ws) if w]
    if len(parts) < 2:
        return comb
    ci, cj = comb.keep if comb.keep is not None else max(parts, key=lambda p: p[2])[:2]
    weights = [[0.0] * len(ws) for ws in comb.weights]
    weights[ci][cj] = 1.0
    return Combination(tuple(tuple(w) for w in weights), None, comb.sign, comb.residual)


def identify_call(rec: Recording, ks: list[float], denoiser: Any, dtype: torch.dtype,
                  cfg_value: float | None, guided: bool) -> tuple[CapturedCall, dict[str, Any]]:  # fmt: skip
    """The replayable step of a recording, and what was found (for run.json)."""
    if len(rec.steps) < 3:
        raise Unidentified(f"the pipeline ran {len(rec.steps)} scheduler steps for 3 asked (need 3 to fit the time)")
    counts = {len(rec.calls_of(i)) for i in range(len(rec.steps))}
    if len(counts) != 1 or 0 in counts:
        raise Unidentified(f"the denoiser is called {sorted(counts)} times per step: not one fixed call pattern")
    sample_row = tuple(rec.steps[0].sample.shape[1:])
    templates = tuple(_template(rec, i, ks, dtype, denoiser) for i in range(counts.pop()))
    full = _fit(rec, sample_row, [t.blocks for t in templates], dtype, cfg_value)
    comb = full if guided else conditional_only(full)
    call = CapturedCall(denoiser, templates, comb, sample_row)
    x, steps, q = _check_rows(rec)
    want = []
    for s, c in zip(steps, q, strict=True):
        parts = _parts(rec, s, sample_row, [t.blocks for t in templates])
        want.append(to_sample(comb.apply([[r[c : c + 1] for r in ps] for ps in parts]), sample_row)[0])
    with torch.no_grad():
        got = call(x, torch.tensor([ks[s] for s in steps], dtype=torch.float64), torch.tensor(q))
    err = relative_error(got, torch.stack(want))
    if err > replay_tolerance(dtype):
        raise Unidentified(f"the replayed step differs from the recorded one by {err:.3g} (relative)")
    found = {
        "latent_input": _path(templates[0].latent.path),
        "latent_form": templates[0].latent.form,
        "timestep_input": _path(templates[0].time.path),
        "timestep_fed": templates[0].time.describe(),
        "timestep_fit_residual": templates[0].time.residual,
        "calls_per_step": len(templates),
        "rows_per_call": [t.blocks * t.conditions for t in templates],
        "per_row_inputs": [sorted(_path(p) for p in t.batched) for t in templates],
        "combination_recorded": full.describe(),
        "combination_probed": comb.describe(),
        "combination_residual": full.residual,
        "replay_rel_diff": err,
    }
    return call, found


def _path(path) -> str:
    head = f"args[{path[1]}]" if path[0] == "args" else str(path[1])
    return head + "".join(f"[{p!r}]" for p in path[2:])


def verify_process(rec: Recording, scheduler: Any, process: Any, ks: list[float], knext: Any) -> float:
    """The scheduler's own ``step`` on each recorded model output against lipscope's reading of it: x̂0 (when the
    step returns it) or the deterministic step α' x̂0 + σ' ε̂ to the next point. Steps with α < 0.05 (x̂0 undefined
    at pure noise) are skipped. Returns the largest relative difference; raises above STEP_TOLERANCE."""
    cfg = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    cfg.update({k: False for k in ("thresholding", "clip_sample") if k in cfg})  # sampler post-processing, not the net
    args, kwargs = rec.set_timesteps or ((len(rec.steps),), {})
    worst, checked = 0.0, 0
    for i, st in enumerate(rec.steps):
        k = torch.tensor([ks[i]], dtype=torch.float64, device=st.sample.device)
        a, s = process.alpha(k), process.sigma(k)
        if float(a) < 0.05:
            continue
        fresh = type(scheduler).from_config(cfg)
        fresh.set_timesteps(*args, **kwargs)
        if hasattr(fresh, "set_begin_index"):
            fresh.set_begin_index(i)
        extra = {n: v for n, v in st.kwargs.items() if n not in ("return_dict", "generator")}
        out = fresh.step(st.model_output, st.timestep, st.sample, **extra, return_dict=True)
        x = st.sample.to(torch.float64)
        o = st.model_output.to(torch.float64)
        eps = process.eps_from_output(o, x, k.expand(x.shape[0]), process.prediction_type)
        x0 = from_epsilon(eps, x, "x0", a.expand(x.shape[0]), s.expand(x.shape[0]))
        pred0 = getattr(out, "pred_original_sample", None)
        if pred0 is not None:
            err = relative_error(x0, pred0)
        else:
            kn = torch.tensor([float(knext(fresh, i))], dtype=torch.float64, device=x.device)
            an, sn = process.alpha(kn), process.sigma(kn)
            err = relative_error(an * x0 + sn * eps, out.prev_sample)
        worst, checked = max(worst, err), checked + 1
    if not checked:
        raise Unidentified("no recorded step away from pure noise to check the prediction convention on")
    if worst > STEP_TOLERANCE:
        raise Unidentified(
            f"the scheduler's step disagrees with lipscope's reading of the output as {process.prediction_type} on a "
            f"{process.kind} process (relative difference {worst:.3g})"
        )
    return worst


__all__ = ["first_output", "identify_call", "verify_process"]
