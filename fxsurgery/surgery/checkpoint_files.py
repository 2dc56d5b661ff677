"""Checkpoint files on disk: reading a (sharded) source tensor by tensor, writing safetensors
shards tensor by tensor.

A source is a single `model.safetensors`, a directory with `model.safetensors.index.json` and
its shards (the layout transformers writes), a directory holding one `.safetensors` file, or
a state_dict file saved with `torch.save` (`.pt`, `.pth`, `.bin`). Headers are read up front
(names, shapes, dtypes: a few kilobytes per file), the tensors one at a time when asked.

Each tensor is read through its own `safe_open`: safetensors maps the file and hands out a
tensor backed by that mapping, whose touched pages count towards the process's resident
memory for as long as the mapping lives. One handle kept open per shard would let a whole
shard accumulate; one handle per tensor releases the pages with the tensor.

Output shards are written without holding them in memory: every name, shape and dtype is
known before the first byte, so the header (and its offsets) is written first and the data
follow tensor by tensor, in header order.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint_ranges import FileRange, Parts, copy_range, write_all
from .errors import SurgeryError

__all__ = ["SAFE_WEIGHTS", "SAFE_INDEX", "TensorInfo", "Source", "ShardWriter", "WriteBehind", "parse_size",
           "shard_names", "write_index"]

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
_STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin")

_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
           "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
           "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
for _name in ("uint16", "uint32", "uint64"):      # torch >= 2.3
    if hasattr(torch, _name):
        _DTYPES["U" + _name[4:]] = getattr(torch, _name)
_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple
    dtype: torch.dtype
    offset: int | None = None     # where its data start in a safetensors file (bytes)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize      # torch >= 2.1; a tensor made to ask costs a microsecond or more


def _read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file (name -> {dtype, shape, data_offsets}) and where
    its data start. Every tensor's data are checked to lie inside the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("shorter than a header")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(f.read(n))
        size = path.stat().st_size
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
    except (OSError, ValueError) as e:
        raise SurgeryError(f"cannot read the safetensors file {path}: {e}") from None
    header.pop("__metadata__", None)
    for name, entry in header.items():
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            count = math.prod(int(x) for x in entry["shape"])
        except (TypeError, KeyError, ValueError):
            raise SurgeryError(f"the safetensors file {path} has a malformed entry for {name}: {entry!r}") from None
        dtype = _DTYPES.get(entry.get("dtype"))
        if dtype is not None and end - begin != count * _itemsize(dtype):
            raise SurgeryError(f"the safetensors file {path} gives {name} {end - begin} bytes, but its shape "
                               f"{tuple(entry['shape'])} and dtype {entry['dtype']} need {count * _itemsize(dtype)}")
        if begin < 0 or 8 + n + end > size:
            raise SurgeryError(f"the safetensors file {path} is shorter than its header says ({size} bytes; {name} "
                               f"ends at {8 + n + end}); is it truncated?")
    return header, 8 + n


class Source:
    """The tensors of a checkpoint: `infos[name]` says where each lives and what it is;
    `read(name)` returns it (CPU, its stored dtype)."""

    def __init__(self, path):
        self.path = Path(path)
        self.infos: dict[str, TensorInfo] = {}
        self._state_dict = None
        files = self._files()
        if self._state_dict is None:
            for file in files:
                header, start = _read_header(file)
                for name, entry in header.items():
                    dtype = _DTYPES.get(entry.get("dtype"))
                    if dtype is None:
                        raise SurgeryError(f"the tensor {name} in {file} has dtype {entry.get('dtype')!r}, "
                                           f"which is not supported (supported: {', '.join(_DTYPES)})")
                    if name in self.infos:
                        raise SurgeryError(f"the tensor {name} is in both {self.infos[name].file} and {file}; "
                                           "a checkpoint holds each tensor once")
                    self.infos[name] = TensorInfo(file, tuple(entry["shape"]), dtype,
                                                  start + int(entry["data_offsets"][0]))
        if self._index is not None:
            for name, file in self._index.items():
                info = self.infos.get(name)
                if info is None or info.file.name != file:
                    raise SurgeryError(f"{self.path / SAFE_INDEX} places {name} in {file}, but "
                                       f"{'that file has no such tensor' if info is None else f'it is in {info.file.name}'}")

    def _files(self) -> list[Path]:
        p = self.path
        self._index = None
        if not p.exists():
            raise SurgeryError(f"the checkpoint {p} does not exist")
        if p.is_file():
            if p.suffix in _STATE_DICT_SUFFIXES:
                self._load_state_dict(p)
                return []
            if p.name.endswith(".index.json"):
                return self._from_index(p)
            return [p]
        index = p / SAFE_INDEX
        if index.is_file():
            return self._from_index(index)
        if (p / SAFE_WEIGHTS).is_file():
            return [p / SAFE_WEIGHTS]
        found = sorted(p.glob("*.safetensors"))
        if len(found) == 1:
            return found
        raise SurgeryError(f"the checkpoint directory {p} has no {SAFE_INDEX} nor {SAFE_WEIGHTS}"
                           + (f", and several .safetensors files ({', '.join(f.name for f in found)}): "
                              "which are one checkpoint is not known" if found else " nor any .safetensors file"))

    def _from_index(self, index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SurgeryError(f"cannot read the checkpoint index {index}: {e!r}") from None
        self._index = weight_map
        self.path = index.parent
        files = []
        for name in dict.fromkeys(weight_map.values()):
            f = index.parent / name
            if not f.is_file():
                raise SurgeryError(f"{index} lists the shard {name}, which is not in {index.parent}")
            files.append(f)
        return files

    def _load_state_dict(self, path: Path) -> None:
        # mmap: the tensors stay on disk until read (torch >= 2.1).
        try:
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure here means "not a readable state_dict"
            raise SurgeryError(f"cannot read {path} as a state_dict saved with torch.save: {e}") from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise SurgeryError(f"{path} does not hold a state_dict (a dict of name -> tensor)")
        self._state_dict = sd
        self.infos = {k: TensorInfo(path, tuple(v.shape), v.dtype) for k, v in sd.items()}

    def read(self, name: str) -> torch.Tensor:
        if self._state_dict is not None:
            return self._state_dict[name]
        from safetensors import safe_open
        info = self.infos[name]
        with safe_open(str(info.file), framework="pt") as f:
            return f.get_tensor(name)

    @property
    def file_count(self) -> int:
        return len({info.file for info in self.infos.values()})

    @property
    def largest_file(self) -> int:
        """Bytes of tensor data in the largest source file."""
        sizes: dict[Path, int] = {}
        for info in self.infos.values():
            sizes[info.file] = sizes.get(info.file, 0) + info.nbytes
        return max(sizes.values(), default=0)


def parse_size(size) -> int:
    """Bytes from an int or a string such as "5GB" (10^9) or "2GiB" (2^30), as transformers reads
    max_shard_size."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", str(size).upper()) if isinstance(size, str) else None
    if m is None:
        raise SurgeryError(f"max_shard_size must be a positive number of bytes or a size such as '5GB' or "
                           f"'500MiB', got {size!r}")
    unit = m.group(2)
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** "BKMGT".index(unit[0]))


