"""The sweep's plots on a committed sweep: every cell told apart in the legends, the right corner named."""

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from cola.llm.sweep import report as sweep_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_legends_tell_every_cell_apart_and_the_frontier_names_the_better_corner(tmp_path, monkeypatch):
    # facts-chains-cpu: one grid axis (method) and eight extra cells that differ only in their own values
    results = json.loads((ROOT / "docs/sweeps/facts-chains-cpu/results.json").read_text())
    drawn = {}

    def capture(plt, fig, path, key, dpi=120):
        drawn[key] = {"legends": [[t.get_text() for t in ax.get_legend().get_texts()]
                                  for ax in fig.axes if ax.get_legend()],
                      "titles": [ax.get_title() for ax in fig.axes]}
        plt.close(fig)
        return {key: path}

    monkeypatch.setattr(sweep_report, "save_figure", capture)
    sweep_report.write_plots(results, tmp_path)
    cells = {c["key"] for c in results["cells"]}
    for key in ("link_plot", "loss_plot", "frontier_plot"):
        (labels,) = drawn[key]["legends"]
        assert len(set(labels)) == len(labels) == len(cells), (key, labels)
    assert any("links=4\nreinit=fw" in t or "links=4 reinit=fw" in t for t in drawn["link_plot"]["legends"][0])
    assert "upper-left is better" in drawn["frontier_plot"]["titles"][0]       # recall: higher is better
