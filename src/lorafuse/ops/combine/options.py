"""The options of one combination (instead of many keyword arguments)."""

from __future__ import annotations

from dataclasses import dataclass

GROUP_BYTES = 64 << 20  # working memory of one group of modules (at least one module per group)


@dataclass(frozen=True)
class CombineOptions:
    """How adapters combine. `rank` / `conv_rank`: output ranks of the methods that take one (default: the
    largest input rank; `conv_rank` for kxk convolutions, k > 1); `density`: the fraction kept by the
    pruning methods; `majority_sign`: ties' sign election ('total' or 'frequency'); `seed`: DARE's masks and
    randomized SVD sketches; `split`: singular values on B ('B', like PEFT) or sqrt on both ('sqrt');
    `threads`: 0 = all cores; `exact`: svd takes its exact path for every module; `group_bytes`: the
    working memory of one group of modules (inputs, stacks, dense matrices), which bounds peak memory
    whatever the number of adapters (a module larger than it forms a group alone); `dtype`: the dtype of the
    written factors, 'fp32' / 'fp16' / 'bf16' or an alias io.dtypes accepts (kohya's 'float', 'torch.bfloat16',
    ...); None: the inputs' factor dtype when they all share one of F32, F16, BF16, else F32. The math is
    float32 / float64 either way; only the result's factors are rounded, once, to nearest even. `device`:
    where the SVDs and norms run, 'cpu' (the compiled core) or 'cuda' (the GPU: its products, the CPU's
    conventions). `engine`: 'auto', 'memory' (every adapter mapped at once, module groups streamed),
    'stream' (ops.combine.many: adapters read one at a time, once per pass; svd and linear) or 'ray' (the
    same passes as Ray tasks over shards of adapters, ops.combine.ray_engine); `ray_address`: the Ray
    cluster of engine 'ray' (None: the Ray this process has initialized, else a local one); `passes`: the
    streamed svd's passes over the adapters (None: 3, one power iteration; 2: range and projection; 1: a
    single-pass sketch; given, it selects the streamed engine under 'auto'); `oversample`: the streamed svd's
    sketch columns beyond the rank (None: 10; a module whose whole range is at most twice k + oversample takes
    it, exactly), which bounds how close 2 passes come to the optimum (docs/cli.md; given, it selects the
    streamed engine under 'auto', as `passes`); `progress`: a bar over adapters
    read (None: when stderr is a terminal). An option the method does not use, given at other than its default,
    is refused by check_options naming the methods that take it (the registry's Method flags)."""

    method: str = "svd"
    rank: int | None = None
    conv_rank: int | None = None
    density: float | None = None
    majority_sign: str = "total"
    seed: int = 0
    split: str = "B"
    threads: int = 0
    exact: bool = False
    group_bytes: int = GROUP_BYTES
    dtype: str | None = None
    device: str = "cpu"
    engine: str = "auto"
    passes: int | None = None
    progress: bool | None = False
    oversample: int | None = None
    ray_address: str | None = None
