"""Networks: the registry, the layers they are built from, and the registered networks.

Importing this package registers ``era9``, ``fastnet`` and the ``slimres`` family.
"""

from . import era9, fastnet, slimres  # noqa: F401  (registers the networks)
from .layers import ClassifierHead, ConvBNAct, DepthwiseSeparable, Net, Residual, init_whitening
from .registry import MODEL_REGISTRY, count_params, create_model, register_model

__all__ = [
    "MODEL_REGISTRY", "ClassifierHead", "ConvBNAct", "DepthwiseSeparable", "Net", "Residual", "count_params",
    "create_model", "init_whitening", "register_model",
]
