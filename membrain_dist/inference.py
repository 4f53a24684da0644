"""Batched inference: one predicted distance per cube, one model load per worker process.

Cubes are read batch by batch (a slice of a numpy array or of a ``zarr.Array``), so a
membrane's cubes never need to fit in memory at once; with a zarr array the batch size is rounded
to a multiple of its chunk length along axis 0 so each chunk is decoded once. On CUDA the batch
goes through pinned host memory with a non-blocking copy, so reading/decoding the next batch
overlaps the GPU's work on the current one, and predictions stay on the GPU until the end (one
synchronisation per call).

The model is prepared for inference once per process, model and device while its weights
stay the same (:func:`prepared_model`, :func:`inference_model`): every Conv3d + BatchNorm3d
pair is folded into one convolution (eval-mode BatchNorm is an affine map per channel), and on
the CPU weights and inputs use the channels-last (NDHWC) layout, for which torch's CPU
convolutions are fastest: together 1.8x the cubes/s of the plain model at batch 1024 on one
core of this project's 2-core machine. With passes of 256 cubes (see ``DEFAULT_BATCH``) the
inference stage of ``benchmarks/scale.py`` ran at 1,805-2,045 cubes/s per core (16 channels;
two full runs), against ~780 before. On the CPU the folded feature stack is then compiled by
TorchScript for inference (:func:`scripted_features`: oneDNN convolutions with their ReLUs
fused, activations in oneDNN's layout between layers), 1.15-1.3x again.

Turn cascade (``refine_below``): averaging 4 quarter turns costs 4 passes per cube, but
only points that score below the clustering threshold are clustered, and on real-SNR data a
few percent do. With cutoffs, every cube gets one pass and only cubes whose first pass lies
below a cutoff (the threshold plus ``InferenceConfig.refine_margin``) get the other turns;
a refined cube's score is the full mean (up to round-off), the others keep their first pass.

Threads: torch keeps one process-wide intra-op thread pool. Inside a dask worker,
:func:`configure_threads` sets it to the worker's ``nthreads`` (the cores the worker was started
with; dask's nanny otherwise sets ``OMP_NUM_THREADS=1`` and torch would use a single core).
Outside dask the torch default (all cores) is kept unless a number is given.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import os
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from membrain_dist.config import PRECISIONS, check_rotations
from membrain_dist.model import META_FILE, WEIGHTS_FILE, MemBrainCNN, ModelMeta, load_model

__all__ = [
    "resolve_device",
    "resolve_precision",
    "configure_threads",
    "get_model",
    "default_batch_size",
    "inference_model",
    "prepared_model",
    "scripted_features",
    "predict_distances",
    "predict_points",
    "cut_cubes_torch",
]

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; others are validated.

    Raises ``ValueError`` for ``"cuda"`` when no GPU is available.
    """
    d = str(device)
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {d!r} requested but torch sees no CUDA device")
    torch.device(d)  # raises on nonsense
    return d


