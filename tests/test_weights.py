"""medssl.weights: float16 split copies join back exactly; a stopped training's final weights come from its newest
checkpoint; a folder with neither is named in the error."""

import pytest
import torch
from medssl.networks import VNet
from medssl.weights import finish_from_checkpoint, half_state, load_split_state, save_split_state


def test_split_copy_round_trip(tmp_path):
    state = VNet().state_dict()
    torch.save(state, tmp_path / "model.pt")
    files = save_split_state(tmp_path / "model.pt", tmp_path / "w", max_bytes=4 << 20)
    assert len(files) >= 4 and all(f.stat().st_size < (4 << 20) + (1 << 20) for f in files)
    joined = load_split_state(tmp_path / "w")
    assert list(joined) == list(state)
    assert all(torch.equal(joined[k], v) for k, v in half_state(state).items())
    with pytest.raises(FileNotFoundError, match="no split weights file"):
        load_split_state(tmp_path / "missing")


def test_finish_from_checkpoint(tmp_path):
    a, b = VNet().state_dict(), VNet().state_dict()
    torch.save({"model": a, "optimizer": {}}, tmp_path / "checkpoint_250.pt")
    torch.save({"model": b, "optimizer": {}}, tmp_path / "checkpoint_1000.pt")
    line = finish_from_checkpoint(tmp_path)
    assert "checkpoint_1000.pt (iteration 1000)" in line
    final = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(torch.equal(final[k], v) for k, v in b.items())
    assert finish_from_checkpoint(tmp_path).endswith("the training completed")
    with pytest.raises(FileNotFoundError, match="no model.pt and no checkpoint"):
        finish_from_checkpoint(tmp_path / "empty")


def test_half_state_keeps_integer_buffers():
    state = half_state(VNet().state_dict())
    assert {v.dtype for v in state.values()} == {torch.float16, torch.int64}
