"""Built-in assets that need no download, and their cards: nothing here loads a model spec.

Trained by the project (recipes in each ``card.json``; ``scripts/etsdm_digits_evidence.py`` then
``scripts/build_zoo.py`` rebuild them), shipped as diffusers pipeline folders in ``lipscope/zoo/``:

* ``digits-ddpm``: UNet2DModel trained on scikit-learn's digits (8×8), DDPM linear, T = 1000;
* ``digits-etsdm``: its E-TSDM retrofit (t̃ = 100, n = 5, 2000 fine-tuning steps);
* ``digits-control``: the same fine-tune without E-TSDM.

And one closed form, built by :mod:`lipscope.loading` from :mod:`lipscope.gaussian`:

* ``digits-gaussian``: the exact optimal ε* for a Gaussian fitted to the digits (D = 64). Several
  digit pixels never vary (λ = 0), so ε* inherits the 1/σ blow-up of Theorem 3.1 exactly.

The digits classifier (``assets/digits_classifier.safetensors``; recipe in
``scripts/train_digits_classifier.py``) is the feature space of ``lipscope evaluate``: its 64-d
penultimate layer gives a digits analogue of FID.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .cards import CLOSED_FORMS, DEFAULT_DATA, ZOO, card, folder, list_builtins, zoo_names  # noqa: F401 (re-exported)

CLASSIFIER_ASSET = Path(__file__).with_name("assets") / "digits_classifier.safetensors"


# ---- the digits classifier ------------------------------------------------------------------------


class DigitsNet(torch.nn.Module):
    """64 → 128 → 64 → 10 MLP on 8×8 digits in [−1, 1]; ``features`` is the 64-d layer."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.out = torch.nn.Linear(64, 128), torch.nn.Linear(128, 64), torch.nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.l2(F.silu(self.l1(x.reshape(len(x), 64)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


def to_digits_space(x: torch.Tensor) -> torch.Tensor:
    """Samples (n, C, H, W) in [−1, 1] → grey 8×8 (n, 64): channel mean, antialiased resize."""
    x = torch.as_tensor(x, dtype=torch.float32)
    x = x.mean(1, keepdim=True)
    if x.shape[-2:] != (8, 8):
        x = F.interpolate(x, size=(8, 8), mode="bilinear", antialias=True, align_corners=False)
    return x.reshape(len(x), 64).clamp(-1, 1)


def load_digits_classifier() -> DigitsNet:
    from safetensors.torch import load_file

    net = DigitsNet()
    net.load_state_dict(load_file(str(CLASSIFIER_ASSET)))
    return net.eval()


def digits_features(x: torch.Tensor, net: DigitsNet | None = None) -> np.ndarray:
    net = net or load_digits_classifier()
    with torch.no_grad():
        return net.features(to_digits_space(x)).double().numpy()
