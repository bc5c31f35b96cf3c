"""Sample quality of a model vs a baseline on the same seeds, per sampler and step count."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .metrics import fid_inception, frechet_distance, kid, sliced_wasserstein
from .models import EpsModel
from .sampling import sample
from .zoo import digits_features, load_digits_classifier

METRICS = ("fd_pixel", "fd_digits", "kid_digits", "swd_pixel")


def evaluate_models(
    models: dict[str, EpsModel],
    reference: torch.Tensor,
    *,
    schedulers: list[str],
    steps: list[int],
    num: int = 500,
    seeds: list[int] | tuple[int, ...] = (0, 1, 2),
    inception_weights: str | None = None,
    progress=None,
) -> pd.DataFrame:
    """Long table: one row per (model, scheduler, steps, seed) with the metrics of ``METRICS`` and
    ``fid`` (NaN with ``fid_available = False`` when Inception weights are not available).

    Every model is sampled with the same seeds (and its own conditioning), so model and baseline see the same
    initial noise. ``reference`` is the real data (n, C, H, W) in [−1, 1]; a latent model's samples are decoded
    by its autoencoder first.
    """
    net = load_digits_classifier()
    ref_flat = reference.reshape(len(reference), -1).double().numpy()
    ref_feat = digits_features(reference, net)
    rows = []
    for name, m in models.items():
        for sch in schedulers:
            for k in steps:
                for seed in seeds:
                    x = sample(m, num, scheduler=sch, steps=k, seed=seed)
                    if m.latent is not None:  # metrics on images: latents decoded as the pipeline does
                        x = m.latent.decode(x)
                    fid = fid_inception(x, reference, inception_weights) if inception_weights else None
                    feat = digits_features(x, net)
                    kid_mean, kid_std = kid(feat, ref_feat, subsets=100, subset_size=1000, seed=seed)
                    rows.append(
                        {
                            "model": name,
                            "scheduler": sch,
                            "steps": k,
                            "seed": seed,
                            "num": num,
                            "fd_pixel": frechet_distance(x.reshape(num, -1).double().numpy(), ref_flat),
                            "fd_digits": frechet_distance(feat, ref_feat),
                            "kid_digits": kid_mean,  # unbiased: comparable at small num, unlike FD
                            "kid_digits_subset_std": kid_std,
                            "swd_pixel": sliced_wasserstein(x.reshape(num, -1).numpy(), ref_flat, seed=seed),
                            "fid": np.nan if fid is None else fid,
                            "fid_available": fid is not None,
                        }
                    )
                    if progress:
                        progress(1)
    return pd.DataFrame(rows)


def summarize_eval(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds per (model, scheduler, steps)."""
    cols = [*METRICS, "fid"]
    g = df.groupby(["model", "scheduler", "steps"], sort=False)[cols]
    out = g.mean().add_suffix("_mean").join(g.std(ddof=1).add_suffix("_std")).reset_index()
    out["seeds"] = df.groupby(["model", "scheduler", "steps"], sort=False).size().to_numpy()
    return out
