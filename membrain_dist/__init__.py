"""membrain-dist: MemBrain (Lamm et al. 2022) as a distributed pipeline over chunked arrays.

Stages (one module each): :mod:`~membrain_dist.sampling`, :mod:`~membrain_dist.normals`,
:mod:`~membrain_dist.extraction`, :mod:`~membrain_dist.model`, :mod:`~membrain_dist.clustering`,
:mod:`~membrain_dist.orientation`, :mod:`~membrain_dist.evaluation`; file formats in
:mod:`~membrain_dist.mrc`, :mod:`~membrain_dist.star`, :mod:`~membrain_dist.manifest`; the
campaign store in :mod:`~membrain_dist.store`. Heavy modules are imported on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "InputError"]

from .errors import InputError  # noqa: E402
