"""Interior filling at export: what counts as outside (gen3d.export.fill_interior, in_line_of_sight)."""

import numpy as np

from gen3d.export import GRID_DIRECTIONS, fill_interior, in_line_of_sight


def brute_force_line_of_sight(empty: np.ndarray) -> np.ndarray:
    """March every voxel along every direction until it leaves the volume or meets a full voxel."""
    n = np.array(empty.shape)
    seen = np.zeros_like(empty)
    for x in np.ndindex(*empty.shape):
        for d in GRID_DIRECTIONS:
            p = np.array(x)
            while (p >= 0).all() and (p < n).all() and empty[tuple(p)]:
                p = p + d
            if not ((p >= 0).all() and (p < n).all()):
                seen[x] = True
                break
    return seen


def test_line_of_sight_matches_marching_each_line():
    rng = np.random.default_rng(0)
    empty = rng.random((9, 9, 9)) > 0.25
    assert np.array_equal(in_line_of_sight(empty), brute_force_line_of_sight(empty))


def shell_volume(n: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """A signed volume (negative inside) of a hollow ball: a solid shell round an empty cavity."""
    x = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1) - (n - 1) / 2
    r = np.linalg.norm(x, axis=-1)
    solid = (r > 12) & (r < 18)
    return np.where(solid, -1.0, 1.0), r


def test_a_cavity_reached_only_round_a_corner_is_filled():
    volume, r = shell_volume()
    c = 24
    volume[c, c, 9:c] = 1.0           # a tunnel down from the cavity into the shell...
    volume[c:, c, 9] = 1.0            # ...that turns inside it and runs out sideways
    filled = fill_interior(volume, 0.5, None, band=1)
    assert (filled[r < 10] < 0).all()  # the cavity was never in sight of the outside: solid now
    # Without the line-of-sight rule a flood from the border would have kept the cavity open:
    from scipy import ndimage
    labels, _ = ndimage.label(volume > 0.5)
    assert labels[c, c, c] == labels[0, 0, 0]


def test_a_cup_open_to_the_outside_stays_open():
    volume, r = shell_volume()
    c = 24
    cup = volume.copy()
    cup[:, :, c:] = np.where((r[:, :, c:] > 12) & (r[:, :, c:] < 18), 1.0, cup[:, :, c:])  # cut the top half off
    filled = fill_interior(cup, 0.5, None, band=1)
    # The bowl's inside looks straight up into open space: nothing there is filled.
    inside_bowl = (r < 10) & (np.arange(48)[None, None, :] < c)
    assert (filled[inside_bowl] > 0).all()
