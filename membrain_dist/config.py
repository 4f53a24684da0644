"""Pipeline configuration: one dataclass per stage, gathered in :class:`PipelineConfig`.

Each stage module owns its config (``ConvertConfig``, ``GeometryConfig``, ``TrainConfig``,
``ClusterConfig``, ``OrientationConfig``, ``PickConfig``); this module only adds the label and inference
settings and the aggregate, which serialises to JSON (stored with models and results) and
reads overrides from a TOML file with one table per stage::

    [geometry]
    band_width = 12.0
    [cluster]
    score_threshold = 2.5
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .clustering import ClusterConfig
from .convert import ConvertConfig
from .errors import InputError
from .geometry import GeometryConfig
from .orientation import OrientationConfig
from .picks import PickConfig
from .train_config import TrainConfig


@dataclass(frozen=True)
class LabelConfig:
    """How training labels are made (stage 3).

    Attributes
    ----------
    max_distance
        Labels are clipped here (voxels; v1: 7).
    template
        Template MRC of the particle (low-pass density, protein bright, its own frame: x = long
        in-plane axis, z = membrane normal). Gives the Mahalanobis shape; rotated per particle
        when the STAR has angles. None: Euclidean distances (the paper's ablation baseline).
    ellipsoid_radii_zyx
        Alternative to a template: particle semi-axes in voxels (normal, second, long axis).
    annotated_only
        Train only on membranes that carry at least one annotated particle (an unannotated
        membrane may hold unlabelled particles, which would be taught as negatives).
    max_membranes
        Use at most this many annotated membranes (the most populated first): 1 reproduces
        the paper's "one annotated membrane" setting. None: all.
    classes
        Particle class names, one network output each (v1's ``TRAINING_PARTICLE_DISTS``).
        Empty (default): one unnamed class, every annotation counts. Otherwise each
        annotation's class is its ``mbClassName`` (a name of this list) or its
        ``rlnClassNumber`` (1-based into this list) column; annotations of other classes are
        left out (one name: a single-class model of that class from a mixed STAR). Several
        names share one network and one scoring pass; on the hard phantom it picked PSII at
        F1 0.64 where a PSII-only model reached 0.73 (mean of three training seeds, 12
        epochs; ``benchmarks/multiclass.py``): one model per class when accuracy comes first.
    class_templates
        One template MRC per class (as ``template``); empty: ``template`` (or the radii) for
        every class.
    class_radii_zyx
        One ellipsoid (normal, second, long semi-axes, voxels) per class, for classes
        without a template; empty: ``ellipsoid_radii_zyx`` for every class.
    """

    max_distance: float = 7.0
    template: str | None = None
    ellipsoid_radii_zyx: tuple[float, float, float] | None = None
    annotated_only: bool = True
    max_membranes: int | None = None
    classes: tuple[str, ...] = ()
    class_templates: tuple[str, ...] = ()
    class_radii_zyx: tuple[tuple[float, float, float], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "class_templates", tuple(self.class_templates))
        object.__setattr__(self, "class_radii_zyx",
                           tuple(tuple(float(v) for v in r) for r in self.class_radii_zyx))
        n = len(self.classes)
        if len(set(self.classes)) != n:
            raise ValueError(f"class names must differ, got {list(self.classes)}")
        for name in ("class_templates", "class_radii_zyx"):
            if getattr(self, name) and len(getattr(self, name)) != n:
                raise ValueError(f"{name} needs one entry per class ({n}), got "
                                 f"{len(getattr(self, name))}")

    @property
    def n_classes(self) -> int:
        """Network outputs: one per named class, one when none is named."""
        return max(1, len(self.classes))


#: allowed numbers of quarter turns averaged per cube (``InferenceConfig.rotations``)
ROTATIONS = (1, 2, 4, 8)


def check_rotations(rotations: int) -> None:
    """ValueError unless ``rotations`` is one of :data:`ROTATIONS`."""
    if rotations not in ROTATIONS:
        raise ValueError(f"rotations must be one of {ROTATIONS}, got {rotations}")


#: ``InferenceConfig.precision`` values
PRECISIONS = ("float32", "bfloat16", "auto")


@dataclass(frozen=True)
class InferenceConfig:
    """Batched CNN inference.

    Attributes
    ----------
    batch_size
        Cubes per forward pass; None: 256 on a CPU, 4096 on a GPU
        (``inference.default_batch_size``).
    device
        ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
    rotations
        Quarter turns of each cube about the membrane normal whose predictions are averaged:
        1 (one pass), 2 (0 and 90 degrees), 4 (default) or 8 (the four turns of the cube and
        of its mirror image). The in-plane angle of a cube is arbitrary (the rotation only
        fixes the normal), so averaging over exact 90-degree turns (no interpolation)
        removes that arbitrariness from the score, at 1x to 8x the inference cost. Saved
        with a model by ``train`` and used by ``predict`` unless given. Measured: F1 0.844
        -> 0.861 (demo) and 0.503 -> 0.547 (hard phantom, one membrane, seed 101) from 1 to
        4; 8 gave 0.512 there, so 4 is the default; with the turn cascade
        (``refine_margin``) 4 turns cost ~1.3 passes per cube on the hard phantom.
    cutter
        Where a scoring task cuts the cubes it scores (when they are not stored): ``host``
        (numpy trilinear, :mod:`membrain_dist.extraction`), ``device`` (``grid_sample`` on the
        inference device, :func:`membrain_dist.inference.predict_points`: on a GPU one block
        copy instead of every cube's) or ``auto`` (default: ``device`` on CUDA, else ``host``).
        Same scores up to float32 round-off; trilinear geometry only (``order`` 1).
    refine_margin
        Turn cascade (voxels; None: off): with ``rotations > 1`` every cube is scored once,
        and only cubes whose first pass lies below the clustering threshold plus this margin
        get the other turns; the others keep the first pass. Only points below the
        threshold are clustered, so the picks are those of every cube at every turn unless
        a cube's first pass is more than the margin above the mean of its turns. Measured on
        the hard phantom's tuning campaign (seed 101, four one-membrane networks, 4 turns):
        margin 1.0 the same held-out F1 for all four (0.511 / 0.588 / 0.649 / 0.570) at 33-38 %
        of the CNN passes; 0.5 moved two of them by 0.003-0.004, 0 by up to 0.02.
    refine_below
        The cascade's cutoffs (voxels; one for every class, or one per class), derived from
        the clustering thresholds and ``refine_margin`` by
        :func:`membrain_dist.pipeline.with_refinement` when a prediction starts; empty:
        every cube gets every turn. Not set by hand.
    screen
        Spatial screen (voxels; None: off): score one point per cube of this size and side
        first, then only the points within this distance of a screened point below the
        cutoffs (``refine_below``, so it needs ``refine_margin``); the others are left
        unscored (NaN, never clustered). :mod:`membrain_dist.screen`. Default 3: on the hard
        phantom's held-out campaigns (seeds 102 / 103, four stored models, 1 and 4 turns) it
        scored 43-48 % of the points, left 0.2-0.4 % of the points below the threshold
        unscored and gave the same F1 (+0.002 on one); ``predict`` end to end on
        300 x 1000 x 1000 took 0.71-0.74x the time at one pass and 0.62x at 4 turns.
    precision
        Arithmetic of the CNN's forward passes: ``auto`` (default: bfloat16 where the device
        computes it natively, a CPU with AVX512-BF16 or AMX or a CUDA GPU that supports it,
        else float32; resolved on each scoring worker,
        :func:`membrain_dist.inference.resolve_precision`), ``float32`` or ``bfloat16``
        (weights and activations in bfloat16, the turns averaged and returned in float32).
        On this project's 2-core Xeon (AMX): 2.3-2.4x the cubes/s of float32 at 4 turns on a
        campaign's cubes, scores 0.004 voxels apart on average (0.03 at most), held-out F1 on
        the hard phantom as in float32 (README, "bfloat16 on the CPU"). bfloat16 rounds a
        score to 1/32 voxel near 5: host-cut cubes are the same to the bit whatever block or
        batch they come from (stored or in memory, any schedule: the same picks), but cubes
        cut on the device (``grid_sample``) differ from the host's by float32 round-off, which
        can move a score by that step and a pick by a few hundredths of a voxel. A campaign
        across devices with and without native bfloat16 mixes the two; give ``float32`` or
        ``bfloat16`` to pin it.
    """

    batch_size: int | None = None
    device: str = "auto"
    rotations: int = 4
    cutter: str = "auto"
    refine_margin: float | None = 1.0
    refine_below: tuple[float, ...] = ()
    screen: float | None = 3.0
    precision: str = "auto"

    def __post_init__(self) -> None:
        check_rotations(self.rotations)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {self.precision!r}")
        if self.cutter not in ("auto", "host", "device"):
            raise ValueError(f"cutter must be auto, host or device, got {self.cutter!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        object.__setattr__(self, "refine_below", tuple(float(t) for t in self.refine_below))
        if self.refine_margin is not None and not self.refine_margin >= 0:
            raise ValueError(f"refine_margin must be >= 0 or None, got {self.refine_margin}")
        if self.screen is not None and not self.screen > 0:
            raise ValueError(f"screen must be > 0 voxels or None, got {self.screen}")

    @property
    def screening(self) -> bool:
        """Whether scoring applies the spatial screen (a cell and the cutoffs it needs)."""
        return self.screen is not None and bool(self.refine_below)


@dataclass(frozen=True)
class PipelineConfig:
    """All stage configurations with the paper's / MemBrain v1's defaults."""

    convert: ConvertConfig = field(default_factory=ConvertConfig)
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    orientation: OrientationConfig = field(default_factory=OrientationConfig)
    picks: PickConfig = field(default_factory=PickConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_overrides(self, section: str, **values: Any) -> PipelineConfig:
        """A copy with ``values`` replaced in one stage's config (None values ignored)."""
        values = {k: v for k, v in values.items() if v is not None}
        if not values:
            return self
        return replace(self, **{section: replace(getattr(self, section), **values)})

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | os.PathLike = "<config>",
                  base: PipelineConfig | None = None) -> PipelineConfig:
        """Build from ``{stage: {field: value}}`` on top of ``base`` (default: the defaults);
        unknown stages or fields are an InputError."""
        cfg = base if base is not None else cls()
        known = {f.name: f for f in fields(cls)}
        for section, values in data.items():
            if section not in known or not isinstance(values, dict):
                raise InputError(source, f"unknown config section [{section}]; "
                                         f"expected one of {sorted(known)}")
            sub = getattr(cfg, section)
            names = {f.name for f in fields(sub)}
            bad = sorted(set(values) - names)
            if bad:
                raise InputError(source, f"[{section}] has unknown keys {bad}; "
                                         f"known: {sorted(names)}")
            values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
            check_types(type(sub), values, source, section)
            try:
                cfg = replace(cfg, **{section: replace(sub, **values)})
            except (TypeError, ValueError) as exc:
                raise InputError(source, f"[{section}]: {exc}") from exc
        return cfg

    @classmethod
    def from_toml(cls, path: str | os.PathLike,
                  base: PipelineConfig | None = None) -> PipelineConfig:
        """The TOML file's values on top of ``base`` (default: the defaults)."""
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InputError(path, f"cannot read config: {exc}") from exc
        return cls.from_dict(data, path, base)


def _matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` (from TOML or JSON) fits the annotation ``tp``."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return (isinstance(value, int | float) and not isinstance(value, bool)
                and math.isfinite(value))
    if tp is str:
        return isinstance(value, str)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, tuple | list):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args,
                                                                                strict=True))
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # an annotation this checker does not know: the dataclass decides


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def check_types(cls: type, values: dict[str, Any], source: str | os.PathLike,
                section: str) -> None:
    """InputError naming ``source`` when a value does not fit its field's annotation
    (``score_threshold = "x"``), before any work uses it."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        tp = hints.get(key)
        if tp is not None and not _matches(value, tp):
            raise InputError(source, f"[{section}] {key} = {value!r}: expected "
                                     f"{_type_name(tp)}")


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild one stage config from its ``asdict`` form (lists back to tuples)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v
                  for k, v in data.items() if k in names})


def _forbid_unknown_keys() -> None:
    """Deployment parameters (``cfg`` of the flows) are validated by pydantic, client side and
    by the Prefect server against the registered JSON schema: with ``extra="forbid"`` that
    schema says ``additionalProperties: false``, so a misspelt key is refused when a run is
    created, not ignored."""
    from pydantic import ConfigDict

    for cls in (ConvertConfig, GeometryConfig, LabelConfig, TrainConfig, InferenceConfig,
                ClusterConfig, OrientationConfig, PickConfig, PipelineConfig):
        cls.__pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[attr-defined]


_forbid_unknown_keys()
