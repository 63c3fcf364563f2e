"""A ``cola train`` run on the tiny OPT of conftest.py, for the crash tests (killed with SIGKILL).

    python reliability_train_script.py SETTINGS_JSON [--resume]

``SETTINGS_JSON``: the :class:`TrainSettings` fields as a JSON object. Prints ``done`` at the end.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from conftest import build_tokenizer, tiny_opt  # noqa: E402

from cola.llm.experiment import run_experiment  # noqa: E402
from cola.llm.settings import TrainSettings  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    fields = json.loads(sys.argv[1])
    if "--resume" in sys.argv[2:]:
        fields["resume"] = True
    tok = build_tokenizer()
    vocab = len(tok)
    results = run_experiment(TrainSettings(**fields), loader=lambda: (tiny_opt(vocab), tok))
    print("done", results["status"], flush=True)


if __name__ == "__main__":
    main()