def native_bfloat16(device: str | torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: on the CPU, AVX512-BF16 or AMX (oneDNN's
    bfloat16 convolutions; without them bfloat16 is emulated and slower than float32), on
    CUDA, a GPU that supports it. Asked of the hardware once per process and device (training
    asks it every batch)."""
    return _native_bfloat16(str(torch.device(device)))


@functools.cache
def _native_bfloat16(device: str) -> bool:
    dev = torch.device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    checks = [getattr(torch.cpu, f, None) for f in ("_is_avx512_bf16_supported",
                                                     "_is_amx_tile_supported")]
    try:
        return any(bool(c()) for c in checks if c is not None)
    except RuntimeError:  # a probe torch cannot answer: not native
        return False


def resolve_precision(precision: str, device: str | torch.device) -> torch.dtype:
    """The dtype of the CNN's forward passes (``InferenceConfig.precision``) on ``device``:
    ``float32``, ``bfloat16``, or for ``auto`` bfloat16 where :func:`native_bfloat16`, else
    float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if native_bfloat16(device) else torch.float32
    return torch.bfloat16 if precision == "bfloat16" else torch.float32


def _dask_worker_threads() -> int | None:
    try:
        from distributed import get_worker

        return int(get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        return None


def configure_threads(num_threads: int | None = None) -> int:
    """Size torch's intra-op thread pool; returns the thread count in use.

    ``num_threads`` wins when given; else inside a dask worker the worker's ``nthreads``;
    else torch's current setting is left alone.
    """
    n = num_threads if num_threads is not None else _dask_worker_threads()
    if n is not None and n >= 1 and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


@functools.lru_cache(maxsize=4)
def _cached_model(path: str, stamp: tuple[int, ...], device: str) -> tuple[MemBrainCNN, ModelMeta]:
    del stamp  # part of the cache key only: a rewritten model directory is reloaded
    return load_model(path, device=device)


def get_model(
    model_dir: str | os.PathLike[str], device: str = "auto"
) -> tuple[MemBrainCNN, ModelMeta]:
    """Load a model directory once per process (per path, file mtimes and device).

    A dask worker running many inference tasks reads and verifies the model once; a model
    rewritten in place (new mtime) is loaded again. Treat the returned model as read-only.
    Raises :class:`~membrain_dist.errors.InputError` like :func:`~membrain_dist.model.load_model`.
    """
    path = Path(model_dir).resolve()
    stamp = tuple(
        (path / f).stat().st_mtime_ns if (path / f).exists() else -1
        for f in (META_FILE, WEIGHTS_FILE)
    )
    return _cached_model(str(path), stamp, resolve_device(device))


#: cubes per forward pass when none is given. CPU: 256 keeps a pass's activations (16 channels
#: x 10^3 voxels x 4 B per cube: 16 MB) under the dask workers' 32 MiB mmap threshold
#: (``flows.runtime.MALLOC_ENV``); at 1024 every pass maps and faults in fresh pages (1,231 vs
#: 1,882 cubes/s on one core, a quarter of the time in the kernel). GPU: thousands.
DEFAULT_BATCH = {"cpu": 256, "cuda": 4096}


def default_batch_size(device: str | torch.device) -> int:
    """Cubes per forward pass on ``device`` when the configuration leaves it open."""
    return DEFAULT_BATCH.get(torch.device(device).type, DEFAULT_BATCH["cpu"])


#: most cubes read at once for a turn cascade (``refine_below``)
REFINE_READ = 16384


def _read_size_for(cubes: Any, batch_size: int) -> int:
    """Cubes read at once: ``batch_size`` rounded up to whole zarr chunks along axis 0."""
    chunks = getattr(cubes, "chunks", None)
    if isinstance(chunks, tuple) and chunks and isinstance(chunks[0], int) and chunks[0] > 0:
        c = chunks[0]
        return c * max(1, -(-batch_size // c))
    return batch_size


def memory_layout(device: str | torch.device) -> torch.memory_format:
    """Layout of 5D cube batches and weights: channels-last 3D on the CPU (oneDNN's fast path:
    1.8x for folded inference, 1.25-1.3x for training of the 16-channel network on 2 cores),
    cuDNN's default contiguous layout on CUDA."""
    return torch.contiguous_format if torch.device(device).type == "cuda" else torch.channels_last_3d


def inference_model(model: nn.Module, device: str | torch.device = "cpu",
                    script: bool | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An eval-mode copy of ``model`` on ``device`` with each Conv3d + BatchNorm3d folded into
    one Conv3d, channels-last on the CPU, its weights in ``dtype`` (folded in float32 first),
    and (``script``, default: on the CPU) the feature stack of each :class:`MemBrainCNN` in
    it compiled by TorchScript for inference (:func:`scripted_features`). Same outputs up to
    round-off (of float32, or of ``dtype``); ``model`` is left untouched. It takes inputs in
    ``dtype`` (:func:`model_dtype`). Modules other than Conv3d -> BatchNorm3d pairs are kept
    as they are.
    """
    dev = torch.device(device)
    m = copy.deepcopy(model).eval()
    for parent in list(m.modules()):
        names = list(parent._modules)
        for a, b in zip(names, names[1:], strict=False):
            conv, bn = parent._modules[a], parent._modules[b]
            if isinstance(conv, nn.Conv3d) and isinstance(bn, nn.BatchNorm3d):
                parent._modules[a] = fuse_conv_bn_eval(conv, bn)
                parent._modules[b] = nn.Identity()
    m = m.to(dev, dtype).to(memory_format=memory_layout(dev))
    if dev.type == "cpu" if script is None else script:
        for net in [x for x in m.modules() if isinstance(x, MemBrainCNN)]:
            net.features = scripted_features(net.features, net.cube_size, dev, dtype)
    return m


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype ``model``'s weights (and so its inputs) are in."""
    return next(model.parameters()).dtype


def scripted_features(features: nn.Module, cube_size: int,
                      device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> nn.Module:
    """``features`` (eval mode, folded) traced, frozen and optimised for inference by
    TorchScript (``torch.jit.optimize_for_inference``): on the CPU oneDNN runs each
    convolution with its ReLU fused and keeps the activations in its own blocked layout
    between layers, instead of a separate pass over each 16 MB activation. 1.15-1.3x the
    cubes/s of the eager folded stack through :func:`predict_distances` (16 channels, 1 or 2
    threads; 1.30x in a dask worker), the same outputs up to round-off, any batch size.
    Tracing takes ~0.6 s, so prepared models are kept (:func:`prepared_model`). The module
    as it was where tracing fails."""
    dev = torch.device(device)
    example = torch.zeros((2, 1, cube_size, cube_size, cube_size), device=dev, dtype=dtype)
    try:
        with torch.no_grad():
            traced = torch.jit.trace(features, example.contiguous(memory_format=memory_layout(dev)))
            return torch.jit.optimize_for_inference(torch.jit.freeze(traced))
    except Exception as exc:  # noqa: BLE001 - an optimisation: fall back to eager
        log.debug("TorchScript inference optimisation failed (%s): eager features", exc)
        return features


_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weights_digest(model: nn.Module) -> bytes:
    """Digest of every parameter and buffer of ``model`` (a changed weight: a new digest)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.digest()


def prepared_model(model: nn.Module, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> nn.Module:
    """:func:`inference_model` of ``model``, kept per model object, device and dtype while its
    weights stay the same (a worker scores many parts with one model: it is prepared once)."""
    key = (str(torch.device(device)), dtype)
    digest = _weights_digest(model)
    per_device = _PREPARED.setdefault(model, {})
    hit = per_device.get(key)
    if hit is not None and hit[0] == digest:
        return hit[1]
    prepared = inference_model(model, key[0], dtype=dtype)
    per_device[key] = (digest, prepared)
    return prepared


def predict_distances(
    model: nn.Module,
    cubes: Any,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    rotations: int = 1,
    refine_below: Sequence[float] = (),
    precision: str = "float32",
) -> np.ndarray:
    """Predicted distance (voxels) from each cube's centre to the nearest particle centre.

    Parameters
    ----------
    model : nn.Module
        A :class:`~membrain_dist.model.MemBrainCNN`; left as it is (an eval-mode copy with
        BatchNorm folded in runs, :func:`inference_model`).
    cubes : (N, s, s, s) array-like
        numpy array, ``zarr.Array`` or anything sliceable along axis 0 to numpy; float32
        rotation-normalised cubes, axis 0 along the normal. Read one batch at a time.
    batch_size : int or None
        Cubes per forward pass (None: :func:`default_batch_size` of the device). A zarr array
        is read in whole chunks along axis 0 and fed in passes of this size.
    device : str
        ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``.
    rotations : int
        Average the predictions of this many quarter turns (1, 2 or 4) of each cube about
        cube axis 0, the membrane normal, or (8) of the four turns of the cube and of its
        mirror image across the cube's y-z plane (``InferenceConfig.rotations``); the
        training augmentation draws the same turns and flips.
    refine_below : sequence of float
        Distances (voxels; one for every class, or one per class): with ``rotations > 1``
        only cubes whose first pass predicts below it get the other turns, the rest keep
        the first pass (``InferenceConfig.refine_margin``). Empty (default): every cube gets
        every turn.
    precision : str
        ``float32`` (default), ``bfloat16`` or ``auto`` (:func:`resolve_precision`): the
        dtype of the forward passes; the turns are averaged and returned in float32.

    Returns
    -------
    (N,) float32 numpy array; (N, C) for a model with ``C > 1`` classes (``n_classes``).
    """
    check_rotations(rotations)
    dev = torch.device(resolve_device(device))
    batch_size = _batch_size(batch_size, dev)
    n = int(cubes.shape[0])
    model = prepared_model(model, dev, resolve_precision(precision, dev))
    cuda = dev.type == "cuda"
    layout = memory_layout(dev)
    cutoffs = _refine_cutoffs(refine_below, dev)
    # a cascade reads several passes at once, so the refined cubes of a block fill passes
    read = batch_size if cutoffs is None or rotations == 1 else max(
        batch_size, min(8 * batch_size, REFINE_READ))
    step = _read_size_for(cubes, read)
    n_classes = int(getattr(model, "n_classes", 1))
    out = torch.empty((n,) if n_classes == 1 else (n, n_classes), dtype=torch.float32,
                      device=dev)
    with torch.inference_mode():
        for start in range(0, n, step):
            block = torch.from_numpy(
                np.ascontiguousarray(cubes[start : start + step], dtype=np.float32))
            if cuda:
                block = block.pin_memory().to(dev, non_blocking=True)
            _score(model, block, rotations, layout, batch_size, cutoffs,
                   out[start : start + len(block)])
    result = out.cpu().numpy()
    log.debug("predicted %d cubes on %s in passes of %d", n, dev, batch_size)
    return result


def _batch_size(batch_size: int | None, dev: torch.device) -> int:
    batch_size = default_batch_size(dev) if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return batch_size


def _forward(model: nn.Module, cubes: torch.Tensor, rotations: int,
             layout: torch.memory_format) -> torch.Tensor:
    """Mean prediction (B,) or (B, C) over ``rotations`` turns (and mirror images) of cubes
    (B, s, s, s)."""
    x = cubes.unsqueeze(1).to(model_dtype(model)).contiguous(memory_format=layout)
    return _add_turns(model, x, range(1, rotations), layout, model(x).float()) / rotations


def _add_turns(model: nn.Module, x: torch.Tensor, turns: range,
               layout: torch.memory_format, acc: torch.Tensor) -> torch.Tensor:
    """``acc`` plus the predictions for turns ``k`` of ``x`` (B, 1, s, s, s): ``k`` quarter
    turns in the y-x plane, of the mirror image (across x) for ``k`` 4-7."""
    for k in turns:
        xk = x if k < 4 else torch.flip(x, dims=(4,))
        xr = torch.rot90(xk, k % 4, dims=(3, 4)).contiguous(memory_format=layout)
        acc += model(xr).float()
    return acc


def _refine_cutoffs(refine_below: Sequence[float], dev: torch.device) -> torch.Tensor | None:
    """``refine_below`` as a tensor that broadcasts against predictions (B,) or (B, C), or
    None when every cube gets every turn."""
    if not len(refine_below):
        return None
    return torch.tensor([float(t) for t in refine_below], dtype=torch.float32, device=dev)


def _score(model: nn.Module, cubes: torch.Tensor, rotations: int, layout: torch.memory_format,
           batch_size: int, cutoffs: torch.Tensor | None, out: torch.Tensor) -> None:
    """Write the predictions of cubes (n, s, s, s) into ``out`` ((n,) or (n, C)), in passes
    of ``batch_size``.

    With ``cutoffs`` (per class, or one for all) the turns are a cascade: every cube gets
    the first pass, and only a cube whose first pass lies below its cutoff for some class
    gets the other ``rotations - 1`` turns (in passes of ``batch_size`` over those cubes);
    the others keep the first pass. A refined cube's prediction is the full mean: the same
    sum in the same order, of passes over other batches (equal up to round-off)."""
    cascade = cutoffs is not None and rotations > 1
    for s in range(0, cubes.shape[0], batch_size):
        out[s : s + batch_size] = _forward(model, cubes[s : s + batch_size],
                                           1 if cascade else rotations, layout)
    if not cascade:
        return
    if out.dim() > 1 and cutoffs.numel() not in (1, out.shape[1]):
        raise ValueError(f"{cutoffs.numel()} refinement cutoffs for {out.shape[1]} classes")
    low = out < cutoffs
    rows = torch.nonzero(low.any(dim=1) if low.dim() > 1 else low).squeeze(1)
    for s in range(0, rows.numel(), batch_size):
        r = rows[s : s + batch_size]
        x = cubes[r].unsqueeze(1).to(model_dtype(model)).contiguous(memory_format=layout)
        out[r] = _add_turns(model, x, range(1, rotations), layout, out[r]) / rotations


def cut_cubes_torch(block: torch.Tensor, points: torch.Tensor, frames: torch.Tensor,
                    size: int) -> torch.Tensor:
    """Trilinear cubes ``(B, s, s, s)`` of ``block`` (z, y, x) on its own device.

    ``points`` (B, 3) are zyx in block voxel coordinates, ``frames`` (B, 3, 3) the cube frames
    (columns u, v, n, zyx), as :func:`membrain_dist.extraction.extract_batches` takes them;
    sample positions are clamped to the block (its ``mode="nearest"``) and interpolated by
    ``grid_sample``: on a GPU the cubes are cut where they are scored, from a block copied
    once, instead of being cut on the host and copied cube by cube. Equals the host's
    trilinear cubes up to float32 round-off of the normalised grid."""
    import torch.nn.functional as F

    dt, dev = block.dtype, block.device
    o = torch.arange(size, dtype=dt, device=dev) - (size - 1) / 2
    u, v, n = frames[:, :, 0], frames[:, :, 1], frames[:, :, 2]
    coords = (points[:, None, None, None, :] + n[:, None, None, None, :] * o[:, None, None, None]
              + v[:, None, None, None, :] * o[None, :, None, None]
              + u[:, None, None, None, :] * o[None, None, :, None])  # (B, s, s, s, zyx)
    dims = torch.tensor(block.shape, dtype=dt, device=dev)
    coords = torch.minimum(coords.clamp_min(0), dims - 1)
    grid = 2 * coords / (dims - 1).clamp_min(1) - 1
    b = points.shape[0]
    grid = grid.flip(-1).reshape(1, b * size, size, size, 3)  # grid_sample wants x, y, z
    out = F.grid_sample(block[None, None], grid, mode="bilinear", padding_mode="border",
                        align_corners=True)
    return out.reshape(b, size, size, size)


def predict_points(
    model: nn.Module,
    read_volume: Any,
    shape_zyx: tuple[int, int, int],
    points: np.ndarray,
    normals: np.ndarray,
    *,
    size: int = 12,
    intensity: Any = None,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    rotations: int = 1,
    read_points: int = 16384,
    refine_below: Sequence[float] = (),
    precision: str = "float32",
) -> np.ndarray:
    """Predicted distance (N,) of every point, its cube cut on ``device`` (``cut_cubes_torch``).

    The tomogram is read block by block as the host extraction reads it
    (:func:`membrain_dist.extraction.batch_blocks`, ``read_points`` points per block,
    normalised with ``intensity``); each block goes to the device once and its cubes are cut
    and scored there in passes of ``batch_size``. Trilinear only (``GeometryConfig.order`` 1).
    Same predictions as cutting on the host and :func:`predict_distances` (``refine_below``
    and ``precision`` as there, per pass of ``batch_size``), up to round-off."""
    from membrain_dist.extraction import batch_blocks

    check_rotations(rotations)
    dev = torch.device(resolve_device(device))
    batch_size = _batch_size(batch_size, dev)
    model = prepared_model(model, dev, resolve_precision(precision, dev))
    layout = memory_layout(dev)
    cutoffs = _refine_cutoffs(refine_below, dev)
    n, n_classes = int(np.asarray(points).shape[0]), int(getattr(model, "n_classes", 1))
    out = torch.empty((n,) if n_classes == 1 else (n, n_classes), dtype=torch.float32,
                      device=dev)
    with torch.inference_mode():
        for start, block, local, frames in batch_blocks(
                read_volume, shape_zyx, points, normals, size=size, order=1,
                batch_size=read_points, intensity=intensity):
            blk = torch.from_numpy(block).to(dev, non_blocking=True)
            pts = torch.from_numpy(local).to(dev)
            fr = torch.from_numpy(frames).to(dev)
            for s in range(0, pts.shape[0], batch_size):
                cubes = cut_cubes_torch(blk, pts[s : s + batch_size], fr[s : s + batch_size],
                                        size)
                _score(model, cubes, rotations, layout, batch_size, cutoffs,
                       out[start + s : start + s + cubes.shape[0]])
    return out.cpu().numpy()
