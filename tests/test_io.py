"""Atomic writes, output paths kept inside the run folder, safetensors checkpoints."""

import pytest
import torch

from gen3d.errors import Gen3DError
from gen3d.io import atomic_path, inside, load_checkpoint, save_checkpoint


def test_atomic_path_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_inside_refuses_escapes(tmp_path):
    assert inside(tmp_path, "a/b.png") == (tmp_path / "a/b.png").resolve()
    for bad in ("../x", "/etc/passwd", "a/../../x"):
        with pytest.raises(Gen3DError, match="would leave the output folder"):
            inside(tmp_path, bad)


def test_checkpoint_round_trip_nested_state(tmp_path):
    opt_param = torch.nn.Parameter(torch.randn(5, 3))
    optimizer = torch.optim.Adam([opt_param])
    opt_param.grad = torch.randn(5, 3)
    optimizer.step()
    state = {"field": {"table": torch.randn(4, 2), "resolution": 48}, "optimizer": optimizer.state_dict(),
             "timeline": [{"seconds": 15.0, "psnr": 30.1}], "pair": (1, "a"), "none": None}
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["field"]["table"], state["field"]["table"])
    assert loaded["field"]["resolution"] == 48 and loaded["pair"] == (1, "a") and loaded["none"] is None
    fresh = torch.optim.Adam([torch.nn.Parameter(torch.zeros(5, 3))])
    fresh.load_state_dict(loaded["optimizer"])  # int keys and tensors survive
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "c.safetensors"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(Gen3DError, match="cannot be read"):
        load_checkpoint(path)
