"""Paste-back compositing: feathered mask geometry and the blend."""
import pytest
import torch

from xnemo_core.compositing import feather_mask, paste_back
from xnemo_core.errors import InvalidInputError


def test_mask_is_one_inside_zero_outside_and_ramps_only_on_inner_edges():
    mask = feather_mask((20, 10, 60, 50), (80, 100), 0.25)
    assert mask.shape == (80, 100)
    assert mask[30, 40] == 1.0 and mask[0, 0] == 0.0 and mask[79, 99] == 0.0
    assert 0.0 < mask[10, 40] < 0.1  # first row of the box sits on the ramp
    row = mask[30, 20:40]
    assert bool((row[1:] >= row[:-1]).all())  # monotone ramp into the box
    edge = feather_mask((-10, -10, 30, 30), (80, 100), 0.25)
    assert edge[0, 0] == 1.0  # box edges outside the image get no ramp


def test_paste_back_blends_by_the_mask():
    background = torch.zeros(1, 80, 100, 3)
    frames = torch.ones(2, 64, 64, 3)
    images, mask = paste_back(background, frames, (20, 10, 60, 50), 0.25)
    assert images.shape == (2, 80, 100, 3) and mask.shape == (1, 80, 100)
    assert torch.allclose(images[0, ..., 0], mask[0], atol=1e-6)  # white over black = the mask itself
    with pytest.raises(InvalidInputError, match="one reference image"):
        paste_back(torch.zeros(3, 80, 100, 3), frames, (20, 10, 60, 50))
