"""What a recipe from elsewhere may not do: name a Ray cluster (the adapters' paths would go to it and what it
returns would be taken back), or name an earlier stage that is also a path beside the recipe (which one a stage
reads could not be told). Both refused at the line, before any stage runs, writing nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from redteam_fixtures import peft_folder
from safetensors.numpy import load_file

from lorafuse.cli import main

SHAPES = {"model.layers.0.self_attn.q_proj": (16, 12)}


def test_a_recipe_cannot_name_a_ray_cluster(tmp_path: Path, capsys):
    peft_folder(tmp_path / "a", SHAPES, seed=1)
    peft_folder(tmp_path / "b", SHAPES, seed=2)
    recipe = tmp_path / "r.yml"
    recipe.write_text("merge_method: svd\nmodels:\n  - model: a\n  - model: b\n"
                      "parameters:\n  rank: 2\n  engine: ray\n  ray_address: 203.0.113.5:6379\n")
    for dry in ([], ["--dry-run"]):
        assert main(["run", str(recipe), "-o", str(tmp_path / "out"), *dry]) == 2
        err = capsys.readouterr().err
        assert f"{recipe} line 8, parameters.ray_address: a recipe cannot name a Ray cluster" in err
        assert "RAY_ADDRESS" in err
    assert not (tmp_path / "out").exists()


def test_a_stage_name_that_is_also_a_path_beside_the_recipe_is_refused(tmp_path: Path, capsys):
    peft_folder(tmp_path / "a", SHAPES, seed=1)
    peft_folder(tmp_path / "pooled", SHAPES, seed=2)  # a real adapter of the same name as the stage
    recipe = tmp_path / "r.yml"
    recipe.write_text("name: pooled\nmerge_method: linear\nmodels:\n  - model: a\n---\n"
                      "name: final\nmerge_method: resize\nmodels:\n  - model: pooled\nparameters:\n  rank: 2\n")
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert (f"{recipe} line 9, models[0].model: 'pooled' names the earlier stage 'pooled' and also a path beside "
            f"the recipe ({tmp_path / 'pooled'})") in err
    assert not (tmp_path / "out").exists()
    # ./pooled reads the path: the resize of the adapter in tmp_path/pooled (rank 4 -> 2 of its own factors)
    recipe.write_text(recipe.read_text().replace("model: pooled", "model: ./pooled"))
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "-q"]) == 0
    direct = tmp_path / "direct"
    assert main(["resize", str(tmp_path / "pooled"), "--rank", "2", "-o", str(direct), "-q"]) == 0
    got, want = (load_file(str(p / "adapter_model.safetensors")) for p in (tmp_path / "out", direct))
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)
