"""CNNSpace validation, build_cnn over every architecture of a space, CNNBody rebuilt from its spec."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from torchslim.core import config_from_dict, structure
from torchslim.errors import ConfigError, RecipeError
from torchslim.nas import CNNSpace, NASSearchConfig, build_cnn
from torchslim.nas.spaces import CNNBody


@pytest.mark.parametrize("field", ["base_widths", "width_mults", "depths", "kernels"])
def test_empty_choice_list_names_the_field(field: str) -> None:
    with pytest.raises(ConfigError, match=rf"space\.{field}: expected at least one choice"):
        CNNSpace(**{field: ()})


@pytest.mark.parametrize(("fields", "message"), [
    ({"kernels": (3, 4)}, r"space\.kernels: expected odd"),
    ({"depths": (1, -1)}, r"space\.depths"),
    ({"width_mults": (0.0, 1.0)}, r"space\.width_mults"),
    ({"base_widths": (2, 4), "width_mults": (0.1,)}, r"space\.width_mults: 0\.1 .* 0 channels"),
    ({"base_widths": (8, 16, 32, 64), "image_size": 8}, r"space\.image_size: 8 is too small for 4 stages"),
    ({"kernels": (3, 3)}, r"space\.kernels: expected distinct"),
])
def test_contradictory_space_names_the_field(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CNNSpace(**fields)


def test_space_from_recipe_mapping_is_strict() -> None:
    cfg = config_from_dict({"method": "nas.search", "space": {"depths": [1, 2], "kernels": [3]}})
    assert isinstance(cfg, NASSearchConfig) and cfg.space.depths == (1, 2) and cfg.space.kernels == (3,)
    with pytest.raises(RecipeError, match=r"space.*has no field 'kernel'"):
        config_from_dict({"method": "nas.search", "space": {"kernel": [3]}})
    with pytest.raises(RecipeError, match=r"space\.depths.*expected"):
        config_from_dict({"method": "nas.search", "space": {"depths": ["two"]}})
    with pytest.raises(RecipeError, match=r"space\.kernels: expected at least one choice"):
        config_from_dict({"method": "nas.search", "space": {"kernels": []}})


@pytest.mark.parametrize(("fields", "message"), [
    ({"objectives": ("latency",)}, "must include 'accuracy'"),
    ({"objectives": ("accuracy", "latency", "latency")}, "name each objective once"),
    ({"trials": 0}, "trials must be >= 1"),
    ({"epochs_per_trial": 0}, "epochs_per_trial"),
    ({"latency_budget_ms": 0.0}, "latency_budget_ms must be > 0"),
])
def test_bad_search_config(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        NASSearchConfig(**fields)  # type: ignore[arg-type]


def test_build_cnn_builds_and_runs_every_architecture_of_a_space() -> None:
    space = CNNSpace(base_widths=(4, 8), width_mults=(1.0,), depths=(0, 2), kernels=(3, 5), image_size=9)
    genes = space.genes()
    x = torch.randn(2, 1, 9, 9)
    seen = set()
    for values in itertools.product(*genes.values()):
        arch = space.arch(dict(zip(genes, values)))
        model = build_cnn(arch).eval()
        with torch.no_grad():
            out = model(x)
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert len(convs) == 1 + 2 * sum(arch.depths) + len(arch.widths) - 1  # stem, blocks, downsampling
        assert {c.kernel_size[0] for c in convs[1:]} <= set(arch.kernels)
        seen.add(arch)
    assert len(seen) == len(list(itertools.product(*genes.values())))


def test_sampled_fashion_sized_architectures_run() -> None:
    space = CNNSpace()
    rng = random.Random(0)
    for _ in range(4):
        arch = space.arch(space.sample(rng))
        with torch.no_grad():
            assert build_cnn(arch).eval()(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_body_is_rebuilt_from_its_spec() -> None:
    space = CNNSpace(image_size=8, base_widths=(4, 8))
    searched = build_cnn(space.arch(space.extreme(largest=False))).eval()
    ops = structure.capture(searched, {"body": {}})
    assert ops[0]["module"]["cls"] == "torchslim:CNNBody"
    base = build_cnn(space.arch(space.extreme(largest=True)))
    structure.replay(base, ops)
    assert isinstance(base.body, CNNBody) and base.body.arch == searched.body.arch
    base.load_state_dict(searched.state_dict(), strict=True)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(base.eval()(x), searched(x), rtol=0, atol=0)
