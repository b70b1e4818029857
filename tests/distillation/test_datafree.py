"""distillation.datafree: generators against the teacher, a student trained with zero real images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import torchslim as ts
from tiny_models import TinyLM
from torchslim.distillation._generators import LatentGaussian, build_generator, check_fit
from torchslim.distillation.datafree import DataFreeConfig, DataFreeDistillation
from torchslim.errors import ConfigError, DataError, UnsupportedModuleError
from torchslim.export import load, save
from torchslim.quantization.ptq import PTQConfig
from torchslim.recipes import Recipe, Stage, TrainSpec
from torchslim.zoo import digits


def _cnn(width: int = 8, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    spec = TrainSpec(epochs=15, batch_size=64, lr=1e-2)
    return ts.compress(_cnn(16), Recipe(stages=(Stage(name="t", methods=(), train=spec),), measure=()),
                       ts.Context(train_data=digits("train"))).model.eval()


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 12, 12), (1, 28, 28), (2, 10, 6), (16,)])
def test_generator_output_shape_matches_example_inputs(shape: tuple[int, ...]) -> None:
    out = build_generator(shape, latent_dim=8)(torch.randn(4, 8))
    assert out.shape == (4, *shape)
    channels = out.transpose(0, 1).reshape(out.shape[1], -1)  # the last BatchNorm normalises each channel
    torch.testing.assert_close(channels.mean(1), torch.zeros(out.shape[1]), atol=1e-5, rtol=0)


def test_latent_kl_is_the_closed_form_gaussian_kl() -> None:
    latent = LatentGaussian(5)
    assert float(latent.kl().detach()) == 0.0  # starts at the prior N(0, 1)
    with torch.no_grad():
        latent.mu.copy_(torch.linspace(-1, 1, 5))
        latent.log_sigma.copy_(torch.linspace(-0.5, 0.5, 5))
    q = torch.distributions.Normal(latent.mu, latent.log_sigma.exp())
    expected = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum()
    torch.testing.assert_close(latent.kl(), expected)


@pytest.mark.parametrize("kind", ["gan", "vae"])
def test_generator_losses_go_down_on_a_tiny_teacher(teacher: nn.Module, kind: str) -> None:
    cfg = DataFreeConfig(generator=kind, batch_size=64, lr=1e-2)  # type: ignore[arg-type]
    method = DataFreeDistillation(cfg)
    torch.manual_seed(0)
    latent = LatentGaussian(cfg.latent_dim) if kind == "vae" else None
    method.attach(build_generator((1, 8, 8), cfg.latent_dim), teacher, latent)
    for _ in range(25):
        method.generator_step()
    first, last = method.history[:5], method.history[-5:]
    for key in ("total", "bn"):  # one-hot alone may rise while the classes balance
        assert sum(h[key] for h in last) < sum(h[key] for h in first), key


def test_adversarial_step_trains_only_the_generator(teacher: nn.Module) -> None:
    method = DataFreeDistillation(DataFreeConfig(adversarial=True, batch_size=16))
    student = _cnn(8, seed=1)
    method.on_start(student, ts.Context(teacher=teacher, example_inputs=torch.randn(1, 1, 8, 8)))
    method.attach(build_generator((1, 8, 8), 64), teacher)
    before = [p.clone() for p in student.parameters()]
    method.generator_step()
    assert method.history[-1]["disagreement"] > 0
    assert all(p.grad is None for p in student.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_replay_adds_past_samples_with_their_own_teacher_logits(teacher: nn.Module) -> None:
    method = DataFreeDistillation(DataFreeConfig(batch_size=16, replay=40))
    torch.manual_seed(0)
    method.attach(build_generator((1, 8, 8), 64), teacher)
    first = method.generator_step()
    assert first.shape[0] == 16  # nothing to replay yet
    made = [first]
    for _ in range(4):
        batch = method.generator_step()
        made.append(batch[:16])
        assert batch.shape[0] == 32
        past = batch[16:]  # each replayed sample is one the generator made before this step
        earlier = torch.cat(made[:-1]).flatten(1)
        assert all((earlier == row.flatten()).all(dim=1).any() for row in past)
        assert method._last is not None and method._last[0] is batch
        with torch.no_grad():
            torch.testing.assert_close(method._last[1], teacher(batch), atol=1e-5, rtol=1e-5)
    assert method._memory is not None and method._memory[0].shape[0] == 40  # ring of 40: oldest overwritten
    kept = method._memory[0].flatten(1)
    assert not any((kept == row.flatten()).all(dim=1).any() for row in made[0])  # 80 made, first 16 gone


@pytest.mark.parametrize("loss", ["l1", "kl"])
def test_student_loss_is_l1_on_logits_or_soft_targets(teacher: nn.Module, loss: str) -> None:
    from torchslim.core import Step
    from torchslim.distillation.losses import soft_target_loss

    method = DataFreeDistillation(DataFreeConfig(batch_size=16, replay=0, loss=loss))  # type: ignore[arg-type]
    method.attach(build_generator((1, 8, 8), 64), teacher)
    torch.manual_seed(0)
    batch = method.generator_step()
    student = _cnn(8, seed=1)(batch)
    with torch.no_grad():
        target = teacher(batch)
    got = method.extra_loss(Step(0, batch, None, student, student))
    expected = ((student - target).abs().mean() if loss == "l1"
                else soft_target_loss(student, target, method.cfg.temperature))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert DataFreeDistillation.default_lr == 2e-3 and DataFreeConfig().loss == "l1"


def test_augment_flips_and_shifts_the_students_batch_and_relabels_it(teacher: nn.Module) -> None:
    import copy

    batches = []
    generator = build_generator((1, 8, 8), 64)
    for augment in (False, True):
        method = DataFreeDistillation(DataFreeConfig(batch_size=16, replay=0, augment=augment))
        method.attach(copy.deepcopy(generator), teacher)
        torch.manual_seed(0)
        batches.append(method.generator_step())
    raw, augmented = batches
    assert method._last is not None
    with torch.no_grad():
        torch.testing.assert_close(method._last[1], teacher(augmented), atol=1e-5, rtol=1e-5)
    padded = [nn.functional.pad(v, (2, 2, 2, 2), mode="replicate") for v in (raw, raw.flip(-1))]
    for i in range(len(raw)):  # each image is one of its 2 x 25 flipped / shifted versions
        options = [p[i, :, dy:dy + 8, dx:dx + 8] for p in padded for dy in range(5) for dx in range(5)]
        assert any(torch.equal(augmented[i], o) for o in options), i
    assert not torch.equal(raw, augmented)


def test_data_free_student_agrees_with_the_teacher_and_samples_calibrate_ptq(
        teacher: nn.Module, tmp_path: Path) -> None:
    test = digits("test")
    x = test.tensors[0]
    stage = Stage(name="df", methods=(DataFreeConfig(batch_size=64, epoch_steps=300, samples=200),),
                  train=TrainSpec(lr=1e-2))
    ctx = ts.Context(teacher=teacher, example_inputs=x[:1], workdir=tmp_path / "work")  # no train_data
    result = ts.compress(_cnn(8, seed=1), Recipe(stages=(stage,), measure=()), ctx)
    student = result.model.eval()
    with torch.no_grad():
        target = teacher(x).argmax(1)
        agree = float((student(x).argmax(1) == target).float().mean())
        chance = float((_cnn(8, seed=1).eval()(x).argmax(1) == target).float().mean())
    assert agree > chance + 0.25, (agree, chance)
    assert result.record.outcomes[-1].stats["classes_covered"] >= 8
    saved = load_file(str(tmp_path / "work" / "datafree-samples.safetensors"))
    assert saved["inputs"].shape == (200, 1, 8, 8) and saved["labels"].shape == (200,)
    assert (tmp_path / "work" / "plots" / "datafree-samples.png").stat().st_size > 1000
    save(result, tmp_path / "run")
    reloaded = load(tmp_path / "run", lambda: _cnn(8, seed=1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), student(x), rtol=0, atol=0)
    calib = torch.utils.data.TensorDataset(saved["inputs"], saved["labels"])
    quantized = ts.apply(_cnn(8, seed=1).eval(), PTQConfig(), ts.Context(calib_data=calib, example_inputs=x[:1]))
    with torch.no_grad():
        assert torch.isfinite(quantized.model(x)).all()


def test_bad_input_is_named() -> None:
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    with pytest.raises(DataError, match=r"\(1, 6, 6\).*\(1, 8, 8\)"):
        check_fit(build_generator((1, 6, 6), 8), teacher, (1, 8, 8), 8, "datafree")
    with pytest.raises(DataError, match=r"\(1, 6, 6\).*cannot take"):
        check_fit(build_generator((1, 6, 6), 8), teacher, (1, 6, 6), 8, "datafree")
    sequence = nn.Sequential(nn.Linear(16, 10), nn.Unflatten(1, (2, 5))).eval()  # (B, 2, 5): not logits
    with pytest.raises(UnsupportedModuleError, match="classifier"):
        check_fit(build_generator((16,), 8), sequence, (16,), 8, "datafree")
    stage = Stage(name="df", methods=(DataFreeConfig(),), train=TrainSpec(steps=1))
    ctx = ts.Context(teacher=TinyLM(), example_inputs=torch.randint(0, 50, (2, 6)))
    with pytest.raises(UnsupportedModuleError, match="tokens"):
        ts.compress(TinyLM(), Recipe(stages=(stage,), measure=()), ctx)
    with pytest.raises(ConfigError):
        DataFreeConfig(generator="flow")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        DataFreeConfig(batch_size=1)
    with pytest.raises(ConfigError, match="loss must be l1 or kl"):
        DataFreeConfig(loss="mse")  # type: ignore[arg-type]


def test_sample_previews_are_embedded_in_the_report(tmp_path: Path) -> None:
    from torchslim.distillation._preview import save_samples
    from torchslim.report.jsonio import write_report
    from torchslim.report.record import RunRecord

    save_samples(tmp_path, "datafree-samples", torch.randn(12, 1, 8, 8), torch.arange(12) % 10, "t")
    write_report(RunRecord(recipe={}, environment={}), tmp_path)
    html = (tmp_path / "report.html").read_text()
    assert "Synthetic samples of distillation.datafree" in html and "data:image/png;base64," in html
