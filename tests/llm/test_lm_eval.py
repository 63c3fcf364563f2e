"""lm-evaluation-harness scores a finished run's adapter as it is: ``--model hf --model_args
pretrained=BASE,peft=RUN/adapter`` (the ``eval`` extra; skipped without ``lm_eval``).

A tiny Llama saved with ``save_pretrained`` is the base; ``cola train`` (``run_experiment``, the default
loader reading that folder) trains three links and writes the adapter and the merged model; a local task
(a YAML over a JSONL file, multiple choice) is scored by lm-eval, offline, exactly as its command line
would (the same ``model_args`` string). The adapter over the base must give lm-eval the merged model's
log-likelihoods, and not the base model's.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from cola.llm.experiment import run_experiment
from cola.llm.settings import TrainSettings

lm_eval = pytest.importorskip("lm_eval")

FIXTURES = Path(__file__).parent / "fixtures"

TASK_YAML = """\
task: tiny_sst2
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{sentence}}}} It was"
doc_to_choice: [" terrible", " great"]
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture
def offline(monkeypatch):
    """No hub: lm-eval asks the hub for the model's commit, datasets for the builder; both must not wait."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _loglikelihoods(model_args: str, tasks) -> tuple[float, list[list[float]]]:
    """lm-eval's accuracy and each example's log-likelihood of each choice, for ``--model hf --model_args ...``."""
    results = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=["tiny_sst2"], device="cpu",
                                      batch_size=4, task_manager=tasks, log_samples=True, bootstrap_iters=0)
    samples = sorted(results["samples"]["tiny_sst2"], key=lambda s: s["doc_id"])
    return results["results"]["tiny_sst2"]["acc,none"], [[r[0] for r in s["filtered_resps"]] for s in samples]


def test_lm_eval_scores_the_run_adapter_over_the_base_as_the_merged_model(tmp_path, tokenizer, make_model, rows,
                                                                         offline):
    tok = copy.deepcopy(tokenizer)
    base = tmp_path / "base"
    make_model("llama").save_pretrained(base)
    tok.save_pretrained(base)
    settings = TrainSettings(model=str(base), task="sst2", data_dir=str(FIXTURES), n_train=6, n_val=2, n_test=4,
                             steps=6, batch_size=2, eval_batch_size=4, links=3, rank=2, lr=2e-2, plots=False,
                             save_merged=True, save_links=False, output_dir=str(tmp_path / "run"), threads=1)
    (run,) = run_experiment(settings)["runs"]
    adapter, merged = run["outputs"]["adapter"], run["outputs"]["merged"]
    assert json.loads((Path(adapter) / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)

    data = tmp_path / "sst2.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in (rows("sst2", "validation") + rows("sst2", "train"))[:8]))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_sst2.yaml").write_text(TASK_YAML.format(data=data))
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(tasks), include_defaults=False)  # --include_path; lm-eval's own not indexed

    threads = torch.get_num_threads()
    try:
        acc, with_adapter = _loglikelihoods(f"pretrained={base},peft={adapter},dtype=float32", tasks)
        merged_acc, of_merged = _loglikelihoods(f"pretrained={merged},dtype=float32", tasks)
        _, of_base = _loglikelihoods(f"pretrained={base},dtype=float32", tasks)
    finally:
        torch.set_num_threads(threads)
    assert len(with_adapter) == 8 and all(len(choices) == 2 for choices in with_adapter)
    assert torch.tensor(with_adapter) == pytest.approx(torch.tensor(of_merged), abs=1e-4)
    assert acc == merged_acc
    assert (torch.tensor(with_adapter) - torch.tensor(of_base)).abs().max() > 1e-2  # the adapter is applied
