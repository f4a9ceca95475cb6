"""The model registry: networks by name, ``create_model`` and ``count_params``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

MODEL_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def add(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODEL_REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        MODEL_REGISTRY[name] = factory
        return factory

    return add


def create_model(name: str, **kwargs) -> nn.Module:
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose from: {', '.join(sorted(MODEL_REGISTRY))}")
    model = MODEL_REGISTRY[name](**kwargs)
    model.name = name
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
