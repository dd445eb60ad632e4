"""What each stage trains, and where the starting weights come from.

Trainable sets (everything else is frozen: requires_grad False, eval mode):

| stage      | trains                                                                                  |
|------------|-----------------------------------------------------------------------------------------|
| vae        | vae (encoder, temporal decoder): from-scratch sizes only                                 |
| vae_decoder| vae `decoder.` only (the latents, and so every diffusion stage, are unchanged)            |
| motion_init| motion_encoder (all of it), with a training-only linear read-out of blendshapes + pose |
| image (1)  | denoising_unet spatial weights (all but `.motion_modules.` / `.temporal_modules.`) and the whole reference_unet |
| motion (2) | motion_encoder, denoising_unet `.motion_modules.`, and the GAN head (appearance encoder, generator; discriminator with its own optimiser) |
| joint (2b)| image's and motion's diffusion parameters together: denoising_unet spatial + `.motion_modules.`, reference_unet, motion_encoder (no GAN head) |
| temporal(3)| denoising_unet `.temporal_modules.`                                                     |

The CLIP image encoder is never trained.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from xnemo_core.checkpoints import (
    OfficialPaths,
    load_bundle,
    load_official,
    read_bundle_metadata,
)
from xnemo_core.config import XNeMoConfig
from xnemo_core.models.motion_modules import ModuleTransformer
from xnemo_core.models.stack import XNeMoModels, build_models
from xnemo_core.pipeline import PREDICTION_TYPES

from .config import ConfigError, ModelSpec

SCRATCH_LICENSE = "Apache-2.0 (weights trained from scratch with comfyui-xnemo's training code)"
SD_LICENSE = ("derived from lambdalabs/sd-image-variations-diffusers (CreativeML OpenRAIL-M) and the "
              "stable-video-diffusion VAE (Stability AI licence): check those terms before sharing")

INSERTED_FAMILIES = (".motion_modules.", ".temporal_modules.")


def _denoiser_part(name: str) -> str:
    if ".motion_modules." in name:
        return "motion"
    if ".temporal_modules." in name:
        return "temporal"
    return "spatial"


def stage_selects(stage: str, component: str, name: str) -> bool:
    """Is parameter `name` of stack component `component` trained in `stage`?"""
    if stage == "vae":
        return component == "vae"
    if stage == "vae_decoder":
        return component == "vae" and name.startswith("decoder.")
    if stage == "motion_init":
        return component == "motion_encoder"
    if stage == "image":
        return component == "reference_unet" or (component == "denoising_unet" and _denoiser_part(name) == "spatial")
    if stage == "motion":
        return component == "motion_encoder" or (component == "denoising_unet" and _denoiser_part(name) == "motion")
    if stage == "temporal":
        return component == "denoising_unet" and _denoiser_part(name) == "temporal"
    if stage == "joint":
        return stage_selects("image", component, name) or stage_selects("motion", component, name)
    raise ConfigError(f"unknown stage {stage!r}")


def select_trainable(stage: str, models: XNeMoModels) -> dict[str, nn.Parameter]:
    """Freeze the stack except the stage's parameters; returns {'component.param': param} to train.

    Components with trainable parameters go to train mode (dropout/BatchNorm as in training), the
    rest to eval mode.
    """
    trainable = {}
    for component, module in models.modules().items():
        any_trained = False
        for name, param in module.named_parameters():
            chosen = stage_selects(stage, component, name)
            param.requires_grad_(chosen)
            if chosen:
                trainable[f"{component}.{name}"] = param
                any_trained = True
        module.train(any_trained)
    return trainable


def enable_gradient_checkpointing(models: XNeMoModels) -> None:
    """Checkpoint every UNet layer of both UNets (recomputed in backward: less memory, ~30% more time).

    The denoiser keeps its reference K/V set after forward, so recomputed attention reads the same bank.
    """
    for unet in (models.denoising_unet, models.reference_unet):
        unet.gradient_checkpointing = True


def zero_init_inserted_modules(unet: nn.Module) -> None:
    """proj_out of every motion/temporal module to zero: inserted modules start as the identity."""
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, ModuleTransformer):
                module.proj_out.weight.zero_()
                module.proj_out.bias.zero_()


def copy_denoiser_into_reference(models: XNeMoModels) -> int:
    """Overwrite the reference UNet with the denoiser's same-named spatial weights; returns how many tensors."""
    source = models.denoising_unet.state_dict()
    target = models.reference_unet.state_dict()
    shared = {k: source[k] for k in target if k in source and source[k].shape == target[k].shape}
    missing = sorted(set(target) - set(shared))
    if missing:
        raise ConfigError(f"reference_from_denoiser: the reference UNet has {len(missing)} weight(s) the denoiser "
                          f"lacks (e.g. {missing[0]!r}); the two UNets must share a spatial layout")
    models.reference_unet.load_state_dict(shared)
    return len(shared)


