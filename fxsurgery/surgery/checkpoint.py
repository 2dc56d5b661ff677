"""Streaming surgery of checkpoints larger than memory.

Plan on models built on the meta device (structure only), then carry the weights tensor by
tensor from a (sharded) safetensors checkpoint into a new sharded safetensors checkpoint, in
the layout transformers writes (`model.safetensors`, or `model-0000k-of-0000n.safetensors`
shards with `model.safetensors.index.json`):

    with torch.device("meta"):
        old, new = LlamaForCausalLM(old_config), LlamaForCausalLM(new_config)
    p = fs.plan(fs.trace(old, old_inputs, old_features), fs.trace(new, new_inputs, new_features))
    p.apply_to_checkpoint("old_dir", "new_dir", init=new._init_weights)

or in one call, `transplant_checkpoint(old, new, old_inputs, new_inputs, old_features,
new_features, "old_dir", "new_dir")`.

At any time one new tensor is being built and the one before it written: its old tensor is
read from the source (see `checkpoint_files`), the elements the plan does not copy take the
new model's initialisation (see `checkpoint_init`; zero where the plan zeros), and the result
is written into its output shard, whose header was written first, by a thread of its own
while the next tensor is built (`WriteBehind`: the random draws and index math overlap the
kernel's copying). Peak memory is a few of the largest tensors, never a shard, never a model.

The output is written into a temporary sibling directory of `dst` and renamed into place only
when every file is complete: a failed or interrupted run leaves no checkpoint at `dst` (and an
existing `dst`, replaced only with overwrite=True, is swapped whole, never half-replaced).
Everything that can be checked is checked before the first byte is written: tensors the plan
needs and the checkpoint lacks, shapes, tensors the old model does not have.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .._durable import fsync_folder, umask
from ..progress import open_bar
from ..tied import tied_names
from .apply import build, in_place_writes
from .checkpoint_files import ShardWriter, Source, WriteBehind, parse_size, shard_names, write_index
from .checkpoint_init import ModuleInit, Scratch, needs_init, rows_keeping_init
from .checkpoint_ranges import FileRange, Parts, copy_chunks, parts, worth_it, zero_writes
from .errors import SurgeryError, _listing

__all__ = ["apply_to_checkpoint", "transplant_checkpoint", "Written"]


@dataclass
class Written:
    """What apply_to_checkpoint wrote."""
    path: Path                                   # the output directory
    files: list = field(default_factory=list)    # its safetensors files, in order
    weight_map: dict = field(default_factory=dict)   # tensor name -> file name
    total_size: int = 0                          # bytes of tensor data


@dataclass
class _Out:
    name: str          # the checkpoint name
    plan: object       # its ParamPlan
    shape: tuple
    dtype: torch.dtype
    source: str | None  # the source tensor it copies from

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def apply_to_checkpoint(plan, src, dst, *, init: Callable[[torch.nn.Module], None] | None = None,
                        max_shard_size=None, dtype: torch.dtype | None = None,
                        progress: bool | Callable[[str, int, int], None] | None = None,
                        overwrite: bool = False, strict: bool = True, init_rows: bool | None = None,
                        sync: bool = False, extra_files: dict | None = None,
                        init_like: torch.nn.Module | None = None) -> Written:
    """Carries the weights of the checkpoint `src` through `plan` into a new checkpoint
    directory `dst`, one tensor at a time. The models the plan was made from may be on the
    meta device; they are only read (structure, and the new model's initialisation).

    src: the old model's checkpoint: a `.safetensors` file, a directory holding
        `model.safetensors.index.json` and its shards (or one `.safetensors` file), an
        `.index.json` file, or a state_dict file (`.pt`, `.pth`, `.bin`, read memory-mapped).
        Tied tensors may be held under any one of their names.
    dst: the output directory; must not exist unless overwrite=True (then the old one is
        replaced whole once the new one is complete). Its parent must exist.
    init: called on a copy of one module of the new model (its own tensors on CPU, no
        children) to initialise it, for the modules whose parameters keep some of the new
        model's values (new units' rows, new output rows). Default: the module's
        reset_parameters. For transformers models pass `init=new_model._init_weights`.
    max_shard_size: bytes (or "5GB", "2GiB") per output shard, as transformers' save_pretrained
        splits (a tensor larger than it gets a shard of its own). Default: sharded like the
        source (one file for one file, else shards of at most the size of its largest file).
    dtype: the floating dtype of the output. Default: each tensor keeps the dtype of the old
        tensor it comes from (bf16 in, bf16 out); new tensors take the source's floating dtype
        when it has one, else the new model's.
    progress: a tqdm bar (True; None: only when stderr is a terminal and tqdm is installed),
        none (False), or a callable(name, bytes done, bytes total) called after each tensor.
    strict: refuse a source holding tensors the old model does not have (False: ignore them).
    init_rows: when the elements keeping the new model's values are whole rows of an nn.Linear
        or nn.Embedding (new units, new tokens), initialise a copy of the module with just
        those rows instead of the whole module: the same distribution for initialisations
        that do not depend on the number of rows (torch's defaults, normal, uniform, kaiming
        on fan_in), and much faster (random draws for a few rows, not the whole layer).
        Default (None): when `init` is None (torch's reset_parameters) or a transformers
        `_init_weights`; pass True to allow it for your init, False for one that depends on
        the number of rows (xavier, orthogonal, fan_out).
    sync: fsync every file and the directories before and after the rename, so that the
        checkpoint survives a power loss once this returns (the command line does).
    init_like: a model whose module at the same path says how to initialise a new model's module
        of another class (its class's reset_parameters, or `init` called on it): for the
        GraphModules of fxsurgery.passes, whose submodules are plain Modules, pass the model
        they were made from.
    extra_files: file name -> callable(path) writing it into the output directory before
        it is renamed into place (a config.json), so that it is part of the same all-or-nothing.

    Returns a `Written`. Raises SurgeryError, naming the tensor and file, before writing
    anything when the checkpoint lacks a tensor the plan copies, holds one of another shape, or
    (strict) holds tensors the old model lacks.
    """
    src_path, dst = Path(src), Path(dst)
    _check_destination(src_path, dst, overwrite)
    source = Source(src_path)
    outs = _outputs(plan, source, dtype, strict)
    if max_shard_size is not None:
        limit = parse_size(max_shard_size)
    else:   # sharded like the source: one file for one file, else shards as large as its largest
        limit = max(source.largest_file, 1) if source.file_count > 1 else float("inf")
    shards = _split(outs, limit)
    names = shard_names(len(shards))
    total = sum(o.nbytes for o in outs)
    report, close_bar = _progress(progress, total)
    values, scratch = ModuleInit(plan.new.model, init, like=init_like), Scratch()
    rows_ok = init_rows if init_rows is not None else (init is None or getattr(init, "__name__", "") == "_init_weights")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    try:
        os.chmod(tmp, 0o777 & ~umask())   # mkdtemp's 0o700 would become dst's mode
        written = Written(dst)
        with WriteBehind(report, total) as behind:
            for fname, shard in zip(names, shards):
                writer = ShardWriter(tmp / fname, [(o.name, o.shape, o.dtype) for o in shard], early_writeback=sync)
                try:
                    by_name = {o.name: o for o in shard}
                    for k, name in enumerate(writer.order):
                        o = by_name[name]
                        # Two scratch slots: this tensor is built in one while the previous one
                        # is written from the other (WriteBehind waits for it before returning).
                        behind.write(writer, name, _value(plan, o, source, values, scratch, rows_ok, f"dest{k % 2}"),
                                     o.nbytes)
                    behind.finish(writer, sync)
                except BaseException:
                    behind.settle()          # no write in flight into the file being aborted
                    writer.abort()
                    raise
                written.files.append(fname)
                written.weight_map.update({o.name: fname for o in shard})
        written.total_size = total
        if len(names) > 1:
            write_index(tmp, written.weight_map, total, sync)
        if extra_files:
            for fname, write in extra_files.items():
                write(tmp / fname)
        if sync:
            fsync_folder(tmp)
        _install(tmp, dst)
        if sync:
            fsync_folder(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        close_bar()
    return written


def _check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    if not dst.parent.is_dir():
        raise SurgeryError(f"the output directory's parent {dst.parent} does not exist; create it first")
    if dst.exists():
        if not overwrite:
            raise SurgeryError(f"the output {dst} exists; pass overwrite=True to replace it (it is replaced whole, "
                               "once the new checkpoint is complete), or choose another directory")
        if not dst.is_dir():
            raise SurgeryError(f"the output {dst} exists and is not a directory")
    s, d = src.resolve(), dst.resolve()
    if s == d or d in s.parents:
        raise SurgeryError(f"the output {dst} holds the source checkpoint {src}; write the new checkpoint elsewhere")


def _install(tmp: Path, dst: Path) -> None:
    """Renames the complete output into place; an existing dst is moved aside first and put back
    if the rename fails, then deleted."""
    if not dst.exists():
        os.rename(tmp, dst)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".replaced", dir=dst.parent))
    os.rmdir(aside)
    os.rename(dst, aside)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(aside, dst)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _tie_targets(model: torch.nn.Module) -> set:
    """Names transformers drops from checkpoints because they are tied to another (the keys of
    `_tied_weights_keys` in transformers 5, its entries in 4)."""
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None)
    if isinstance(tied, dict):
        return set(tied)
    if isinstance(tied, (list, tuple, set)):
        return set(tied)
    return set()


def _outputs(plan, source: Source, dtype, strict: bool) -> list[_Out]:
    """The output tensors in the new model's state_dict order, one name per tied group, each
    with its shape, dtype and source tensor; every check against the checkpoint happens here."""
    old_model, new_model = plan.old.model, plan.new.model
    old_alias = tied_names(old_model)
    old_shapes = {n: tuple(t.shape) for n, t in list(old_model.named_parameters(remove_duplicate=False)) +
                  list(old_model.named_buffers(remove_duplicate=False))}
    infos = source.infos
    where = lambda n: infos[n].file.name   # noqa: E731
    extra = sorted(n for n in infos if n not in old_shapes)
    if extra and strict:
        raise SurgeryError(f"the checkpoint {source.path} holds tensors the old model does not have: "
                           + "; ".join(f"{n} (in {where(n)})" for n in extra[:5])
                           + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
                           + "; is it the old model's checkpoint? (strict=False ignores them)")
    for n, info in infos.items():
        if n in old_shapes and info.shape != old_shapes[n]:
            raise SurgeryError(f"the checkpoint's {n} (in {where(n)}) has shape {info.shape}, but the old "
                               f"model's is {old_shapes[n]}; is it the old model's checkpoint?")
    floating = {i.dtype for n, i in infos.items() if i.dtype.is_floating_point and n in old_shapes}
    default_float = dtype or (floating.pop() if len(floating) == 1 else None)

    by_alias = {a: p for p in plan.params.values() for a in p.aliases}
    targets = _tie_targets(new_model)
    outs, seen = [], set()
    for key, t in new_model.state_dict(keep_vars=True).items():
        p = by_alias.get(key)
        if p is None:
            raise SurgeryError(f"the new model's {key} is not in the plan; plan again")
        if id(p) in seen or not p.persistent:
            continue
        seen.add(id(p))
        if tuple(t.shape) != p.match.new_shape:
            raise SurgeryError(f"the new model's {key} has shape {tuple(t.shape)}, but the plan was made for "
                               f"{p.match.new_shape}; plan again (nothing was written)")
        name = next((a for a in p.aliases if a not in targets), p.aliases[0])
        src_name = None
        if p.old_name is not None and p.match.copy and not p.match.unexplained:
            src_name = next((a for a in old_alias.get(p.old_name, (p.old_name,)) if a in infos), None)
            if src_name is None:
                names = old_alias.get(p.old_name, (p.old_name,))
                raise SurgeryError(f"the checkpoint {source.path} has no tensor {p.old_name}"
                                   + (f" (nor {_listing(names[1:])}, tied to it)" if len(names) > 1 else "")
                                   + f", which the plan copies into {p.name}; is it the old model's checkpoint?")
            if infos[src_name].shape != p.match.old_shape:
                raise SurgeryError(f"the checkpoint's {src_name} (in {where(src_name)}) has shape "
                                   f"{infos[src_name].shape}, but the plan was made for {p.match.old_shape}")
        if t.is_floating_point():
            out_dtype = dtype or (infos[src_name].dtype if src_name and infos[src_name].dtype.is_floating_point
                                  else default_float or t.dtype)
        else:
            out_dtype = t.dtype
        outs.append(_Out(name, p, tuple(t.shape), out_dtype, src_name))
    return outs


def _split(outs: list[_Out], limit: int) -> list[list[_Out]]:
    """Consecutive tensors into shards of at most `limit` bytes (a larger tensor alone)."""
    shards, size = [[]], 0
    for o in outs:
        if shards[-1] and size + o.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(o)
        size += o.nbytes
    return shards


def _value(plan, o: _Out, source: Source, values: ModuleInit, scratch: Scratch, rows_ok: bool,
           slot: str = "dest") -> torch.Tensor:
    """The new tensor `o`, built from its old tensor and the new model's initial values as
    SurgeryPlan.apply builds it, in o.dtype. It may live in `scratch`'s `slot`: write it out
    before building another one there."""
    m, cats = o.plan.match, plan.new_categories
    info = source.infos[o.source] if o.source is not None else None
    if info is not None and info.offset is not None and info.dtype == o.dtype:
        # The byte route (checkpoint_ranges): copied stretches never pass through torch.
        src = FileRange(info.file, info.offset, info.nbytes)
        if m.identity:
            return Parts([src], info.nbytes)
        chunks = copy_chunks(m, cats, info.shape, o.shape, scratch.memo)
        if worth_it(chunks, info.nbytes // max(math.prod(info.shape), 1)):
            with torch.no_grad():
                dest = _initial(plan, o, values, scratch, rows_ok, slot)
                for w in zero_writes(m, cats, dest):
                    w()
            return parts(dest, chunks, src, dest.element_size(), o.name)
    old = source.read(o.source) if o.source is not None else None
    with torch.no_grad():
        if old is not None and m.identity:
            return old.to(o.dtype)
        dest = _initial(plan, o, values, scratch, rows_ok, slot)
        writes = in_place_writes(m, old, dest, cats)
        if writes is None:
            return build(m, old, dest, cats).to(o.dtype)
        for w in writes:
            w()
        return dest


def _initial(plan, o: _Out, values: ModuleInit, scratch: Scratch, rows_ok: bool, slot: str) -> torch.Tensor:
    """The buffer `o` is built in, holding the new model's values wherever the plan keeps them
    (and anything elsewhere: every other element is copied or zeroed afterwards)."""
    m, cats = o.plan.match, plan.new_categories
    rows = rows_keeping_init(m, cats) if rows_ok and values.rows_only(o.name) else None
    # Every element of `dest` that is not copied or zeroed below keeps its value: the
    # new model's, put there first. The scratch buffer holds the previous tensor's values
    # elsewhere, and needs no clearing: those elements are all overwritten.
    if rows is not None:
        dest = scratch.tensor(slot, o.shape, o.dtype)
        dest.index_copy_(0, rows, values.row_values(o.name, rows, o.dtype))
    elif needs_init(m, cats):
        dest = values.values(o.name, o.dtype)
    else:
        dest = scratch.tensor(slot, o.shape, o.dtype)
    if tuple(dest.shape) != o.shape:   # a bug guard: never write a wrong shape
        raise SurgeryError(f"internal error: the initial value of {o.name} has shape {tuple(dest.shape)}, "
                           f"expected {o.shape}")
    return dest


def _progress(progress, total: int):
    """(report(name, done, total), close()) for the progress argument (see fxsurgery.progress)."""
    bar = open_bar(progress, "writing checkpoint", total, error=SurgeryError, unit="B", unit_scale=True)
    if bar is None:
        return (lambda *a: None), lambda: None
    return (lambda name, done, _total: bar.update(done, name)), bar.close


def transplant_checkpoint(old_model: torch.nn.Module, new_model: torch.nn.Module, old_inputs, new_inputs,
                          old_features, new_features, src, dst, *, rename=None, units=None,
                          strict_plan: bool = False, new_categories: str = "zero", **checkpoint_kwargs):
    """The one-call form for the command line: traces both models (meta-device models are
    fine and fastest), plans, and streams `src` into `dst` with apply_to_checkpoint
    (checkpoint_kwargs: init, max_shard_size, dtype, progress, overwrite, strict). rename,
    units, new_categories and strict_plan (plan's strict) go to `plan`. Returns (plan, Written)."""
    from ..capture import trace
    from .planning import plan as make_plan
    p = make_plan(trace(old_model, old_inputs, old_features), trace(new_model, new_inputs, new_features),
                  rename=rename, units=units, strict=strict_plan, new_categories=new_categories)
    return p, apply_to_checkpoint(p, src, dst, **checkpoint_kwargs)
