"""Import MemBrain v1's pretrained model (a PyTorch Lightning checkpoint), without unpickling
anything but tensors and plain containers.

Reading the checkpoint
----------------------
A Lightning 1.4 ``.ckpt`` is a torch zip: ``<prefix>/data.pkl`` (a pickle) plus one file per
tensor storage, ``<prefix>/data/<key>``. ``torch.load(weights_only=False)`` would execute
whatever callables the pickle names. :class:`_CheckpointUnpickler` instead resolves globals
from a closed list (``find_class``):

- ``collections.OrderedDict`` (the real one: it only builds a mapping);
- ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_tensor`` / ``_rebuild_parameter``, answered
  by *our* functions (:func:`_rebuild_tensor`), which check offset / size / stride against
  the storage before taking a strided copy;
- ``torch.<X>Storage`` type names, answered by inert dtype tokens;
- Lightning's callback classes and hyper-parameter containers (``pytorch_lightning.*``,
  ``argparse.Namespace``), answered by :class:`InertGlobal` subclasses that record the
  global's name and whatever arguments or state the pickle hands them, and do nothing else.

Every other global (``os.system``, ``builtins.eval``, ``subprocess.*``, ...) raises
:class:`RefusedGlobal` before anything is called, so no code named by the file ever runs.
Storages come through ``persistent_load``: ``('storage', <token>, key, location, numel)``;
the bytes are read from the zip (CRC-checked by ``zipfile``), their length checked against
``numel``, and they always land on the CPU.

Mapping v1's network onto :class:`~membrain_dist.model.MemBrainCNN`
------------------------------------------------------------------
v1's ``MemBrain_model.forward`` (CellArchLab/MemBrain, ``scripts/MemBrain_model.py``): conv1
(1->32, k3, pad 0), batchnorm1, ReLU; conv1b (pad 1), batchnorm2, ReLU; conv2 (pad 0),
batchnorm3, ReLU; conv2b (pad 1), batchnorm4, ReLU; ``view(-1, 32 * 8^3)``; mlp1 -> one output
per particle class, no final activation. That is exactly MemBrainCNN's layer list
(``features.0/1 ... 9/10``, ``head``), so no separate network variant is needed; only the axes
differ. v1 cubes are indexed ``[x', y', z']`` with the membrane normal on the last axis; ours
``[z', y', x']`` with the normal on the first (``extraction``). With ``ours = v1.permute(2, 1, 0)``:

- conv kernels ``(O, I, a, b, c)`` over v1's axes become ``w.permute(0, 1, 4, 3, 2)``;
- v1 flattens the last feature map ``(C, x, y, z)`` C-major; ours flattens ``(C, z, y, x)``,
  so ``mlp1.weight.reshape(K, C, m, m, m).permute(0, 1, 4, 3, 2).reshape(K, -1)``;
- batch-norm and bias vectors are per channel and carry over unchanged.

v1's preprocessing, and what of it ``predict`` reproduces
---------------------------------------------------------
- v1 z-scored the tomogram (mean / std), clipped at +-3 and min-max scaled the whole tomogram
  to [0, 1]; training then rescaled every cube to [0, 1] (``__augment_subvol`` ->
  ``__scale_single_subvolume``, after the noise augmentation). Our cubes are a robust z-score
  clipped at +-3 with membranes made bright. The imported model carries
  ``input_transform = {"kind": "cube_minmax", "invert": ...}`` (model.json), applied inside the
  network's forward to every batch: each cube rescaled to [0, 1], after negation when the
  tomograms v1 was trained on had dark membranes (``membrane_contrast``, default ``dark``:
  v1 took tomograms as reconstructed and never inverted them; cryo-ET shows density dark).
  Per-cube min-max makes the remaining global affine differences (robust vs plain z-score,
  v1's tomogram-wide [0, 1] scaling) irrelevant; only where the +-3 clip bites differs.
  Note: v1's own test path (``augment=False``) skipped the per-cube rescaling and fed
  tomogram-scaled cubes; we feed what the network was *trained* on.
- Cubic-spline interpolation: reproduced (``geometry.order = 3`` in the model's
  ``pipeline.json``).
- Labels capped at 7 (Mahalanobis units): recorded as ``labels.max_distance = 7`` (it bounds
  the model's output range; nothing is trained here).
- Cube centring: NOT reproduced. v1 cut a 25^3 box around the *rounded* point, rotated it
  about that voxel and kept indices 6..17, so its 12^3 cube is centred half a voxel off the
  rounded point along each rotated axis; ours is centred on the exact point. Reproducing it
  needs an extraction option our geometry config does not have, and the direction of the
  half-voxel shift depends on v1's rotation conventions (pyto ``Rigid3D``, ``zyz_in_active``,
  the normal negated before the Euler angles), which cannot be checked without running v1.
  The difference is a shift of at most ~1.2 voxels of the cube content.
- The sign of the normal (which cube end is the protein side) is taken to agree: both
  pipelines point the cube's normal axis to the picked side. Not verified against v1's
  rotation code (same reason).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import pickle
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import InputError

__all__ = [
    "V1_VOXEL_SIZE_A",
    "V1Checkpoint",
    "InertGlobal",
    "RefusedGlobal",
    "read_checkpoint",
    "v1_state_dict",
    "convert_state",
    "import_v1",
]

log = logging.getLogger(__name__)

#: voxel size of v1's shipped model's training data (bin 4)
V1_VOXEL_SIZE_A = 13.68

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64, "IntStorage": torch.int32, "ShortStorage": torch.int16,
    "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}

#: modules whose globals become inert placeholders (Lightning callbacks, hparams containers)
_INERT_MODULE_PREFIXES = ("pytorch_lightning.", "lightning.pytorch.", "lightning_fabric.")
_INERT_GLOBALS = {("argparse", "Namespace")}


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the allowed list (nothing was called)."""

    def __init__(self, module: str, name: str) -> None:
        self.global_name = f"{module}.{name}"
        super().__init__(f"refused global {self.global_name!r}")


