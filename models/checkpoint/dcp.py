"""torch.distributed.checkpoint (DCP) directories, as torchtitan and the SimpleGPT reference write them.

A directory (`dcp.save(states, checkpoint_id=".../step-N")`) holds `.metadata`, a pickled
torch.distributed.checkpoint.metadata.Metadata (keys -> tensor sizes, dtypes and chunks; chunk -> file, byte
offset and length), and `__{rank}_{i}.distcp` files in which every tensor chunk is a torch.save stream and
every other value (floats, tuples, BytesIO) a byte item. torch's own reader unpickles `.metadata` without
restriction; here it goes through an unpickler that admits only the classes DCP writes (and the few torch
values and pathlib classes they hold): anything else is refused before it runs. Tensor chunks are read with
torch.load(weights_only=True) and assembled from their offsets (a sharded FSDP save has several per tensor).

Layouts (torchtitan's CheckpointManager):
  full          model under `model.`, AdamW state under `optimizer.state.<param>.{exp_avg,exp_avg_sq,step}`,
                its hyperparameters under `optimizer.param_groups.<param>.<key>` (flattened optimizer state
                dict) or `optimizer.param_groups.<i>.<key>` with `...params` naming the group's parameters,
                plus `lr_scheduler.`, `dataloader.` and `train_state.` (`train_state.step`);
  weights-only  the model's keys alone (`model_weights_only` at the last step; RoPE table dropped, maybe in
                `export_dtype`), or, in earlier torchtitan, under `model.` without anything else.
"""

import io
import pickle
import re
from pathlib import Path

import torch

from hessian_tools.errors import UserError
from hessian_tools.paths import input_file, is_directory, is_regular
from models.checkpoint.files import first_line, read_torch
from models.checkpoint.nanogpt import ADAM_FIELDS
from models.checkpoint.state_dict import clean_name
from models.schemas import check_step

METADATA = ".metadata"
STEP_DIR = re.compile(r"^step-(\d+)$")
MODEL, OPT_STATE, OPT_GROUPS = "model.", "optimizer.state.", "optimizer.param_groups."


def _allowed_globals() -> dict:
    """(module, name) -> the object a DCP metadata pickle may reference; nothing else is ever resolved."""
    import pathlib

    from torch.distributed._shard.sharded_tensor import metadata as shard_metadata
    from torch.distributed.checkpoint import filesystem, metadata

    allowed = {("torch.distributed.checkpoint.metadata", name): getattr(metadata, name)
               for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                            "TensorProperties", "_MEM_FORMAT_ENCODING", "StorageMeta", "MetadataIndex")}
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = filesystem._StorageInfo
    # older torch wrote TensorProperties from its sharded-tensor module
    for name in ("TensorProperties", "MEM_FORMAT_ENCODING"):
        allowed[("torch.distributed._shard.sharded_tensor.metadata", name)] = getattr(shard_metadata, name)
    layouts = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}
    for name, value in vars(torch).items():
        if isinstance(value, (torch.dtype, torch.layout)):
            allowed[("torch", name)] = value
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = lambda name: layouts[name]  # "torch.strided" -> layout
    for name in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"):
        allowed[("pathlib", name)] = getattr(pathlib, name)
    return allowed


class _Refused(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, allowed: dict):
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module, name):
        if (module, name) not in self.allowed:
            raise _Refused(f"refused global {module}.{name}")
        return self.allowed[(module, name)]


