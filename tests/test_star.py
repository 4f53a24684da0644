import numpy as np
import pandas as pd
import pytest
import starfile
from scipy.spatial.transform import Rotation

from membrain_dist import axes
from membrain_dist.errors import InputError
from membrain_dist.star import (
    particles_frame,
    particles_matrices,
    particles_zyx,
    read_particles,
    write_particles,
)


def test_particle_at_zyx_is_written_as_x_y_z(tmp_path):
    df = particles_frame("tomo", np.array([[3.0, 7.0, 11.0]]), None, (20, 30, 40), 2.0)
    p = tmp_path / "p.star"
    write_particles(p, df)
    raw = starfile.read(p)  # independent reader
    assert (raw["rlnCoordinateX"][0], raw["rlnCoordinateY"][0], raw["rlnCoordinateZ"][0]) == (
        11.0, 7.0, 3.0)
    # RELION 5 centred Å: (x - N/2) * voxel size
    assert raw["rlnCenteredCoordinateXAngst"][0] == pytest.approx((11 - 20) * 2.0)
    assert raw["rlnCenteredCoordinateYAngst"][0] == pytest.approx((7 - 15) * 2.0)
    assert raw["rlnCenteredCoordinateZAngst"][0] == pytest.approx((3 - 10) * 2.0)
    assert list(raw[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].iloc[0]) == [0, 0, 0]
    back = read_particles(p)
    np.testing.assert_array_equal(particles_zyx(back), [[3.0, 7.0, 11.0]])
    assert [x.name for x in tmp_path.iterdir()] == ["p.star"]


def test_round_trip_with_angles_and_extra(tmp_path):
    rng = np.random.default_rng(5)
    n = 50
    zyx = rng.uniform(0, 100, (n, 3)).astype(np.float32)
    m_zyx = axes.matrix_xyz_to_zyx(Rotation.random(n, random_state=7).as_matrix())
    score = rng.random(n).astype(np.float32)
    df = particles_frame("TS_01", zyx, m_zyx, (100, 120, 140), 7.5,
                         extra={"mbScore": score, "mbMembrane": np.arange(n)})
    assert list(df.columns[:10]) == [
        "rlnTomoName", "rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ", "rlnAngleRot",
        "rlnAngleTilt", "rlnAnglePsi", "rlnCenteredCoordinateXAngst",
        "rlnCenteredCoordinateYAngst", "rlnCenteredCoordinateZAngst"]
    p = tmp_path / "r.star"
    write_particles(p, df)
    back = read_particles(p)
    np.testing.assert_allclose(particles_zyx(back), zyx, atol=1e-5)
    np.testing.assert_allclose(particles_matrices(back), m_zyx, atol=1e-5)
    np.testing.assert_allclose(back["mbScore"], score, atol=1e-6)
    np.testing.assert_array_equal(back["mbMembrane"], np.arange(n))
    cen = back[["rlnCenteredCoordinateXAngst", "rlnCenteredCoordinateYAngst",
                "rlnCenteredCoordinateZAngst"]].to_numpy()
    np.testing.assert_allclose(cen, (zyx[:, ::-1] - [70.0, 60.0, 50.0]) * 7.5, atol=1e-3)


def test_matrices_from_angles_have_the_normal_of_conventions():
    df = pd.DataFrame({"rlnTomoName": ["a"], "rlnCoordinateX": [0.0], "rlnCoordinateY": [0.0],
                       "rlnCoordinateZ": [0.0], "rlnAngleRot": [10.0], "rlnAngleTilt": [50.0],
                       "rlnAnglePsi": [-30.0]})
    m = particles_matrices(df)[0]  # zyx columns
    t, p = np.radians(50.0), np.radians(-30.0)
    n_xyz = [-np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)]
    np.testing.assert_allclose(m[:, 2], n_xyz[::-1], atol=1e-6)


def test_multi_block_file_and_tomo_filter(tmp_path):
    p = tmp_path / "relion.star"
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnTomoTiltSeriesPixelSize": [1.35]})
    parts = pd.DataFrame({"rlnTomoName": ["1", "2", "1"], "rlnCoordinateX": [1.0, 2.0, 3.0],
                          "rlnCoordinateY": [4.0, 5.0, 6.0], "rlnCoordinateZ": [7.0, 8.0, 9.0]})
    starfile.write({"optics": optics, "particles": parts}, p)
    df = read_particles(p, tomo_name="1")
    assert list(df["rlnTomoName"]) == ["1", "1"]
    np.testing.assert_array_equal(particles_zyx(df), [[7, 4, 1], [9, 6, 3]])
    assert particles_matrices(df) is None


def test_missing_coordinate_columns(tmp_path):
    p = tmp_path / "bad.star"
    starfile.write({"particles": pd.DataFrame({"rlnTomoName": ["a"], "rlnCoordinateX": [1.0],
                                               "rlnCoordinateY": [2.0]})}, p)
    with pytest.raises(InputError, match="rlnCoordinateZ") as ei:
        read_particles(p)
    assert ei.value.path == str(p)


def test_unreadable_star(tmp_path):
    p = tmp_path / "junk.star"
    p.write_text("this is not a star file\n")
    with pytest.raises(InputError, match="junk.star"):
        read_particles(p)


def test_extra_columns_need_prefix():
    with pytest.raises(ValueError, match="mb"):
        particles_frame("a", np.zeros((1, 3)), None, (4, 4, 4), 1.0, extra={"score": [1.0]})
