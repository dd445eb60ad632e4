"""X-NeMo ComfyUI nodes (classic node API). Each submodule contributes NODE_CLASSES: {node id: (class, display name)}.

Node ids are stored in saved workflows: never rename one.
"""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}


def _register(module) -> None:
    for node_id, (cls, display_name) in module.NODE_CLASSES.items():
        NODE_CLASS_MAPPINGS[node_id] = cls
        NODE_DISPLAY_NAME_MAPPINGS[node_id] = display_name
