"""Sample quality of a model vs a baseline on the same seeds, per sampler and step count, and the paired
(per-seed) differences model − baseline with Student-t confidence intervals."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .errors import InputError
from .features import FeatureSpace, digits_space
from .metrics import fid_inception, frechet_distance, kid, sliced_wasserstein
from .models import EpsModel
from .sampling import as_images, sample

KEYS = ["model", "scheduler", "steps"]


def metric_names(features: str = "digits") -> tuple[str, ...]:
    """The metric columns of a table measured in the feature space named ``features``."""
    return ("fd_pixel", f"fd_{features}", f"kid_{features}", "swd_pixel")


def evaluate_models(
    models: dict[str, EpsModel],
    reference: torch.Tensor,
    *,
    schedulers: list[str],
    steps: list[int],
    num: int = 500,
    seeds: list[int] | tuple[int, ...] = (0, 1, 2),
    inception_weights: str | None = None,
    features: FeatureSpace | None = None,
    progress=None,
) -> pd.DataFrame:
    """Long table: one row per (model, scheduler, steps, seed) with the metrics of :func:`metric_names`
    (``fd_<name>``, ``kid_<name>`` and ``kid_<name>_subset_std`` in the feature space ``features``, default
    the digits classifier: ``fd_digits``, …) and ``fid`` (NaN with ``fid_available = False`` when Inception
    weights are not available).

    Every model is sampled with the same seeds (and its own conditioning), so model and baseline see the same
    initial noise. ``reference`` is the real data (n, C, H, W) in [−1, 1], its features computed once; a latent
    model's samples are decoded by its autoencoder first, and pixels from another range (VE: [0, 1]) mapped to it.
    """
    space = features if features is not None else digits_space()
    fd_col, kid_col = f"fd_{space.name}", f"kid_{space.name}"
    ref_flat = reference.reshape(len(reference), -1).double().numpy()
    ref_feat = space(reference)
    rows = []
    for name, m in models.items():
        for sch in schedulers:
            for k in steps:
                for seed in seeds:
                    # metrics on images in [−1, 1]: latents decoded as the pipeline does, pixels from the model's range
                    x = as_images(m, sample(m, num, scheduler=sch, steps=k, seed=seed))
                    fid = fid_inception(x, reference, inception_weights) if inception_weights else None
                    feat = space(x)
                    kid_mean, kid_std = kid(feat, ref_feat, subsets=100, subset_size=1000, seed=seed)
                    rows.append(
                        {
                            "model": name,
                            "scheduler": sch,
                            "steps": k,
                            "seed": seed,
                            "num": num,
                            "fd_pixel": frechet_distance(x.reshape(num, -1).double().numpy(), ref_flat),
                            fd_col: frechet_distance(feat, ref_feat),
                            kid_col: kid_mean,  # unbiased: comparable at small num, unlike FD
                            f"{kid_col}_subset_std": kid_std,
                            "swd_pixel": sliced_wasserstein(x.reshape(num, -1).numpy(), ref_flat, seed=seed),
                            "fid": np.nan if fid is None else fid,
                            "fid_available": fid is not None,
                        }
                    )
                    if progress:
                        progress(1)
    return pd.DataFrame(rows)


def metric_columns(df: pd.DataFrame) -> list[str]:
    """The metric columns of an evaluate table (lower is better for each), ``fid`` last."""
    cols = [c for c in df.columns if c.startswith(("fd_", "kid_", "swd_")) and not c.endswith("_subset_std")]
    return [*cols, "fid"] if "fid" in df.columns else cols


def summarize_eval(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds per (model, scheduler, steps)."""
    cols = metric_columns(df)
    g = df.groupby(KEYS, sort=False)[cols]
    out = g.mean().add_suffix("_mean").join(g.std(ddof=1).add_suffix("_std")).reset_index()
    out["seeds"] = df.groupby(KEYS, sort=False).size().to_numpy()
    return out


PAIRED_COLUMNS = [
    "model",
    "baseline",
    "scheduler",
    "steps",
    "metric",
    "n",
    "model_mean",
    "baseline_mean",
    "diff_mean",
    "diff_std",
    "ci_low",
    "ci_high",
    "confidence",
    "frac_better",
]


def paired_differences(df: pd.DataFrame, baseline: str = "baseline", confidence: float = 0.95) -> pd.DataFrame:
    """Per (model ≠ ``baseline``, scheduler, steps, metric): the per-seed differences d_s = model − baseline
    (paired by seed, both finite), their mean, standard deviation (ddof 1), n, the Student-t interval
    mean ± t_{(1+confidence)/2, n−1} · std/√n (NaN for n = 1: one seed gives no spread), and ``frac_better``, the
    fraction of seeds where the model is lower (better; ties count as not better). Metrics as
    :func:`metric_columns`; ``fid`` only where it was computed."""
    from scipy import stats

    if not 0 < confidence < 1:
        raise InputError(f"`confidence` {confidence} must be in (0, 1)")
    if baseline not in set(df["model"]):
        raise InputError(
            f"`baseline` {baseline!r} is not a model of the table ({', '.join(map(str, df['model'].unique()))})"
        )
    base = df[df["model"] == baseline]
    rows = []
    for (name, sch, k), d in df[df["model"] != baseline].groupby(KEYS, sort=False):
        b = base[(base["scheduler"] == sch) & (base["steps"] == k)]
        for met in metric_columns(df):
            pair = d[["seed", met]].merge(b[["seed", met]], on="seed", suffixes=("_m", "_b")).dropna()
            if pair.empty:
                continue
            diff = (pair[f"{met}_m"] - pair[f"{met}_b"]).to_numpy(dtype=np.float64)
            n = len(diff)
            mean = float(diff.mean())
            std = float(diff.std(ddof=1)) if n > 1 else float("nan")
            half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / np.sqrt(n) if n > 1 else float("nan")
            rows.append(
                {
                    "model": name,
                    "baseline": baseline,
                    "scheduler": sch,
                    "steps": k,
                    "metric": met,
                    "n": n,
                    "model_mean": float(pair[f"{met}_m"].mean()),
                    "baseline_mean": float(pair[f"{met}_b"].mean()),
                    "diff_mean": mean,
                    "diff_std": std,
                    "ci_low": mean - half,
                    "ci_high": mean + half,
                    "confidence": confidence,
                    "frac_better": float(np.mean(diff < 0)),
                }
            )
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS)