class InertGlobal:
    """Stand-in for a non-tensor Lightning object: records what the pickle gave it, runs
    nothing. Subclasses (one per global name, made by the unpickler) carry ``global_name``."""

    global_name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.global_name}>"


@dataclass(frozen=True)
class _StorageType:
    name: str
    dtype: torch.dtype


@dataclass(frozen=True)
class _Storage:
    data: torch.Tensor  # 1-D, CPU


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> torch.Tensor:
    """Our answer to ``torch._utils._rebuild_tensor_v2``: a bounds-checked strided copy."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
    ints = (isinstance(offset, int) and all(isinstance(v, int) for v in (*size, *stride))
            and isinstance(size, tuple) and isinstance(stride, tuple))
    if not ints or len(size) != len(stride) or offset < 0 or min((*size, *stride), default=0) < 0:
        raise pickle.UnpicklingError(f"bad tensor geometry {offset!r} {size!r} {stride!r}")
    hooks = rest[1] if len(rest) > 1 else None
    if hooks:  # backward hooks would be callables: never
        raise pickle.UnpicklingError("tensor with backward hooks")
    n = storage.data.numel()
    if 0 in size:
        return torch.empty(size, dtype=storage.data.dtype)
    last = offset + sum((s - 1) * st for s, st in zip(size, stride, strict=True))
    if last >= n:
        raise pickle.UnpicklingError(f"tensor view {size} reaches past its storage ({n} items)")
    return torch.as_strided(storage.data, size, stride, offset).clone()


def _rebuild_parameter(data: Any, requires_grad: Any = False, hooks: Any = None) -> torch.Tensor:
    if not isinstance(data, torch.Tensor) or hooks:
        raise pickle.UnpicklingError("bad parameter record")
    return data


class _CheckpointUnpickler(pickle.Unpickler):
    """Restricted unpickler for torch-zip checkpoints (see the module docstring)."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self._zip, self._prefix = archive, prefix
        self._storages: dict[str, _Storage] = {}
        self._inert: dict[str, type] = {}
        self.placeholders: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if module.startswith(_INERT_MODULE_PREFIXES) or (module, name) in _INERT_GLOBALS:
            full = f"{module}.{name}"
            if full not in self._inert:
                self._inert[full] = type(f"Inert_{name}", (InertGlobal,), {"global_name": full})
            self.placeholders.add(full)
            return self._inert[full]
        raise RefusedGlobal(module, name)

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and isinstance(pid[4], int) and pid[4] >= 0):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        stype, key, numel = pid[1], pid[2], pid[4]
        if key not in self._storages:
            raw = self._zip.read(f"{self._prefix}data/{key}")  # KeyError / BadZipFile (CRC)
            itemsize = torch.empty(0, dtype=stype.dtype).element_size()
            if len(raw) != numel * itemsize:
                raise pickle.UnpicklingError(
                    f"storage {key}: {len(raw)} bytes for {numel} x {stype.name}")
            data = (torch.frombuffer(bytearray(raw), dtype=stype.dtype) if numel
                    else torch.empty(0, dtype=stype.dtype))
            self._storages[key] = _Storage(data)
        return self._storages[key]


