"""Importing MemBrain v1's pretrained checkpoint (membrain_dist.v1, ``import-v1``).

The reference forward pass here is written from v1's published layer list
(CellArchLab/MemBrain ``scripts/MemBrain_model.py``) with ``torch.nn.functional`` on the raw
checkpoint tensors as torch's own ``weights_only`` loader reads them, on v1's axis order
(cube ``[x', y', z']``, normal last), with v1's per-cube [0, 1] scaling.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from membrain_dist.cli import main
from membrain_dist.errors import InputError
from membrain_dist.model import load_model

REPO = Path(__file__).resolve().parents[1]
CKPT = REPO.parent / "shared" / "data" / "membrain-v1" / "Spinach_28mb_PSII.ckpt"
if not CKPT.is_file():  # worktrees live next to main/ and shared/
    CKPT = Path("/work/shared/data/membrain-v1/Spinach_28mb_PSII.ckpt")
needs_ckpt = pytest.mark.skipif(not CKPT.is_file(), reason="v1 checkpoint not available")


def _raw_v1_state() -> dict[str, torch.Tensor]:
    """The checkpoint's tensors via torch's own restricted loader (independent of ours)."""

    def stub(module: str, name: str) -> type:
        return type(name, (), {"__module__": module, "__qualname__": name})

    allowed = [stub("pytorch_lightning.callbacks.early_stopping", "EarlyStopping"),
               stub("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint")]
    with torch.serialization.safe_globals(allowed):
        ck = torch.load(CKPT, map_location="cpu", weights_only=True)
    return ck["state_dict"]


def _v1_forward(sd: dict[str, torch.Tensor], x_v1: torch.Tensor) -> torch.Tensor:
    """v1's MemBrain_model.forward: (B, 1, x, y, z) -> (B, 1)."""
    x = x_v1
    for conv, bn, pad in (("conv1", "batchnorm1", 0), ("conv1b", "batchnorm2", 1),
                          ("conv2", "batchnorm3", 0), ("conv2b", "batchnorm4", 1)):
        x = F.conv3d(x, sd[f"{conv}.weight"], sd[f"{conv}.bias"], padding=pad)
        x = F.batch_norm(x, sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"],
                         sd[f"{bn}.weight"], sd[f"{bn}.bias"], training=False, eps=1e-5)
        x = F.relu(x)
    x = x.reshape(x.shape[0], -1)  # v1: x.view(-1, mlp_fac * 64), C-major over (C, x, y, z)
    return F.linear(x, sd["mlp1.weight"], sd["mlp1.bias"])


def _v1_scale(cubes: torch.Tensor) -> torch.Tensor:
    """v1's __scale_single_subvolume, per cube."""
    flat = cubes.reshape(cubes.shape[0], -1)
    lo = flat.min(1).values[:, None, None, None]
    hi = flat.max(1).values[:, None, None, None]
    return (cubes - lo) / (hi - lo)


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("v1") / "model"
    assert main(["import-v1", str(CKPT), "--out", str(out)]) == 0
    return out


@needs_ckpt
def test_imported_model_matches_v1_forward(imported: Path) -> None:
    """(a) our zyx cubes through the imported model == v1's forward on the same cubes in
    v1's x, y, z order, with v1's preprocessing (membranes dark: our cubes negated)."""
    model, meta = load_model(imported, voxel_size_A=13.68)
    assert meta.voxel_size_A == 13.68 and meta.input_transform == {"kind": "cube_minmax",
                                                                   "invert": True}
    sd = _raw_v1_state()
    gen = torch.Generator().manual_seed(0)
    ours = torch.randn(64, 12, 12, 12, generator=gen).clamp(-3, 3)  # robust z-score, +-3
    ours[:8] += torch.linspace(-2, 2, 12)[:, None, None]  # some structure along the normal
    x_v1 = _v1_scale(-ours).permute(0, 3, 2, 1).unsqueeze(1)  # ours [z,y,x] -> v1 [x,y,z]
    with torch.no_grad():
        want = _v1_forward(sd, x_v1)[:, 0]
        got = model(ours)
    diff = float((got - want).abs().max())
    print(f"max |imported - v1 reference| = {diff:.3g} (outputs {float(want.min()):.2f}.."
          f"{float(want.max()):.2f})")
    assert diff < 1e-5
    # the scoring path (BatchNorm folded, channels-last) agrees too
    from membrain_dist.inference import predict_distances

    fast = predict_distances(model, ours.numpy(), batch_size=32, device="cpu")
    assert np.abs(fast - want.numpy()).max() < 1e-4
    # the check has power: without the axis permutation the outputs differ
    with torch.no_grad():
        unpermuted = _v1_forward(sd, _v1_scale(-ours).unsqueeze(1))[:, 0]
    assert float((unpermuted - want).abs().max()) > 1e-3


