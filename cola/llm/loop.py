"""One training run of ``cola train``: steps, knots, non-finite steps, checkpoints, evaluation after
every link.

A run trains either a :class:`cola.Chain` (LoRA is a one-link chain) or, for full fine-tuning, a
:class:`FullFineTuning`, which offers the same step interface: ``step(loss) -> Verdict`` (false when
a non-finite step was skipped, decided on the device), ``zero_grad()``, ``step_count``, ``nonfinite_steps``,
``nonfinite_in_row``, ``state_dict()``. The loop (:class:`Training`) does not care which.

Resuming: each run writes an atomic checkpoint (the trainer's state with the LoRA factors,
merged weights, optimizer, strategies and RNG; the number of micro-batches consumed, from which
the data order follows; the :class:`~cola.llm.records.RunRecord` so far) every
``checkpoint_every`` steps and at every knot; a resumed run continues exactly (bit for bit on CPU
with the same thread count).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import cola
import cola.distributed as cd
from cola.config import schedule_multiplier
from cola.errors import ColaError
from cola import guard
from cola.guard import Verdict
from cola.llm import objective, stopping
from cola.llm.tasks import blocks as corpus, replay
from cola.llm.parallel import as_forward, gather_errors, is_sharded, shares
from cola.llm.records import RunRecord, mean_loss
from cola.llm.settings import TrainSettings
from cola.llm.tasks.replay import ReplayPool
from cola.llm.tracking import Tracking

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


class RunStopped(ColaError):
    """Raised inside a run when ``stop_after`` steps were taken; the checkpoint is written."""


@dataclass
class StepBudget:
    """The ``stop_after`` steps this invocation may still take, shared by its runs (None: no limit)."""

    left: int | None = None

    @property
    def spent(self) -> bool:
        return self.left is not None and self.left <= 0

    def take(self) -> None:
        if self.left is not None:
            self.left -= 1


class FullFineTuning(guard.Guarded):
    """Full fine-tuning (AdamW over every weight, the chain's base LR schedule) with the chain's step
    interface and its non-finite guard (:class:`cola.guard.Guarded`, the same code): a step whose loss or
    gradients are not finite leaves the weights alone, is counted, and still counts as a step of the schedule."""

    history: tuple = ()   # no knots: the chain's attributes the loop reads
    link = 0

    def __init__(self, model, settings: TrainSettings, total_steps: int, key: str):
        self.model, self.key = model, key
        self.params = list({id(p): p for p in model.parameters()}.values())
        # the fused AdamW skips a non-finite step inside its kernel: no host read, no copy of the model to undo it
        fused = True if self.params and self.params[0].device.type in ("cpu", "cuda") else None
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.full_lr, weight_decay=settings.weight_decay,
                                           fused=fused)
        cfg = settings.chain_config("lora", total_steps, 0)  # for its base LR schedule only
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda taken: schedule_multiplier(cfg.lr_schedule, taken, total_steps, cfg.warmup_steps))
        self.trainable = sum(p.numel() for p in self.params)
        self.step_count = 0
        self.counts = guard.Counts()   # skipped steps, on the device until read

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self, loss: torch.Tensor | float) -> Verdict:
        """The optimizer step unless the loss or a gradient is not finite, decided on the device
        (:mod:`cola.guard`): nothing is read back; the :class:`~cola.guard.Verdict` holds the flag."""
        found = self.guarded_step(loss)
        self.scheduler.step()
        self.step_count += 1
        return Verdict(found)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        # the weights go to host memory one by one (no second copy of the model on an accelerator)
        return {"model": {n: p.detach().cpu() for n, p in self.model.named_parameters()},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}

    def load_state_dict(self, state: dict[str, Any], record: RunRecord) -> None:
        self.model.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step_count = record.steps_taken
        self.counts.set(record.nonfinite_steps)


def current_lr(trainer) -> float:
    """The LR of the next step (a chain's LR policy included)."""
    if isinstance(trainer, cola.Chain):
        return trainer.optimizer.param_groups[0]["lr"] * trainer.lr_multiplier()
    return trainer.current_lr()


def epoch_batches(encoded: list, batch_size: int, seed: int, epoch: int) -> list[list]:
    """The micro-batches of ``epoch``: a permutation drawn from ``(seed, epoch)`` alone, so that the data position of
    a resumed run is the number of micro-batches it consumed."""
    state = int(np.random.SeedSequence([seed, 0x5EED, epoch]).generate_state(1)[0])
    return objective.iterate_batches(encoded, batch_size, torch.Generator().manual_seed(state))


@dataclass
class Run:
    """A run being trained: the model, its trainer, its training data and its record."""

    key: str
    model: Any
    tokenizer: Any
    trainer: Any                    #: a cola.Chain or a FullFineTuning
    encoded: list                   #: the encoded training examples
    splits: Any                     #: the seed's Splits (validation used after each link)
    record: RunRecord
    checkpoint: Path
    seed: int
    lr_hint: str = ""               #: the flag to lower when steps keep failing
    objective: str = "classification"  #: the loss: blocks (the corpus task's LM loss), lm or classification
    tracking: Tracking = field(default_factory=Tracking)  #: its experiment trackers (none by default)
    replay: ReplayPool | None = None  #: text mixed into every micro-batch (:mod:`cola.llm.tasks.replay`)
    _batches: tuple[int, list] = field(default=(-1, []), repr=False)

    @property
    def chain(self) -> cola.Chain | None:
        return self.trainer if isinstance(self.trainer, cola.Chain) else None

    def micro_batch(self, batch_size: int) -> list:
        """The next global micro-batch (the record's position), from that epoch's seeded order."""
        per_epoch = math.ceil(len(self.encoded) / batch_size)
        epoch, index = divmod(self.record.position, per_epoch)
        if self._batches[0] != epoch:
            self._batches = (epoch, epoch_batches(self.encoded, batch_size, self.seed, epoch))
        return self._batches[1][index]


# ============================================================================ checkpoints

def save_checkpoint(run: Run) -> None:
    """Rank 0 writes the checkpoint (every rank holds the same state), then every rank goes on.
    Under FSDP ``chain.state_dict()`` gathers the shards: a collective that every rank joins."""
    if not cd.is_main_process() and not is_sharded(run.model):
        cd.save_on_main(run.checkpoint, None)   # joins rank 0's write: its end, or its error
        return
    state: dict[str, Any] = {"version": CHECKPOINT_VERSION, "key": run.key, "record": run.record.to_dict()}
    if run.chain is not None:
        state["chain"] = run.chain.state_dict()
    else:
        state.update(run.trainer.state_dict())
    t0 = time.perf_counter()
    cd.save_on_main(run.checkpoint, state)
    log.debug("%s: checkpoint at step %d in %.2f s", run.key, run.record.steps_taken, time.perf_counter() - t0)


def load_checkpoint_everywhere(path: Path, key: str) -> dict[str, Any]:
    """Every rank reads the checkpoint rank 0 wrote (on any number of ranks); an error on any rank
    is raised on all of them."""
    state, error = None, None

    def unreadable(why) -> str:
        return (f"{key}: rank {cd.rank()} cannot read the checkpoint {path} that rank 0 sees ({why}): every rank "
                "needs the output folder (one node, or a filesystem shared by the nodes)")

    try:
        state = cola.load_checkpoint(path)
    except ColaError as err:
        if cd.is_distributed() and not path.is_file():
            error = unreadable("no such file")
        else:
            error = (f"{key}: cannot resume: {err}. Move the file away to restart this run from step 0 "
                     "(the other runs keep their progress)")
    except OSError as err:
        if not cd.is_distributed():
            raise
        error = unreadable(err)
    first = gather_errors(error)
    if first is not None:
        raise ColaError(first) from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION or state.get("key") != key:
        raise ColaError(f"checkpoint of {key} is not one this version of cola train wrote "
                        f"(version {state.get('version') if isinstance(state, dict) else None}, "
                        f"run {state.get('key') if isinstance(state, dict) else None})")
    return state


def resume(run: Run) -> None:
    """Continue ``run`` from its checkpoint: trainer state, data position and record."""
    state = load_checkpoint_everywhere(run.checkpoint, run.key)
    record = RunRecord.from_dict(state["record"])
    record.nonfinite_in_row = 0  # a resumed run gets a fresh max_nonfinite_in_row budget (as the chain does)
    if run.chain is not None:
        run.chain.load_state_dict(state["chain"])
    else:
        run.trainer.load_state_dict(state, record)
    run.record = record
    log.info("%s: resumed at step %d of %d", run.key, run.trainer.step_count, record.total_steps)


# ============================================================================ the loop

def _to_host(values: list) -> list[float]:
    """``values`` (tensors and numbers) as floats, the tensors read back in one transfer."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    read = iter(torch.stack([t.float().reshape(()) for t in tensors]).tolist() if tensors else [])
    return [next(read) if isinstance(v, torch.Tensor) else float(v) for v in values]


class Training:
    """The loop of one run: :meth:`train` trains until ``total_steps`` (or the step budget is spent)."""

    def __init__(self, settings: TrainSettings, run: Run, evaluate: Callable, budget: StepBudget,
                 progress: bool = False):
        self.settings, self.run, self.evaluate, self.budget = settings, run, evaluate, budget
        self.progress = progress
        self.knots_seen = len(run.chain.history) if run.chain else 0
        self.pending: list[tuple[Any, Any]] = []   #: (loss, verdict) of the steps not yet read back
        self.agreed = [False] * len(stopping.SIGNALS)   #: the stop flags of the ranks, as of the last all-reduce
        self.tic = time.perf_counter()
        self.replay_batches: list[tuple[list, float]] = []

    @property
    def steps_taken(self) -> int:
        return self.run.trainer.step_count

    @property
    def end(self) -> int:
        """The step the run ends at: ``end_at_step`` (a checkpoint of the T-step schedule), else T."""
        total = self.run.record.total_steps
        return min(total, self.settings.end_at_step) if self.settings.end_at_step else total

    def train(self) -> None:
        """Train to the end; raises :class:`RunStopped` when the budget runs out first."""
        run, total = self.run, self.end
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=self.steps_taken, desc=f"training {run.key}", unit="step",
                       dynamic_ncols=True)
        run.model.train()
        self.tic = time.perf_counter()
        try:
            while self.steps_taken < total:
                if self.budget.spent:  # spent on an earlier run
                    raise RunStopped(f"{run.key}: stopped before step {self.steps_taken + 1} of {total} (stop_after)")
                lr_now = current_lr(run.trainer)
                self.take_step(self.accumulate(), lr_now)
                self.after_step(bar)
        finally:
            if bar is not None:
                bar.close()
        run.model.eval()

    def accumulate(self) -> torch.Tensor | float:
        """Forward and backward of ``grad_accum`` micro-batches; the (global, averaged) loss."""
        s, run = self.settings, self.run
        distributed = cd.is_distributed()
        self.step_batches = []
        self.replay_batches = []
        for _ in range(s.grad_accum):
            batch = run.micro_batch(s.batch_size)
            replayed = run.replay.indices(run.record.position, run.seed) if run.replay is not None else None
            if distributed:  # this rank's slice of the global micro-batch, weighted by its share of it
                mine = cd.shard(batch)
                kind = run.objective
                self.step_batches.append((mine, cd.loss_scale(shares(mine, kind), shares(batch, kind))))
                if replayed is not None:   # blocks of one length: a rank's share is its number of blocks
                    part = cd.shard(list(replayed))
                    self.replay_batches.append((part, cd.loss_scale(len(part), len(replayed))))
            else:
                self.step_batches.append((batch, 1.0))
                if replayed is not None:
                    self.replay_batches.append((list(replayed), 1.0))
            run.record.position += 1
        return self.backward()

    def backward(self) -> torch.Tensor | float:
        """Loss and gradients of this step's micro-batches, averaged over the ranks; the loss, left on
        the device in one process (read back with the steps around it, :meth:`flush`), a float on
        several ranks (their average, the same on every rank)."""
        s, run = self.settings, self.run
        pad = run.tokenizer.pad_token_id or 0
        total = None
        for i, (mine, scale) in enumerate(self.step_batches):
            if run.objective == "blocks":
                loss = as_forward(run.model, lambda: corpus.lm_loss(run.model, torch.stack(mine)))
            else:
                loss = as_forward(run.model, lambda: objective.training_loss(run.model, mine, run.objective, pad))
            loss = loss * (scale / s.grad_accum)
            if self.replay_batches:   # the replay's loss joins the step's (and its backward)
                part, part_scale = self.replay_batches[i]
                if part:
                    extra = as_forward(run.model, lambda: replay.replay_loss(run.model, run.replay, part))
                    loss = loss + extra * (run.replay.weight * part_scale / s.grad_accum)
            loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        if cd.is_distributed():
            cd.sync_gradients(run.model)  # every trainable weight (a probing re-init's factors too): the mean
            # the same loss on every rank, and in the same all-reduce whether any rank was asked to stop
            loss, self.agreed = cd.average_and_any(total, stopping.flags())
            return loss
        return total

    def stop_signal(self) -> int:
        """The signal that makes this step the last one, 0 for none: the flag a SIGTERM / SIGINT set in
        this process (free to read), or under torchrun the flags that every rank sent with this step's
        loss average, so that all ranks stop after the same step."""
        return stopping.from_flags(self.agreed) if cd.is_distributed() else stopping.requested()

    def closure(self) -> torch.Tensor | float:
        """This step's loss and gradients again (what a re-init that probes the gradient calls at a knot)."""
        self.run.trainer.zero_grad()
        return self.backward()

    def take_step(self, loss: torch.Tensor | float, lr_now: float) -> None:
        """The trainer's step (a knot may follow). Whether it was taken is left on the device with its
        loss until :meth:`flush` reads the pending steps at once."""
        run = self.run
        verdict = run.trainer.step(loss, closure=self.closure) if run.chain else run.trainer.step(loss)
        run.trainer.zero_grad()
        self.pending.append((loss, verdict))
        run.record.lr_per_step.append(lr_now)

    def flush(self) -> None:
        """Read the pending steps back from the device in one transfer: each one's loss into the record
        (None for a skipped step), the skipped-step counts, a warning per skipped step."""
        if not self.pending:
            return
        n = len(self.pending)
        # a Verdict's flag is 1 (or True) when the step was skipped; FullFineTuning's bool is "taken"
        flags = [v.flag if isinstance(v, Verdict) else not v for _, v in self.pending]
        values = _to_host([loss for loss, _ in self.pending] + flags)
        run, record = self.run, self.run.record
        first = self.steps_taken - n + 1
        for i, (loss, flag) in enumerate(zip(values[:n], values[n:])):
            skipped = flag > 0
            record.train_loss.append(None if skipped else loss)
            if skipped:
                record.nonfinite_steps += 1
                record.nonfinite_in_row += 1
                log.warning("%s: step %d skipped: non-finite loss or gradient (%d in a row, %d in all)", run.key,
                            first + i, record.nonfinite_in_row, record.nonfinite_steps)
            else:
                record.nonfinite_in_row = 0
        if run.tracking:
            run.tracking.steps(first, record.train_loss[-n:], record.lr_per_step[-n:],
                               [r.step for r in run.trainer.history])
        self.pending = []

    def stop_if_failing(self) -> None:
        """``max_nonfinite_in_row`` skipped steps in a row: checkpoint and stop with an error naming both."""
        run, record = self.run, self.run.record
        in_row = record.nonfinite_in_row
        if in_row < self.settings.max_nonfinite_in_row:
            return
        save_checkpoint(run)
        raise ColaError(f"{run.key}: {in_row} steps in a row with a non-finite loss or gradient "
                        f"({record.nonfinite_steps} skipped in all); stopped after step {self.steps_taken}, the last "
                        f"good one was {self.steps_taken - in_row}; checkpoint {run.checkpoint}. Lower {run.lr_hint} "
                        f"or check the data, then continue with cola train --resume (max_nonfinite_in_row={in_row})")

    def after_step(self, bar) -> None:
        """After a step: read the pending steps back where something needs them (a log line, a knot's
        evaluation, a checkpoint, the end, and every ``min(log_every, max_nonfinite_in_row)`` steps for
        the non-finite check), evaluate after a knot, checkpoint, and honour the step budget."""
        s, run, record = self.settings, self.run, self.run.record
        step, total = self.steps_taken, self.end   # the run's last step (end_at_step, else T)
        record.seconds["train"] += time.perf_counter() - self.tic
        self.tic = time.perf_counter()
        link = run.chain.link if run.chain else 0
        knot = run.chain is not None and len(run.chain.history) > self.knots_seen
        self.budget.take()
        signal = self.stop_signal()   # SIGTERM / SIGINT: this step is the last one (on every rank)
        stop = self.budget.spent and step < total
        periodic = bool(s.checkpoint_every and step % s.checkpoint_every == 0)
        checkpoint = bool(signal) or step < total and (knot or stop or periodic)
        logged = step % s.log_every == 0 or step == total
        if logged or knot or checkpoint or step % min(s.log_every, s.max_nonfinite_in_row) == 0:
            self.flush()
            if logged:
                recent = record.train_loss[-s.log_every:]
                mean, loss = mean_loss(recent), record.train_loss[-1]
                log.info("%s step %d/%d link %d: loss %s (mean of last %d %s), lr %.3g", run.key, step, total, link,
                         "skipped" if loss is None else f"{loss:.4f}", len(recent),
                         "–" if mean is None else f"{mean:.4f}", record.lr_per_step[-1])
            if bar is not None:
                loss = record.train_loss[-1]
                bar.set_postfix(loss="skipped" if loss is None else f"{loss:.4f}", link=link, refresh=False)
        if bar is not None:
            bar.update(1)
        if knot:
            for report in run.chain.history[self.knots_seen:]:
                run.tracking.knot(report)
            self.knots_seen = len(run.chain.history)
            if s.eval_links:
                self.evaluate_link(step)
        if s.eval_every and step % s.eval_every == 0 and step < total:
            self.evaluate_trajectory(step, reuse=knot and s.eval_links)
        if checkpoint:
            save_checkpoint(run)
            self.tic = time.perf_counter()
        if signal:
            raise stopping.SignalStop(signal, f"{run.key}: stopped by {stopping.name(signal)} after step {step} of "
                                              f"{total}; checkpoint {run.checkpoint}")
        if stop:
            raise RunStopped(f"{run.key}: stopped after step {step} of {total} (stop_after)")
        self.stop_if_failing()   # the counts are those of the last flush

    def evaluate_trajectory(self, step: int, reuse: bool = False) -> None:
        """A point of the run's learn / forget trajectory (validation every ``eval_every`` steps); ``reuse``: the
        link's evaluation at this step is the point."""
        run = self.run
        link = run.chain.link if run.chain else 0
        if reuse:
            run.record.add_trajectory_point(step, link, run.record.curve[-1]["validation"])
            return
        t0 = time.perf_counter()
        val = self.evaluate(run.model, run.tokenizer, run.splits.validation, f"{run.key} validation at step {step}")
        run.record.add_trajectory_point(step, link, val)
        run.record.seconds["eval"] += time.perf_counter() - t0
        run.model.train()
        self.tic = time.perf_counter()

    def evaluate_link(self, step: int) -> None:
        """Validation after the link that just ended (a point of the COLA curve)."""
        run = self.run
        t0 = time.perf_counter()
        val = self.evaluate(run.model, run.tokenizer, run.splits.validation,
                            f"{run.key} validation after link {self.knots_seen}")
        run.record.add_curve_point(self.knots_seen, step, val)
        run.tracking.validation(run.record.curve[-1])
        run.record.seconds["eval"] += time.perf_counter() - t0
        run.model.train()
        self.tic = time.perf_counter()
