"""One-shot nas.search: subnets sliced from one sandwich-trained supernet, scored without training."""

from __future__ import annotations

import dataclasses
import itertools
import random
from pathlib import Path

import pytest
import torch

import torchslim as ts
from torchslim.core.storage import load_state_dict_into, save_state_dict
from torchslim.errors import ConfigError, RecipeError
from torchslim.export import load, save
from torchslim.nas import CNNSpace, NASSearchConfig, TransformerSpace, build_cnn, search
from torchslim.nas.supernet import CNNSupernet, OneShot, calibration, load_or_train, recalibrate, subnet
from torchslim.zoo import digits
from torchslim.zoo.data import head, make_eval_fn

pytest.importorskip("optuna")

TINY = CNNSpace(base_widths=(4, 8), width_mults=(0.5, 1.0), depths=(0, 1), kernels=(3, 5), image_size=8)


@pytest.fixture(scope="module")
def full_digits() -> ts.Context:
    test = head(digits("test"), 200)
    return ts.Context(train_data=digits("train"), eval_fn=make_eval_fn(test), example_inputs=test.tensors[0][:1],
                      seed=0)


@pytest.fixture(scope="module")
def trained(full_digits: ts.Context) -> CNNSupernet:
    return load_or_train(TINY, OneShot(epochs=30), full_digits, lr=1e-2)


def test_a_sliced_subnet_computes_what_the_supernet_computes_for_it() -> None:
    torch.manual_seed(0)
    supernet = CNNSupernet(TINY)
    x = torch.randn(16, 1, 8, 8)
    rng = random.Random(0)
    for _ in range(8):
        arch = TINY.arch(TINY.sample(rng))
        sliced = subnet(supernet, arch, [x]).train()  # training mode: batch statistics, like the supernet
        torch.testing.assert_close(sliced(x), supernet.run(x, arch), rtol=0, atol=0)
        assert sum(p.numel() for p in sliced.parameters()) < sum(p.numel() for p in supernet.parameters()) or \
            arch == supernet.largest


def test_recalibration_gives_batchnorm_the_statistics_of_the_batches() -> None:
    torch.manual_seed(0)
    model = build_cnn(TINY.arch(TINY.extreme(largest=True)))
    batches = [torch.randn(32, 1, 8, 8) * 3 + 1 for _ in range(3)]
    recalibrate(model, batches)
    stem_conv, stem_bn = model.body.stem[0], model.body.stem[1]
    with torch.no_grad():
        means = torch.stack([stem_conv(b).mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    torch.testing.assert_close(stem_bn.running_mean, means, rtol=1e-5, atol=1e-6)
    assert not model.training and stem_bn.momentum == 0.1  # the momentum is restored


def test_sandwich_training_makes_every_subnet_accurate(trained: CNNSupernet, full_digits: ts.Context) -> None:
    batches = calibration(full_digits, OneShot())
    genes = TINY.genes()
    untrained = CNNSupernet(TINY)
    assert full_digits.eval_fn is not None
    for values in itertools.product(*genes.values()):
        arch = TINY.arch(dict(zip(genes, values)))
        shared = full_digits.eval_fn(subnet(trained, arch, batches))["accuracy"]
        assert shared > 0.5, f"{arch}: {shared}"  # 10 classes; an untrained slice scores about 0.1
    assert full_digits.eval_fn(subnet(untrained, TINY.arch(TINY.extreme(largest=True)), batches))["accuracy"] < 0.3


def test_one_shot_search_fine_tunes_the_choice_and_reloads_bit_exact(trained: CNNSupernet, full_digits: ts.Context,
                                                                      tmp_path: Path) -> None:
    ctx = dataclasses.replace(full_digits, workdir=tmp_path / "work")
    path = tmp_path / "supernet.safetensors"
    spec = OneShot(epochs=30, finetune_epochs=1, path=str(path))
    save_state_dict(trained, path, metadata={"space": _tag()})  # as a finished training leaves it
    model = build_cnn(TINY.arch(TINY.extreme(largest=True)))
    cfg = NASSearchConfig(space=TINY, strategy="random", trials=12, one_shot=spec, lr=1e-3,
                          distill=({"method": "distillation.logits", "temperature": 2.0},))  # from the largest
    result = ts.apply(model, cfg, ctx)
    stats = result.record.outcomes[-1].stats
    assert stats["trials_complete"] >= 1 and stats["best_accuracy"] > 0.5
    assert stats["finetuned_accuracy"] >= stats["best_accuracy"] - 0.05
    assert not (ctx.workdir / "supernet-checkpoints").exists(), "the saved supernet is loaded, not trained again"
    save(result, tmp_path / "out")
    reloaded = load(tmp_path / "out", lambda: build_cnn(TINY.arch(TINY.extreme(largest=True))))
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), result.model.eval()(x), rtol=0, atol=0)


def test_search_without_a_saved_supernet_trains_and_saves_it(full_digits: ts.Context, tmp_path: Path) -> None:
    ctx = dataclasses.replace(full_digits, workdir=tmp_path)
    cfg = NASSearchConfig(space=TINY, strategy="tpe", trials=4, one_shot=OneShot(epochs=2, finetune_epochs=0))
    result = search(cfg, ctx)
    assert len(result.rows) == 4 and result.supernet is not None
    saved = CNNSupernet(TINY)
    load_state_dict_into(saved, tmp_path / "supernet.safetensors")
    for (name, a), b in zip(saved.state_dict().items(), result.supernet.state_dict().values()):
        assert torch.equal(a, b), name
    again = load_or_train(TINY, OneShot(epochs=2), ctx, lr=None)  # loaded: the same weights
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), saved.state_dict().values()))


def _tag() -> str:
    from torchslim.nas.supernet import _space_tag

    return _space_tag(TINY)


def test_bad_one_shot_settings_fail_clearly(full_digits: ts.Context, tmp_path: Path, trained: CNNSupernet) -> None:
    with pytest.raises(ConfigError, match="one_shot.epochs: expected >= 1, found 0"):
        OneShot(epochs=0)
    with pytest.raises(ConfigError, match="transformer space"):
        NASSearchConfig(space=TransformerSpace(layers=(1,), heads=(2,), ffn=(8,)), one_shot=OneShot())
    with pytest.raises(RecipeError, match="did you mean 'sandwich'"):
        NASSearchConfig.from_dict({"method": "nas.search", "one_shot": {"sandwhich": 2}})
    other = dataclasses.replace(TINY, kernels=(3,))
    path = tmp_path / "supernet.safetensors"
    save_state_dict(trained, path, metadata={"space": _tag()})
    with pytest.raises(ConfigError, match="holds the supernet of space"):
        load_or_train(other, OneShot(path=str(path)), full_digits, lr=None)
