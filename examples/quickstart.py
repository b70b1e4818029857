"""Compress a small classifier from Python: prune + distill, then save and reload it.

Runs in seconds on sklearn's digits; swap in your own model, data and eval function.
    python examples/quickstart.py [--out runs/quickstart]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from torch import nn

import torchslim as ts
from torchslim.zoo.data import digits, make_eval_fn

RECIPE = """
version: 1
stages:
  - name: prune
    methods:
      - {method: pruning.magnitude, sparsity: 0.7, scope: global}
      - {method: distillation.logits, temperature: 4.0, alpha: 0.9}
    train: {epochs: 3, lr: 1.0e-3, batch_size: 64}
measure: [accuracy, params, size]
"""


def build() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/quickstart")
    out = Path(parser.parse_args().out)
    torch.manual_seed(0)
    train, test = digits("train"), digits("test")
    model = build()
    # A stage with a train block and no methods is plain training: here, the model to compress.
    ts.compress(model, "stages: [{name: fit, train: {epochs: 10, lr: 3.0e-3, batch_size: 64}}]",
                ts.Context(train_data=train))
    ctx = ts.Context(example_inputs=test[:1][0], train_data=train, eval_fn=make_eval_fn(test))
    result = ts.compress(copy.deepcopy(model), RECIPE, ctx)
    before, after = result.record.before(), result.record.after()
    print(f"accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}, "
          f"size {before['size_bytes']:,.0f} -> {after['size_bytes']:,.0f} bytes")
    ts.save(result, out, overwrite=True)
    reloaded = ts.load(out, build=build)
    x = test[:64][0]
    assert torch.equal(reloaded(x), result.model.eval()(x)), "reloaded model differs"
    print(f"saved to {out}/ and reloaded bit-exact")


if __name__ == "__main__":
    main()
