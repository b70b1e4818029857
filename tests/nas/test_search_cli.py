"""``torchslim search``: two worker processes fill one SQLite study; the run saves the chosen model."""

from __future__ import annotations

import sqlite3
from datetime import datetime
from pathlib import Path

import pytest
import torch

from torchslim.cli.__main__ import main
from torchslim.export import load
from torchslim.nas.spaces import digits_cnn

RECIPE = """
version: 1
model: py:torchslim.nas.spaces:digits_cnn
data: zoo:digits
stages:
  - name: search
    methods:
      - method: nas.search
        strategy: random
        trials: 3
        space: {base_widths: [4, 8], width_mults: [0.5, 1.0], depths: [0, 1], kernels: [3, 5], image_size: 8}
measure: [params]
export: [checkpoint]
"""


@pytest.mark.integration
def test_search_with_two_workers_shares_one_study(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "out"
    assert main(["--quiet", "search", str(recipe), "--workers", "2", "--out", str(out)]) == 0
    with sqlite3.connect(tmp_path / "out.nas.db") as conn:
        states = dict(conn.execute("select state, count(*) from trials group by state").fetchall())
    assert states.get("COMPLETE", 0) >= 3 and "RUNNING" not in states
    assert (out / "plots" / "nas_pareto.png").is_file() and (out / "nas_trials.md").is_file()
    model = load(out, digits_cnn)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_search_needs_a_nas_search_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.replace("method: nas.search", "method: pruning.magnitude").split("        strategy")[0])
    assert main(["--quiet", "search", str(recipe), "--out", str(tmp_path / "out")]) == 2
    assert "needs a recipe with a nas.search method" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_one_shot_search_trains_the_supernet_once_for_every_worker(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.replace("trials: 3", "trials: 6\n        one_shot: {epochs: 2, finetune_epochs: 1}"))
    out = tmp_path / "out"
    assert main(["--quiet", "search", str(recipe), "--workers", "2", "--out", str(out)]) == 0
    supernet = tmp_path / "out.supernet.safetensors"
    assert supernet.is_file()
    with sqlite3.connect(tmp_path / "out.nas.db") as conn:
        starts = [datetime.fromisoformat(t) for (t,) in conn.execute(
            "select datetime_start from trials where state = 'COMPLETE'").fetchall()]
    assert len(starts) >= 6
    assert supernet.stat().st_mtime <= min(starts).timestamp(), "trained before any worker scored a subnet"
    assert not (out / "checkpoints" / "supernet-checkpoints").exists()
    model = load(out, digits_cnn)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
