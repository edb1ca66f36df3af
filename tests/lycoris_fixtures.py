"""LyCORIS networks and references shared by the LyCORIS tests: a tiny torch model, every layout
LyCORIS makes on it, and the deltas LyCORIS's own forward pass adds."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from lycoris import LycorisNetwork, create_lycoris
from lycoris.modules.locon import LoConModule
from torch import nn

U32 = 2.0**-24  # float32 unit roundoff
TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class Tiny(nn.Module):
    """Odd sizes: 6 = 2*3 and 10 = 2*5 (LoKr factors), 48 x 64 room for decompose_both, a 3x3 conv
    and a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(10, 6, bias=False)
        self.wide = nn.Linear(64, 48, bias=False)
        self.conv = nn.Conv2d(32, 24, 3, padding=1, bias=False)
        self.point = nn.Conv2d(12, 9, 1, bias=False)


def network(algo: str, seed: int = 0, dtype: str = "F32", **kwargs: object) -> tuple[Tiny, LycorisNetwork]:
    """A LyCORIS network on a fresh Tiny model, every parameter random and non-zero (DoRA magnitudes
    positive), rounded to `dtype` so that the saved file holds exactly the module's values."""
    torch.manual_seed(seed)
    model = Tiny()
    net = create_lycoris(model, 1.0, algo=algo, **kwargs)
    net.apply_to()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for lora in net.loras:
            for name, p in lora.named_parameters():
                if name == "dora_scale":
                    p.copy_(p * (0.5 + torch.rand(p.shape, generator=g)))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
                p.copy_(p.to(TORCH_DTYPES[dtype]).float())
    return model, net


def save(net: LycorisNetwork, path: Path, dtype: str = "F32", metadata: dict[str, str] | None = None) -> Path:
    net.save_weights(str(path), TORCH_DTYPES[dtype], metadata)
    return path


def lycoris_delta(lora: nn.Module) -> np.ndarray:
    """The delta LyCORIS's forward pass adds (scale applied once): LoCon's get_diff_weight, LoHa /
    LoKr's get_weight (their get_diff_weight multiplies by the scale a second time)."""
    with torch.no_grad():
        d = lora.get_diff_weight(1.0)[0] if isinstance(lora, LoConModule) else lora.get_weight(lora.shape)
    return d.double().numpy()


def lycoris_bound(lora: nn.Module) -> np.ndarray:
    """The same computation on |every parameter|: the sum of |terms| of each element, which bounds
    float32 rounding errors."""
    twin = copy.deepcopy(lora)
    with torch.no_grad():
        for p in twin.parameters():
            p.abs_()
    return np.abs(lycoris_delta(twin))


def assert_close_f32(ours: np.ndarray, ref: np.ndarray, bound: np.ndarray, terms: int, what: str) -> None:
    """|ours - ref| <= (terms + 4) u * bound, elementwise (u: float32 unit roundoff)."""
    ours, ref, bound = (np.asarray(x, np.float64).reshape(ref.shape[0], -1) for x in (ours, ref, bound))
    tol = 4 * (terms + 4) * U32 * bound + 1e-30
    worst = float(np.max(np.abs(ours - ref) / tol))
    assert worst <= 1.0, f"{what}: error {worst:.3g} x the float32 bound"


def data_buffer(path: Path) -> bytes:
    data = path.read_bytes()
    return data[8 + int.from_bytes(data[:8], "little"):]


def modules(net: LycorisNetwork) -> dict[str, nn.Module]:
    return {lora.lora_name: lora for lora in net.loras}


def terms(lora: nn.Module) -> int:
    r = int(getattr(lora, "lora_dim", 1))
    return 2 * r * r + 8


# Every LoHa / LoKr / LoCon layout LyCORIS makes on Tiny (conv_dim: rank of the 3x3 conv).
CONFIGS = {
    "locon": dict(algo="locon", linear_dim=2, linear_alpha=1.0, conv_dim=3, conv_alpha=1.5),
    "locon_tucker": dict(algo="locon", linear_dim=2, linear_alpha=3.0, conv_dim=3, conv_alpha=2.0, use_tucker=True),
    "loha": dict(algo="loha", linear_dim=2, linear_alpha=1.0, conv_dim=2, conv_alpha=3.0),
    "loha_rank3": dict(algo="loha", linear_dim=3, linear_alpha=1.5, conv_dim=3, conv_alpha=1.0),  # r^2 >= 6 rows
    "loha_tucker": dict(algo="loha", linear_dim=2, linear_alpha=1.0, conv_dim=2, conv_alpha=0.5, use_tucker=True),
    "lokr": dict(algo="lokr", linear_dim=2, linear_alpha=1.0, conv_dim=2, conv_alpha=3.0),
    "lokr_factor4": dict(algo="lokr", linear_dim=2, linear_alpha=3.0, conv_dim=2, conv_alpha=1.0, factor=4),
    "lokr_decompose_both": dict(algo="lokr", linear_dim=2, linear_alpha=0.5, conv_dim=2, conv_alpha=1.0,
                                decompose_both=True),
    "lokr_tucker": dict(algo="lokr", linear_dim=2, linear_alpha=1.0, conv_dim=2, conv_alpha=3.0, use_tucker=True),
    "lokr_full_w2": dict(algo="lokr", linear_dim=8, linear_alpha=2.0, conv_dim=8, conv_alpha=2.0),
}
