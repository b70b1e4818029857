import pytest
import torch
from torch import nn

from tiny_llama import TinyDecoder, tiny_llama, token_batches
from tiny_models import MLP
from torchslim.core import surgery
from torchslim.core.layerwise import BlockStep, InputGram, InputNorms, find_blocks, layerwise


def _reference_block_outputs(model: nn.Module, stack: nn.ModuleList, batches: list, **kwargs) -> dict[int, list]:
    """Each block's hidden output over a plain full forward pass per batch."""
    outs: dict[int, list] = {i: [] for i in range(len(stack))}
    handles = [b.register_forward_hook(lambda m, a, o, i=i: outs[i].append(o[0] if isinstance(o, tuple) else o))
               for i, b in enumerate(stack)]
    with torch.no_grad():
        for x in batches:
            model(x, **kwargs)
    for h in handles:
        h.remove()
    return outs


def _collect(model: nn.Module, batches: list, layers: dict | None = None, modifies: bool = True):
    seen: list[BlockStep] = []
    outputs: dict[int, list] = {}

    def on_block(step: BlockStep) -> None:
        seen.append(step)
        outputs[step.index] = step.forward()

    outside = layerwise(model, batches, layers=layers or {}, on_block=on_block, modifies=modifies,
                        new_stat=lambda f, m: InputGram(m.in_features))
    return seen, outputs, outside


def test_blocks_reproduce_a_full_forward_with_the_cache_off() -> None:
    torch.manual_seed(0)
    model = TinyDecoder().eval()
    batches = token_batches()
    expected = _reference_block_outputs(model, model.layers, batches, use_cache=False)
    seen, got, _ = _collect(model, batches)
    assert [s.fqn for s in seen] == ["layers.0", "layers.1", "layers.2"]
    for i in range(3):
        for a, b in zip(expected[i], got[i]):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
    for step in seen:  # the cache stand-in never reaches a calibration call
        assert all("past_key_values" not in kw and kw.get("use_cache") is False for _, kw in step.calls)


def test_llama_layers_reproduce_a_full_forward() -> None:
    model = tiny_llama(layers=3)
    batches = [b * 2 for b in token_batches(vocab=64)]
    expected = _reference_block_outputs(model, model.model.layers, batches, use_cache=False)
    linears = {f: m for f, m in model.named_modules() if isinstance(m, nn.Linear)}
    seen, got, outside = _collect(model, batches, linears)
    assert [s.fqn for s in seen] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    for i in range(3):
        for a, b in zip(expected[i], got[i]):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert outside == ["lm_head"]
    assert sorted(seen[1].stats) == sorted(f for f in linears if f.startswith("model.layers.1."))


