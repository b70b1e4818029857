import copy

import pytest
import torch
from torch import nn

from tiny_models import MLP, ResConcatCNN, TinyLM
from torchslim.core import Context, Step, surgery
from torchslim.distillation.attention import AttentionDistillation, AttentionDistillationConfig
from torchslim.distillation.losses import relation_log_probs
from torchslim.errors import ConfigError, DataError, UnsupportedModuleError


def _started(cfg: AttentionDistillationConfig, student: nn.Module, teacher: nn.Module) -> AttentionDistillation:
    method = AttentionDistillation(cfg)
    method.on_start(student, Context(teacher=teacher))
    return method


def _loss(method: AttentionDistillation, student: nn.Module, teacher: nn.Module, x: object,
          clear: bool = True) -> torch.Tensor:
    step = Step(0, x, None, student(**x) if isinstance(x, dict) else student(x), student,
                teacher_fn=lambda i: teacher(**i) if isinstance(i, dict) else teacher(i))
    loss = method.extra_loss(step)
    if clear:
        method.on_step(step)
    return loss


class SelfAttention(nn.Module):
    """Hugging Face style: separate query/key/value Linear children, a head count attribute."""

    def __init__(self, dim: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        self.num_heads, self.is_causal = heads, causal
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, e = h.shape
        split = lambda z: z.reshape(b, t, self.num_heads, -1).transpose(1, 2)  # noqa: E731
        out = nn.functional.scaled_dot_product_attention(
            split(self.query(h)), split(self.key(h)), split(self.value(h)), is_causal=self.is_causal)
        return out.transpose(1, 2).reshape(b, t, e)


class Encoder(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 4, layers: int = 2, causal: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, dim)
        self.layers = nn.ModuleList(SelfAttention(dim, heads, causal) for _ in range(layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(input_ids)
        for layer in self.layers:
            h = h + layer(h)
        return h


def test_attention_relations_of_a_copy_are_zero_and_reach_only_the_student() -> None:
    torch.manual_seed(0)
    teacher = TinyLM().eval()
    student = copy.deepcopy(teacher)
    method = _started(AttentionDistillationConfig(), student, teacher)
    assert method._keys == [("attn:attn", "relations")] and method._heads["attn:attn"] == 4
    tokens = torch.randint(0, 50, (2, 6))
    assert _loss(method, student, teacher, tokens).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        student.attn.in_proj_weight.add_(0.05 * torch.randn_like(student.attn.in_proj_weight))
    loss = _loss(method, student, teacher, tokens)
    assert loss.item() > 0
    loss.backward()
    assert student.attn.in_proj_weight.grad is not None and student.attn.in_proj_weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    method.on_end(student, Context())
    assert surgery.leftovers(student) == [] and surgery.leftovers(teacher) == []


def test_head_count_and_width_mismatch_is_handled_by_relation_heads() -> None:
    torch.manual_seed(0)
    teacher, student = TinyLM(dim=32), TinyLM(dim=16)
    student.attn = nn.MultiheadAttention(16, num_heads=2, batch_first=True)
    method = _started(AttentionDistillationConfig(), student, teacher)
    assert method._heads["attn:attn"] == 2  # the student's head count, applied to both
    loss = _loss(method, student, teacher, torch.randint(0, 50, (2, 6)))
    assert torch.isfinite(loss) and loss.item() > 0
    method.on_end(student, Context())
    method = _started(AttentionDistillationConfig(heads=3), student, teacher)
    with pytest.raises(ConfigError, match="3 relation heads do not divide the student's width 16"):
        _loss(method, student, teacher, torch.randint(0, 50, (2, 6)))
    assert surgery.leftovers(student) == [] and surgery.leftovers(teacher) == []


def test_query_key_value_children_padding_and_uniform_layer_mapping() -> None:
    torch.manual_seed(0)
    teacher, student = Encoder(layers=4), Encoder(layers=2)
    cfg = AttentionDistillationConfig(mapping="uniform", relations=("qk", "vv", "qq", "kk"))
    method = _started(cfg, student, teacher)
    assert [k for k, _ in method._keys] == ["layers.0:layers.1", "layers.1:layers.3"]
    ids, mask = torch.randint(0, 30, (2, 5)), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    loss = _loss(method, student, teacher, {"input_ids": ids, "attention_mask": mask})
    assert torch.isfinite(loss) and loss.item() > 0
    method.on_end(student, Context())
    same = copy.deepcopy(teacher)
    method = _started(AttentionDistillationConfig(mapping="uniform"), same, teacher)
    assert _loss(method, same, teacher, {"input_ids": ids, "attention_mask": mask}).item() == pytest.approx(
        0.0, abs=1e-6)
    method.on_end(same, Context())


def test_causal_modules_are_masked() -> None:
    torch.manual_seed(0)
    teacher = Encoder(causal=True)
    student = copy.deepcopy(teacher)
    method = _started(AttentionDistillationConfig(relations=("qk",)), student, teacher)
    ids = torch.randint(0, 30, (2, 5))
    _loss(method, student, teacher, ids, clear=False)  # keep the captures to read them
    capture = method._qkv[0].get("layers.1:layers.1", "student", ids)
    probs = relation_log_probs(capture.q, capture.k, 4, allowed=capture.allowed).exp()  # (B, H, T, T)
    later = torch.ones(5, 5, dtype=torch.bool).triu(1)
    assert probs[..., later].max().item() == 0.0  # no query attends to a later token
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 5))
    method.on_end(student, Context())


def test_cnn_attention_maps_pair_convolution_stages() -> None:
    torch.manual_seed(0)
    teacher = ResConcatCNN().eval()
    student = copy.deepcopy(teacher)
    method = _started(AttentionDistillationConfig(), student, teacher)
    assert [k for k, kind in method._keys if kind == "maps"] == ["stem:stem", "res:res", "side:side"]
    x = torch.randn(2, 3, 12, 12)
    assert _loss(method, student, teacher, x).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        student.stem[0].weight.mul_(torch.rand_like(student.stem[0].weight))
    assert _loss(method, student, teacher, x).item() > 0
    method.on_end(student, Context())


def test_models_without_attention_or_maps_and_bad_pairs_are_clear_errors() -> None:
    with pytest.raises(UnsupportedModuleError, match="expected attention modules.*found 0 in the student"):
        _started(AttentionDistillationConfig(), MLP(), MLP())
    lm, other = TinyLM(), TinyLM()
    with pytest.raises(ConfigError, match="one side is an attention module"):
        _started(AttentionDistillationConfig(pairs=("attn:ffn",)), lm, other)
    assert surgery.leftovers(lm) == [] and surgery.leftovers(other) == []
    method = _started(AttentionDistillationConfig(pairs=("ffn",)), lm, other)
    with pytest.raises(DataError, match=r"need \(B, C, H, W\) activations"):
        _loss(method, lm, other, torch.randint(0, 50, (2, 6)))
    assert surgery.leftovers(lm) == [] and surgery.leftovers(other) == []
    with pytest.raises(ConfigError, match="unknown relation 'qv'"):
        AttentionDistillationConfig(relations=("qv",))
