"""The hand-written families against the generic adapter on the same tiny folders (docs/models.md, "family"): the
same K tables (UNet2D, SD, SD3, PixArt, DiT) — the generic path calls the same denoiser on the same inputs, so
the tables agree to float64 rounding — and, for Flux, whose generic space is the packed one, the same ε field under
the 2×2 packing (the noise the probe draws lies in another layout there, so its tables are not compared)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from lipscope.families import generic
from lipscope.loading import load_model
from lipscope.probe import probe
from lipscope.prompts import conditioning_for

U64 = 2.0**-53


@pytest.fixture(scope="module")
def family_folders(tmp_path_factory, pipeline_dir):
    from family_fixtures import save_dit_pipeline, save_prompt_embeds, save_sd_pipeline
    from family_fixtures2 import save_embeds, save_pixart_folder, save_sd3_folder
    from family_fixtures3 import save_flux_embeds, save_flux_folder

    d = tmp_path_factory.mktemp("fam-vs-generic")
    return {
        "ddpm": (pipeline_dir, None, {}),
        "sd": (save_sd_pipeline(d / "sd"), save_prompt_embeds(d / "sd.safetensors"), {}),
        "sd3": (save_sd3_folder(d / "sd3"), save_embeds(d / "sd3.safetensors", "sd3"), {}),
        "pixart": (save_pixart_folder(d / "pixart"), save_embeds(d / "pixart.safetensors", "pixart"),
                   {"use_resolution_binning": False, "height": 16, "width": 16}),
        "dit": (save_dit_pipeline(d / "dit"), None, {"guidance_scale": 1.0}),  # DiTPipeline's null class is 1000
        "flux": (save_flux_folder(d / "flux"), save_flux_embeds(d / "flux.safetensors"), {"height": 16, "width": 16}),
    }  # fmt: skip


def _both(folders, kind: str, w: float | None, labels=None):
    folder, embeds, call = folders[kind]
    fam = load_model(str(folder), dtype="float64")
    emb = str(embeds) if embeds else None
    cf = conditioning_for(fam, str(folder), prompt_embeds=emb, guidance_scale=w, class_labels=labels)
    index = json.loads((folder / "model_index.json").read_text())
    comp = "unet" if "unet" in index else "transformer"
    gen = generic.load(str(folder), comp, None, str(folder), "cpu", "float64", call_args=call, index=index)
    cg = generic.conditioning(gen, prompt_embeds=emb, guidance_scale=w, class_labels=labels)
    return dataclasses.replace(fam, conditioning=cf) if cf is not None else fam, dataclasses.replace(
        gen, conditioning=cg
    )


@pytest.mark.parametrize(("kind", "w", "labels"), [("ddpm", None, None), ("sd", 3.0, None), ("sd3", 3.0, None),
                                                   ("pixart", 3.0, None), ("dit", None, [1, 7])])  # fmt: skip
def test_family_and_generic_give_the_same_table(family_folders, kind, w, labels):
    fam, gen = _both(family_folders, kind, w, labels)
    assert gen.conditioning.info["adapter"].startswith("generic") and gen.sample_shape == fam.sample_shape
    grid = [0, 10, 500]
    a, b = (probe(m, "digits", timesteps=grid, samples=3, seed=1) for m in (fam, gen))
    ka, kb = a.attrs["K_samples"], b.attrs["K_samples"]
    tol = _rounding_bound(fam, grid, 3, 1)
    print(kind, "max |dK|/K", float(np.max(np.abs(ka - kb) / ka)), "max tol/K", float(np.max(tol / ka)))
    assert np.all(np.abs(ka - kb) <= tol), (kind, np.abs(ka - kb).max(), tol)
    assert list(a["t"]) == list(b["t"])


def _rounding_bound(m, grid, n: int, seed: int) -> np.ndarray:
    """64·u₆₄·(‖ε(x_k, k)‖ + ‖ε(x_k, k+1)‖)/Δτ per (sample, grid point): the float64 rounding of an FD difference of
    the same denoiser on the same inputs evaluated in another order (x_k as the probe draws it)."""
    from lipscope import rng
    from lipscope.data import load_data_with_scaling
    from lipscope.latents import latent_x0

    if m.latent is not None:
        x0 = latent_x0(m.latent, "digits", n, seed, (-1.0, 1.0), m.sample_shape)[0].double()
    else:
        x0 = load_data_with_scaling("digits", n, seed, m.sample_shape, (-1.0, 1.0))[0].double()
    noise = rng.noise(seed, n, tuple(x0.shape[1:]), dtype=torch.float64)
    out = np.zeros((n, len(grid)))
    for j, k in enumerate(grid):
        kk = torch.tensor(float(k), dtype=torch.float64)
        x = m.schedule.alpha(kk) * x0 + m.schedule.sigma(kk) * noise
        with torch.no_grad():
            norms = m(x, float(k)).flatten(1).norm(dim=1) + m(x, float(k) + 1).flatten(1).norm(dim=1)
        out[:, j] = 64 * U64 * norms.numpy() * m.T
    return out


def test_flux_family_and_generic_give_the_same_field_under_the_packing(family_folders):
    from lipscope.families.flux import pack

    fam, gen = _both(family_folders, "flux", None)
    assert gen.sample_shape == (4, 16) and fam.sample_shape == (4, 4, 4)  # 2×2 tokens of 4·4 channels
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, 4, 4, 4), generator=g, dtype=torch.float64)
    for k in (10.0, 600.0):
        with torch.no_grad():
            ef, eg = pack(fam(x, k)), gen(pack(x), k)
        assert torch.allclose(ef, eg, rtol=0, atol=64 * U64 * float(ef.abs().max()) * 16), (k, (ef - eg).abs().max())
