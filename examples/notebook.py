"""A notebook as a script: check, train and look at your own network with tinycifar's Python API.

    python examples/notebook.py                 # 24 epochs of the seed recipe on CIFAR-10
    python examples/notebook.py --epochs 1 --synthetic --out /tmp/nb   # what CI runs

In Jupyter, paste the cells (between the ``# %%`` markers) as they are: the progress bars
become widgets and a figure at the end of a cell is shown; here they are saved as PNGs.
"""

import argparse
from pathlib import Path

from my_net import Net  # examples/my_net.py, beside this file

import tinycifar

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=24)
parser.add_argument("--synthetic", action="store_true", help="small generated data instead of CIFAR-10")
parser.add_argument("--out", default="runs/notebook", help="run folder")
args = parser.parse_args()
data = {"dataset": "synthetic", "synthetic_size": 1000} if args.synthetic else {}

# %% Does the network follow the assignment's rules?
report = tinycifar.check(Net())
print(report)
assert report.passed

# %% Layer by layer: output shapes, parameters, multiply-accumulates, receptive field
print(tinycifar.summary(Net()))

# %% Train with the reference recipe (the `seed` preset: albumentations-style augmentation,
# Nesterov SGD with a cosine decay), fewer epochs than its 75
model = Net(dropout=0.05)
run = tinycifar.fit(model, preset="seed", epochs=args.epochs, out=args.out, **data)
print(f"final test accuracy {run.summary['final_acc']:.2f}%, best {run.summary['best_acc']:.2f}%")

# %% Curves, mistakes and where the network looked
out = Path(args.out)
tinycifar.plot_curves(run).savefig(out / "nb_curves.png")
tinycifar.plot_mistakes(run).savefig(out / "nb_mistakes.png")
tinycifar.plot_gradcam(run).savefig(out / "nb_gradcam.png")
print(f"figures in {out}")
