"""The settings of a ``cola train`` run: one typed dataclass, from flags and/or a config file.

Every field has a help text (shown by ``cola train --help``) and an annotation: its type, which a
config file's value is checked against (:mod:`cola.fieldtypes`) and from which the flag is made. A config file (TOML or YAML, ``--config``) uses the field names as
keys (``-`` and ``_`` both accepted) and a nested ``[chain]`` table for the fields of
:class:`cola.ChainConfig` (strategies and their options, ``lr_schedule``, ``warmup_steps``,
``knots``, ...; ``total_steps`` and ``seed`` follow from ``steps``/``epochs`` and ``seeds``)::

    model = "facebook/opt-1.3b"
    task = "rte"
    method = "cola"
    links = 3
    seeds = [0, 1, 2, 3, 4]

    [chain]
    rank_schedule = "step-down"
    rank_schedule_options = { later_rank = 4 }
    lr_policy = "restart"

Flags given on the command line win over the file, which wins over the defaults. Unknown
keys, wrong types and bad names are all reported at once in one :class:`cola.ConfigError`,
with the closest known name for each unknown one.

A few defaults depend on the model ("auto", shown as ``None`` here and resolved by
:meth:`TrainSettings.resolved`): the embedded model gets a small CPU budget that runs in
minutes; any other model gets the paper's protocol (1000 train / 500 validation / 1000 test
examples, 5 epochs).
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from cola.config import DEFAULT_LINKS, ChainConfig, Validated
from cola.errors import ConfigError
from cola.fieldtypes import base_type, field_types, type_problem
from cola.llm.config_files import checked, merge, read_config_file
from cola.llm.models import EMBEDDED_MODEL
from cola.llm.tasks.kinds import CLASSIFICATION, kind_of
from cola.llm.validation import (CHAIN_DEFAULTS, CHAIN_DERIVED, CHAIN_KEYS, DTYPE_NAMES, LOSSES,  # noqa: F401
                                 METHODS, REPLAY_LOSSES, RULES, TRACKERS, value_problems)
from cola.io import write_json

#: the classification tasks' automatic defaults (the --help texts name them): the embedded model's quick CPU budget
#: and the paper's protocol (MeZO splits, 5 epochs) for every other model
EMBEDDED_PROFILE, PAPER_PROFILE = CLASSIFICATION.profile(True), CLASSIFICATION.profile(False)

#: fields that may differ when a run is resumed (they do not change the numbers)
RUNTIME_FIELDS = ("resume", "output_dir", "dry_run", "threads", "stop_after", "keep_checkpoints",
                  "plots", "log_every", "name", "config", "fsdp", "gradient_checkpointing", "attn_implementation",
                  "compile", "report_to", "take_over_lock")
"""``fsdp`` is one of them like the number of ranks, which is no setting at all: a checkpoint holds the
gathered state, so a run may continue sharded or replicated on any number of ranks (the numbers agree to
float rounding). So are the performance settings: a run may continue with gradient checkpointing (the same
numbers), another attention kernel or compiled (the numbers agree to float rounding)."""


def _f(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with its help text (its type is its annotation) and command-line extras:
    ``group`` (the --help section), ``choices`` (shown as the metavar), ``file_key`` (False: not
    read from config files)."""
    meta = {"help": help, **extra}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainSettings(Validated):
    """Everything a ``cola train`` run depends on. ``None`` means "automatic" where the help says so."""

    # -- model and task ---------------------------------------------------------------------
    model: str = _f("embedded", "hub id, local folder, or 'embedded' (SmolLM2-135M-Instruct, offline)",
                    group="model and data")
    task: str = _f("tweets", "built-in task (tweets, sst2, rte, cb, boolq, wsc, wic, multirc), 'custom' with "
                   "--template/--answers/--train-file, 'corpus': language modelling on raw text (--train-file, "
                   "default the Python standard library's source), scored by held-out perplexity and forgetting, "
                   "or 'facts': knowledge injection (--train-file a table of prompt/answer facts or synthetic:N "
                   "invented ones), scored by exact-match recall of every fact taught, on paraphrases and forgetting",
                   group="model and data")
    data_dir: str | None = _f(None, "folder (or file) with the task's data: <dir>/<task>/train.jsonl "
                              "and validation.jsonl; default: built-in source (tweets: offline; others: hub)",
                              group="model and data")
    train_file: str | None = _f(None, "file of training examples (jsonl/json/csv/parquet); train and "
                                "validation are drawn from it. With --task corpus: a text file, a folder of "
                                "text files (--files) or a jsonl/json/csv/parquet table (--text-field), split "
                                "by document. With --task facts: a jsonl/json/csv/parquet table of facts (--prompt-field, --answer-field, "
                                "optional --paraphrases-field) or synthetic:N[:SEED], N invented facts drawn from SEED "
                                "(default --test-seed)", group="model and data")
    test_file: str | None = _f(None, "file of test examples; without it the test set is set aside "
                               "from --train-file", group="model and data")
    template: str | None = _f(None, "prompt template of --task custom, e.g. '{text} It was {answer}' "
                              "(\\n in a command-line template is a newline)", group="model and data")
    answers: list[str] | None = _f(None, "answer words of --task custom in label order, "
                                   "comma-separated: terrible,great", group="model and data")
    label_field: str | None = _f(None, "label column (default: the task's own; 'label' for custom)",
                                 group="model and data")
    files: str = _f("*", "--task corpus with a folder as --train-file: the files to read, a glob matched "
                    "recursively (e.g. '*.py')", group="model and data")
    text_field: str = _f("text", "--task corpus with a table as --train-file: the column of each document's text",
                         group="model and data")
    prompt_field: str = _f("prompt", "--task facts: the column of each fact's prompt", group="model and data")
    answer_field: str = _f("answer", "--task facts: the column of each fact's answer", group="model and data")
    paraphrases_field: str = _f("paraphrases", "--task facts: the column of each fact's other prompts (a list; "
                                "scored, never trained on; optional)", group="model and data")
    reference_file: str | None = _f(None, "--task corpus and facts: general text the run never trains on, whose loss rise "
                                    "over zero-shot is the forgetting and beside it the KL to the starting model (a "
                                    "file, folder or table like --train-file, or embedded:NAME; default: the embedded "
                                    "tweets, or embedded:python-docs when the tweets are the replay)",
                                    group="model and data")
    more_references: list[str] = _f([], "--task corpus and facts: other texts whose loss rise and KL to the start are "
                                    "reported beside the reference's (e.g. another language); never a budget's "
                                    "measure", group="model and data")
    replay_file: str | None = _f(None, "--task corpus and facts: text the user wants kept (a file, folder or table like "
                                 "--train-file, or embedded:NAME), mixed into every micro-batch (--replay-ratio); "
                                 "never the same documents as the reference (a reference of the same source gets the "
                                 "other half of its documents, with a warning)", group="model and data")
    replay_ratio: float = _f(0.5, "replay blocks per training example in each micro-batch (0.5: 8 blocks with a "
                             "batch of 16; at least one block)", group="model and data")
    replay_loss: str = _f("lm", "the loss on the replay blocks: lm (their tokens' NLL, as replay usually is) or kl "
                          "(the KL divergence from the starting model's distributions, as distillation does: keeps "
                          "the model where it started instead of moving it towards the replay text)",
                          group="model and data", choices=REPLAY_LOSSES)
    replay_weight: float = _f(1.0, "weight of the replay loss added to the task's loss", group="model and data")
    replay_blocks: int = _f(256, "blocks of replay text in the pool (evenly spaced over its documents; their "
                            "start distributions are computed once for --replay-loss kl)", group="model and data")
    kl_top_k: int = _f(64, "tokens of the starting model's distribution kept per position for the KL to the start "
                       "(the rest of the vocabulary is one bucket: a lower bound of the full KL)",
                       group="model and data")
    train_paraphrases: int = _f(0, "--task facts: train on K phrasings of each fact beside its prompt (its "
                                "'phrasings', then its paraphrases); recall on the paraphrases never trained on is "
                                "scored apart", group="model and data")
    n_train: int | None = _f(None, f"training examples (default {EMBEDDED_PROFILE['n_train']} for the embedded "
                             f"model, {PAPER_PROFILE['n_train']} otherwise: the paper's; --task facts: the facts "
                             "taught, a subset of --train-file drawn with --test-seed, nested as it grows; default "
                             "all)", group="model and data")
    n_val: int | None = _f(None, f"validation examples (--task corpus: held-out blocks; --task facts: facts, "
                           f"default all), scored after every link "
                           f"(default "
                           f"{EMBEDDED_PROFILE['n_val']} / {PAPER_PROFILE['n_val']})",
                           group="model and data")
    n_test: int | None = _f(None, f"test examples (--task corpus: held-out blocks; --task facts: blocks of the "
                            f"reference text; every fact is tested) (default "
                            f"{EMBEDDED_PROFILE['n_test']} / "
                            f"{PAPER_PROFILE['n_test']})", group="model and data")
    test_seed: int = _f(0, "seed of the test draw (fixed so every run is scored on the same examples)",
                        group="model and data")
    max_length: int | None = _f(None, "longest prompt+answer in tokens (--task corpus: the block length); "
                                "longer prompts are cut from "
                                f"the left (default {EMBEDDED_PROFILE['max_length']} for the embedded model, "
                                "else the model's context)",
                                group="model and data")
    dtype: str | None = _f(None, "float32, bfloat16, float16 or auto (default: float32 on CPU, "
                           "bfloat16 on CUDA)", group="model and data", choices=DTYPE_NAMES)
    device: str | None = _f(None, "cpu, cuda, cuda:1, ... (default: CUDA when available; under "
                            "torchrun/accelerate each rank's own GPU, cuda:LOCAL_RANK)", group="model and data")
    fsdp: bool = _f(False, "under torchrun/accelerate: shard the frozen base model over the ranks with "
                    "FSDP2 (fully_shard), LoRA factors replicated; lora/cola only (default: replicated, "
                    "DDP-style)", group="model and data")

    # -- method ------------------------------------------------------------------------------
    method: str = _f("cola", "lora (one link), cola (--links links over the same steps) or full "
                     "(full fine-tuning, no LoRA)", group="method", choices=METHODS)
    compare: list[str] | None = _f(None, "methods to compare on the same data, seeds and steps, "
                                   "comma-separated (lora,cola[,full]); overrides --method", group="method")
    links: int = _f(DEFAULT_LINKS, "links of --method cola; the knots split the same total steps evenly",
                    group="method")
    rank: int = _f(8, "LoRA rank r of each link (a rank schedule may change later links)", group="method")
    alpha: float = _f(16.0, "LoRA alpha; scaling alpha/r", group="method")
    targets: list[str] | None = _f(None, "module name patterns to put LoRA on (default: q_proj v_proj, "
                                   "or the fused qkv_proj / c_attn of Phi-3 / GPT-2)", group="method")
    dropout: float = _f(0.0, "dropout on the LoRA path's input", group="method")
    chain: dict[str, Any] = _f({}, "cola.ChainConfig fields ([chain] table of a config file; "
                               "strategy flags below); lr_schedule defaults to linear (the paper's)",
                               group="method")

    # -- optimisation ------------------------------------------------------------------------
    lr: float = _f(1e-3, "AdamW learning rate of the LoRA parameters", group="optimisation")
    full_lr: float = _f(1e-5, "AdamW learning rate of --method full (all weights)",
                        group="optimisation")
    weight_decay: float = _f(0.0, "AdamW weight decay", group="optimisation")
    batch_size: int = _f(8, "examples per micro-batch", group="optimisation")
    grad_accum: int = _f(1, "micro-batches per optimizer step", group="optimisation")
    epochs: float | None = _f(None, f"passes over the training examples (default {PAPER_PROFILE['epochs']:g} for "
                              "models other than the embedded one); exclusive with --steps", group="optimisation")
    steps: int | None = _f(None, f"optimizer steps in all (default {EMBEDDED_PROFILE['steps']} for the "
                           "embedded model); exclusive with --epochs", group="optimisation")
    loss: str = _f("classification", "classification: cross-entropy over the answers' mean token "
                   "log-likelihoods (the paper); lm: NLL of the gold answer's tokens", group="optimisation",
                   choices=LOSSES)
    max_nonfinite_in_row: int = _f(20, "steps with a non-finite loss/gradient are skipped; after this many "
                                   "in a row the run is checkpointed and stopped (checked every "
                                   "min(log_every, this) steps, when the loop reads the steps back)",
                                   group="optimisation")
    seeds: list[int] = _f([0], "seeds: each draws its own train/validation sample, LoRA init and "
                          "data order; results are mean and std over them", group="optimisation")

    # -- performance (how the model runs, not what it computes) ------------------------------
    gradient_checkpointing: bool = _f(False, "recompute each decoder layer's activations in the backward pass "
                                      "instead of keeping them (transformers' non-reentrant checkpointing): much "
                                      "less activation memory for about one more forward of compute; lora, cola "
                                      "and full, one process, DDP and FSDP", group="performance")
    attn_implementation: str | None = _f(None, "attention kernel passed to from_pretrained: eager, sdpa, "
                                         "flash_attention_2, ... (default: transformers' choice for the model)",
                                         group="performance")
    compile: bool = _f(False, "torch.compile the decoder (inductor): the first steps and evaluations compile "
                       "(minutes on CPU); knots reuse the compiled graphs, a rank change recompiles once",
                       group="performance")

    # -- evaluation --------------------------------------------------------------------------
    eval_rule: str = _f("mean", "scoring rule of the reported accuracy: mean token log-prob (the paper), "
                        "sum (lm-eval acc) or norm (lm-eval acc_norm); all three are recorded",
                        group="evaluation", choices=RULES)
    eval_batch_size: int = _f(16, "examples per evaluation batch", group="evaluation")
    eval_links: bool = _f(True, "evaluate on the validation split after every link (the COLA curve)",
                          group="evaluation")
    eval_every: int = _f(0, "also score the validation split every this many steps (the run's learn / forget "
                         "trajectory, from which tuning may pick a step); 0: after the links only",
                         group="evaluation")
    end_at_step: int | None = _f(None, "end the run after this many of its steps: the LR schedule and the knots are "
                                 "those of all the steps, the test is scored here (the checkpoint a user picks; "
                                 "cola sweep --tune-step sets it)", group="evaluation")

    # -- outputs -----------------------------------------------------------------------------
    output_dir: str | None = _f(None, "where results go (default: runs/<name>)",
                                group="outputs")
    name: str | None = _f(None, "run name (default: <methods>-<task>-<timestamp>)", group="outputs")
    save_merged: bool = _f(False, "save each run's merged model (save_pretrained + tokenizer)",
                           group="outputs")
    save_adapter: bool = _f(True, "save each run's whole chain as one PEFT adapter", group="outputs")
    save_links: bool = _f(True, "save each link as its own PEFT adapter with a manifest",
                          group="outputs")
    plots: bool = _f(True, "write PNG plots (accuracy per link, training loss)", group="outputs")
    checkpoint_every: int = _f(50, "write a resumable checkpoint every this many steps (and at every "
                               "knot); 0: only at knots", group="outputs")
    keep_checkpoints: bool = _f(False, "keep each run's last checkpoint after it completes",
                                group="outputs")
    resume: bool = _f(False, "continue the runs in --output-dir from their checkpoints", group="outputs")
    take_over_lock: bool = _f(False, "take over the output folder's lock (cola.lock) left by a process that no "
                              "longer runs (killed, or its machine crashed); a running owner is never overridden",
                              group="outputs")
    stop_after: int | None = _f(None, "stop this invocation after this many optimizer steps in all, "
                                "checkpointed (continue with --resume); for time-sliced jobs",
                                group="outputs")
    dry_run: bool = _f(False, "print the plan (knots, ranks, trainable parameters, FLOPs) and stop",
                       group="outputs")
    threads: int | None = _f(None, "CPU threads of torch (torch.set_num_threads; default: torch's, "
                           "one per core)", group="outputs")
    log_every: int = _f(10, "log the training loss every this many steps", group="outputs")
    report_to: list[str] = _f(["none"], "experiment trackers of each run (one or more): none, tensorboard (event "
                              "files in <output-dir>/tracking), trackio (local unless TRACKIO_SPACE_ID is set) or "
                              "wandb (online unless WANDB_MODE=offline)", group="outputs", choices=TRACKERS)
    config: str | None = _f(None, "the config file these settings were read from (informational)",
                            group="outputs", file_key=False)

    # ------------------------------------------------------------------ construction
    def __post_init__(self) -> None:
        for name, tp in field_types(TrainSettings).items():  # 16 in a config file means 16.0 for a float
            value = getattr(self, name)
            if base_type(tp) is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, name, float(value))
        super().__post_init__()

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "settings") -> "TrainSettings":
        """Build from a mapping (e.g. a saved ``settings.json``); unknown keys and wrong types are errors."""
        return cls(**checked(data, source, FIELD_NAMES))

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "TrainSettings":
        """Read a TOML (``.toml``), YAML (``.yaml``/``.yml``) or JSON file; ``overrides`` win over its keys."""
        data = read_config_file(path)
        merged = merge(checked(data, str(path), FILE_KEYS), checked(overrides or {}, "command line", FIELD_NAMES))
        merged["config"] = str(path)
        return cls(**merged)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> "TrainSettings":
        return replace(self, **changes)

    # ------------------------------------------------------------------ derived values
    @property
    def methods(self) -> list[str]:
        """The methods this run trains: ``compare`` if given, else ``[method]``."""
        return list(self.compare) if self.compare else [self.method]

    @property
    def objective(self) -> str:
        """What a step's loss is: ``blocks`` (the corpus task's LM loss on token blocks), ``lm`` (the
        answer tokens' NLL: the facts task, or ``loss="lm"``) or ``classification``."""
        return kind_of(self.task).objective or self.loss

    @property
    def is_embedded(self) -> bool:
        return self.model == EMBEDDED_MODEL

    def resolved(self) -> "TrainSettings":
        """A copy with every automatic (``None``) default filled in from the model's profile."""
        profile = kind_of(self.task).profile(self.is_embedded)
        changes = {}
        for key in ("n_train", "n_val", "n_test", "max_length"):
            if getattr(self, key) is None and profile[key] is not None:
                changes[key] = profile[key]
        if self.steps is None and self.epochs is None:
            changes.update({k: profile[k] for k in ("steps", "epochs") if k in profile})
        return replace(self, **changes) if changes else self

    def total_steps(self, n_train: int) -> int:
        """T: ``steps``, or ``ceil(epochs * batches per epoch / grad_accum)`` for ``n_train`` examples."""
        if self.steps is not None:
            return self.steps
        epochs = self.epochs if self.epochs is not None else PAPER_PROFILE["epochs"]
        batches = math.ceil(n_train / self.batch_size)
        return max(1, math.ceil(epochs * batches / self.grad_accum))

    def chain_config(self, method: str, total_steps: int, seed: int) -> ChainConfig:
        """The :class:`cola.ChainConfig` of ``method`` (``lora``: one link, no knots; ``cola``: the chain)."""
        if method == "full":
            raise ConfigError("method 'full' trains without a chain")
        opts = {**CHAIN_DEFAULTS, **self.chain}
        if method == "lora":
            opts.update(links=1, merge_policy="even", merge_policy_options={}, knots=None)
        else:
            opts.setdefault("links", self.links)
            if opts.get("knots") is not None and "merge_policy" not in self.chain:
                opts["merge_policy"] = "knots"
        return ChainConfig(total_steps=total_steps, seed=seed, **opts)

    # ------------------------------------------------------------------ validation
    def problems(self) -> list[str]:
        """Every problem of these settings (empty when valid)."""
        p: list[str] = []
        values = {}
        for name, tp in field_types(TrainSettings).items():
            value = getattr(self, name)
            problem = type_problem(name, value, tp)
            if problem:  # reported; the checks below see the default instead
                p.append(problem)
                value = default_of(name)
            values[name] = value
        return p + value_problems(SimpleNamespace(**values))

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Write ``settings.json`` atomically (a crash leaves no half-written file)."""
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "TrainSettings":
        return cls.from_dict(json.loads(Path(path).read_text()), str(path))

    def differences(self, other: "TrainSettings") -> list[str]:
        """Fields (other than runtime ones) where ``other`` differs, as ``name: this vs other``."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} vs {b[k]!r}" for k in a if k not in RUNTIME_FIELDS and a[k] != b[k]]


FIELD_NAMES = tuple(f.name for f in fields(TrainSettings))
FILE_KEYS = tuple(f.name for f in fields(TrainSettings) if f.metadata.get("file_key", True))


def help_text(name: str) -> str:
    """The help of field ``name`` (for the CLI)."""
    return next(f.metadata["help"] for f in fields(TrainSettings) if f.name == name)


def default_of(name: str) -> Any:
    """The default of field ``name``."""
    f = next(f for f in fields(TrainSettings) if f.name == name)
    return f.default_factory() if f.default_factory is not MISSING else f.default
