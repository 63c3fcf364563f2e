"""``cola sweep``: a grid of ``cola train`` runs, tuned, resumable, paired with a baseline.

The spec (:mod:`.spec`), its cells and run keys (:mod:`.cells`), the runs (:mod:`.runs`), LR tuning under a
forgetting budget (:mod:`.tuning`, :mod:`.frontiers`), results and report (:mod:`.results`, :mod:`.report`),
the command (:mod:`.command`) and its command line (:mod:`.cli`).
"""

from cola.llm.sweep.command import migrate_keys, run_sweep
from cola.llm.sweep.spec import SweepSpec, load_recipe, recipe_names

__all__ = ["SweepSpec", "load_recipe", "migrate_keys", "recipe_names", "run_sweep"]