def build_initial_models(spec: ModelSpec, seed: int) -> tuple[XNeMoModels, str]:
    """The stack a run starts from (fp32, CPU) and the licence its outputs inherit."""
    models, license_text = _initial_models(spec, seed)
    if spec.prediction_type is not None and spec.prediction_type != models.config.unet.prediction_type:
        if spec.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"model.prediction_type must be one of {PREDICTION_TYPES}, got {spec.prediction_type!r}")
        config = models.config
        models.config = dataclasses.replace(config, unet=dataclasses.replace(config.unet,
                                                                           prediction_type=spec.prediction_type))
    if spec.reference_from_denoiser:
        copy_denoiser_into_reference(models)
    if spec.motion_encoder_from:
        take_component(models, load_bundle(spec.motion_encoder_from, dtype=torch.float32), "motion_encoder",
                       f"model.motion_encoder_from {spec.motion_encoder_from}")
    return models, license_text


COMPONENT_NAMES = {"vae": "VAE", "motion_encoder": "motion encoder"}


def take_component(models: XNeMoModels, donor: XNeMoModels, component: str, source: str) -> None:
    """Put `donor`'s `component` into `models` (a start mixing runs); both must share its config, so
    the latent space (VAE) or the token layout (motion encoder) stays the one the rest was trained on."""
    ours, theirs = getattr(models.config, component), getattr(donor.config, component)
    if theirs != ours:
        raise ConfigError(f"{source}: its {COMPONENT_NAMES.get(component, component)} config differs from "
                          f"the model's ({theirs} vs {ours})")
    getattr(models, component).load_state_dict(getattr(donor, component).state_dict())


def _initial_models(spec: ModelSpec, seed: int) -> tuple[XNeMoModels, str]:
    if spec.init == "scratch":
        torch.manual_seed(seed)
        models = build_models(spec.xnemo_config())
        zero_init_inserted_modules(models.denoising_unet)
        return models, SCRATCH_LICENSE
    if spec.init == "bundle":
        if not spec.path:
            raise ConfigError("model.init 'bundle' needs model.path (e.g. the previous stage's final.safetensors)")
        license_text = read_bundle_metadata(spec.path).get("license", "unknown")
        return load_bundle(spec.path, dtype=torch.float32), license_text
    if spec.init == "official":
        if not spec.path:
            raise ConfigError("model.init 'official' needs model.path (the folder with xnemo_*.pth)")
        from xnemo_core.checkpoints import OFFICIAL_LICENSE

        paths = OfficialPaths.from_folder(spec.path, base_dir=spec.base_dir, vae_dir=spec.vae_dir)
        return load_official(paths, dtype=torch.float32), OFFICIAL_LICENSE
    if spec.init == "sd_image_variations":
        return init_from_sd_image_variations(spec, seed), SD_LICENSE
    raise ConfigError(f"model.init must be scratch | bundle | official | sd_image_variations, got {spec.init!r}")


def init_from_sd_image_variations(spec: ModelSpec, seed: int) -> XNeMoModels:
    """Full size from lambdalabs/sd-image-variations-diffusers (both UNets, CLIP) + the SVD VAE.

    The denoiser's inserted modules start as the identity (zero proj_out) and the motion encoder
    at random; everything read from disk goes through xnemo_core's validated loader.
    """
    from pathlib import Path

    from xnemo_core.checkpoints import _folder_weights, load_states_into, official_config

    if not spec.path or not spec.vae_dir:
        raise ConfigError("model.init 'sd_image_variations' needs model.path (the sd-image-variations-diffusers "
                          "folder with unet/ and image_encoder/) and model.vae_dir (the SVD vae/ folder)")
    root = Path(spec.path)
    paths = OfficialPaths(denoising_unet="", reference_unet="", motion_encoder="", temporal_module="",
                          image_encoder_dir=str(root / "image_encoder"), vae_dir=spec.vae_dir,
                          base_unet_dir=str(root / "unet"))
    config: XNeMoConfig = official_config(paths)
    torch.manual_seed(seed)
    models = build_models(config)
    zero_init_inserted_modules(models.denoising_unet)
    unet_state = _folder_weights(paths.base_unet_dir)[1]
    den = models.denoising_unet
    inserted = {k: v for k, v in den.state_dict().items() if any(f in k for f in INSERTED_FAMILIES)}
    states = {
        "denoising_unet": {**inserted, **unet_state},
        "reference_unet": {k: v for k, v in unet_state.items() if not k.startswith(("conv_norm_out.", "conv_out."))},
        "motion_encoder": models.motion_encoder.state_dict(),  # random init: stage 2 trains it
        "image_encoder": _folder_weights(paths.image_encoder_dir)[1],
        "vae": _folder_weights(paths.vae_dir)[1],
    }
    load_states_into(models, states, {
        "denoising_unet": f"{paths.base_unet_dir} (+ identity-initialised inserted modules)",
        "reference_unet": paths.base_unet_dir, "image_encoder": paths.image_encoder_dir, "vae": paths.vae_dir})
    return models.eval()
