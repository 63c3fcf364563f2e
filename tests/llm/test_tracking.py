"""``--report-to``: what the trackers of a run are handed, read back from TensorBoard's event files; trackio
and wandb through fakes of their modules (the packages need not be installed); naming in ``cola sweep``;
closing on errors and stops; the errors of a bad or missing tracker.

Tiny Llama models on the fixture files, each run well under a second.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from pathlib import Path

import pytest

from cola.errors import ConfigError
from cola.llm import loop
from cola.llm.experiment import run_experiment
from cola.llm.settings import TrainSettings
from cola.llm.tracking import Naming, open_run

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def loader(tok, make_model):
    return lambda: (make_model("llama"), tok)


def tiny(tmp_path: Path, **changes) -> TrainSettings:
    base = dict(model="tiny", task="sst2", data_dir=str(FIXTURES), n_train=6, n_val=2, n_test=4, steps=6,
                batch_size=2, eval_batch_size=4, links=3, rank=2, lr=5e-3, plots=False, save_adapter=False,
                save_links=False, output_dir=str(tmp_path / "run"), log_every=3)
    base.update(changes)
    return TrainSettings(**base)


class FakeBackend:
    """A module standing in for ``wandb`` or ``trackio``: every run's init arguments, logs and finish."""

    def __init__(self, name: str):
        self.module = types.ModuleType(name)
        self.module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # found by importlib.util.find_spec
        self.runs: list[dict] = []
        self.module.init = self.init
        self.module.log = lambda metrics, step=None: self.log(metrics, step)
        self.module.finish = lambda exit_code=None: self.runs[-1].update(finished=exit_code if exit_code is not None
                                                                        else "finished")

    def init(self, **kwargs):
        self.runs.append({"init": kwargs, "logs": [], "finished": None})
        run = types.SimpleNamespace(log=lambda metrics, step=None: self.log(metrics, step),
                                    finish=lambda exit_code=0: self.runs[-1].update(finished=exit_code))
        return run

    def log(self, metrics, step):
        self.runs[-1]["logs"].append((step, dict(metrics)))

    def series(self, tag: str, run: int = -1) -> list[tuple[int, float]]:
        return [(step, m[tag]) for step, m in self.runs[run]["logs"] if tag in m]


@pytest.fixture
def fakes(monkeypatch):
    """Fake ``wandb`` and ``trackio`` modules in ``sys.modules``."""
    made = {name: FakeBackend(name) for name in ("wandb", "trackio")}
    for name, fake in made.items():
        monkeypatch.setitem(sys.modules, name, fake.module)
    return made


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return acc


def _scalars(acc, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_events_hold_every_step_knot_and_evaluation(tmp_path, loader, monkeypatch):
    pytest.importorskip("tensorboard")
    reads = []
    to_host = loop._to_host
    monkeypatch.setattr(loop, "_to_host", lambda values: reads.append(len(values)) or to_host(values))
    run_experiment(tiny(tmp_path / "plain"), loader=loader)
    plain_reads, reads[:] = list(reads), []
    settings = tiny(tmp_path, report_to=["tensorboard"])
    (run,) = run_experiment(settings, loader=loader)["runs"]
    assert reads == plain_reads and len(reads) < run["total_steps"]  # no read of its own: the loop's batched ones

    acc = _events(Path(settings.output_dir) / "tracking" / "cola-seed0")
    loss = _scalars(acc, "train/loss")
    assert [s for s, _ in loss] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in loss] == pytest.approx(run["train_loss"], rel=1e-6)
    assert [v for _, v in _scalars(acc, "train/lr")] == pytest.approx(run["lr_per_step"], rel=1e-6)
    assert _scalars(acc, "train/link") == [(1, 0), (2, 0), (3, 1), (4, 1), (5, 2), (6, 2)]  # knots after 2 and 4

    reports = run["knot_reports"]
    assert [s for s, _ in _scalars(acc, "knot/norm_mean")] == [r["step"] for r in reports] == [2, 4]
    assert [v for _, v in _scalars(acc, "knot/norm_max")] == pytest.approx([max(r["norms"].values()) for r in reports])
    for tag in ("knot/seconds", "knot/new_rank", "knot/effective_rank_mean", "knot/accumulated_norm_mean"):
        assert len(_scalars(acc, tag)) == 2, tag
    assert [s for s, _ in _scalars(acc, "knot/overlap_mean")] == [4]  # the first link overlaps nothing

    curve = run["curve"]
    assert [s for s, _ in _scalars(acc, "validation/loss")] == [c["step"] for c in curve] == [0, 2, 4, 6]
    assert [v for _, v in _scalars(acc, "validation/loss")] == pytest.approx([c["validation"]["loss"] for c in curve])
    assert _scalars(acc, "test/accuracy") == [(6, pytest.approx(run["test"]["accuracy"]))]

    from tensorboard.plugins.hparams import plugin_data_pb2

    hparams = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["lr"].number_value == pytest.approx(5e-3) and start.hparams["method"].string_value == "cola"
    assert start.hparams["seed"].number_value == 0 and start.hparams["chain_config.lr_schedule"].string_value == "linear"
    assert "_hparams_/session_end_info" in hparams  # closed as a success


