"""The MemBrain scoring CNN and its on-disk model directory.

Architecture (MemBrain v1, kept as is so trained behaviour is comparable)
-------------------------------------------------------------------------
Input ``(B, s, s, s)`` (or ``(B, 1, s, s, s)``) float32 cubes, ``s = 12`` by default; cube axis 0
is the membrane normal. Four 3D convolutions, kernel 3, each followed by BatchNorm3d and ReLU:

====== =========== ======= ============= =======================
layer  channels    padding size (s = 12) receptive field (voxels)
====== =========== ======= ============= =======================
conv1  1 -> C      0       12 -> 10      3^3
conv2  C -> C      1       10 -> 10      5^3
conv3  C -> C      0       10 -> 8       7^3
conv4  C -> C      1       8 -> 8        9^3
====== =========== ======= ============= =======================

then flatten ``C x (s-4)^3`` (32 x 8^3 = 16384) and one Linear layer to one output per particle
class (v1's ``TRAINING_PARTICLE_DISTS``; one by default), the predicted distance (voxels) from
the cube centre to the nearest particle centre of that class. Each conv feature sees a
9^3 neighbourhood; the 8^3 feature positions tile the cube, so through the fully connected layer
the output sees every voxel of the 12^3 cube (receptive field = the whole cube), while the
position-specific linear weights let it tell where in the cube a feature lies.

Ensembles
---------
:class:`MemBrainEnsemble` averages several such networks trained from different seeds
(``TrainConfig.members``); member ``k`` scores the cube turned by ``k`` quarter turns about the
normal, so an ensemble of four costs one pass per member and sees the four turns one network
sees at ``rotations`` 4.

Model directory
---------------
``weights.safetensors`` holds the state dict (tensors only, never pickle); ``model.json`` holds
:class:`ModelMeta` (architecture name and version, cube size, channels, training voxel size,
intensity normalisation, training config, metrics, package version) and the SHA-256 of the
weights file. Both are written atomically (temporary file + ``os.replace``), weights first, so an
interrupted save leaves either the old model or a sha mismatch that :func:`load_model` refuses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from membrain_dist.errors import InputError

__all__ = [
    "ARCHITECTURE",
    "ARCHITECTURE_VERSION",
    "MemBrainCNN",
    "MemBrainEnsemble",
    "ModelMeta",
    "save_model",
    "load_model",
    "package_version",
    "INPUT_TRANSFORMS",
    "check_input_transform",
]

log = logging.getLogger(__name__)

ARCHITECTURE = "membrain-cnn"
ARCHITECTURE_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
META_FILE = "model.json"
#: relative voxel-size difference above which :func:`load_model` refuses a model
VOXEL_SIZE_RTOL = 0.05
DEFAULT_NORMALISATION = (
    "per-tomogram robust z-score (membranes bright), clipped at +-3; "
    "cubes rotation-normalised with cube axis 0 along the membrane normal"
)


#: cube input transforms a model may declare (``ModelMeta.input_transform["kind"]``):
#: ``cube_minmax`` rescales each cube to [0, 1] (after negating it when ``invert`` is true), as
#: MemBrain v1's training did (``membrain_dist.v1``); an empty dict is the identity
INPUT_TRANSFORMS = ("cube_minmax",)


def check_input_transform(spec: dict[str, Any]) -> dict[str, Any]:
    """Validate an input-transform spec (``{}`` or ``{"kind": "cube_minmax", "invert": bool}``);
    returns it as a plain dict, raises ``ValueError``."""
    if not isinstance(spec, dict):
        raise ValueError(f"input_transform must be an object, got {spec!r}")
    if not spec:
        return {}
    if spec.get("kind") not in INPUT_TRANSFORMS or set(spec) - {"kind", "invert"} \
            or not isinstance(spec.get("invert", False), bool):
        raise ValueError(f"unknown input_transform {spec!r}; known: {{}} or "
                         f'{{"kind": "cube_minmax", "invert": true|false}}')
    return {"kind": spec["kind"], "invert": bool(spec.get("invert", False))}


class CubeMinMax(nn.Module):
    """Per-cube rescaling to [0, 1] (``(x - min) / (max - min)``, optionally of ``-x``); a
    constant cube maps to 0. Parameter-free: the state dict is unchanged."""

    def __init__(self, invert: bool = False) -> None:
        super().__init__()
        self.invert = bool(invert)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.invert:
            x = -x
        dims = tuple(range(1, x.dim()))
        lo = x.amin(dim=dims, keepdim=True)
        span = (x.amax(dim=dims, keepdim=True) - lo).clamp_min(1e-12)
        return (x - lo) / span


def package_version() -> str:
    """Installed membrain-dist version, or ``"unknown"``."""
    try:
        from importlib.metadata import version

        return version("membrain-dist")
    except Exception:  # noqa: BLE001 - metadata missing in a source checkout
        return "unknown"


class MemBrainCNN(nn.Module):
    """v1 scoring CNN: 4 x (Conv3d k3 + BatchNorm3d + ReLU), flatten, Linear -> n_classes.

    Parameters
    ----------
    cube_size : int
        Edge ``s`` of the input cubes (voxels); at least 5 (the convolutions remove 4).
    channels : int
        Feature channels of every convolution (v1: 32).
    n_classes : int
        Particle classes, one predicted distance each (default 1).

    ``forward`` takes ``(B, s, s, s)`` or ``(B, 1, s, s, s)`` float32 and returns ``(B,)``
    predicted distances (voxels) for one class, ``(B, n_classes)`` for several.
    """

    def __init__(self, cube_size: int = 12, channels: int = 32,
                 input_transform: dict[str, Any] | None = None, n_classes: int = 1) -> None:
        super().__init__()
        if cube_size < 5:
            raise ValueError(f"cube_size must be >= 5, got {cube_size}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        self.cube_size = int(cube_size)
        self.channels = int(channels)
        self.n_classes = int(n_classes)
        layers: list[nn.Module] = []
        for c_in, pad in ((1, 0), (channels, 1), (channels, 0), (channels, 1)):
            layers += [
                nn.Conv3d(c_in, channels, kernel_size=3, padding=pad),
                nn.BatchNorm3d(channels),
                nn.ReLU(inplace=True),
            ]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels * (cube_size - 4) ** 3, self.n_classes)
        # applied to the cubes before ``features`` (an imported v1 model: its own input scaling)
        self.input_transform = check_input_transform(input_transform or {})
        self.prepare = (CubeMinMax(self.input_transform["invert"]) if self.input_transform
                        else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.unsqueeze(1)
        s = self.cube_size
        if x.dim() != 5 or tuple(x.shape[1:]) != (1, s, s, s):
            raise ValueError(f"expected (B, {s}, {s}, {s}) cubes, got {tuple(x.shape)}")
        out = self.head(self.features(self.prepare(x)).flatten(1))
        return out.squeeze(1) if self.n_classes == 1 else out


class MemBrainEnsemble(nn.Module):
    """The mean prediction of several :class:`MemBrainCNN` of one architecture (a deep
    ensemble: the same data, different seeds), member ``k`` on the cube turned by ``k``
    quarter turns in the plane of the membrane (cube axes 1, 2; axis 0 is the normal).

    The turns are exact symmetries of the training augmentation (``rotation="quarter"``), so
    each member sees a cube as it might have been cut; giving the members different turns
    spreads the ``rotations`` averaging over them: an ensemble of four at ``rotations`` 1 costs
    the four passes one network costs at ``rotations`` 4. Same call signature and output as
    :class:`MemBrainCNN`; ``cube_size``, ``channels``, ``n_classes`` and ``input_transform``
    are the members' (which must agree).
    """

    def __init__(self, members: list[MemBrainCNN]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        first = members[0]
        key = (first.cube_size, first.channels, first.n_classes, first.input_transform)
        for m in members[1:]:
            if (m.cube_size, m.channels, m.n_classes, m.input_transform) != key:
                raise ValueError("ensemble members differ in architecture (cube size, "
                                 "channels, classes or input transform)")
        self.members = nn.ModuleList(members)
        self.cube_size, self.channels, self.n_classes = key[:3]
        self.input_transform = dict(first.input_transform)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.unsqueeze(1)
        out = None
        for k, member in enumerate(self.members):
            xk = torch.rot90(x, k % 4, dims=(3, 4)) if k % 4 else x
            pred = member(xk.contiguous(memory_format=_layout_of(x)))
            out = pred if out is None else out + pred
        return out / len(self.members)


def _layout_of(x: torch.Tensor) -> torch.memory_format:
    """The memory format ``x`` (B, 1, z, y, x) was laid out in: channels-last 3D (the CPU
    inference layout) when its strides are those, else contiguous."""
    return (torch.channels_last_3d if x.is_contiguous(memory_format=torch.channels_last_3d)
            else torch.contiguous_format)


def n_members(model: nn.Module) -> int:
    """Networks averaged by ``model``: its members for an ensemble, else 1."""
    return len(model.members) if isinstance(model, MemBrainEnsemble) else 1


def build_model(cube_size: int, channels: int, input_transform: dict[str, Any] | None = None,
                n_classes: int = 1, members: int = 1) -> MemBrainCNN | MemBrainEnsemble:
    """An untrained network of this architecture: one :class:`MemBrainCNN`, or an ensemble of
    ``members`` of them."""
    nets = [MemBrainCNN(cube_size, channels, input_transform, n_classes)
            for _ in range(members)]
    return nets[0] if members == 1 else MemBrainEnsemble(nets)


@dataclass(frozen=True)
class ModelMeta:
    """What ``model.json`` records about a trained model.

    Attributes
    ----------
    cube_size, channels : int
        Architecture parameters (:class:`MemBrainCNN`).
    voxel_size_A : float or None
        Voxel size (Å) of the training tomograms; inference on other voxel sizes is refused.
    normalisation : str
        How cube intensities were normalised for training (inference must match).
    train_config : dict
        The training configuration (``dataclasses.asdict`` of ``TrainConfig``).
    metrics : dict
        Training outcome (best epoch, validation loss, ...).
    architecture, architecture_version : str, int
        Checked on load.
    membrain_dist_version : str
        Package version that wrote the model.
    weights_sha256 : str
        Hex SHA-256 of ``weights.safetensors``; filled in by :func:`save_model`.
    input_transform : dict
        What the network does to each cube before its first convolution (``{}``: nothing;
        see :data:`INPUT_TRANSFORMS`); taken from the model by :func:`save_model`.
    n_classes : int
        Outputs of the network (taken from the model by :func:`save_model`).
    classes : list of str
        Particle class names, one per output (``[]``: an unnamed single class). Both are left
        out of ``model.json`` at their defaults, so a single-class model's file is as before.
    members : int
        Networks of a :class:`MemBrainEnsemble` (1: one :class:`MemBrainCNN`; left out of
        ``model.json`` then).
    """

    cube_size: int = 12
    channels: int = 32
    voxel_size_A: float | None = None
    normalisation: str = DEFAULT_NORMALISATION
    train_config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    architecture: str = ARCHITECTURE
    architecture_version: int = ARCHITECTURE_VERSION
    membrain_dist_version: str = field(default_factory=package_version)
    weights_sha256: str = ""
    input_transform: dict[str, Any] = field(default_factory=dict)
    n_classes: int = 1
    classes: list[str] = field(default_factory=list)
    members: int = 1

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        if self.n_classes == 1 and not self.classes:
            del data["n_classes"], data["classes"]
        if self.members == 1:
            del data["members"]
        return json.dumps(data, indent=2, sort_keys=True)


def current_umask() -> int:
    """This process's umask, read without changing it where Linux allows (else set and
    restored at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a unique temporary file, fsync and ``os.replace``.

    The file gets the mode of an ordinary new file (0o666 less the umask: 0o644 with the
    usual 022, group-readable), not the 0o600 of a temporary file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(model: MemBrainCNN | MemBrainEnsemble, out_dir: str | os.PathLike[str],
               meta: ModelMeta) -> ModelMeta:
    """Write ``out_dir/weights.safetensors`` and ``out_dir/model.json`` atomically.

    ``cube_size``, ``channels`` and ``weights_sha256`` of ``meta`` are taken from the model and
    the written file. Creates ``out_dir`` if missing. Returns the metadata as written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    blob = st_save(state, metadata={"architecture": ARCHITECTURE, "format": "membrain-dist"})
    meta = dataclasses.replace(
        meta,
        cube_size=model.cube_size,
        channels=model.channels,
        architecture=ARCHITECTURE,
        architecture_version=ARCHITECTURE_VERSION,
        weights_sha256=hashlib.sha256(blob).hexdigest(),
        input_transform=dict(model.input_transform),
        n_classes=model.n_classes,
        classes=list(meta.classes),
        members=n_members(model),
    )
    if meta.classes and len(meta.classes) != model.n_classes:
        raise ValueError(f"{len(meta.classes)} class names for {model.n_classes} outputs")
    atomic_write_bytes(out / WEIGHTS_FILE, blob)
    atomic_write_bytes(out / META_FILE, (meta.to_json() + "\n").encode())
    log.info("model saved to %s (sha256 %s)", out, meta.weights_sha256[:12])
    return meta


def _read_meta(path: Path) -> ModelMeta:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "model metadata file is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(path, f"not a readable JSON file ({e})") from None
    if not isinstance(raw, dict):
        raise InputError(path, "model metadata must be a JSON object")
    if raw.get("architecture") != ARCHITECTURE:
        raise InputError(
            path, f"unknown architecture {raw.get('architecture')!r}, expected {ARCHITECTURE!r}"
        )
    if raw.get("architecture_version") != ARCHITECTURE_VERSION:
        raise InputError(
            path,
            f"unsupported architecture_version "
            f"{raw.get('architecture_version')!r}, expected {ARCHITECTURE_VERSION}",
        )
    names = {f.name for f in dataclasses.fields(ModelMeta)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise InputError(path, f"unknown keys {unknown}")
    try:
        meta = ModelMeta(**raw)
    except TypeError as e:
        raise InputError(path, f"malformed model metadata ({e})") from None
    checks = [
        (isinstance(meta.cube_size, int) and meta.cube_size >= 5, "cube_size must be an int >= 5"),
        (isinstance(meta.channels, int) and meta.channels >= 1, "channels must be an int >= 1"),
        (
            meta.voxel_size_A is None
            or (
                isinstance(meta.voxel_size_A, int | float)
                and math.isfinite(meta.voxel_size_A)
                and meta.voxel_size_A > 0
            ),
            "voxel_size_A must be a positive number or null",
        ),
        (
            isinstance(meta.weights_sha256, str) and len(meta.weights_sha256) == 64,
            "weights_sha256 must be a 64-character hex string",
        ),
        (
            isinstance(meta.train_config, dict) and isinstance(meta.metrics, dict),
            "train_config and metrics must be objects",
        ),
        (
            isinstance(meta.n_classes, int) and meta.n_classes >= 1
            and isinstance(meta.classes, list)
            and all(isinstance(c, str) for c in meta.classes)
            and len(meta.classes) in (0, meta.n_classes),
            "n_classes must be an int >= 1 and classes a list of that many names (or [])",
        ),
        (isinstance(meta.members, int) and meta.members >= 1, "members must be an int >= 1"),
    ]
    for ok, problem in checks:
        if not ok:
            raise InputError(path, problem)
    try:
        check_input_transform(meta.input_transform)
    except ValueError as e:
        raise InputError(path, str(e)) from None
    return meta


def load_model(
    model_dir: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    expected_cube_size: int | None = None,
    voxel_size_A: float | None = None,
) -> tuple[MemBrainCNN | MemBrainEnsemble, ModelMeta]:
    """Load a model directory written by :func:`save_model`, refusing anything doubtful.

    Raises :class:`~membrain_dist.errors.InputError` naming the offending file when a file is
    missing, ``model.json`` is malformed or names an unknown architecture/version, the weights'
    SHA-256 differs from the recorded one (tampered or half-written), the tensor names or shapes
    do not match the architecture, the cube size differs from ``expected_cube_size``, or the
    training voxel size differs from ``voxel_size_A`` by more than 5 %. The weights are parsed by
    safetensors (no unpickling). Returns the model in eval mode on ``device`` (``"auto"``: CUDA
    when available) and its metadata.
    """
    d = Path(model_dir)
    meta_path, weights_path = d / META_FILE, d / WEIGHTS_FILE
    if not d.is_dir():
        raise InputError(d, "model directory does not exist")
    meta = _read_meta(meta_path)
    if expected_cube_size is not None and meta.cube_size != expected_cube_size:
        raise InputError(
            meta_path,
            f"model was trained on {meta.cube_size}^3 cubes, the data has {expected_cube_size}^3",
        )
    if voxel_size_A is not None and meta.voxel_size_A is not None:
        rel = abs(meta.voxel_size_A - voxel_size_A) / meta.voxel_size_A
        if rel > VOXEL_SIZE_RTOL:
            raise InputError(
                meta_path,
                f"model was trained at {meta.voxel_size_A:.4g} Å/voxel, "
                f"the data has {voxel_size_A:.4g} Å/voxel",
            )
    try:
        blob = weights_path.read_bytes()
    except FileNotFoundError:
        raise InputError(weights_path, "weights file is missing") from None
    except OSError as e:
        raise InputError(weights_path, f"cannot read weights ({e})") from None
    digest = hashlib.sha256(blob).hexdigest()
    if digest != meta.weights_sha256:
        raise InputError(
            weights_path,
            f"sha256 {digest[:12]}... does not match model.json's "
            f"{meta.weights_sha256[:12]}... (modified or incomplete file)",
        )
    try:
        state = st_load(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise InputError(weights_path, f"not a valid safetensors file ({e})") from None
    model = build_model(meta.cube_size, meta.channels, meta.input_transform, meta.n_classes,
                        meta.members)
    want = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    got = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    if want != got:
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
        raise InputError(
            weights_path,
            f"tensors do not match {ARCHITECTURE} "
            f"(cube {meta.cube_size}, {meta.channels} channels, {meta.members} member(s)): "
            f"missing {missing}, "
            f"unexpected {extra}, wrong shape/dtype {wrong}",
        )
    model.load_state_dict(state, strict=True)
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    log.debug(
        "loaded model %s (cube %d, %d channels) on %s", d, meta.cube_size, meta.channels, device
    )
    return model, meta
