"""A realistic RunRecord: a Fashion-MNIST CNN pruned, then quantized, then deployed."""

from __future__ import annotations

import pytest

from torchslim.report.record import DeploymentRow, MetricsRow, OutcomeRow, RunRecord


def make_record() -> RunRecord:
    recipe = {
        "version": 1,
        "model": "zoo:fashion_cnn",
        "data": "zoo:fashion_mnist",
        "stages": [
            {"name": "prune", "methods": [{"method": "pruning.channel", "ratio": 0.5, "importance": "l2",
                                           "ignore": ["re:classifier.*"]}],
             "train": {"epochs": 2, "lr": 0.001}},
            {"name": "quantize", "methods": [{"method": "quantization.ptq", "weight_bits": 8,
                                              "activation_bits": 8}]},
        ],
        "measure": ["accuracy", "params", "size", "flops", "latency"],
        "export": ["checkpoint", "onnx"],
    }
    environment = {
        "torchslim": "0.1.0", "torch": "2.14.1", "python": "3.11.7", "platform": "Linux-6.1-x86_64",
        "cpu": "AMD EPYC 7B13", "threads": 2, "device": "cpu", "onnxruntime": "1.20.1",
        "onnx": "1.17.0", "timestamp": "2025-03-01T12:00:00+00:00", "example_input_shape": [1, 1, 28, 28],
    }
    metrics = [
        MetricsRow("before", {"accuracy": 0.9123, "params": 421642.0, "params_nonzero": 421642.0,
                              "size_bytes": 1687512.0, "flops": 12_345_678.0, "latency_ms": 0.853}),
        MetricsRow("prune", {"accuracy": 0.9050, "params": 105410.0, "params_nonzero": 105410.0,
                             "size_bytes": 423880.0, "flops": 3_101_234.0, "latency_ms": 0.312}),
        MetricsRow("quantize", {"accuracy": 0.9031, "params": 105410.0, "params_nonzero": 105302.0,
                                "size_bytes": 110240.0, "flops": 3_101_234.0, "latency_ms": 0.298}),
    ]
    outcomes = [
        OutcomeRow(stage="prune", method="pruning.channel", config=recipe["stages"][0]["methods"][0],
                   touched=["features.0", "features.3", "features.6"], stats={"ratio": 0.5, "groups": 3},
                   layers={"features.0": {"sparsity": 0.5}, "features.3": {"sparsity": 0.5},
                           "features.6": {"sparsity": 0.4375}}, seconds=0.42),
        OutcomeRow(stage="quantize", method="quantization.ptq", config=recipe["stages"][1]["methods"][0],
                   touched=["features.0", "features.3", "features.6", "classifier"], stats={"bits": 8},
                   layers={"features.0": {"bits": 8}, "features.3": {"bits": 8}, "features.6": {"bits": 8},
                           "classifier": {"bits": 8}}, seconds=1.73),
    ]
    deployments = [
        DeploymentRow("original fp32", "torch", {"latency_ms": 0.853, "accuracy": 0.9123}),
        DeploymentRow("original fp32", "onnxruntime", {"latency_ms": 0.402, "accuracy": 0.9123}),
        DeploymentRow("compressed int8", "onnxruntime", {"latency_ms": 0.2, "accuracy": 0.9025},
                      note="max |diff| vs PyTorch 3.1e-02, cosine 0.999812"),
    ]
    return RunRecord(recipe=recipe, environment=environment, metrics=metrics, outcomes=outcomes,
                     deployments=deployments, structure={"features.0": {"out_channels": 16}},
                     completed_stages=2)


@pytest.fixture
def record() -> RunRecord:
    return make_record()