@dataclass(frozen=True)
class V1Checkpoint:
    """What a v1 checkpoint holds, as plain Python (tensors on the CPU)."""

    path: Path
    sha256: str
    content: dict[str, Any]
    placeholders: tuple[str, ...]  # globals answered by InertGlobal

    @property
    def keys(self) -> list[str]:
        return list(self.content)


def _pickle_member(archive: zipfile.ZipFile, path: Path) -> str:
    pkls = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
        raise InputError(path, f"not a torch zip checkpoint (found {len(pkls)} */data.pkl)")
    return pkls[0][: -len("data.pkl")]


def read_checkpoint(path: str | os.PathLike[str]) -> V1Checkpoint:
    """Unpickle a torch-zip checkpoint with the restricted unpickler.

    Raises :class:`~membrain_dist.errors.InputError` naming ``path`` when the file is missing,
    not a zip, truncated or corrupt (CRC), not a pickle of a dict, or names a global outside
    the allowed list (nothing from the file is executed in any case).
    """
    p = Path(path)
    try:
        blob = p.read_bytes()
    except OSError as exc:
        raise InputError(p, f"cannot read checkpoint ({exc})") from None
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as archive:
            prefix = _pickle_member(archive, p)
            unpickler = _CheckpointUnpickler(archive.read(f"{prefix}data.pkl"), archive, prefix)
            content = unpickler.load()
    except RefusedGlobal as exc:
        raise InputError(p, f"refused: the checkpoint's pickle names {exc.global_name!r}, which "
                            "is not a tensor, storage or plain container; a MemBrain v1 "
                            "checkpoint does not need it (possibly a tampered file). Nothing "
                            "from the file was executed.") from None
    except InputError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, pickle.UnpicklingError, KeyError,
            ValueError, TypeError, AttributeError, IndexError, OverflowError, RuntimeError,
            NotImplementedError) as exc:
        raise InputError(p, f"truncated or corrupt checkpoint ({type(exc).__name__}: "
                            f"{str(exc)[:200]})") from None
    if not isinstance(content, dict):
        raise InputError(p, f"checkpoint holds a {type(content).__name__}, expected a dict")
    return V1Checkpoint(p, hashlib.sha256(blob).hexdigest(), content,
                        tuple(sorted(unpickler.placeholders)))


# v1 layer list (scripts/MemBrain_model.py): conv name -> batch-norm name, padding
V1_LAYERS = (("conv1", "batchnorm1", 0), ("conv1b", "batchnorm2", 1),
             ("conv2", "batchnorm3", 0), ("conv2b", "batchnorm4", 1))