def test_gram_and_norms_match_the_inputs_seen_by_the_layer() -> None:
    torch.manual_seed(0)
    model = TinyDecoder().eval()
    batches = token_batches()
    target = model.layers[1].up
    inputs = []
    handle = target.register_forward_hook(lambda m, a, o: inputs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for x in batches:
            model(x, use_cache=False)
    handle.remove()
    x = torch.cat(inputs).double()  # (tokens, in)
    grams: dict = {}

    def keep(step: BlockStep) -> None:
        grams.update(step.stats)

    layerwise(model, batches, layers={"layers.1.up": target}, on_block=keep,
              new_stat=lambda f, m: InputGram(m.in_features))
    torch.testing.assert_close(grams["layers.1.up"].xtx, x.T @ x, rtol=1e-5, atol=1e-4)
    assert grams["layers.1.up"].rows == x.shape[0]
    norms = InputNorms(x.shape[1])
    norms.update(x.float())
    torch.testing.assert_close(norms.squares, grams["layers.1.up"].squares, rtol=1e-5, atol=1e-4)


def test_changes_made_by_the_callback_feed_the_next_block() -> None:
    torch.manual_seed(0)
    model = TinyDecoder().eval()
    batches = token_batches()
    zero = torch.zeros_like(model.layers[0].down.weight, dtype=torch.bool)

    def prune_first(step: BlockStep) -> None:
        if step.index == 0:
            surgery.add_mask(step.module.down, "weight", zero)

    seen: list[list] = []
    layerwise(model, batches, layers={}, new_stat=lambda f, m: InputNorms(m.in_features),
              on_block=lambda s: (prune_first(s), seen.append(s.forward())))
    expected = _reference_block_outputs(model, model.layers, batches, use_cache=False)  # now pruned
    for a, b in zip(expected[2], seen[2]):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_a_read_only_pass_reuses_outputs_and_gives_the_same_result() -> None:
    torch.manual_seed(0)
    model = TinyDecoder().eval()
    batches = token_batches()
    _, again, _ = _collect(model, batches, modifies=True)
    _, reused, _ = _collect(model, batches, modifies=False)
    for i in again:
        for a, b in zip(again[i], reused[i]):
            torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_model_without_a_block_list_is_one_block() -> None:
    torch.manual_seed(0)
    model = MLP().train()
    batches = [torch.randn(4, 16) for _ in range(2)]
    seen, _, outside = _collect(model, batches, {"fc1": model.fc1, "fc2": model.fc2})
    assert [(s.fqn, sorted(s.stats)) for s in seen] == [("", ["fc1", "fc2"])]
    assert seen[0].stats["fc1"].rows == 8 and outside == []
    assert model.training and surgery.leftovers(model) == []


class ParallelHeads(nn.Module):
    """A ModuleList whose members all read the same input: not a chain of blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(h(x) for h in self.heads)


def test_module_list_not_run_as_a_chain_falls_back_to_the_whole_model() -> None:
    torch.manual_seed(0)
    model = ParallelHeads().eval()
    assert find_blocks(model) is not None
    layers = dict(model.heads.named_children())
    layers = {f"heads.{k}": v for k, v in layers.items()}
    seen, _, _ = _collect(model, [torch.randn(2, 8)], layers)
    assert [s.fqn for s in seen] == [""] and sorted(seen[0].stats) == sorted(layers)


def test_no_hooks_left_and_mode_restored_after_an_error() -> None:
    model = TinyDecoder().train()

    def fail(step: BlockStep) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        layerwise(model, token_batches(), layers={"layers.0.up": model.layers[0].up},
                  new_stat=lambda f, m: InputNorms(m.in_features), on_block=fail)
    assert model.training and surgery.leftovers(model) == []


def test_groups_follow_shared_inputs_and_observe_sees_changed_layers() -> None:
    model = tiny_llama(layers=1)
    batches = token_batches(vocab=128)
    linears = {f: m for f, m in model.named_modules() if isinstance(m, nn.Linear) and f != "lm_head"}
    steps: list[BlockStep] = []
    fresh: dict = {}

    def on_block(step: BlockStep) -> None:
        steps.append(step)
        step.module.mlp.up_proj.weight.data.zero_()  # changes what down_proj sees
        fresh.update(step.observe(["model.layers.0.mlp.down_proj"], lambda f, m: InputGram(m.in_features)))

    layerwise(model, batches, layers=linears, new_stat=lambda f, m: InputGram(m.in_features), on_block=on_block)
    p = "model.layers.0."
    assert steps[0].groups == [[p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"],
                               [p + "self_attn.o_proj"], [p + "mlp.gate_proj", p + "mlp.up_proj"],
                               [p + "mlp.down_proj"]]
    assert steps[0].stats[p + "mlp.down_proj"].xtx.abs().sum() > 0
    assert fresh[p + "mlp.down_proj"].xtx.abs().sum() == 0  # up_proj zeroed -> down_proj inputs are 0
    assert fresh[p + "mlp.down_proj"].rows == steps[0].stats[p + "mlp.down_proj"].rows
