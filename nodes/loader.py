"""X-NeMo Load Model: the demo model, a converted bundle or the official release -> XNEMO_PIPE."""
from __future__ import annotations

import logging

import torch

from . import comfy_compat, model_paths
from .common import CATEGORY, PIPE, XNeMoNodeError, XNeMoPipe, guarded

log = logging.getLogger("xnemo")

PRECISIONS = ("auto", "fp16", "bf16", "fp32")
DEVICES = ("auto", "cpu")
DEMO_LICENSE = "Apache-2.0 (bundled demo model, trained from scratch; not the official weights)"


def _precision_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")


class XNeMoModelLoader:
    DESCRIPTION = (
        "Loads X-NeMo: the bundled demo model (small, 64 px, runs offline on CPU), a converted .safetensors "
        "bundle, or the official release from ComfyUI/models/xnemo/ (xnemo_*.pth, licensed CC BY-NC 4.0: "
        "non-commercial use only). Models stay on the offload device between runs.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (PIPE, "STRING")
    RETURN_NAMES = ("pipe", "info")
    OUTPUT_TOOLTIPS = ("The loaded X-NeMo models for the Extract Motion and Animate nodes.",
                       "What was loaded: source, licence of the weights, native size, precision, device.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "weights": (model_paths.weights_choices(), {
                    "default": model_paths.DEMO,
                    "tooltip": "demo: the bundled demo model (always available, offline). 'official (models/xnemo)': "
                               "the four xnemo_*.pth files of the official release (CC BY-NC 4.0) in ComfyUI/models/"
                               "xnemo/. Other entries: converted bundles and official sets found in the xnemo model "
                               "folders (extra_model_paths.yaml 'xnemo:' entries included)."}),
                "precision": (list(PRECISIONS), {
                    "default": "auto",
                    "tooltip": "Weight precision. auto: fp16 on a GPU, fp32 on the CPU. bf16 needs a recent GPU."}),
                "device": (list(DEVICES), {
                    "default": "auto",
                    "tooltip": "auto: ComfyUI's compute device (GPU when there is one). cpu: always run on the CPU."}),
                "image_encoder": (model_paths.image_encoder_choices(), {
                    "default": model_paths.AUTO,
                    "tooltip": "Official weights only: the CLIP ViT-L/14 image encoder of sd-image-variations. auto "
                               "looks for sd-image-variations-diffusers/image_encoder/ in models/xnemo and models/"
                               "diffusers; or pick a diffusers folder or a clip_vision file."}),
                "vae": (model_paths.vae_choices(), {
                    "default": model_paths.AUTO,
                    "tooltip": "Official weights only: the Stable Video Diffusion temporal VAE. auto looks for "
                               "stable-video-diffusion-img2vid-xt/vae/ in models/xnemo and models/diffusers; or "
                               "pick a diffusers folder or a vae file with diffusers keys."}),
                "download_base_models": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Official weights only: download missing base models from Hugging Face "
                               "(lambdalabs/sd-image-variations-diffusers, stabilityai/stable-video-diffusion-img2vid-xt)"
                               " into models/xnemo/. Needs internet; the SVD repository needs a Hugging Face login."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, weights=None, image_encoder=None, vae=None):
        """Queue-time check that names the missing file and where it goes (instead of 'value not in list')."""
        try:
            if weights is not None:
                model_paths.resolve_weights(weights)
        except FileNotFoundError as exc:
            return f"X-NeMo Load Model: {exc}"
        for value, choices, what in ((image_encoder, model_paths.image_encoder_choices(), "image_encoder"),
                                     (vae, model_paths.vae_choices(), "vae")):
            if value is not None and value not in choices:
                return (f"X-NeMo Load Model: {what} {value!r} not found in this ComfyUI (choices: "
                        f"{', '.join(choices)}); pick another entry or 'auto'.")
        return True

    @guarded("X-NeMo Load Model")
    def load(self, weights, precision="auto", device="auto", image_encoder="auto", vae="auto",
             download_base_models=False):
        from xnemo_core import animate
        from xnemo_core.checkpoints import (
            OFFICIAL_LICENSE,
            CheckpointError,
            load_bundle,
            load_official,
            read_bundle_metadata,
            resolve_dtype,
        )

        load_device = torch.device("cpu") if device == "cpu" else comfy_compat.torch_device()
        offload = comfy_compat.offload_device() if load_device.type != "cpu" else load_device
        dtype = resolve_dtype(precision, load_device)
        try:
            kind, path = model_paths.resolve_weights(weights)
        except FileNotFoundError as exc:
            raise XNeMoNodeError(f"X-NeMo Load Model: {exc}") from exc

        if kind == "official":
            try:
                paths = model_paths.resolve_official(path, image_encoder, vae, download_base_models)
            except FileNotFoundError as exc:
                raise XNeMoNodeError(f"X-NeMo Load Model: {exc}") from exc
            except CheckpointError as exc:
                raise XNeMoNodeError(
                    f"X-NeMo Load Model: {exc}\nOr set download_base_models to fetch the two base models "
                    f"(online), or pick them in image_encoder / vae.") from exc
            models = load_official(paths, device=offload, dtype=dtype)
            source, license_text = str(path), OFFICIAL_LICENSE
        else:
            file = animate.DEMO_MODEL if kind == "demo" else path
            if kind == "demo" and not file.is_file():
                raise XNeMoNodeError(
                    f"X-NeMo Load Model: the bundled demo model is missing ({file}). It ships with the pack: "
                    f"update or reinstall the X-NeMo node pack.")
            default_license = DEMO_LICENSE if kind == "demo" else "not stated in the bundle"
            license_text = read_bundle_metadata(file).get("license", default_license)
            models = load_bundle(file, device=offload, dtype=dtype)
            source = str(file)

        native = animate.native_resolution(models)
        info = (f"X-NeMo weights: {weights} ({source})\n"
                f"licence: {license_text}\n"
                f"native size: {native} px; precision: {_precision_name(models.dtype)}; "
                f"runs on {load_device}, kept on {offload} between runs")
        log.info(info.replace("\n", " | "))
        pipe = XNeMoPipe(models=models, name=weights, license=license_text, load_device=load_device,
                         offload_device=offload, native_size=native, info=info)
        return (pipe, info)


NODE_CLASSES = {"XNeMoModelLoader": (XNeMoModelLoader, "X-NeMo Load Model")}