_BN_FIELDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def v1_state_dict(ckpt: V1Checkpoint) -> tuple[dict[str, torch.Tensor], int, int]:
    """The checkpoint's v1 network tensors, checked against v1's layer list.

    Returns ``(state, channels, cube_size)``; raises InputError naming the file when a tensor
    is missing, extra, or of the wrong shape, or when the network has more than one output.
    """
    state = ckpt.content.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(ckpt.path, "no 'state_dict' of tensors in the checkpoint "
                                    f"(keys {ckpt.keys})")
    w1 = state.get("conv1.weight")
    if w1 is None or w1.dim() != 5:
        raise InputError(ckpt.path, "no 5-D conv1.weight: not a MemBrain v1 model")
    c = int(w1.shape[0])
    expected: dict[str, tuple[int, ...]] = {}
    for i, (conv, bn, _) in enumerate(V1_LAYERS):
        expected[f"{conv}.weight"] = (c, 1 if i == 0 else c, 3, 3, 3)
        expected[f"{conv}.bias"] = (c,)
        for f in _BN_FIELDS:
            expected[f"{bn}.{f}"] = () if f == "num_batches_tracked" else (c,)
    mlp = state.get("mlp1.weight")
    m = round((mlp.shape[1] / c) ** (1 / 3)) if mlp is not None and mlp.dim() == 2 else 0
    if mlp is not None and mlp.dim() == 2:  # one output per v1 particle class (part_dists)
        expected["mlp1.weight"] = (int(mlp.shape[0]), c * m**3)
        expected["mlp1.bias"] = (int(mlp.shape[0]),)
    got = {k: tuple(v.shape) for k, v in state.items()}
    problems = []
    if mlp is None:
        problems.append("mlp1.weight missing")
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = sorted(f"{k} {got[k]} (v1: {expected[k]})" for k in set(expected) & set(got)
                   if got[k] != expected[k])
    if missing or extra or wrong:
        problems.append(f"missing {missing}, unexpected {extra}, wrong shape {wrong}")
    if m < 1 and not problems:
        problems.append("mlp1 input is not channels x m^3")
    if problems:
        raise InputError(ckpt.path, "tensors do not match MemBrain v1's layer list "
                                    "(conv1, conv1b, conv2, conv2b, batchnorm1-4, mlp1): "
                                    + "; ".join(problems))
    return dict(state), c, m + 4


def convert_state(v1: dict[str, torch.Tensor], channels: int,
                  cube_size: int) -> dict[str, torch.Tensor]:
    """v1 tensors (x, y, z axes) -> MemBrainCNN state dict (z, y, x axes); see module docs."""
    out: dict[str, torch.Tensor] = {}
    for i, (conv, bn, _) in enumerate(V1_LAYERS):
        ci, bi = 3 * i, 3 * i + 1  # features.<ci> conv, features.<bi> batch norm
        out[f"features.{ci}.weight"] = v1[f"{conv}.weight"].permute(0, 1, 4, 3, 2)
        out[f"features.{ci}.bias"] = v1[f"{conv}.bias"]
        for f in _BN_FIELDS:
            out[f"features.{bi}.{f}"] = v1[f"{bn}.{f}"]
    m = cube_size - 4
    w = v1["mlp1.weight"]
    out["head.weight"] = w.reshape(w.shape[0], channels, m, m, m).permute(0, 1, 4, 3, 2) \
        .reshape(w.shape[0], -1)
    out["head.bias"] = v1["mlp1.bias"]
    return {k: (v.to(torch.float32) if v.is_floating_point() else v.to(torch.int64))
            .contiguous().clone() for k, v in out.items()}


def v1_class_names(hparams: Any, n_out: int) -> list[str]:
    """Class names of a v1 network with ``n_out`` outputs: one per entry of its ``part_dists``
    (each a list of particle groups, joined with ``+``); ``[]`` for one output (an unnamed
    class, as every single-class model) or when ``part_dists`` does not fit."""
    dists = hparams.get("part_dists") if isinstance(hparams, dict) else None
    if n_out == 1 or not isinstance(dists, list) or len(dists) != n_out:
        return [] if n_out == 1 else [f"class{i + 1}" for i in range(n_out)]
    return ["+".join(map(str, d)) if isinstance(d, list) else str(d) for d in dists]


def _plain(obj: Any, depth: int = 0) -> Any:
    """JSON-safe summary of hyper-parameters / callback states (tensors -> numbers/shapes)."""
    if depth > 6:
        return "..."
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else f"tensor{tuple(obj.shape)}"
    if isinstance(obj, dict):
        return {str(_plain(k, depth + 1)): _plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v, depth + 1) for v in obj]
    if isinstance(obj, InertGlobal):
        return {"global": obj.global_name, "state": _plain(obj.state, depth + 1)}
    if isinstance(obj, type) and issubclass(obj, InertGlobal):
        return obj.global_name
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    return repr(obj)[:200]


MEMBRANE_CONTRASTS = ("dark", "bright")


