"""Opening a GGUF file and reading its metadata with errors that say what is wrong.

``gguf.GGUFReader`` memory-maps the file, so opening it costs a metadata parse (~1-3 s for a
50k-token vocabulary) but no tensor reads; weights are read lazily, slice by slice.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gguf import GGUFReader

_MISSING = object()
GGUF_MAGIC = b"GGUF"


def open_gguf(path: str | Path) -> GGUFReader:
    """A reader for ``path``; FileNotFoundError / ValueError name the problem."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (starts with {magic!r}, "
                         f"expected {GGUF_MAGIC!r})")
    try:
        return GGUFReader(path, "r")
    except Exception as exc:  # gguf raises ValueError/IndexError/struct errors on truncation
        raise ValueError(f"{path} is a corrupt or truncated GGUF file: "
                         f"{type(exc).__name__}: {exc}") from exc


def field(reader: GGUFReader, key: str, default: Any = _MISSING) -> Any:
    """The Python value of metadata ``key`` (str, number, bool or list)."""
    entry = reader.fields.get(key)
    if entry is None:
        if default is _MISSING:
            raise ValueError(f"GGUF metadata has no {key!r}; the file is incomplete or not a "
                             "model file llama.cpp would accept")
        return default
    return entry.contents()
