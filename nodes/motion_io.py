"""X-NeMo Save / Load Motion: XNEMO_MOTION as shareable .safetensors files (tensors + JSON header, never pickle).

Save writes into ComfyUI's output folder (``output/xnemo/motion_00001_.safetensors``); Load lists the
motion files of the input folder (where shared files go) and of the output folder (marked
``[output]``, as ComfyUI's own loaders do), two folder levels deep.
"""
from __future__ import annotations

import os
import re

from . import comfy_compat
from .common import CATEGORY, MOTION, XNeMoNodeError, guarded
from .motion_nodes import describe

NO_FILES = "(no motion files yet: save one with X-NeMo Save Motion)"
_SUFFIX = ".safetensors"


def _list(root: str, depth: int = 2) -> list[str]:
    found = []
    if not os.path.isdir(root):
        return found
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        level = 0 if rel_dir == "." else rel_dir.count(os.sep) + 1
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if level < depth else []
        for name in sorted(filenames):
            if name.endswith(_SUFFIX) and not name.startswith("."):
                found.append(os.path.normpath(os.path.join(rel_dir, name)).replace(os.sep, "/"))
    return found


def motion_files() -> list[str]:
    files = _list(comfy_compat.input_directory())
    files += [f"{name} [output]" for name in _list(comfy_compat.output_directory())]
    return files or [NO_FILES]


def resolve_motion_path(name: str) -> str:
    """A Load choice ('file [output]' / 'file') or an absolute path -> the file's path."""
    name = name.strip()
    if os.path.isabs(name):
        return name
    return comfy_compat.annotated_path(name, comfy_compat.input_directory())


def next_save_path(prefix: str) -> tuple[str, str]:
    """(absolute path, Load-style name) for ``output/<prefix>_NNNNN_.safetensors``, never outside output/."""
    output = os.path.abspath(comfy_compat.output_directory())
    prefix = prefix.strip().replace("\\", "/") or "xnemo/motion"
    folder = os.path.abspath(os.path.join(output, os.path.dirname(prefix)))
    if os.path.commonpath([output, folder]) != output:
        raise XNeMoNodeError(f"X-NeMo Save Motion: filename_prefix {prefix!r} points outside the output folder")
    base = os.path.basename(prefix) or "motion"
    os.makedirs(folder, exist_ok=True)
    pattern = re.compile(rf"^{re.escape(base)}_(\d+)_{re.escape(_SUFFIX)}$")
    used = [int(m.group(1)) for m in map(pattern.match, os.listdir(folder)) if m]
    filename = f"{base}_{max(used, default=0) + 1:05d}_{_SUFFIX}"
    path = os.path.join(folder, filename)
    name = os.path.relpath(path, output).replace(os.sep, "/") + " [output]"
    return path, name


class XNeMoSaveMotion:
    DESCRIPTION = ("Saves a motion as a .safetensors file in ComfyUI's output folder (under xnemo/ by default). "
                   "The file holds only tensors and a JSON header (no pickle), so it is safe to share: put a "
                   "received file into ComfyUI's input folder and pick it in X-NeMo Load Motion.")
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = (MOTION, "STRING")
    RETURN_NAMES = ("motion", "file")
    OUTPUT_TOOLTIPS = ("The same motion, passed through.",
                       "The saved file as X-NeMo Load Motion names it (connect it to Load Motion's file input).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "motion": (MOTION, {"tooltip": "The motion to save."}),
            "filename_prefix": ("STRING", {"default": "xnemo/motion",
                                           "tooltip": "File name prefix inside the output folder; a counter and "
                                                      ".safetensors are appended (xnemo/motion_00001_.safetensors)."}),
        }}

    @guarded("X-NeMo Save Motion")
    def save(self, motion, filename_prefix="xnemo/motion"):
        path, name = next_save_path(filename_prefix)
        motion.save(path)
        return {"ui": {"text": [f"saved {name} ({len(motion)} frames at {motion.fps:g} fps)"]},
                "result": (motion, name)}


class XNeMoLoadMotion:
    DESCRIPTION = ("Loads a motion saved by X-NeMo Save Motion (or shared by someone): files in ComfyUI's input "
                   "folder, or in the output folder (marked [output]). A connected 'file' input (e.g. from Save "
                   "Motion) overrides the list.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (MOTION, "FLOAT", "INT", "STRING")
    RETURN_NAMES = ("motion", "fps", "frames", "info")
    OUTPUT_TOOLTIPS = ("The loaded motion.", "Its frame rate (for Create Video).", "Its number of frames.",
                       "A readable summary of the motion.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "motion_file": (motion_files(), {
                    "tooltip": "A motion .safetensors file from the input folder, or from the output folder ([output])."}),
            },
            "optional": {
                "file": ("STRING", {"forceInput": True,
                                    "tooltip": "A file name as X-NeMo Save Motion outputs it, or an absolute path; "
                                               "overrides motion_file when connected."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, motion_file=None):
        return True  # the file may be written earlier in the same run (Save Motion -> file); checked when run

    @classmethod
    def IS_CHANGED(cls, motion_file=None, file=None):
        try:
            return os.path.getmtime(resolve_motion_path(file or motion_file))
        except (OSError, TypeError):
            return float("nan")

    @guarded("X-NeMo Load Motion")
    def load(self, motion_file=NO_FILES, file=None):
        from xnemo_core.motion import MotionSequence

        name = file if file else motion_file
        if name == NO_FILES:
            raise XNeMoNodeError("X-NeMo Load Motion: no motion file chosen. Save one with X-NeMo Save Motion, or "
                                 "put a shared .safetensors motion into ComfyUI's input folder and refresh.")
        path = resolve_motion_path(name)
        if not os.path.isfile(path):
            raise XNeMoNodeError(f"X-NeMo Load Motion: motion file {name!r} not found ({path}). Put it into "
                                 f"ComfyUI's input folder ({comfy_compat.input_directory()}) and refresh.")
        motion = MotionSequence.load(path)
        return (motion, float(motion.fps), len(motion), describe(motion))


NODE_CLASSES = {
    "XNeMoSaveMotion": (XNeMoSaveMotion, "X-NeMo Save Motion"),
    "XNeMoLoadMotion": (XNeMoLoadMotion, "X-NeMo Load Motion"),
}
