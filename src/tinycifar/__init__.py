"""tinycifar: fast, compact CIFAR-10 networks on a CPU, a GPU or several.

The notebook API (``fit``, ``check``, ``summary``, ``plot_curves``, ``plot_mistakes``,
``plot_gradcam``) lives in ``tinycifar.api`` and is loaded on first use, so that the command
line does not pay for matplotlib at start-up.
"""

from importlib.metadata import PackageNotFoundError, version

try:  # pyproject.toml is the one place the version is written; this reads what was installed
    __version__ = version("tinycifar")
except PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"

_API = ("CheckReport", "Rules", "RunResult", "Summary", "check", "fit", "plot_curves", "plot_gradcam",
        "plot_mistakes", "summary")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'tinycifar' has no attribute {name!r}")
