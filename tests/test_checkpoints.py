"""Official-format loading, bundle round trip, and the readable errors for bad files."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import micro_config
from xnemo_core.checkpoints import (
    CheckpointError,
    OfficialPaths,
    load_bundle,
    load_official,
    read_bundle_metadata,
    read_state_dict,
    save_bundle,
)
from xnemo_core.models.stack import build_models


def _write_official_release(models, root, with_pe: bool, with_base: bool):
    """Write a stack in the official release's on-disk layout (4 .pth files + base model folders)."""
    den = models.denoising_unet.state_dict()
    temporal = {k: v for k, v in den.items() if ".temporal_modules." in k and (with_pe or not k.endswith(".pe"))}
    spatial_and_motion = {k: v for k, v in den.items() if ".temporal_modules." not in k}
    if with_base:  # the denoising file lacks some spatial keys; the SD base supplies them
        base = {k: v for k, v in spatial_and_motion.items() if ".motion_modules." not in k}
        spatial_and_motion = {k: v for k, v in spatial_and_motion.items() if not k.startswith("conv_in")}
    root.mkdir(parents=True, exist_ok=True)
    torch.save(spatial_and_motion, root / "xnemo_denoising_unet.pth")
    torch.save(temporal, root / "xnemo_temporal_module.pth")
    torch.save(models.reference_unet.state_dict(), root / "xnemo_reference_unet.pth")
    torch.save(models.motion_encoder.state_dict(), root / "xnemo_motion_encoder.pth")
    cfg = models.config
    base_dir = root / "sd-image-variations-diffusers"
    (base_dir / "image_encoder").mkdir(parents=True)
    models.image_encoder.config.save_pretrained(base_dir / "image_encoder")
    save_file(models.image_encoder.state_dict(), str(base_dir / "image_encoder" / "model.safetensors"))
    if with_base:
        (base_dir / "unet").mkdir()
        (base_dir / "unet" / "config.json").write_text(json.dumps(cfg.unet.diffusers_config()))
        save_file({k: v.contiguous() for k, v in base.items()}, str(base_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    vae_dir = root / "stable-video-diffusion-img2vid-xt" / "vae"
    vae_dir.mkdir(parents=True)
    (vae_dir / "config.json").write_text(json.dumps(cfg.vae.diffusers_config()))
    save_file(models.vae.state_dict(), str(vae_dir / "diffusion_pytorch_model.safetensors"))
    return OfficialPaths.from_folder(root)


def _assert_same(a, b):
    for name, module in a.modules().items():
        sa, sb = module.state_dict(), b.modules()[name].state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


@pytest.mark.parametrize("with_pe,with_base", [(True, False), (False, True)])
def test_official_to_bundle_round_trip_is_lossless(tmp_path, micro_models, with_pe, with_base):
    paths = _write_official_release(micro_models, tmp_path / "release", with_pe, with_base)
    loaded = load_official(paths, config=micro_config())
    _assert_same(micro_models, loaded)
    bundle = tmp_path / "bundle.safetensors"
    save_bundle(loaded, bundle)
    meta = read_bundle_metadata(bundle)
    assert "CC BY-NC 4.0" in meta["license"]
    again = load_bundle(bundle)
    assert again.config == micro_config()
    _assert_same(micro_models, again)


def test_bundle_dtype_and_fp16_storage(tmp_path, micro_models):
    bundle = tmp_path / "b16.safetensors"
    save_bundle(micro_models, bundle, dtype=torch.float16)
    models = load_bundle(bundle)
    assert models.dtype == torch.float16
    ref = micro_models.reference_unet.conv_in.weight
    assert torch.equal(models.reference_unet.conv_in.weight, ref.half())
    assert load_bundle(bundle, dtype=torch.float32).dtype == torch.float32


def test_missing_key_is_reported_with_file_and_key(tmp_path, micro_models):
    paths = _write_official_release(micro_models, tmp_path / "r", with_pe=True, with_base=False)
    state = torch.load(paths.reference_unet, weights_only=True)
    del state["mid_block.attentions.0.proj_in.weight"]
    torch.save(state, paths.reference_unet)
    with pytest.raises(CheckpointError) as err:
        load_official(paths, config=micro_config())
    text = str(err.value)
    assert "xnemo_reference_unet.pth" in text and "mid_block.attentions.0.proj_in.weight" in text
    assert "1 missing" in text


def test_wrong_shape_is_reported_expected_vs_found(tmp_path, micro_models):
    paths = _write_official_release(micro_models, tmp_path / "r", with_pe=True, with_base=False)
    state = torch.load(paths.motion_encoder, weights_only=True)
    state["final_proj.weight"] = torch.zeros(7, 7)
    state["unknown.extra"] = torch.zeros(1)
    torch.save(state, paths.motion_encoder)
    with pytest.raises(CheckpointError) as err:
        load_official(paths, config=micro_config())
    text = str(err.value)
    assert "final_proj.weight" in text and "vs [7, 7]" in text
    assert "unknown.extra" in text and "1 unexpected" in text


class Payload:  # an arbitrary object: loading it would need full unpickling
    def __reduce__(self):
        return (print, ("this would run at load time",))


def test_pickle_payload_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "obj": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        read_state_dict(path)


def test_non_tensor_entries_and_wrappers(tmp_path):
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {"module.a": torch.ones(2)}}, path)
    assert list(read_state_dict(path)) == ["a"]
    torch.save({"a": torch.ones(1), "epoch": 3}, path)
    with pytest.raises(CheckpointError, match="not a tensor"):
        read_state_dict(path)


def test_incomplete_release_folder_lists_what_is_missing(tmp_path):
    (tmp_path / "xnemo_reference_unet.pth").write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        OfficialPaths.from_folder(tmp_path)
    assert "xnemo_denoising_unet.pth" in str(err.value) and "CC BY-NC 4.0" in str(err.value)


def test_not_a_bundle(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(CheckpointError, match="not an X-NeMo bundle"):
        load_bundle(path)


def test_meta_build_costs_nothing_and_keeps_buffers():
    models = build_models(micro_config(), device="meta")
    assert all(p.is_meta for p in models.denoising_unet.parameters())
    pe = dict(models.denoising_unet.named_buffers())
    table = next(v for k, v in pe.items() if k.endswith("pos_encoder.pe"))
    assert not table.is_meta and table[0, 0, 1] == 1.0  # cos(0) on the first odd channel
