"""The score-SDE corrector's step size per sample (lipscope) vs averaged over the batch (diffusers, score_sde), measured
on Gaussian data where the exact score drives the sampler: the variance of the samples over the data variance, per
coordinate (mean, min, max), and the largest error of the mean, for a few dimensions and step counts.

    python scripts/pc_corrector_batch.py            # about a minute on one CPU core

The corrector's step is 2·(snr·‖z‖/‖score‖)²: per sample, ‖z‖ and ‖score‖ fluctuate by ~1/√(2D), so for data of few
dimensions the step (and the sample variance) blows up; in high dimension the two agree (docs/probe.md).
"""

from __future__ import annotations

import dataclasses

import torch

from lipscope import rng
from lipscope.gaussian import GaussianMixture, gaussian_eps_model
from lipscope.processes import VEProcess
from lipscope.sigma_samplers import make_sigma_scheduler


def run(dims: int, n: int, steps: int, per_sample: bool) -> tuple[float, float, float, float]:
    mu, var = torch.linspace(-0.5, 0.5, dims), torch.linspace(0.3, 1.5, dims)
    g = GaussianMixture.gaussian(mu, var)
    m = dataclasses.replace(gaussian_eps_model(g, VEProcess(sigma_min=0.01, sigma_max=50.0)), target="score")
    s = make_sigma_scheduler("pc", m, steps)
    x = rng.normal(0, rng.Stream.SAMPLER_INIT, n, g.shape).double() * s.init_noise_sigma
    gens = [rng.generator(0, rng.Stream.SAMPLER_STEP, i) for i in range(n)]
    mean = x
    for i, t in enumerate(s.timesteps):
        k = m.schedule.step_of_sigma(s.sigmas[i]).expand(n)
        score = m(x, k)
        if per_sample:
            x = torch.cat(
                [s.step_correct(score[j : j + 1], x[j : j + 1], generator=gens[j]).prev_sample for j in range(n)]
            )
        else:
            x = s.step_correct(score, x, generator=gens[0]).prev_sample
        out = s.step_pred(m(x, k), t, x, generator=gens)
        x, mean = out.prev_sample, out.prev_sample_mean
    ratio = mean.var(0) / var
    return float(ratio.mean()), float(ratio.min()), float(ratio.max()), float((mean.mean(0) - mu).abs().max())


if __name__ == "__main__":
    print("| D | n | steps | corrector step | variance / data variance: mean [min, max] | max error of the mean |")
    print("|---|---|---|---|---|---|")
    for dims, n, steps in ((2, 1000, 50), (2, 1000, 200), (64, 1000, 50), (256, 400, 100)):
        for per_sample in (True, False):
            r, lo, hi, e = run(dims, n, steps, per_sample)
            kind = "per sample (lipscope)" if per_sample else "batch mean (diffusers)"
            print(f"| {dims} | {n} | {steps} | {kind} | {r:.3f} [{lo:.3f}, {hi:.3f}] | {e:.3f} |")
