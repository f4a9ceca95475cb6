"""Where a network comes from: the registry, plugins, and the user's own code.

A model spec names a network in one of four ways:

- a registered name: ``era9``, ``fastnet``, ... (``tinycifar models`` lists them);
- a plugin's name: an installed package registers a factory under the entry-point group
  ``tinycifar.models`` (timm-style), e.g. ``[project.entry-points."tinycifar.models"]
  mynet = "mypkg.nets:mynet"`` in its pyproject.toml;
- ``path/to/file.py:factory`` (``file.py`` alone means ``file.py:Net``): a class or function in
  a file of the user's;
- ``package.module:factory``: the same in an importable module.

A factory is called with the run's ``model_kwargs`` and must return an ``nn.Module`` that maps
N x 3 x 32 x 32 images to N x classes logits; nothing else is required of it (no
``features``/``head`` split). Every way of failing (a file that does not import, a missing
factory, one that raises or returns something else, a wrong output shape) is a ``ModelError``
with one line naming the file and the reason.

User code is code: it runs only when the user names it. A checkpoint records its network's spec
and the sha256 of the source file (``ModelSource``), never pickled code, and loading it refuses a
source whose content changed unless the user says so (``checkpoint.model_from_checkpoint``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import re
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..devices import module_device

ENTRY_POINT_GROUP = "tinycifar.models"
DEFAULT_FACTORY = "Net"  # the course's convention: class Net(nn.Module) in the student's file
MODEL_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


class ModelError(ValueError):
    """A network cannot be built from its spec; the message names the spec or file and the reason."""


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def add(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODEL_REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        MODEL_REGISTRY[name] = factory
        return factory

    return add


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def plugins() -> dict[str, importlib.metadata.EntryPoint]:
    """Networks that installed packages register under the ``tinycifar.models`` entry-point group."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


@dataclass(frozen=True)
class ModelSource:
    """What a checkpoint records about its network's code: the spec, and the file it came from."""

    spec: str
    kind: str  # builtin | plugin | file | module | instance
    path: str | None = None  # the source file, absolute
    sha256: str | None = None  # of that file's bytes when the network was built

    @property
    def is_user_code(self) -> bool:
        """Code that a checkpoint must never import by itself: the user has to name it."""
        return self.kind in ("file", "module", "instance")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: Any) -> ModelSource | None:
        if not isinstance(value, dict) or not isinstance(value.get("spec"), str):
            return None
        return cls(value["spec"], str(value.get("kind", "builtin")), value.get("path"), value.get("sha256"))


