"""Reading the project's TOML files (sweep specs, rules) with one-line errors that name the file."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any


def read_toml(path: Path, label: str, error: type[Exception]) -> dict[str, Any]:
    """The file's table; ``error(f"{label}: ...")`` when it cannot be read or is not TOML."""
    try:
        return tomllib.loads(path.read_text())
    except OSError as e:
        raise error(f"{label}: cannot read ({e.strerror or e})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise error(f"{label}: not valid TOML ({e})") from None
