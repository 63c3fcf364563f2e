"""`cola theory`: the checks report honestly, the command prints, writes JSON and plots."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from cola_theory import checks, cli
from cola_theory.checks import CheckResult, Context
from cola_theory.problems import standard_problems


def test_check_result_relations_and_ratio():
    ok = CheckResult("a", "x <= y", 1.0, 2.0)
    bad = CheckResult("b", "x <= y", 3.0, 2.0)
    assert ok.passed and ok.ratio == 0.5
    assert not bad.passed and bad.ratio == 1.5
    assert CheckResult("c", "x >= y", 3.0, 2.0, ">=").passed
    assert not CheckResult("d", "x >= y", 1.0, 2.0, ">=").passed
    assert not CheckResult("e", "nan", math.nan, 1.0).passed
    assert CheckResult("f", "diverged baseline", 1e-6, math.inf).passed  # below an infinite value
    assert not CheckResult("g", "diverged", math.inf, 1.0).passed
    assert not CheckResult("g2", "both diverged", math.inf, math.inf).passed
    assert CheckResult("g3", "diverged is above a floor", math.inf, 1.0, ">=").passed
    row = bad.to_dict()
    assert row["passed"] is False and row["ratio"] == 1.5
    json.dumps(CheckResult("h", "inf", math.inf, 1.0).to_dict())  # serialisable


def test_a_violated_bound_is_reported_not_hidden():
    """Break an assumption (beta 10^4 too small): Theorem 4.1's bound fails and the row says so."""
    p = standard_problems()["cauchy"]
    wrong = dataclasses.replace(p, beta=p.beta * 1e-4)
    rows = checks.check_fw_exact(Context(problems={"cauchy": wrong}))
    assert rows and all(not r.passed and r.ratio > 1 for r in rows)


@pytest.mark.parametrize("group", ["constants", "fw-exact", "fw-stochastic", "rac-nonconvex"])
def test_fast_groups_pass_on_the_default_problems(group):
    rows, _ = checks.run_checks([group], Context())
    assert rows and all(r.passed for r in rows), [r.name for r in rows if not r.passed]


def test_every_bound_has_a_check():
    names = set(checks.CHECKS)
    assert {"fw-exact", "fw-chain", "fw-rate", "rac-nonconvex", "rac-pl", "counterexample",
            "practical-chain"} <= names
    with pytest.raises(ValueError, match="unknown check"):
        checks.run_checks(["no-such-check"])


def test_cli_runs_a_group_prints_and_writes_json(tmp_path, capsys):
    rc = cli.main(["--only", "fw-exact,constants", "--output-dir", str(tmp_path), "--no-plots"])
    out = capsys.readouterr().out
    assert rc == 0
    report = json.loads((tmp_path / "theory.json").read_text())
    names = [row["name"] for row in report["checks"]]
    assert names and all(name in out for name in names)
    assert "thm4.1-exact/ls-low" in names and "beta/quadratic" in names
    assert all(row["passed"] for row in report["checks"])
    assert {"observed", "bound", "ratio", "passed", "relation", "kind"} <= set(report["checks"][0])
    assert report["problems"]["ls-low"]["beta"] > 0


def test_cli_writes_the_rate_plot(tmp_path):
    assert cli.main(["--only", "fw-rate", "--output-dir", str(tmp_path)]) == 0
    assert (tmp_path / "gap_vs_T.png").stat().st_size > 1000


def test_cli_exit_status_reports_failures(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(checks.CHECKS, "always-fails", lambda ctx: [CheckResult("x", "1 <= 0", 1.0, 0.0)])
    assert cli.main(["--only", "always-fails", "--output-dir", str(tmp_path), "--no-plots"]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert cli.main(["--only", "nonsense", "--output-dir", str(tmp_path)]) == 2


def test_cli_list(capsys):
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in checks.CHECKS)


@pytest.mark.slow
def test_default_run_passes_and_writes_every_plot(tmp_path):
    rc = cli.main(["--output-dir", str(tmp_path)])
    report = json.loads((tmp_path / "theory.json").read_text())
    failed = [row["name"] for row in report["checks"] if not row["passed"]]
    assert rc == (1 if failed else 0)
    for name in ("gap_vs_T.png", "loss_vs_step.png", "rac.png"):
        assert (tmp_path / name).exists()
    assert not failed, failed


def test_single_threaded_restores_the_thread_count():
    import torch

    from cola_theory.threads import single_threaded

    before = torch.get_num_threads()
    with single_threaded():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
