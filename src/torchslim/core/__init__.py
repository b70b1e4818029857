"""Core pieces shared by every technique: configs, registry, context, selectors, surgery."""

from torchslim.core import structure, surgery
from torchslim.core.batchnorm import recalibrate_batchnorm
from torchslim.core.config import MethodConfig, check
from torchslim.core.context import (
    Context,
    EvalFn,
    calibration_inputs,
    first_batch_inputs,
    take_batches,
    to_device,
)
from torchslim.core.hooks import HookSet
from torchslim.core.lifecycle import Step, TrainedMethod
from torchslim.core.outcome import Outcome
from torchslim.core.registry import (
    config_from_dict,
    get_config_class,
    is_trained,
    list_methods,
    register,
    resolve,
)
from torchslim.core.select import select

__all__ = [
    "Context",
    "EvalFn",
    "HookSet",
    "MethodConfig",
    "Outcome",
    "Step",
    "TrainedMethod",
    "check",
    "config_from_dict",
    "calibration_inputs",
    "first_batch_inputs",
    "take_batches",
    "recalibrate_batchnorm",
    "to_device",
    "get_config_class",
    "is_trained",
    "list_methods",
    "register",
    "resolve",
    "select",
    "structure",
    "surgery",
]
