"""Checkpoints bigger than memory: read and write safetensors tensor group by tensor group.

Two users:
- ``prune_checkpoint`` applies a known plan (``hf-moeprune prune --keep/--plan``) without loading the model: a
  meta-device skeleton carries the surgery (so config, class and key names are exactly what the in-memory path
  produces), and the weights go from the input shards to the output shards one conversion group at a time
  (e.g. one layer's ``gate_up_proj``, built from Mixtral's per-expert ``w1``/``w3`` keys by transformers' own
  conversion mapping). Peak memory: about one output shard plus one expert tensor of one layer.
- ``CheckpointReader.load_module_state`` materialises one decoder layer (or the embeddings) for layer-wise
  calibration (``hf_moeprune.oneshot.collect_statistics_layerwise``).

The key conversions (legacy checkpoint names <-> the fused tensors transformers v5 models hold) are
transformers' private loading machinery (``transformers.core_model_loading`` and ``conversion_mapping``); every
use of it is in ``hf_moeprune.compat`` (``load_conversions``, ``apply_load_conversions``, ``converted_key``,
``revert_conversions``), checked against transformers 5.24.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import json
import logging
import os
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from hf_moeprune import compat
from hf_moeprune.format.modeling_moeprune import with_extra_rows
from hf_moeprune.format.safetensors_header import header_bytes
from hf_moeprune.utils import atomic_write_text

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


class StreamingUnsupported(ValueError):
    """The checkpoint cannot be streamed (the caller falls back to loading the whole model); the message says why."""


def parse_size(size: int | str) -> int:
    """``"5GB"`` -> 5e9 bytes (the units ``save_pretrained``'s ``max_shard_size`` accepts); ints pass through."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B)?\s*", str(size).upper())
        if match is None:
            raise ValueError(f"size {size!r} is not a byte count like 500MB, 5GB or 2GiB")
        value = int(float(match.group(1)) * _SIZE_UNITS.get(match.group(2) or "", 1))
    if value < 1:
        raise ValueError(f"size {size!r} must be at least one byte")
    return value


def layer_of_key(key: str) -> int | None:
    """The decoder-layer index a checkpoint or model key belongs to (None: embeddings, final norm, head)."""
    match = _LAYER_KEY.search(key)
    return int(match.group(1)) if match else None


# -- the C heap -----------------------------------------------------------------------------------------------------
_LIBC: ctypes.CDLL | None | bool = False  # False: not looked up yet; None: not glibc
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
_MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial default


def return_freed_memory() -> None:
    """Give the C heap's free memory back to the operating system (glibc only; a no-op elsewhere).

    Why: streaming allocates and frees the same large tensors (a layer's experts, an output shard) over and over.
    glibc serves a large allocation with its own ``mmap`` (returned on ``free``) only while it is above a threshold
    that it raises, up to 32 MiB, each time such a block is freed; after the first layer, layer-sized tensors made
    of many 1-32 MiB pieces land in the ordinary heap, which fragments and is not returned, so resident memory grew
    by 8-30 MB with every 100 MB layer (benchmarks/results/oneshot_memory.md). The
    first call pins the threshold at glibc's initial 128 KiB (``mallopt(M_MMAP_THRESHOLD)``, which also turns the
    raising off, for the whole process); every call then trims the heap's free top (``malloc_trim(0)``)."""
    global _LIBC
    if _LIBC is False:
        _LIBC = None
        name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
        try:
            libc = ctypes.CDLL(name) if name else None
            if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt"):
                libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
                _LIBC = libc
        except OSError:  # a libc without these (e.g. musl): nothing to tune
            _LIBC = None
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


# -- reading ------------------------------------------------------------------------------------------------------
# safetensors dtype names -> torch dtypes that are read byte for byte (others go through safetensors itself)
_SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64, "F16": torch.float16,
    "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def _read_exact(f, start: int, tensor: torch.Tensor, where: str) -> torch.Tensor:
    """Fill the contiguous CPU ``tensor`` with the bytes at ``start`` of the open file ``f``."""
    buffer = memoryview(tensor.view(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")
    f.seek(start)
    done = 0
    while done < len(buffer):
        n = f.readinto(buffer[done:])
        if not n:
            raise ValueError(f"{where}: the file ends inside the tensor's data")
        done += n
    return tensor


@dataclass
class CheckpointReader:
    """A local safetensors checkpoint (one file or an index of shards), read tensor by tensor."""

    folder: Path
    weight_map: dict[str, str]  # checkpoint key -> file name inside ``folder``
    _headers: dict[str, tuple[int, dict]] = field(default_factory=dict, repr=False)  # file -> (data start, header)

    @classmethod
    def open(cls, path: str | os.PathLike) -> CheckpointReader:
        folder = Path(path)
        if not folder.is_dir():
            raise StreamingUnsupported(f"{str(path)!r} is not a local folder (a Hub id is loaded in memory)")
        index, single = folder / SAFE_WEIGHTS_INDEX_NAME, folder / SAFE_WEIGHTS_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise StreamingUnsupported(f"{index} is not a safetensors index with a weight_map: {exc}") from None
        elif single.is_file():
            with safe_open(single, "pt") as f:
                weight_map = dict.fromkeys(f.keys(), SAFE_WEIGHTS_NAME)
        else:
            raise StreamingUnsupported(f"{folder} holds no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}")
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise StreamingUnsupported(f"{index} names shard file(s) {missing} that are not in {folder}")
        return cls(folder, dict(weight_map))

    def keys_by_layer(self) -> dict[int | None, list[str]]:
        units: dict[int | None, list[str]] = defaultdict(list)
        for key in self.weight_map:
            units[layer_of_key(key)].append(key)
        return dict(units)

    def _header(self, filename: str) -> tuple[int, dict]:
        if filename not in self._headers:
            with open(self.folder / filename, "rb") as f:
                raw = header_bytes(f)
            self._headers[filename] = (8 + len(raw), json.loads(raw))
        return self._headers[filename]

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of tensor ``key`` on disk (from its file's header; nothing read)."""
        return tuple(self._header(self.weight_map[key])[1][key]["shape"])

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Fill ``out`` (e.g. one expert's slot of a fused tensor) with tensor ``key``, cast to ``out``'s dtype;
        straight from the file when the dtypes match and ``out`` is contiguous CPU memory."""
        filename = self.weight_map[key]
        data_start, header = self._header(filename)
        entry = header[key]
        where = f"{self.folder / filename}: tensor {key!r}"
        if tuple(entry["shape"]) != tuple(out.shape):
            raise ValueError(f"{where}: shape {entry['shape']} on disk, {list(out.shape)} expected")
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"]) if sys.byteorder == "little" else None
        if dtype == out.dtype and out.device.type == "cpu" and out.is_contiguous():
            begin, end = entry["data_offsets"]
            if out.numel() * out.element_size() != end - begin:
                raise ValueError(f"{where}: {end - begin} bytes of data for shape {entry['shape']} {dtype}")
            with open(self.folder / filename, "rb", buffering=0) as f:
                _read_exact(f, data_start + begin, out, where)
        else:
            out.copy_(self.read([key])[key])

    def read(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """The tensors ``keys``, each read with plain file reads straight into its own memory.

        Not through safetensors' memory map: the mapped pages a tensor is copied from stay resident (and count in
        the process's memory) until the file is closed, which doubled what a layer costs while it loads. Dtypes
        without a byte-for-byte torch equivalent (and big-endian machines) still go through ``safe_open``."""
        by_file: dict[str, list[str]] = defaultdict(list)
        for key in keys:
            by_file[self.weight_map[key]].append(key)
        out = {}
        for filename, names in by_file.items():
            data_start, header = self._header(filename)
            plain = sys.byteorder == "little"
            with open(self.folder / filename, "rb", buffering=0) as f:
                for name in names:
                    entry = header.get(name)
                    dtype = _SAFETENSORS_DTYPES.get(entry["dtype"]) if entry and plain else None
                    if dtype is None:
                        with safe_open(self.folder / filename, "pt") as g:
                            out[name] = g.get_tensor(name)
                        continue
                    begin, end = entry["data_offsets"]
                    tensor = torch.empty(entry["shape"], dtype=dtype)
                    where = f"{self.folder / filename}: tensor {name!r}"
                    if tensor.numel() * tensor.element_size() != end - begin:
                        raise ValueError(f"{where}: {end - begin} bytes of data for shape {entry['shape']} {dtype}")
                    out[name] = _read_exact(f, data_start + begin, tensor, where)
        return out


def meta_skeleton(path: str | os.PathLike, config=None, include_buffers: bool = False) -> nn.Module:
    """The model of ``path`` built on the meta device (no weights), in the dtype ``from_pretrained`` would load.

    With ``include_buffers`` the buffers are real CPU tensors (small; the rotary embeddings' frequencies are
    computed at construction and are not in the checkpoint), as a forward pass needs them."""
    from accelerate import init_empty_weights
    from transformers import GenerationConfig

    from hf_moeprune.loading import load_config, model_from_config

    config = config if config is not None else load_config(path)
    dtype = getattr(config, "dtype", None) or torch.get_default_dtype()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with init_empty_weights(include_buffers=not include_buffers):
        model = model_from_config(config, dtype=dtype)  # the family's Auto class (vision-language ones too)
    if (Path(path) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


def _check_streamable(config) -> None:
    if getattr(config, "quantization_config", None) is not None:
        raise StreamingUnsupported("the checkpoint is quantized (its quantizer decides how tensors load)")


@dataclass
class ModuleLoader:
    """Materialises parts of a meta skeleton from the checkpoint: the tensors of one decoder layer (or of the
    embeddings/norm/head) converted to the model's names and dtypes."""

    reader: CheckpointReader
    model: nn.Module
    conversions: list = field(default_factory=list)
    meta_state: dict[str, torch.Tensor] = field(default_factory=dict)
    units: dict[int | None, list[str]] = field(default_factory=dict)
    stacked_groups: int = 0  # groups filled slot by slot (``compat.stacked_slots``) rather than converted whole

    @classmethod
    def create(cls, path: str | os.PathLike, model: nn.Module) -> ModuleLoader:
        _check_streamable(model.config)
        reader = CheckpointReader.open(path)
        return cls(reader, model, compat.load_conversions(model), model.state_dict(), reader.keys_by_layer())

    def groups(
        self, layer: int | None, select: Mapping[str, torch.Tensor] | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Model-named tensors of ``layer``, one conversion group at a time (e.g. all per-expert ``w1``/``w3``
        keys of the layer together, since they form one ``gate_up_proj``). ``select`` maps model names to the rows
        (dim 0, the experts) to keep: those tensors come back with only these rows, in that order (per-expert keys
        of the other experts are then not even read)."""
        select = select or {}
        by_target: dict[str, list[str]] = defaultdict(list)
        for key in self.units.get(layer, []):
            target = compat.converted_key(key, self.conversions, self.model.base_model_prefix, self.meta_state)
            by_target[target].append(key)
        for keys in by_target.values():
            # per-expert keys that stack into one fused tensor: fill it key by key (one source in memory at a time)
            stacked = None
            if len(keys) > 1:
                shapes = {key: self.reader.shape(key) for key in keys}
                stacked = compat.stacked_slots(self.model, self.conversions, self.meta_state, shapes)
            if stacked is not None:
                target, dim, slots = stacked
                shape, rows = list(self.meta_state[target].shape), None
                # the slot index is the expert when the experts are dim 0 of the fused tensor
                if target in select and (dim != 0 or all(start == 0 for _, start, _ in slots.values())):
                    rows = {int(expert): row for row, expert in enumerate(select[target].tolist())}
                    shape[0] = len(rows)
                fused = torch.empty(shape, dtype=self.meta_state[target].dtype)
                for key, (index, start, length) in slots.items():
                    if rows is not None:
                        if index not in rows:
                            continue
                        index = rows[index]
                    slot = fused[start + index] if dim == 0 else fused[index].narrow(dim - 1, start, length)
                    self.reader.read_into(key, slot)
                if rows is None and target in select:
                    fused = fused.index_select(0, select[target])
                self.stacked_groups += 1
                group = {target: fused}
                del fused  # the caller's group is then the only reference (pruning it frees the full tensor)
                yield group
                continue
            tensors = compat.apply_load_conversions(
                self.model, self.conversions, self.meta_state, self.reader.read(keys)
            )
            for name in tensors.keys() & select.keys():
                tensors[name] = tensors[name].index_select(0, select[name])
            if tensors:
                yield tensors

    def load_module_state(self, layer: int | None) -> dict[str, torch.Tensor]:
        """Every model-named tensor of ``layer`` (None: everything outside the decoder layers)."""
        out = {}
        for group in self.groups(layer):
            out.update(group)
        return out


def materialize(model: nn.Module, state: Mapping[str, torch.Tensor], device: torch.device | str = "cpu") -> None:
    """Replace meta parameters/buffers named in ``state`` (full model names) by the given tensors, on ``device``."""
    for name, tensor in state.items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        old = getattr(owner, attr)
        value = tensor.to(device)
        if isinstance(old, nn.Parameter):
            setattr(owner, attr, nn.Parameter(value, requires_grad=False))
        else:
            compat.set_buffer(owner, attr, value)


def release(module: nn.Module) -> None:
    """Send a materialised module's tensors back to the meta device (frees their memory)."""
    module.to("meta")


# -- writing ------------------------------------------------------------------------------------------------------
class ShardWriter:
    """Collects named tensors and writes ``model-XXXXX-of-YYYYY.safetensors`` shards of at most ``max_shard_bytes``
    (a single tensor bigger than that gets a shard of its own, as in ``save_pretrained``), then the index."""

    def __init__(self, folder: Path, max_shard_bytes: int, metadata: Mapping[str, str] | None = None):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = dict(metadata or {"format": "pt"})
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[str, list[str]]] = []  # (temporary file name, keys)
        self.total_size = 0

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            size = tensor.numel() * tensor.element_size()
            if self._pending and self._pending_bytes + size > self.max_shard_bytes:
                self._flush()
            self._pending[name] = tensor.contiguous()
            self._pending_bytes += size
            self.total_size += size

    def _flush(self) -> None:
        if not self._pending:
            return
        name = f".shard-{len(self._written):05d}.safetensors"
        save_file(self._pending, self.folder / name, metadata=self.metadata)
        self._written.append((name, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self, total_parameters: int) -> list[str]:
        """Write the last shard, give the shards their final names and, for several, write the index last."""
        self._flush()
        if len(self._written) == 1:
            os.replace(self.folder / self._written[0][0], self.folder / SAFE_WEIGHTS_NAME)
            return [SAFE_WEIGHTS_NAME]
        count = len(self._written)
        weight_map, names = {}, []
        for i, (tmp, keys) in enumerate(self._written, start=1):
            final = f"model-{i:05d}-of-{count:05d}.safetensors"
            os.replace(self.folder / tmp, self.folder / final)
            weight_map.update(dict.fromkeys(keys, final))
            names.append(final)
        index = {"metadata": {"total_parameters": total_parameters, "total_size": self.total_size},
                 "weight_map": weight_map}  # fmt: skip
        atomic_write_text(self.folder / SAFE_WEIGHTS_INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")
        return names


# -- streaming surgery --------------------------------------------------------------------------------------------
def _layer_prefixes(model: nn.Module, adapter) -> dict[int, str]:
    names = {id(module): name for name, module in model.named_modules()}
    return {i: names[id(layer)] + "." for i, layer in enumerate(adapter.decoder_layers(model))}


def prune_checkpoint(
    path: str | os.PathLike,
    keep: Mapping[int, Sequence[int]],
    output_dir: str | os.PathLike,
    export_stock: bool = True,
    max_shard_size: int | str = "5GB",
    merge: Mapping[int, tuple[Mapping[int, int], torch.Tensor]] | None = None,
    extra_config: Mapping[str, object] | None = None,
    on_written: Callable[[Path], None] | None = None,
    overwrite: bool = False,
    drop_group_limited_routing: bool = False,
) -> nn.Module:
    """Apply the plan ``keep`` (layer -> expert positions to keep) to the checkpoint at ``path`` and write the
    result to the (new) folder ``output_dir``, shard by shard, without loading the model.

    The files equal what ``from_pretrained`` + ``prune_experts`` + ``save_pretrained`` write (same config, same
    tensor bytes; the shard boundaries follow ``max_shard_size``). ``merge`` maps a layer to (removed -> kept
    assignment, per-expert token frequencies): those experts are folded into the kept ones first
    (``hf_moeprune.pruning.merging``). ``extra_config`` fields are added to the written config; ``on_written`` may
    add files to the output folder before it appears; ``overwrite`` replaces a non-empty ``output_dir`` once the new
    one is complete; ``drop_group_limited_routing`` as in `prune_experts` (a config change only). Returns the
    meta-device skeleton of the pruned model (its config is the one written). Raises ``StreamingUnsupported`` before
    writing anything when the checkpoint cannot be streamed (not a local safetensors folder, quantized).
    """
    from transformers import AutoConfig

    from hf_moeprune.adapters import get_adapter
    from hf_moeprune.pruning.merging import merged_rows
    from hf_moeprune.surgery import prune_experts
    from hf_moeprune.utils import atomic_output_dir

    max_bytes = parse_size(max_shard_size)
    return_freed_memory()  # pins glibc's mmap threshold before the first layer (see its docstring)
    CheckpointReader.open(path)  # not streamable: say so before anything else is read
    config = AutoConfig.from_pretrained(path)
    _check_streamable(config)
    model = meta_skeleton(path, config)
    # the loader converts checkpoint tensors against the unpruned layout, on a skeleton of its own: some conversions
    # read the model's parameter shapes (Qwen3-VL-MoE's Transpose(check_dims=True) transposes a tensor whose shape
    # differs from the parameter's), which the surgery below changes on ``model``
    loader = ModuleLoader.create(path, meta_skeleton(path, copy.deepcopy(config)))
    adapter = get_adapter(model)
    prefixes = _layer_prefixes(model, adapter)
    layers = adapter.decoder_layers(model)
    # (routed experts, router rows after them) per layer before pruning: those rows (LongCat's zero-computation
    # experts) are kept at the end of the tensors that hold them, in order
    before = {int(layer): (adapter.num_experts(layers[int(layer)]), adapter.extra_rows(layers[int(layer)]))
              for layer in keep}  # fmt: skip
    # validates the plan and gives the skeleton the pruned config, class and shapes
    prune_experts(model, keep, drop_group_limited_routing=drop_group_limited_routing)
    for name, value in (extra_config or {}).items():
        setattr(model.config, name, value)
    merge = {int(layer): m for layer, m in (merge or {}).items() if m[0]}
    index = {int(layer): torch.tensor([int(p) for p in kept], dtype=torch.long) for layer, kept in keep.items()}
    full_index = {layer: with_extra_rows(rows, *before[layer]) for layer, rows in index.items()}
    pruned_state = model.state_dict()
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        # config, generation config and (for the hf_moeprune format) the modeling file, written by the same code as
        # the in-memory path; an empty state dict writes an empty weights file, replaced below
        model.save_pretrained(tmp, state_dict={}, export_stock=export_stock)
        for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME):
            (tmp / name).unlink(missing_ok=True)
        # the class save_pretrained wrote (stock or pruned) decides the tensor names on disk
        written = meta_skeleton(tmp)
        writer = ShardWriter(tmp, max_bytes)
        units = sorted(loader.units, key=lambda u: -1 if u is None else u)
        for unit in units:
            expert_names, merged_names, select, extra_names = set(), set(), {}, set()
            if unit in index:
                expert_names = {prefixes[unit] + n for n in adapter.tensor_names}
                extra_names = {prefixes[unit] + n for n in adapter.extra_row_tensor_names}

            def rows(name: str, unit=unit, extra_names=extra_names) -> torch.Tensor:
                return full_index[unit] if name in extra_names else index[unit]

            if unit in merge:
                merged_names = {f"{prefixes[unit]}{adapter.experts_path}.{n}" for n in adapter.expert_tensors}
            else:  # removed experts are not read at all (merging needs them)
                select = {name: rows(name) for name in expert_names}
            for group in loader.groups(unit, select):
                for name in list(group):
                    if name in merged_names:
                        group[name] = merged_rows(group[name], *merge[unit])
                    if name in expert_names and name not in select:
                        group[name] = group[name].index_select(0, rows(name))
                    expected = pruned_state.get(name)
                    if expected is not None and tuple(expected.shape) != tuple(group[name].shape):
                        raise RuntimeError(
                            f"{name}: streamed tensor has shape {tuple(group[name].shape)}, the pruned model "
                            f"expects {tuple(expected.shape)}"
                        )
                writer.add(compat.revert_conversions(written, group))
                del group
            return_freed_memory()
            logger.info("streamed %s", "embeddings/head" if unit is None else f"layer {unit}")
        shards = writer.close(model.num_parameters())
        if on_written is not None:
            on_written(tmp)
    logger.info("wrote %s (%d shard(s), %.1f MB) by streaming", output_dir, len(shards), writer.total_size / 1e6)
    return model