def sha256_of(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def parse_spec(spec: str) -> tuple[str, str, str]:
    """(kind, target, factory): kind is ``name`` (registry or plugin), ``file`` or ``module``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelError(f"--model {spec!r}: expected a network name, path/to/file.py:factory or module:factory")
    target, sep, factory = spec.rpartition(":")
    if not sep:
        return ("file", spec, DEFAULT_FACTORY) if spec.endswith(".py") else ("name", spec, "")
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", factory):
        raise ModelError(f"--model {spec}: {factory!r} is not a Python name; expected FILE.py:factory or "
                         "module:factory")
    if target.endswith(".py") or "/" in target or "\\" in target:
        return "file", target, factory
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", target):
        raise ModelError(f"--model {spec}: {target!r} is neither a .py file nor an importable module name")
    return "module", target, factory


def short_name(spec: str) -> str:
    """A name fit for a folder: 'era9', 'my_net.Net' for my_net.py:Net, 'nets.Wide' for pkg.nets:Wide."""
    kind, target, factory = parse_spec(spec)
    if kind == "name":
        return re.sub(r"[^\w.-]", "_", target)
    stem = Path(target).stem if kind == "file" else target.rpartition(".")[2]
    return re.sub(r"[^\w.-]", "_", f"{stem}.{factory}")


def check_spec(spec: str) -> None:
    """Cheap checks that need no import: a known name, or an existing file. Configs call this."""
    kind, target, _ = parse_spec(spec)
    if kind == "name" and target not in MODEL_REGISTRY and target not in plugins():
        raise ModelError(unknown_name_message(spec))
    if kind == "file" and not Path(target).expanduser().is_file():
        raise ModelError(f"--model {spec}: {target} not found")


def unknown_name_message(spec: str) -> str:
    names = ", ".join(sorted(MODEL_REGISTRY))
    extra = f"; plugins: {', '.join(sorted(plugins()))}" if plugins() else ""
    return (f"--model {spec}: unknown model {spec!r}; choose from: {names}{extra}, "
            "or give your own as path/to/file.py:factory or module:factory")


# ---------------------------------------------------------------------------- user code


def _located(e: BaseException, path: Path) -> str:
    """'ExcType: message (line N)', the line being the innermost one in ``path``."""
    line = e.lineno if isinstance(e, SyntaxError) else None
    for frame in traceback.extract_tb(e.__traceback__):
        if Path(frame.filename) == path:
            line = frame.lineno
    text = (e.msg if isinstance(e, SyntaxError) else str(e)).strip().splitlines()
    where = f", line {line}" if line else ""
    return f"{type(e).__name__}: {text[0] if text else ''}{where}".rstrip(": ")


def _import_file(spec: str, path: Path, source: bytes, digest: str):
    """Execute exactly the bytes that were hashed, once per content (later calls reuse the module)."""
    stem = re.sub(r"\W", "_", path.stem)
    name = f"tinycifar_user_{stem}_{digest[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling inside the file look their module up
    sys.path.insert(0, str(path.parent))  # the file may import its neighbours
    try:
        exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102 - the user named this file
    except BaseException as e:
        del sys.modules[name]
        if isinstance(e, KeyboardInterrupt):
            raise
        raise ModelError(f"--model {spec}: {path} failed to import ({_located(e, path)})") from None
    finally:
        sys.path.remove(str(path.parent))
    return module


def _factory_in(module, spec: str, factory: str, where: str) -> Callable[..., Any]:
    obj: Any = module
    for part in factory.split("."):
        if not hasattr(obj, part):
            defined = [n for n, v in vars(module).items() if not n.startswith("_") and callable(v)
                       and getattr(v, "__module__", None) == module.__name__]
            hint = f" (it defines: {', '.join(defined)})" if defined else " (it defines no class or function)"
            raise ModelError(f"--model {spec}: {where} has no {factory!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"--model {spec}: {where}: {factory!r} is a {type(obj).__name__}, not a class or function")
    return obj


def resolve(spec: str) -> tuple[Callable[..., Any], ModelSource]:
    """The factory a spec names, and where its code comes from. Imports the user's file or module."""
    kind, target, factory = parse_spec(spec)
    if kind == "name":
        if target in MODEL_REGISTRY:
            return MODEL_REGISTRY[target], ModelSource(spec, "builtin")
        entry = plugins().get(target)
        if entry is None:
            raise ModelError(unknown_name_message(spec))
        try:
            fn = entry.load()
        except Exception as e:  # noqa: BLE001 - a broken plugin can fail in any way
            raise ModelError(f"--model {spec}: plugin {entry.value} failed to load ({type(e).__name__}: {e})") from None
        file = inspect.getsourcefile(fn) if inspect.isfunction(fn) or inspect.isclass(fn) else None
        return fn, ModelSource(spec, "plugin", file, sha256_of(file) if file else None)
    if kind == "file":
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ModelError(f"--model {spec}: {target} not found")
        source = path.read_bytes()
        digest = hashlib.sha256(source).hexdigest()
        module = _import_file(spec, path, source, digest)
        return _factory_in(module, spec, factory, str(target)), ModelSource(spec, "file", str(path), digest)
    try:
        module = importlib.import_module(target)
    except Exception as e:  # noqa: BLE001 - importing runs the module: anything can fail
        raise ModelError(f"--model {spec}: module {target} failed to import ({type(e).__name__}: {e})") from None
    file = getattr(module, "__file__", None)
    return (_factory_in(module, spec, factory, f"module {target}"),
            ModelSource(spec, "module", file, sha256_of(file) if file else None))


def source_of_instance(model: nn.Module) -> ModelSource:
    """What can be recorded about a network handed over as an object (the Python API)."""
    name = getattr(model, "name", None)
    if isinstance(name, str) and name in MODEL_REGISTRY:
        return ModelSource(name, "builtin")
    cls = type(model)
    try:
        file = inspect.getsourcefile(cls)
    except (TypeError, OSError):  # defined in a notebook cell or the interpreter: no file to point at
        file = None  # (a class of a __main__ without __file__, as in a Jupyter kernel, raises OSError)
    spec = f"{file}:{cls.__qualname__}" if file else f"{cls.__module__}:{cls.__qualname__}"
    return ModelSource(spec, "instance", file, sha256_of(file) if file and Path(file).is_file() else None)


# ---------------------------------------------------------------------------- building


def check_output(model: nn.Module, where: str, num_classes: int = 10, input_size: int = 32) -> None:
    """One forward pass on two blank images: the network must return N x num_classes logits."""
    shape = f"2x3x{input_size}x{input_size}"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, 3, input_size, input_size, device=module_device(model)))
    except Exception as e:  # noqa: BLE001 - user code can fail in any way
        first = (str(e).strip().splitlines() or [""])[0]
        raise ModelError(f"{where}: forward on a {shape} batch raised {type(e).__name__}: {first}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"{where}: forward returned {type(out).__name__}, expected a tensor of 2x{num_classes} logits")
    if tuple(out.shape) != (2, num_classes):
        got = "x".join(map(str, out.shape))
        raise ModelError(f"{where}: maps a {shape} batch to {got}; expected 2x{num_classes} (one logit per class)")


def build_model(spec: str | nn.Module, kwargs: dict[str, Any] | None = None, num_classes: int = 10,
                input_size: int = 32) -> tuple[nn.Module, ModelSource]:
    """The network and its source, checked to map N x 3 x input_size x input_size to N x num_classes."""
    if isinstance(spec, nn.Module):
        source = source_of_instance(spec)
        check_output(spec, f"model {type(spec).__name__}", num_classes, input_size)
        return spec, source
    factory, source = resolve(spec)
    kwargs = dict(kwargs or {})
    num_classes = kwargs.get("num_classes", num_classes)  # a factory told its class count must honour it
    call = f"{getattr(factory, '__qualname__', spec)}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    try:
        model = factory(**kwargs)
    except Exception as e:  # noqa: BLE001 - user code can fail in any way
        detail = _located(e, Path(source.path)) if source.path else f"{type(e).__name__}: {e}"
        raise ModelError(f"--model {spec}: {call} raised {detail}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"--model {spec}: {call} returned {type(model).__name__}, not an nn.Module")
    if source.kind == "builtin":
        model.name = spec
    check_output(model, f"--model {spec}", num_classes, input_size)
    return model, source


def create_model(spec: str, **kwargs) -> nn.Module:
    """The network a spec names (registered name, plugin, file.py:factory or module:factory)."""
    return build_model(spec, kwargs)[0]
