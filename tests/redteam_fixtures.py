"""Small inputs of the red-team tests (test_redteam_round2.py, test_redteam_round3.py): a PEFT adapter folder of
float32 factors and a Llama-named float32 base, of any module shapes."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

R = 2
PREFIX = "base_model.model."


def peft_folder(folder: Path, shapes: dict[str, tuple[int, int]], seed: int, rank: int = R, alpha: float = R,
                extra: dict[str, object] | None = None, tensors: dict[str, np.ndarray] | None = None) -> Path:
    """A PEFT adapter folder: module -> (out, in), float32 factors from `seed`."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    data = dict(tensors or {})
    for module, (o, i) in shapes.items():
        data[f"{PREFIX}{module}.lora_A.weight"] = rng.standard_normal((rank, i)).astype(np.float32)
        data[f"{PREFIX}{module}.lora_B.weight"] = rng.standard_normal((o, rank)).astype(np.float32)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha,
              "target_modules": sorted({m.rsplit(".", 1)[-1] for m in shapes}), **(extra or {})}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(data, str(folder / "adapter_model.safetensors"))
    return folder


def llm_base(folder: Path, shapes: dict[str, tuple[int, int]]) -> Path:
    """A base checkpoint folder: module -> weight shape, float32 from a fixed seed, config.json of a Llama."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(99)
    save_file({f"{m}.weight": rng.standard_normal(s).astype(np.float32) for m, s in shapes.items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


def kohya_file(path: Path, module: str, seed: int, rank: int = 2, width: int = 8) -> Path:
    """A kohya LoRA file of one module (width x width, float32, alpha = rank)."""
    rng = np.random.default_rng(seed)
    save_file({f"{module}.lora_down.weight": rng.standard_normal((rank, width)).astype(np.float32),
               f"{module}.lora_up.weight": rng.standard_normal((width, rank)).astype(np.float32),
               f"{module}.alpha": np.array(float(rank), np.float32)}, str(path))
    return path


def read_torch(path: Path) -> dict:
    """Every tensor of a .safetensors file, or of a folder's .safetensors files, as torch tensors (safetensors'
    own reader: float8 too)."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    out: dict = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


RECIPE_SHAPES = {"model.layers.0.self_attn.q_proj": (48, 32)}


def recipe_tree(folder: Path) -> Path:
    """base/ (a Llama-named checkpoint of RECIPE_SHAPES), a/ and b/ (PEFT adapters on it), in `folder`."""
    llm_base(folder / "base", RECIPE_SHAPES)
    peft_folder(folder / "a", RECIPE_SHAPES, 1)
    peft_folder(folder / "b", RECIPE_SHAPES, 2)
    return folder


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `lorafuse ARGV` run in this process (lorafuse.cli.main)."""
    from lorafuse.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


def peft_deltas(folder: Path) -> dict[str, np.ndarray]:
    """(lora_alpha / r) B @ A per module of a PEFT folder, in float64, from its files."""
    from safetensors.numpy import load_file

    cfg = json.loads((folder / "adapter_config.json").read_text())
    t = load_file(str(folder / "adapter_model.safetensors"))
    scale = cfg["lora_alpha"] / cfg["r"]
    return {k.removeprefix(PREFIX).removesuffix(".lora_A.weight"):
            scale * (t[k.replace("lora_A", "lora_B")].astype(np.float64) @ t[k].astype(np.float64))
            for k in t if k.endswith(".lora_A.weight")}


def namespace_prefix(probe: str) -> list[str] | None:
    """A command prefix under which the shell command `probe` (a mount) succeeds: a private mount namespace, as
    root or as an unprivileged user mapped to root; None where neither can be made."""
    for prefix in (["unshare", "--mount", "--propagation", "private"],
                   ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"]):
        try:
            if subprocess.run([*prefix, "sh", "-c", probe], capture_output=True, timeout=30).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


def write_recipe(folder: Path, text: str, name: str = "r.yml") -> Path:
    """`text` written to folder/name (a recipe file)."""
    (folder / name).write_text(text)
    return folder / name


def stop_import(monkeypatch: object, module: str, raised: BaseException | Callable[[], BaseException]) -> None:
    """Make `import module` raise `raised` (or what the callable returns, called at the import), as a Ctrl-C or a
    damaged install would while lorafuse's console script imports it (pytest's monkeypatch puts it back)."""
    import builtins

    real = builtins.__import__

    def stopped(name: str, *args: object, **kw: object) -> object:
        if name == module:
            raise raised() if callable(raised) and not isinstance(raised, BaseException) else raised
        return real(name, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", stopped)  # type: ignore[attr-defined]
