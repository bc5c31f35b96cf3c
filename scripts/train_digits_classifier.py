"""Rebuild lipscope/assets/digits_classifier.safetensors (the feature net of `lipscope evaluate`).

python scripts/train_digits_classifier.py

The recipe: full-batch AdamW on a seeded 80% split of the digits, with light augmentation (±1 px
shifts, Gaussian pixel noise σ = 0.1) so features stay stable on imperfect samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sklearn.datasets import load_digits

from lipscope.data import digits_array
from lipscope.rng import isolated_torch_rng
from lipscope.zoo import CLASSIFIER_ASSET, DigitsNet


def train_digits_classifier(seed: int = 0, epochs: int = 400) -> tuple[DigitsNet, float]:
    """Train the classifier; returns the net and its accuracy on the held-out 20%."""
    x = torch.from_numpy(digits_array()).reshape(-1, 64)
    y = torch.from_numpy(load_digits().target).long()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[: int(0.8 * len(x))], perm[int(0.8 * len(x)) :]
    with isolated_torch_rng(seed):
        net = DigitsNet()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-3)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(epochs):
        xb = x[tr].reshape(-1, 1, 8, 8)
        sh = torch.randint(-1, 2, (2,), generator=g)
        xb = torch.roll(xb, shifts=(int(sh[0]), int(sh[1])), dims=(2, 3))
        xb = (xb + 0.1 * torch.randn(xb.shape, generator=g)).clamp(-1, 1)
        loss = F.cross_entropy(net(xb.reshape(-1, 64)), y[tr])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        acc = float((net(x[te]).argmax(1) == y[te]).float().mean())
    return net, acc


if __name__ == "__main__":
    net, acc = train_digits_classifier(seed=0)
    CLASSIFIER_ASSET.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(CLASSIFIER_ASSET))
    print(f"held-out accuracy {acc:.4f}; wrote {CLASSIFIER_ASSET} ({CLASSIFIER_ASSET.stat().st_size} bytes)")