def import_v1(
    ckpt_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    voxel_size_A: float = V1_VOXEL_SIZE_A,
    membrane_contrast: str = "dark",
) -> dict[str, Any]:
    """Read a v1 checkpoint safely and write a membrain-dist model directory.

    Writes ``weights.safetensors`` + ``model.json`` (``input_transform`` = v1's per-cube
    [0, 1] scaling, the voxel size, the v1 hyper-parameters under ``train_config``) and
    ``pipeline.json`` (cubic interpolation, label cap 7). ``membrane_contrast``: how membranes
    looked in the tomograms v1 was trained on (``dark``: as reconstructed, v1's default).
    Returns a summary (keys, hyper-parameters, placeholders, cube size, channels).
    """
    from .config import PipelineConfig
    from .model import MemBrainCNN, ModelMeta, atomic_write_bytes, save_model

    if membrane_contrast not in MEMBRANE_CONTRASTS:
        raise ValueError(f"membrane_contrast must be one of {MEMBRANE_CONTRASTS}")
    if not (math.isfinite(voxel_size_A) and voxel_size_A > 0):
        raise ValueError("voxel_size_A must be a positive number")
    ckpt = read_checkpoint(ckpt_path)
    v1, channels, cube_size = v1_state_dict(ckpt)
    # ours: membranes bright; v1 was fed the tomogram as it was
    transform = {"kind": "cube_minmax", "invert": membrane_contrast == "dark"}
    n_out = int(v1["mlp1.weight"].shape[0])
    model = MemBrainCNN(cube_size, channels, transform, n_classes=n_out)
    model.load_state_dict(convert_state(v1, channels, cube_size), strict=True)
    hparams = _plain(ckpt.content.get("hyper_parameters", {}))
    classes = v1_class_names(hparams, n_out)
    info = {
        "source": "MemBrain v1 checkpoint (CellArchLab/MemBrain), imported by membrain-dist",
        "checkpoint": str(ckpt.path), "checkpoint_sha256": ckpt.sha256,
        "checkpoint_keys": ckpt.keys, "placeholders": list(ckpt.placeholders),
        "hyper_parameters": hparams,
        "pytorch_lightning_version": _plain(ckpt.content.get("pytorch-lightning_version")),
        "epoch": _plain(ckpt.content.get("epoch")),
        "global_step": _plain(ckpt.content.get("global_step")),
        "membrane_contrast": membrane_contrast,
    }
    callbacks = _plain(ckpt.content.get("callbacks", {}))
    normalisation = (
        "MemBrain v1: tomogram z-scored and clipped at +-3, each cube rescaled to [0, 1] "
        f"(membranes {membrane_contrast}). Applied by the network to our cubes (robust z-score, "
        "membranes bright, +-3): negated when membranes were dark, then per-cube [0, 1]"
    )
    out = Path(out_dir)
    meta = save_model(model, out, ModelMeta(
        voxel_size_A=float(voxel_size_A), normalisation=normalisation, train_config=info,
        metrics={"v1_callbacks": callbacks}, classes=classes,
    ))
    cfg = PipelineConfig().with_overrides("geometry", order=3)
    cfg = cfg.with_overrides("labels", max_distance=float(hparams.get(
        "max_particle_distance", 7.0)) if isinstance(hparams, dict) else 7.0)
    if len(classes) > 1:
        cfg = cfg.with_overrides("labels", classes=tuple(classes))
    data = cfg.to_dict()
    data["v1_import"] = {
        "reproduced": ["per-cube [0, 1] scaling (model.json input_transform)",
                       "cubic-spline interpolation (geometry.order = 3)",
                       "label cap (labels.max_distance)"],
        "not_reproduced": ["cube centred half a voxel off the rounded point (ours: exact "
                           "point)", "v1's plain (not robust) z-score before the +-3 clip"],
    }
    atomic_write_bytes(out / "pipeline.json",
                       json.dumps(data, indent=2, sort_keys=True, default=str).encode())
    log.info("imported %s -> %s (cube %d, %d channels, %.2f Å)", ckpt.path, out, cube_size,
             channels, voxel_size_A)
    return {**info, "out": str(out), "cube_size": cube_size, "channels": channels,
            "weights_sha256": meta.weights_sha256, "input_transform": transform}
