"""Reading PyTorch (Lightning) checkpoints without running anything stored in them.

A Lightning ``.ckpt`` is a torch zip archive: ``<name>/data.pkl`` (a pickle)
plus one raw record per tensor storage. Besides the ``state_dict`` the pickle
may hold callback, hyper-parameter or optimiser objects, which
``torch.load(weights_only=True)`` refuses. :func:`read_torch_zip` unpickles
``data.pkl`` with :class:`RestrictedUnpickler`: it builds tensors (storages are
memory-mapped from the file, nothing is copied), plain containers and a few
inert values (dtypes, bytes); every other class or function named in the file
becomes an :class:`Opaque` placeholder. A placeholder's constructor, ``__new__``
and ``__setstate__`` ignore their arguments, so no code of the file's choosing
runs (no import of its modules, no constructor, no ``__reduce__`` callable).
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

from recon.errors import InputError

# (module, name) -> how the unpickler builds it; everything else becomes an Opaque placeholder.
_DTYPES = {
    name: getattr(torch, name)
    for name in (
        "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
        "complex64", "complex128", "float8_e4m3fn", "float8_e5m2",
    )
    if hasattr(torch, name)
}  # fmt: skip
# torch's legacy typed-storage class names, as torch.save writes them into persistent ids.
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}  # fmt: skip


class Opaque:
    """Stands in for an object of a class the restricted unpickler does not build.

    Every way pickle creates, calls or fills an object (call, ``__new__``,
    ``BUILD``, ``APPENDS``, ``SETITEMS``) is a no-op here; ``opaque_name``
    says what it replaced.
    """

    opaque_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> Opaque:
        # A placeholder may stand for a callable (e.g. getattr(cls, "method")) that a REDUCE applies.
        return Opaque()

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        """Ignored (pickle's APPEND on a list subclass)."""

    def extend(self, items: Any) -> None:
        """Ignored (pickle's APPENDS on a list subclass)."""

    def __repr__(self) -> str:
        return f"<opaque {self.opaque_name}>"


class _StorageType:
    """What a ``torch.<X>Storage`` global becomes: only its element dtype."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_rest: Any) -> Any:
    """``torch._utils._rebuild_tensor_v2``'s job for well-formed arguments; an Opaque otherwise."""
    if not isinstance(storage, torch.storage.TypedStorage) or not isinstance(offset, int):
        return _opaque("torch._utils", "_rebuild_tensor_v2")()
    if not all(isinstance(v, tuple) and all(isinstance(x, int) for x in v) for v in (size, stride)) or len(size) != len(stride):
        return _opaque("torch._utils", "_rebuild_tensor_v2")()
    tensor = torch.empty((0,), dtype=storage.dtype)
    return tensor.set_(storage._untyped_storage, offset, size, stride)


def _rebuild_parameter(data: Any, *_rest: Any) -> Any:
    """A saved ``nn.Parameter`` becomes its plain tensor."""
    return data


def _latin1_bytes(text: Any, encoding: str = "latin1") -> Any:
    """How protocol-2 pickles spell ``bytes``: ``_codecs.encode(text, "latin1")``."""
    if isinstance(text, str) and encoding == "latin1":
        return text.encode("latin1")
    return _opaque("_codecs", "encode")()


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
    ("_codecs", "encode"): _latin1_bytes,
    **{("torch", name): dtype for name, dtype in _DTYPES.items()},
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


def _opaque(module: str, name: str) -> type[Opaque]:
    qualified = f"{module}.{name}"
    return type(name if name.isidentifier() else "Opaque", (Opaque,), {"opaque_name": qualified, "__module__": __name__})


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles tensors, plain containers, dtypes and bytes; every other global becomes an :class:`Opaque`.

    ``storages(key, dtype, numel)`` returns the typed storage of a persistent
    id ``('storage', <X>Storage, key, location, numel)``. ``replaced`` counts
    the placeholders made, by qualified name.
    """

    def __init__(self, file: io.BufferedIOBase, storages: Any) -> None:
        super().__init__(file)
        self._storages = storages
        self.replaced: collections.Counter[str] = collections.Counter()

    def find_class(self, module: str, name: str) -> Any:
        """The allowed builder of ``module.name``, else a fresh :class:`Opaque` subclass (nothing is imported)."""
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        self.replaced[f"{module}.{name}"] += 1
        return _opaque(module, name)

    def persistent_load(self, pid: Any) -> Any:
        """Tensor storages, mapped from the archive; anything else is refused."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        return self._storages(str(key), storage_type.dtype, int(numel))


def _record_offsets(path: Path) -> tuple[str, dict[str, tuple[int, int]]]:
    """The archive's folder prefix and ``{record name: (byte offset of its data, size)}`` (records must be stored uncompressed)."""
    records: dict[str, tuple[int, int]] = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        infos = archive.infolist()
        if not infos:
            raise InputError(f"{path}: empty torch archive")
        prefix = infos[0].filename.split("/", 1)[0]
        for info in infos:
            raw.seek(info.header_offset)
            header = raw.read(30)
            if len(header) != 30 or header[:4] != b"PK\x03\x04":
                raise InputError(f"{path}: damaged zip record {info.filename}")
            name_length, extra_length = struct.unpack("<HH", header[26:30])
            if info.compress_type != zipfile.ZIP_STORED:
                raise InputError(f"{path}: record {info.filename} is compressed; not a torch.save archive")
            records[info.filename] = (info.header_offset + 30 + name_length + extra_length, info.file_size)
    return prefix, records


def read_torch_zip(path: str | Path) -> tuple[Any, collections.Counter[str]]:
    """Unpickles a torch zip archive (``torch.save`` / Lightning ``.ckpt``) with :class:`RestrictedUnpickler`.

    Returns the object (tensors memory-mapped from the file, on the CPU) and
    the count of placeholders made per class name. Raises :class:`InputError`
    naming the file when it is not such an archive.
    """
    path = Path(path)
    try:
        prefix, records = _record_offsets(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{path}: not a readable torch checkpoint ({exc})") from exc
    if f"{prefix}/data.pkl" not in records:
        raise InputError(f"{path}: no {prefix}/data.pkl in the archive; not a torch checkpoint")
    order = records.get(f"{prefix}/byteorder")
    with open(path, "rb") as raw:
        if order is not None:
            raw.seek(order[0])
            if raw.read(order[1]).decode("ascii", "replace").strip() != sys.byteorder:
                raise InputError(f"{path}: saved on a machine of the other byte order")
        raw.seek(records[f"{prefix}/data.pkl"][0])
        payload = raw.read(records[f"{prefix}/data.pkl"][1])
    whole = torch.UntypedStorage.from_file(str(path), False, path.stat().st_size)
    made: dict[str, torch.storage.TypedStorage] = {}

    def storages(key: str, dtype: torch.dtype, numel: int) -> torch.storage.TypedStorage:
        if key not in made:
            record = records.get(f"{prefix}/data/{key}")
            if record is None:
                raise InputError(f"{path}: tensor storage {key} missing from the archive")
            offset, size = record
            element = torch.empty((), dtype=dtype).element_size()
            if numel * element > size:
                raise InputError(f"{path}: tensor storage {key} is shorter than its {numel} elements")
            made[key] = torch.storage.TypedStorage(wrap_storage=whole[offset : offset + size], dtype=dtype, _internal=True)
        return made[key]

    unpickler = RestrictedUnpickler(io.BytesIO(payload), storages)
    try:
        obj = unpickler.load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, RuntimeError) as exc:
        raise InputError(f"{path}: damaged checkpoint pickle ({type(exc).__name__}: {exc})") from exc
    return obj, unpickler.replaced
