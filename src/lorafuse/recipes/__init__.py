"""Recipes: `lorafuse run RECIPE.yml -o OUT` and `lorafuse.run(recipe, out)`.

A recipe is YAML whose fields follow mergekit's where they mean the same thing (schema.py): one document is
one stage; several documents are named stages run in order, a later one reading an earlier one's output by
its name. Each stage runs as the lorafuse command it stands for (runner.py), so a recipe and the commands
typed by hand give the same files. Errors name the recipe's line and field (source.py, checks.py).
"""

from __future__ import annotations

from lorafuse.recipes.runner import RunReport, StageRun, load_recipe, run
from lorafuse.recipes.schema import schema_json
from lorafuse.recipes.source import RecipeError

__all__ = ["RecipeError", "RunReport", "StageRun", "load_recipe", "run", "schema_json"]
