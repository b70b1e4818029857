"""The explicit list of built-in method modules; importing them fills the registry."""

from torchslim.distillation import adversarial as _adversarial  # noqa: F401
from torchslim.distillation import attention as _attention  # noqa: F401
from torchslim.distillation import features as _features  # noqa: F401
from torchslim.distillation import inversion as _inversion  # noqa: F401
from torchslim.distillation import logits as _logits  # noqa: F401
from torchslim.distillation import relational as _relational  # noqa: F401
from torchslim.lowrank import drone as _drone  # noqa: F401
from torchslim.lowrank import separable as _separable  # noqa: F401
from torchslim.lowrank import svd as _svd  # noqa: F401
from torchslim.lowrank import tucker as _tucker  # noqa: F401
from torchslim.pruning import channel as _channel  # noqa: F401
from torchslim.pruning import gradual as _gradual  # noqa: F401
from torchslim.pruning import layers as _layers  # noqa: F401
from torchslim.pruning import magnitude as _magnitude  # noqa: F401
from torchslim.pruning import nm as _nm  # noqa: F401
from torchslim.pruning import snip as _snip  # noqa: F401
from torchslim.pruning import sparsegpt as _sparsegpt  # noqa: F401
from torchslim.pruning import wanda as _wanda  # noqa: F401
from torchslim.quantization import awq as _awq  # noqa: F401
from torchslim.quantization import dynamic as _dynamic  # noqa: F401
from torchslim.quantization import gptq as _gptq  # noqa: F401
from torchslim.quantization import weight_only as _weight_only  # noqa: F401
from torchslim.sharing import huffman as _huffman  # noqa: F401
from torchslim.sharing import kmeans as _kmeans  # noqa: F401
