"""The CNN's shapes and its model directory: bit-exact round trip, refusals naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from membrain_dist.errors import InputError
from membrain_dist.model import MemBrainCNN, MemBrainEnsemble, ModelMeta, load_model, save_model


def _model(cube: int = 12, channels: int = 4, seed: int = 0) -> MemBrainCNN:
    torch.manual_seed(seed)
    m = MemBrainCNN(cube, channels)
    # non-trivial BatchNorm statistics so the buffers matter for the round trip
    with torch.no_grad():
        m.train()(torch.randn(8, cube, cube, cube))
    return m.eval()


def test_architecture_shapes_and_v1_layout():
    m = MemBrainCNN()
    convs = [l for l in m.features if isinstance(l, torch.nn.Conv3d)]
    assert [c.padding for c in convs] == [(0, 0, 0), (1, 1, 1), (0, 0, 0), (1, 1, 1)]
    assert [c.out_channels for c in convs] == [32] * 4
    assert sum(isinstance(l, torch.nn.BatchNorm3d) for l in m.features) == 4
    assert m.head.in_features == 32 * 8**3
    out = m.eval()(torch.zeros(3, 12, 12, 12))
    assert out.shape == (3,)
    assert m(torch.zeros(2, 1, 12, 12, 12)).shape == (2,)
    with pytest.raises(ValueError):
        m(torch.zeros(2, 10, 10, 10))


def test_round_trip_is_bit_exact(tmp_path: Path):
    m = _model()
    meta = save_model(
        m,
        tmp_path / "model",
        ModelMeta(voxel_size_A=14.08, train_config={"lr": 1e-4}, metrics={"best_val_loss": 0.3}),
    )
    assert (tmp_path / "model" / "weights.safetensors").is_file()
    assert len(meta.weights_sha256) == 64
    m2, meta2 = load_model(tmp_path / "model", expected_cube_size=12, voxel_size_A=14.0)
    assert meta2 == meta and meta2.channels == 4 and meta2.voxel_size_A == 14.08
    sd1, sd2 = m.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert sd1[k].dtype == sd2[k].dtype and torch.equal(sd1[k], sd2[k]), k
    x = torch.randn(16, 12, 12, 12)
    with torch.inference_mode():
        assert torch.equal(m(x), m2(x))
    assert not m2.training
    assert not list(tmp_path.glob("model/*.tmp"))


def test_tampered_weights_refused(tmp_path: Path):
    save_model(_model(), tmp_path, ModelMeta())
    w = tmp_path / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0x01  # one bit in the last tensor's data
    w.write_bytes(bytes(data))
    with pytest.raises(InputError, match="sha256") as e:
        load_model(tmp_path)
    assert e.value.path == str(w)


def _edit_json(path: Path, **changes: object) -> None:
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def test_incompatible_model_json_refused(tmp_path: Path):
    save_model(_model(), tmp_path, ModelMeta(voxel_size_A=14.0))
    meta_path = tmp_path / "model.json"
    with pytest.raises(InputError, match="12\\^3") as e:
        load_model(tmp_path, expected_cube_size=16)
    assert e.value.path == str(meta_path)
    with pytest.raises(InputError, match="Å/voxel"):
        load_model(tmp_path, voxel_size_A=7.0)

    # a json claiming another cube size no longer matches the stored tensors
    _edit_json(meta_path, voxel_size_A=None, cube_size=10)
    with pytest.raises(InputError, match="tensors do not match") as e:
        load_model(tmp_path)
    assert e.value.path == str(tmp_path / "weights.safetensors")

    _edit_json(meta_path, cube_size=12, architecture="membrain-v2-transformer")
    with pytest.raises(InputError, match="unknown architecture") as e:
        load_model(tmp_path)
    assert e.value.path == str(meta_path)

    _edit_json(meta_path, architecture="membrain-cnn", architecture_version=99)
    with pytest.raises(InputError, match="architecture_version"):
        load_model(tmp_path)

    meta_path.write_text("{not json")
    with pytest.raises(InputError, match="JSON") as e:
        load_model(tmp_path)
    assert e.value.path == str(meta_path)


def test_missing_files_refused(tmp_path: Path):
    with pytest.raises(InputError, match="does not exist"):
        load_model(tmp_path / "nope")
    save_model(_model(), tmp_path, ModelMeta())
    (tmp_path / "weights.safetensors").unlink()
    with pytest.raises(InputError, match="missing") as e:
        load_model(tmp_path)
    assert e.value.path == str(tmp_path / "weights.safetensors")
    (tmp_path / "model.json").unlink()
    with pytest.raises(InputError, match="missing") as e:
        load_model(tmp_path)
    assert e.value.path == str(tmp_path / "model.json")


def test_weights_with_wrong_channels_refused(tmp_path: Path):
    # a consistent (sha-correct) directory whose tensors belong to another width
    save_model(_model(channels=4), tmp_path / "a", ModelMeta())
    save_model(_model(channels=8), tmp_path / "b", ModelMeta())
    raw = json.loads((tmp_path / "b" / "model.json").read_text())
    raw["channels"] = 4
    (tmp_path / "b" / "model.json").write_text(json.dumps(raw))
    with pytest.raises(InputError, match="tensors do not match"):
        load_model(tmp_path / "b")


def test_ensemble_is_the_mean_of_its_members_on_their_quarter_turns(tmp_path: Path):
    members = [_model(seed=k) for k in range(3)]
    ens = MemBrainEnsemble(members).eval()
    x = torch.randn(5, 12, 12, 12)
    with torch.inference_mode():
        # member k sees the cube turned k times about axis 0 (the normal), in the y-x plane
        want = sum(m(torch.rot90(x, k, dims=(2, 3))) for k, m in enumerate(members)) / 3
        assert torch.allclose(ens(x), want, atol=1e-6)
        assert not torch.allclose(ens(x), sum(m(x) for m in members) / 3, atol=1e-4)
    meta = save_model(ens, tmp_path / "ens", ModelMeta(voxel_size_A=10.0))
    assert meta.members == 3 and json.loads(meta.to_json())["members"] == 3
    assert "members" not in json.loads(save_model(members[0], tmp_path / "one",
                                                  ModelMeta()).to_json())
    back, meta2 = load_model(tmp_path / "ens")
    assert isinstance(back, MemBrainEnsemble) and meta2 == meta
    with torch.inference_mode():
        assert torch.equal(back(x), ens(x))
    # a file claiming another number of members is refused, naming the weights
    raw = json.loads((tmp_path / "ens" / "model.json").read_text())
    (tmp_path / "ens" / "model.json").write_text(json.dumps({**raw, "members": 2}))
    with pytest.raises(InputError, match="weights.safetensors.*2 member"):
        load_model(tmp_path / "ens")
    with pytest.raises(ValueError, match="differ in architecture"):
        MemBrainEnsemble([_model(channels=4), _model(channels=8)])
