"""Rebuild lipscope/assets/digits_classifier.safetensors (the feature net of `lipscope evaluate`).

python scripts/train_digits_classifier.py
"""

from safetensors.torch import save_file

from lipscope.metrics import ASSET, train_digits_classifier

if __name__ == "__main__":
    net, acc = train_digits_classifier(seed=0)
    ASSET.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(ASSET))
    print(f"held-out accuracy {acc:.4f}; wrote {ASSET} ({ASSET.stat().st_size} bytes)")