def test_a_crashed_and_resumed_run_shows_each_step_once(tmp_path, loader, monkeypatch):
    """Steps logged after the last checkpoint (here: step 5, past the knot at 4) are logged again by the
    resumed run; TensorBoard shows the new ones only (the writer purges from the checkpoint on)."""
    pytest.importorskip("tensorboard")
    settings = tiny(tmp_path, report_to=["tensorboard"], log_every=1, checkpoint_every=0)
    check = loop.Training.stop_if_failing

    def crash_after_step_5(self):
        if self.steps_taken == 5:
            raise RuntimeError("killed")
        check(self)

    with monkeypatch.context() as patch:
        patch.setattr(loop.Training, "stop_if_failing", crash_after_step_5)
        with pytest.raises(RuntimeError, match="killed"):
            run_experiment(settings, loader=loader)
    (run,) = run_experiment(settings.replace(resume=True), loader=loader)["runs"]
    acc = _events(Path(settings.output_dir) / "tracking" / "cola-seed0")
    assert [s for s, _ in _scalars(acc, "train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in _scalars(acc, "train/loss")] == pytest.approx(run["train_loss"], rel=1e-6)
    assert [s for s, _ in _scalars(acc, "validation/loss")] == [0, 2, 4, 6]


def test_wandb_and_trackio_get_the_run_name_group_settings_and_metrics(tmp_path, loader, fakes):
    settings = tiny(tmp_path, report_to=["wandb", "trackio"], compare=["lora", "cola"], name="exp1")
    results = run_experiment(settings, loader=loader)
    for backend in fakes.values():
        assert [r["init"]["name"] for r in backend.runs] == ["exp1/lora-seed0", "exp1/cola-seed0"]
        assert {r["init"]["group"] for r in backend.runs} == {"exp1"}
        assert {r["init"]["project"] for r in backend.runs} == {"chain-of-lora"}
        assert [r["init"]["config"]["method"] for r in backend.runs] == ["lora", "cola"]
        assert backend.runs[1]["init"]["config"]["lr"] == 5e-3
        for record, tracked in zip(results["runs"], backend.runs):
            steps = [step for step, _ in tracked["logs"]]
            assert steps == sorted(steps)  # wandb drops a step lower than one already logged
            assert [v for _, v in backend.series("train/loss", results["runs"].index(record))] == \
                pytest.approx(record["train_loss"])
            assert backend.series("test/accuracy", results["runs"].index(record)) == \
                [(6, pytest.approx(record["test"]["accuracy"]))]
    wandb, trackio = fakes["wandb"], fakes["trackio"]
    assert [r["finished"] for r in wandb.runs] == [0, 0] and [r["finished"] for r in trackio.runs] == ["finished"] * 2
    assert Path(wandb.runs[0]["init"]["dir"]) == Path(settings.output_dir) / "tracking" / "lora-seed0"
    assert "mode" not in wandb.runs[0]["init"]  # WANDB_MODE (offline, online) is wandb's own to read
    assert [s for s, _ in wandb.series("knot/norm_mean", 1)] == [2, 4] and not wandb.series("knot/norm_mean", 0)


def test_a_failed_run_closes_its_trackers_as_failed(tmp_path, loader, fakes, monkeypatch):
    def broken(self, step):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(loop.Training, "evaluate_link", broken)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        run_experiment(tiny(tmp_path, report_to=["wandb"]), loader=loader)
    assert fakes["wandb"].runs[0]["finished"] == 1


def test_a_stop_for_stop_after_is_no_failure(tmp_path, loader, fakes):
    assert run_experiment(tiny(tmp_path, report_to=["wandb"], stop_after=3), loader=loader)["status"] == "stopped"
    assert fakes["wandb"].runs[0]["finished"] == 0


def test_a_sweep_names_its_runs_by_sweep_cell_and_seed(tmp_path, tok, make_model, fakes):
    pytest.importorskip("tensorboard")
    from cola.llm.sweep import run_sweep
    from cola.llm.sweep.spec import SweepSpec

    base = {k: v for k, v in tiny(tmp_path).to_dict().items()
            if k in ("model", "task", "data_dir", "n_train", "n_val", "n_test", "steps", "batch_size", "rank")}
    spec = SweepSpec(settings={**base, "report_to": ["trackio", "tensorboard"]}, grid={"links": [1, 2]}, seeds=[0],
                     tune={"lr": [5e-3, 1e-2]}, tune_seeds=[100])
    out = tmp_path / "my-sweep"
    run_sweep(spec, out, loader=lambda: (make_model("llama"), tok))
    names = [r["init"]["name"] for r in fakes["trackio"].runs]
    assert set(names) == {"my-sweep/tuning links=1: lr=0.005/lora-seed100", "my-sweep/tuning links=1: lr=0.01/lora-seed100",
                          "my-sweep/tuning links=2: lr=0.005/cola-seed100", "my-sweep/tuning links=2: lr=0.01/cola-seed100",
                          "my-sweep/links=1/lora-seed0", "my-sweep/links=2/cola-seed0"}
    assert {r["init"]["group"] for r in fakes["trackio"].runs if r["init"]["name"].endswith("seed0")} == \
        {"my-sweep/links=1", "my-sweep/links=2"}
    events = sorted(str(p.parent.relative_to(out / "tracking")) for p in (out / "tracking").rglob("events.*"))
    assert events == sorted(n.removeprefix("my-sweep/") for n in names)


def test_bad_and_missing_trackers_are_clear_errors(monkeypatch):
    with pytest.raises(ConfigError) as err:
        TrainSettings(report_to=["tensorbord"])
    assert "report_to='tensorbord': allowed none, tensorboard, trackio, wandb (closest: tensorboard)" in str(err.value)
    with pytest.raises(ConfigError, match="'none' means no tracker"):
        TrainSettings(report_to=["none", "tensorboard"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed, whether it is or not
    with pytest.raises(ConfigError, match=r"report_to=wandb: needs the wandb package.*pip install wandb"):
        TrainSettings(report_to=["wandb"])
    with pytest.raises(ConfigError, match="pip install wandb"):  # the same when the run opens it
        open_run(["wandb"], Naming("x", Path("unused")), "cola-seed0", {})
    assert TrainSettings().report_to == ["none"]
    assert not open_run(["none"], Naming("x", Path("unused")), "cola-seed0", {})  # no tracker: a no-op


def test_report_to_is_a_runtime_setting_outside_sweep_identities_and_axes():
    from cola.llm.settings import RUNTIME_FIELDS
    from cola.llm.sweep.cells import run_key
    from cola.llm.sweep.spec import NOT_AXES, SweepSpec

    assert "report_to" in RUNTIME_FIELDS and "report_to" in NOT_AXES
    plain = TrainSettings(model="tiny", task="sst2", data_dir=str(FIXTURES))
    assert run_key(plain) == run_key(plain.replace(report_to=["tensorboard"]))
    assert not plain.differences(plain.replace(report_to=["tensorboard"]))
    with pytest.raises(ConfigError, match="report_to"):
        SweepSpec(settings={"model": "tiny"}, grid={"report_to": [["none"], ["tensorboard"]]})