@needs_ckpt
def test_imported_model_dir_records_v1_settings(imported: Path) -> None:
    import json

    from membrain_dist.pipeline import model_pipeline_config

    cfg = model_pipeline_config(imported)
    assert cfg.geometry.order == 3 and cfg.labels.max_distance == 7.0
    meta = json.loads((imported / "model.json").read_text())
    hp = meta["train_config"]["hyper_parameters"]
    assert hp["part_dists"] == [["PSII", "UK"]] and hp["loss_fn"] == "Huber"
    with pytest.raises(InputError, match="13.68"):  # voxel-size check applies
        load_model(imported, voxel_size_A=6.84)


class _Payload:
    """Pickles as a call of ``func(*args)``: what a tampered checkpoint would carry."""

    def __init__(self, func, args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _evil_checkpoint(path: Path, marker: Path, how: str) -> None:
    if how == "os.system":
        payload = _Payload(os.system, (f"touch {marker}",))
    else:
        import builtins

        payload = _Payload(builtins.open, (str(marker), "w"))
    sd = {"conv1.weight": torch.zeros(32, 1, 3, 3, 3)}
    torch.save({"state_dict": sd, "hyper_parameters": {"lr": payload}}, path)  # torch zip


@pytest.mark.parametrize("how", ["os.system", "builtins.open"])
def test_malicious_reduce_is_refused_and_never_runs(tmp_path: Path, how: str) -> None:
    """(b) a real torch-zip checkpoint whose pickle calls a payload: refused, exit 2, and
    the payload's marker file is never created."""
    ckpt, marker = tmp_path / "evil.ckpt", tmp_path / "pwned"
    _evil_checkpoint(ckpt, marker, how)
    assert not marker.exists()
    from membrain_dist.v1 import read_checkpoint

    with pytest.raises(InputError, match="refused") as err:
        read_checkpoint(ckpt)
    assert str(ckpt) in str(err.value)
    assert main(["import-v1", str(ckpt), "--out", str(tmp_path / "m")]) == 2
    assert not marker.exists()
    assert not (tmp_path / "m" / "model.json").exists()
    # the payload is live: an unrestricted load would have run it
    live, live_marker = tmp_path / "live.ckpt", tmp_path / "live_marker"
    _evil_checkpoint(live, live_marker, how)
    torch.load(live, weights_only=False)
    assert live_marker.exists()


@needs_ckpt
def test_truncated_checkpoint_exits_2_through_the_cli(tmp_path: Path) -> None:
    """(c) the real CLI in a subprocess: a cut-off file is bad input naming the file."""
    data = CKPT.read_bytes()
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(data[: len(data) // 2])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "membrain_dist.cli", "import-v1", str(bad),
                        "--out", str(tmp_path / "m")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    assert str(bad) in r.stderr and "corrupt" in r.stderr


@needs_ckpt
def test_corrupt_storage_and_wrong_tensors_are_bad_input(tmp_path: Path) -> None:
    import zipfile

    # a flipped byte inside a tensor file: the zip CRC catches it
    data = bytearray(CKPT.read_bytes())
    with zipfile.ZipFile(CKPT) as z:
        info = z.getinfo("archive/data/2")
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + 100] ^= 0xFF
    bad = tmp_path / "flipped.ckpt"
    bad.write_bytes(bytes(data))
    assert main(["import-v1", str(bad), "--out", str(tmp_path / "a")]) == 2
    # a checkpoint whose tensors are not v1's layer list
    sd = dict(_raw_v1_state())
    sd["conv2.weight"] = torch.zeros(32, 32, 5, 5, 5)
    del sd["batchnorm4.running_var"]
    wrong = tmp_path / "wrong.ckpt"
    torch.save({"state_dict": sd}, wrong)
    from membrain_dist.v1 import read_checkpoint, v1_state_dict

    with pytest.raises(InputError, match=r"conv2.weight.*batchnorm4.running_var|missing"):
        v1_state_dict(read_checkpoint(wrong))
    assert main(["import-v1", str(wrong), "--out", str(tmp_path / "b")]) == 2


@needs_ckpt
def test_import_then_predict_sequential_writes_a_star(imported: Path, tmp_path: Path) -> None:
    """(d) import-v1 + predict --sequential on a tiny synthetic campaign (no accuracy claim)."""
    from membrain_dist.synth import SynthConfig, generate_campaign

    manifest = generate_campaign(tmp_path / "data", n_tomos=1, seed=3, n_train=0,
                                 cfg=SynthConfig(shape_zyx=(48, 96, 96)))
    out = tmp_path / "pred"
    rc = main(["predict", "--manifest", str(manifest), "--model", str(imported), "--out",
               str(out), "--sequential", "--device", "cpu"])
    assert rc == 0
    star = out / "synth_000.star"
    assert star.is_file()
    from membrain_dist.star import read_particles

    df = read_particles(star)
    assert {"rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"} <= set(df.columns)
