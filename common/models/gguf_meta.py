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


def _reader_class() -> type[GGUFReader]:
    import numpy as np
    from gguf import GGUFReader

    class PlainArrayReader(GGUFReader):
        """GGUFReader over a plain ndarray view of its memory map (same bytes, still lazy).

        The reader slices its map once per metadata item (~250k times for a 49k-token
        vocabulary); on an ``np.memmap`` every slice pays the subclass's ``__array_finalize__``,
        which made opening SmolLM2's file 3-4x slower."""

        @property  # type: ignore[override]
        def data(self) -> np.ndarray:
            return self._plain_data

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._plain_data = value.view(np.ndarray)  # .base keeps the mmap alive

    return PlainArrayReader


def open_gguf(path: str | Path) -> GGUFReader:
    """A reader for ``path``; FileNotFoundError / ValueError name the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (starts with {magic!r}, "
                         f"expected {GGUF_MAGIC!r})")
    try:
        return _reader_class()(path, "r")
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
