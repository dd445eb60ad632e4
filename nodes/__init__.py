"""X-NeMo ComfyUI nodes (classic node API). Each submodule contributes NODE_CLASSES: {node id: (class, display name)}.

Node ids are stored in saved workflows: never rename one, and only append new widgets at the end.
Importing is cheap (no model, no diffusers/transformers/mediapipe import); inside ComfyUI it also
registers the ``xnemo`` model folder and copies the two demo media files the shipped workflows use
into the input folder (set XNEMO_NO_DEMO_MEDIA=1 to skip that).
"""
import logging
import os

from . import comfy_compat, extract, loader, model_paths, motion_io, motion_nodes, paste, sampler

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}


def _register(module) -> None:
    for node_id, (cls, display_name) in module.NODE_CLASSES.items():
        NODE_CLASS_MAPPINGS[node_id] = cls
        NODE_DISPLAY_NAME_MAPPINGS[node_id] = display_name


for _module in (loader, extract, sampler, paste, motion_nodes, motion_io):
    _register(_module)


def _setup_inside_comfyui() -> None:
    if comfy_compat.module("folder_paths") is None:
        return
    try:
        model_paths.register()
        if not os.environ.get("XNEMO_NO_DEMO_MEDIA"):
            from .media import install_demo_media

            install_demo_media(comfy_compat.input_directory())
    except Exception as exc:  # never let set-up break ComfyUI's start
        logging.getLogger("xnemo").warning("X-NeMo: set-up inside ComfyUI failed: %s", exc)


_setup_inside_comfyui()
