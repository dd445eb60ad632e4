"""Shared test fixtures: paths to the parity fixtures and small model stacks."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from xnemo_core.config import ImageEncoderConfig, MotionEncoderConfig, UNetConfig, VAEConfig, XNeMoConfig

FIXTURES = Path(__file__).parent / "fixtures"
PARITY_DIR = FIXTURES / "parity"
MANIFEST = FIXTURES / "official_checkpoint_keys.json"


def micro_config() -> XNeMoConfig:
    """The smallest stack with the official topology (4 levels, 2 layers, all 21+21 modules): seconds on CPU."""
    return XNeMoConfig(
        unet=UNetConfig(block_out_channels=(32, 32, 32, 32), cross_attention_dim=16, sample_size=16,
                        attention_head_dim=2, module_heads=2),
        motion_encoder=dataclasses.replace(XNeMoConfig.tiny().motion_encoder),
        vae=VAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1),
        image_encoder=ImageEncoderConfig(hidden_size=32, intermediate_size=64, projection_dim=16,
                                         num_hidden_layers=1, num_attention_heads=2),
        name="micro",
    )


@pytest.fixture(scope="session")
def micro_models():
    from xnemo_core.models.stack import build_models

    torch.manual_seed(0)
    return build_models(micro_config())
