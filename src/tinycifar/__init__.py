"""tinycifar: fast, compact CIFAR-10 networks on a CPU, a GPU or several."""

__version__ = "0.1.0"