def shard_names(count: int) -> list[str]:
    """The file names transformers gives to `count` shards."""
    if count == 1:
        return [SAFE_WEIGHTS]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class ShardWriter:
    """Writes one safetensors file whose tensors are announced up front: `entries` is a list of
    (name, shape, dtype); `write(name, tensor)` must then be called in the order of `order`."""

    def __init__(self, path: Path, entries, metadata: dict | None = None, early_writeback: bool = False):
        self.path = path
        self._early = early_writeback and hasattr(os, "posix_fadvise")
        # Larger elements first, as safetensors orders them, so that every tensor's data start
        # at a multiple of its element size (readers that map the file rely on it).
        self.order = [e[0] for e in sorted(entries, key=lambda e: -_itemsize(e[2]))]
        spec = {name: (tuple(shape), dtype) for name, shape, dtype in entries}
        header, offset = {"__metadata__": dict(metadata or {"format": "pt"})}, 0
        self._expected = {}
        for name in self.order:
            shape, dtype = spec[name]
            n = math.prod(shape) * _itemsize(dtype)
            header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            self._expected[name] = (shape, dtype)
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.size = 8 + len(raw) + offset
        self._next = 0
        self._kernel_copy: dict = {}
        # Unbuffered: tensors are written in one call each, and file ranges are appended by
        # the kernel at the descriptor's position, which a buffer would get out of step with.
        self._file = open(path, "wb", buffering=0)
        write_all(self._file.fileno(), struct.pack("<Q", len(raw)) + raw)
        self._flushed = 0

    def write(self, name: str, value) -> None:
        """Writes the next tensor: a tensor, or `Parts` (bytes of buffers and of source files)."""
        want = self.order[self._next]
        shape, dtype = self._expected[want]
        if isinstance(value, Parts):
            need = math.prod(shape) * _itemsize(dtype)
            if name != want or value.nbytes != need:  # a bug guard
                raise SurgeryError(f"internal error: writing {name} ({value.nbytes} bytes) into {self.path.name}, "
                                   f"expected {want} ({need} bytes)")
            fd = self._file.fileno()
            for piece in value.pieces:
                if isinstance(piece, FileRange):
                    copy_range(piece, fd, name, self._kernel_copy)
                else:
                    write_all(fd, piece)
        else:
            tensor = value
            if name != want or tuple(tensor.shape) != shape or tensor.dtype != dtype:  # a bug guard
                raise SurgeryError(f"internal error: writing {name} {tuple(tensor.shape)} {tensor.dtype} into "
                                   f"{self.path.name}, expected {want} {shape} {dtype}")
            if tensor.numel():
                write_all(self._file.fileno(),
                          tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1
        if self._early:
            self._start_writeback()

    def _start_writeback(self) -> None:
        """Starts writing what this tensor added to the disk now, so that the final fsync waits
        for the last few tensors only, not for the whole shard (the kernel would otherwise start
        only once gigabytes are dirty). On Linux, DONTNEED on dirty pages queues their writeback
        and drops none of them; the fsync before the rename is what makes the file durable."""
        end = self._file.tell()
        try:
            os.posix_fadvise(self._file.fileno(), self._flushed, end - self._flushed, os.POSIX_FADV_DONTNEED)
        except OSError:
            self._early = False
        self._flushed = end

    def sync(self) -> None:
        """Flushes the file to the disk (before it is renamed into place, for durability)."""
        os.fsync(self._file.fileno())

    def close(self) -> None:
        done = self._file.tell()
        self._file.close()
        if self._next != len(self.order) or done != self.size:
            raise SurgeryError(f"internal error: {self.path.name} has {done} bytes and {self._next} tensors, "
                               f"expected {self.size} and {len(self.order)}")

    def abort(self) -> None:
        self._file.close()


class WriteBehind:
    """The writes of the output on one thread of their own, in order, so that building a tensor
    (random draws for new rows, stretches read, index math) overlaps writing the previous one
    (the kernel copying bytes into the page cache). os.write, copy_file_range and preadv
    release the GIL. At most one tensor is in flight: `write` returns once the previous one is
    written, so a caller building tensors in two buffers in turn never overwrites one that is
    being written. A failed write raises in the caller at the next `write` or `finish`."""

    def __init__(self, report, total: int):
        from concurrent.futures import ThreadPoolExecutor
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fxsurgery-write")
        self._last = None          # (future, name, nbytes) of the tensor in flight
        self._report, self._total, self._done = report, total, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.settle()
        self._pool.shutdown(wait=True)

    def write(self, writer: "ShardWriter", name: str, value, nbytes: int) -> None:
        future = self._pool.submit(writer.write, name, value)
        previous, self._last = self._last, (future, name, nbytes)
        if previous is not None:
            self._wait(previous)

    def finish(self, writer: "ShardWriter", sync: bool) -> None:
        """Waits for the shard's last tensor, then fsyncs it (sync) and closes it."""
        if self._last is not None:
            last, self._last = self._last, None
            self._wait(last)
        if sync:
            writer.sync()
        writer.close()

    def settle(self) -> None:
        """Waits for the tensor in flight, whatever its outcome (before its file is aborted)."""
        if self._last is not None:
            from concurrent.futures import wait
            wait([self._last[0]])
            self._last = None

    def _wait(self, item) -> None:
        future, name, nbytes = item
        future.result()
        self._done += nbytes
        self._report(name, self._done, self._total)


def write_index(directory: Path, weight_map: dict, total_size: int, sync: bool = False) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    with open(directory / SAFE_INDEX, "w") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if sync:
            f.flush()
            os.fsync(f.fileno())
