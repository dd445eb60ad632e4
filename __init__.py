"""ComfyUI entry point of the X-NeMo node pack.

ComfyUI imports this folder as a package. The engine (`xnemo_core`) is imported by absolute name,
so the pack folder is appended (not prepended: nothing here may shadow other packages) to sys.path.
Importing registers node classes only; no model is loaded until a node runs.
"""
import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.append(_PACK_DIR)

if __package__:  # imported as a package (ComfyUI); a bare import (e.g. by a test collector) registers nothing
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

    WEB_DIRECTORY = None
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
