"""Networks: where they come from (registry, plugins, the user's own files), the layers ours
are built from, the registered networks, and what a traced network looks like.

Importing this package registers ``era9``, ``fastnet`` and the ``slimres`` family.
"""

from . import era9, fastnet, slimres  # noqa: F401  (registers the networks)
from .layers import ClassifierHead, ConvBNAct, DepthwiseSeparable, Net, Residual, init_whitening
from .registry import (
    ENTRY_POINT_GROUP,
    MODEL_REGISTRY,
    ModelError,
    ModelSource,
    build_model,
    check_spec,
    count_params,
    create_model,
    plugins,
    register_model,
)

__all__ = [
    "ENTRY_POINT_GROUP", "MODEL_REGISTRY", "ClassifierHead", "ConvBNAct", "DepthwiseSeparable", "ModelError",
    "ModelSource", "Net", "Residual", "build_model", "check_spec", "count_params", "create_model", "init_whitening",
    "plugins", "register_model",
]
