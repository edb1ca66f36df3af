"""`lorafuse.run`: a recipe run from Python (lorafuse/__init__ names it lazily, so `import lorafuse` does not load
the recipes). Defined here, beside the types it names, so that typing.get_type_hints(lorafuse.run) resolves them."""

from __future__ import annotations

import os

from lorafuse.recipes.runner import RecipeLike, RunReport
from lorafuse.recipes.runner import run as _run


def run(recipe: RecipeLike, out: str | bytes | os.PathLike[str] | os.PathLike[bytes], *, overwrite: bool = False,
        dry_run: bool = False, threads: int = 0, device: str | None = None, quiet: bool = True,
        intermediate_dir: str | bytes | os.PathLike[str] | os.PathLike[bytes] | None = None) -> RunReport:
    """Run a recipe (mergekit-style YAML; `lorafuse run`): each stage as the lorafuse command it stands for.

    Every stage is checked before the first runs (errors name the recipe's line and field); stages before the
    last write into a temporary folder beside `out` (removed at the end) or `intermediate_dir` (kept); the last
    writes `out`. The recipe is recorded verbatim in the output's model card and metadata.

    Parameters
    ----------
    recipe : str, bytes, os.PathLike, mapping or sequence of mappings
        A recipe file (.yml / .yaml; relative model paths are taken from its folder), YAML text (a string
        holding a newline, or one line of flow YAML, `{merge_method: ...}`, that names no file), or the data
        itself: a mapping for one stage, a list of mappings for several.
    out : str, bytes or os.PathLike
        The output of the last stage (what its verb's `-o` takes).
    overwrite : bool, default False
        Replace an existing `out` (the verbs' --overwrite rules).
    dry_run : bool, default False
        Check the recipe and print each stage's plan (the verbs' --dry-run); write nothing.
    threads : int, default 0
        Worker threads of every stage; 0 uses every core.
    device : str, default None
        'cpu' or 'cuda' for the stages whose verb takes --device; None: each verb's default.
    quiet : bool, default True
        Print nothing on success (False: each stage's command line and summary on stdout, the notes on stderr, as
        the CLI prints them).
    intermediate_dir : str, bytes or os.PathLike, default None
        Write the stages before the last into this folder (NAME, or NAME.safetensors for one file) and keep them
        (a path as `out`: an empty one, which would be the current folder, is refused).

    Returns
    -------
    RunReport
        `out`, `stages` (name, verb, command line, output, seconds), `seconds`, `notes`, `dry_run`.
    """
    from lorafuse.cli import dispatch

    return _run(recipe, out, overwrite=overwrite, dry_run=dry_run, threads=threads, device=device, quiet=quiet,
                intermediate_dir=intermediate_dir, dispatch=dispatch)


__all__ = ["run"]
