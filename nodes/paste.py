"""X-NeMo Paste Back: composite the animated square into the full reference image with a feathered mask.

The compositing itself is xnemo_core.compositing.paste_back; this node only checks the wiring.
"""
from __future__ import annotations

from xnemo_core.compositing import paste_back

from . import comfy_compat
from .common import CATEGORY, CROP, XNeMoNodeError, guarded


class XNeMoPasteBack:
    DESCRIPTION = ("Puts the animated face square back into the full reference image (or into one background "
                   "image per frame) with a feathered edge, so the result has the reference's full size.")
    CATEGORY = CATEGORY
    FUNCTION = "paste"
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("images", "mask")
    OUTPUT_TOOLTIPS = ("The composited frames at the reference image's size.",
                       "Where the animation was pasted (1 = animated, 0 = reference), feathered.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "reference": ("IMAGE", {"tooltip": "The full image the animation was made from (the same image as "
                                                   "the Animate node's reference), or one background per frame."}),
                "frames": ("IMAGE", {"tooltip": "Animated frames from X-NeMo Animate."}),
                "crop": (CROP, {"tooltip": "The crop output of X-NeMo Animate (where the square came from)."}),
                "feather": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 0.5, "step": 0.01,
                                      "tooltip": "Width of the soft edge as a fraction of the crop side. 0 = hard "
                                                 "edge."}),
            }
        }

    @guarded("X-NeMo Paste Back")
    def paste(self, reference, frames, crop, feather=0.1):
        width, height = crop.crop.image_size
        if (int(reference.shape[2]), int(reference.shape[1])) != (int(width), int(height)):
            raise XNeMoNodeError(
                f"X-NeMo Paste Back: the reference is {reference.shape[2]}x{reference.shape[1]} but the animation "
                f"was cropped from a {width}x{height} image; connect the same image as the Animate node's reference")
        images, mask = paste_back(reference, frames, crop.crop.appearance_box, feather,
                                  out_device=comfy_compat.intermediate_device())
        return (images, mask.to(comfy_compat.intermediate_device()))


NODE_CLASSES = {"XNeMoPasteBack": (XNeMoPasteBack, "X-NeMo Paste Back")}
