"""A seeded random-weight convolutional feature space for the natural-patch evidence (docs/etsdm.md).

``lipscope evaluate --features py:patch_features:features`` (with ``scripts/`` on ``PYTHONPATH``). No weights to
download: three 3×3 conv layers (ReLU, 2× average pooling) with weights drawn from seed 0, features = the
channel means and standard deviations of each layer (2·(32+64+128) = 448 dimensions). Random conv features are a
rough perceptual space; the numbers compare the models of one table only, never published FID/KID values.
"""

from __future__ import annotations

import torch


class RandomConvFeatures(torch.nn.Module):
    def __init__(self, seed: int = 0, channels: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        layers, c_in = [], 3
        for c in channels:
            conv = torch.nn.Conv2d(c_in, c, 3, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2.0 / (9 * c_in)) ** 0.5)
                conv.bias.zero_()
            layers.append(conv)
            c_in = c
        self.convs = torch.nn.ModuleList(layers)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        feats = []
        for conv in self.convs:
            x = torch.relu(conv(x))
            feats += [x.mean((2, 3)), x.std((2, 3))]
            x = torch.nn.functional.avg_pool2d(x, 2) if min(x.shape[-2:]) >= 2 else x
        return torch.cat(feats, 1)


def features() -> RandomConvFeatures:
    """The factory ``--features py:patch_features:features`` calls."""
    net = RandomConvFeatures().eval()
    net.name = "randconv"  # the metric columns: fd_randconv, kid_randconv
    return net