def read_metadata(path: Path):
    """The Metadata of a DCP directory, unpickled with only DCP's own classes admitted, and checked."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex

    file = input_file(path / METADATA, "DCP metadata file")
    try:
        with open(file, "rb") as f:
            meta = _MetadataUnpickler(f, _allowed_globals()).load()
    except _Refused as exc:
        raise UserError(f"{file}: not a DCP metadata file ({first_line(exc)}); nothing from it was executed") \
            from None
    except Exception as exc:  # truncated or malformed pickles raise many types
        raise UserError(f"{file}: cannot read the DCP metadata (truncated or corrupt?): {first_line(exc)}") from None
    storage = getattr(meta, "storage_data", None)
    if not isinstance(meta, Metadata) or not isinstance(meta.state_dict_metadata, dict) \
            or not isinstance(storage, dict) or not all(isinstance(k, MetadataIndex) and isinstance(v, _StorageInfo)
                                                       for k, v in storage.items()):
        raise UserError(f"{file}: not the metadata of a torch.distributed.checkpoint FileSystemWriter save")
    return meta


class DcpReader:
    """Reads the values of a DCP directory by key: tensors (assembled from their chunks) and byte items."""

    def __init__(self, path: Path):
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

        self.path = path
        meta = read_metadata(path)
        self.tensors = {k: v for k, v in meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
        self.byte_items = {k for k, v in meta.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
        self.storage = {(i.fqn, None if i.offset is None else tuple(i.offset)): info
                        for i, info in meta.storage_data.items()}
        self.sizes = {}

    def _bytes(self, info, key: str) -> bytes:
        name = info.relative_path
        if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
            raise UserError(f"{self.path / METADATA}: {key} is stored in {name!r}, not in a file of the directory")
        file = self.path / name
        if name not in self.sizes:
            if not is_regular(file):
                raise UserError(f"{file}: missing or not a regular file; the DCP directory is incomplete")
            self.sizes[name] = file.stat().st_size
        offset, length = info.offset, info.length
        if not (isinstance(offset, int) and isinstance(length, int) and 0 <= offset and 0 <= length
                and offset + length <= self.sizes[name]):
            raise UserError(f"{file}: {key} lies outside the file (offset {offset}, length {length}, file "
                            f"{self.sizes[name]} bytes): truncated?")
        if getattr(info, "transform_descriptors", None):
            raise UserError(f"{file}: {key} is stored with transforms {info.transform_descriptors}, which this "
                            "reader does not undo")
        with open(file, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def tensor(self, key: str) -> torch.Tensor:
        md = self.tensors[key]
        dtype = md.properties.dtype
        if not isinstance(dtype, torch.dtype):
            raise UserError(f"{self.path / METADATA}: {key} has no valid dtype")
        out = torch.empty(tuple(md.size), dtype=dtype)
        covered = 0
        for chunk in md.chunks:
            offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
            info = self.storage.get((key, offsets))
            if info is None:
                raise UserError(f"{self.path / METADATA}: no storage entry for chunk {offsets} of {key}")
            part = read_torch(io.BytesIO(self._bytes(info, key)), f"{self.path / info.relative_path} ({key})")
            if not torch.is_tensor(part) or tuple(part.shape) != sizes or len(offsets) != out.dim():
                raise UserError(f"{self.path / info.relative_path}: chunk {offsets} of {key} is not a tensor of the "
                                f"recorded size {sizes}")
            out[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))] = part
            covered += part.numel()
        if covered != out.numel():
            raise UserError(f"{self.path / METADATA}: the chunks of {key} cover {covered} of its {out.numel()} "
                            "elements")
        return out

    def value(self, key: str):
        """A byte item (a torch.save'd float, tuple, list...), read with weights_only=True; None if unreadable."""
        info = self.storage.get((key, None))
        if info is None:
            return None
        try:
            return read_torch(io.BytesIO(self._bytes(info, key)), key)
        except UserError:
            return None


def is_dcp(path: Path) -> bool:
    return is_directory(path) and is_regular(path / METADATA)


def step_dirs(folder: Path) -> list[Path]:
    """torchtitan's complete checkpoints in a folder (`step-N/` holding a .metadata), sorted by step."""
    found = [p for p in folder.iterdir() if STEP_DIR.match(p.name) and is_dcp(p)] if is_directory(folder) else []
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def _optimizer_state(reader: DcpReader) -> dict:
    state: dict = {}
    for key in reader.tensors:
        if key.startswith(OPT_STATE):
            name, _, field = key[len(OPT_STATE):].rpartition(".")
            state.setdefault(clean_name(name), {})[field] = reader.tensor(key)
    return state


def _adam_settings(reader: DcpReader, names) -> dict:
    """{param: {lr, betas, eps, weight_decay}} from either param_groups layout (entries that cannot be read are
    left out)."""
    settings: dict = {}
    groups = {m.group(1) for k in reader.byte_items if (m := re.match(rf"{re.escape(OPT_GROUPS)}(\d+)\.params$", k))}
    for g in groups:  # optimizer.param_groups.<i>.params lists the group's parameter names
        params = reader.value(f"{OPT_GROUPS}{g}.params") or []
        values = {f: reader.value(f"{OPT_GROUPS}{g}.{f}") for f in ADAM_FIELDS}
        for name in params:
            settings[clean_name(str(name))] = {f: v for f, v in values.items() if v is not None}
    for key in reader.byte_items:  # flattened: optimizer.param_groups.<param>.<field>
        if key.startswith(OPT_GROUPS):
            name, _, field = key[len(OPT_GROUPS):].rpartition(".")
            if field in ADAM_FIELDS and clean_name(name) in names:
                value = reader.value(key)
                if value is not None:
                    settings.setdefault(clean_name(name), {})[field] = value
    return settings


def read_dcp(path: Path):
    """(raw model state, meta, optimizer reader or None, Adam settings reader or None, step) of a DCP dir."""
    reader = DcpReader(path)
    full = any(k.startswith(MODEL) for k in reader.tensors)
    model_keys = [k for k in reader.tensors if k.startswith(MODEL)] if full else list(reader.tensors)
    if not model_keys:
        raise UserError(f"{path}: the DCP checkpoint holds no tensors")
    state = {(k[len(MODEL):] if full else k): reader.tensor(k) for k in model_keys}
    has_optimizer = any(k.startswith(OPT_STATE) for k in reader.tensors)
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for k, v in state.items() if not k.endswith("freqs_cis")})
    meta = {"format": "torchtitan-dcp", "layout": "full" if has_optimizer else "weights-only",
            "stored_dtype": ",".join(dtypes)}
    step = None
    if "train_state.step" in reader.tensors:
        step = check_step(reader.tensor("train_state.step"), str(path / METADATA), "train_state.step")
    elif STEP_DIR.match(path.name):
        step = int(STEP_DIR.match(path.name).group(1))
    if not has_optimizer:
        return state, meta, None, None, step
    names = {clean_name(k) for k in state}
    return state, meta, lambda: _optimizer_state(reader), lambda: _adam_settings(reader, names), step
