"""A small in-repo ComfyUI workflow toolchain for tests: object_info, validation, UI -> API, execution.

* :func:`node_info` describes a classic-API node class the way ComfyUI's /object_info does.
* :func:`widget_specs` lists the widgets a node shows, in the order the front end stores their values
  in ``widgets_values`` (required, then optional inputs; a seed-like INT with ``control_after_generate``
  stores one extra value right after it, e.g. ``[0, "fixed", ...]``; an upload combo may be followed by
  the upload button's value ``"image"``).
* :func:`validate_workflow` checks a UI-format (front-end "Save") workflow against object_info: node
  types, link endpoints and types, socket lists, widget count/order/types/ranges, combo values.
* :func:`to_prompt` converts it to the API prompt form (what the front end POSTs to /prompt).
* :func:`execute` runs a prompt like ComfyUI's executor does for a fresh server: VALIDATE_INPUTS on
  constant inputs, then every output node and what it depends on, in dependency order.
"""
from __future__ import annotations

import inspect
from typing import Any

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
SEED_NAMES = ("seed", "noise_seed")  # the front end adds control_after_generate to these INTs by name as well


# ------------------------------------------------------------------------------------------ object_info

def node_info(node_id: str, cls, display_name: str) -> dict:
    """/object_info entry of a classic-API node class (server.py node_info, the fields the front end reads)."""
    spec = cls.INPUT_TYPES()
    info = {
        "input": spec,
        "input_order": {section: list(inputs) for section, inputs in spec.items()},
        "output": list(cls.RETURN_TYPES),
        "output_is_list": list(getattr(cls, "OUTPUT_IS_LIST", [False] * len(cls.RETURN_TYPES))),
        "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
        "name": node_id,
        "display_name": display_name,
        "description": getattr(cls, "DESCRIPTION", ""),
        "python_module": "custom_nodes.comfyui-xnemo",
        "category": getattr(cls, "CATEGORY", "sd"),
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
    }
    if hasattr(cls, "OUTPUT_TOOLTIPS"):
        info["output_tooltips"] = list(cls.OUTPUT_TOOLTIPS)
    return info


def input_type(spec) -> str:
    kind = spec[0]
    return "COMBO" if isinstance(kind, (list, tuple)) else str(kind)


def input_options(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def combo_values(spec) -> list:
    kind = spec[0]
    return list(kind) if isinstance(kind, (list, tuple)) else list(input_options(spec).get("options", []))


def is_widget(spec) -> bool:
    return input_type(spec) in WIDGET_TYPES and not input_options(spec).get("forceInput", False)


def ordered_inputs(info: dict) -> list[tuple[str, str, Any]]:
    """(section, name, spec) for required then optional inputs, in input_order."""
    out = []
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        order = info.get("input_order", {}).get(section, list(specs))
        out.extend((section, name, specs[name]) for name in order)
    return out


def widget_specs(info: dict) -> list[dict]:
    """Widgets in widgets_values order, each {name, type, spec, extra}; extra is 'control' / 'upload' / None."""
    widgets = []
    for _, name, spec in ordered_inputs(info):
        if not is_widget(spec):
            continue
        options = input_options(spec)
        widgets.append({"name": name, "type": input_type(spec), "spec": spec, "extra": None})
        if options.get("control_after_generate") or (input_type(spec) == "INT" and name in SEED_NAMES
                                                     and options.get("control_after_generate") is not False):
            widgets.append({"name": name, "type": "CONTROL", "spec": spec, "extra": "control"})
        if options.get("image_upload") or options.get("video_upload"):
            widgets.append({"name": name, "type": "UPLOAD", "spec": spec, "extra": "upload"})
    return widgets


def socket_inputs(info: dict) -> list[tuple[str, str, bool]]:
    """(name, type, optional) of the inputs shown as sockets without a widget."""
    return [(name, input_type(spec), section == "optional") for section, name, spec in ordered_inputs(info)
            if not is_widget(spec)]


def validate_inputs_names(cls) -> set[str]:
    fn = getattr(cls, "VALIDATE_INPUTS", None)
    return set(inspect.signature(fn).parameters) if fn else set()


# ------------------------------------------------------------------------------------------ validation

def _split_widget_values(info: dict, values: list) -> tuple[dict, list[str]]:
    """Map widgets_values onto widget names; the optional upload value may be absent."""
    errors, mapped = [], {}
    specs = widget_specs(info)
    required = [w for w in specs if w["extra"] != "upload"]
    if len(values) not in (len(required), len(specs)):
        names = [w["name"] + ("(control)" if w["extra"] == "control" else "(upload)" if w["extra"] else "")
                 for w in specs]
        return {}, [f"{len(values)} widget values for widgets {names}"]
    with_upload = len(values) == len(specs)
    i = 0
    for w in specs:
        if w["extra"] == "upload" and not with_upload:
            continue
        value = values[i]
        i += 1
        if w["extra"] == "control":
            if value not in CONTROL_VALUES:
                errors.append(f"{w['name']}: control_after_generate value {value!r} not in {CONTROL_VALUES}")
        elif w["extra"] == "upload":
            if value != "image":
                errors.append(f"{w['name']}: upload widget value {value!r} (the front end stores 'image')")
        else:
            mapped[w["name"]] = (value, w)
    return mapped, errors


def _check_value(name: str, value, widget: dict, media: set[str], dynamic: bool) -> list[str]:
    kind, spec = widget["type"], widget["spec"]
    options = input_options(spec)
    if kind == "COMBO":
        if options.get("image_upload") or options.get("video_upload"):
            return [] if value in media else [f"{name}: {value!r} is not a shipped media file {sorted(media)}"]
        if dynamic:
            return [] if isinstance(value, str) else [f"{name}: {value!r} is not a string"]
        choices = combo_values(spec)
        return [] if value in choices else [f"{name}: {value!r} not in {choices}"]
    if kind == "BOOLEAN":
        return [] if isinstance(value, bool) else [f"{name}: {value!r} is not a boolean"]
    if kind == "STRING":
        return [] if isinstance(value, str) else [f"{name}: {value!r} is not a string"]
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "INT" and not isinstance(value, int)):
            return [f"{name}: {value!r} is not {kind}"]
        low, high = options.get("min"), options.get("max")
        if (low is not None and value < low) or (high is not None and value > high):
            return [f"{name}: {value} outside [{low}, {high}]"]
    return []


def validate_workflow(workflow: dict, object_info: dict, classes: dict, media: set[str],
                      virtual: tuple[str, ...] = ("Note", "MarkdownNote")) -> list[str]:
    """Problems found in a UI-format workflow (empty list = loads and queues cleanly)."""
    errors: list[str] = []
    for key in ("last_node_id", "last_link_id", "nodes", "links", "version"):
        if key not in workflow:
            errors.append(f"missing top-level key {key!r}")
    if errors:
        return errors
    nodes = {n["id"]: n for n in workflow["nodes"]}
    if len(nodes) != len(workflow["nodes"]):
        errors.append("duplicate node ids")
    if max(nodes) > workflow["last_node_id"]:
        errors.append("last_node_id is smaller than a node id")
    links = {link[0]: link for link in workflow["links"]}
    if len(links) != len(workflow["links"]):
        errors.append("duplicate link ids")
    if links and max(links) > workflow["last_link_id"]:
        errors.append("last_link_id is smaller than a link id")

    for node in workflow["nodes"]:
        where = f"node {node['id']} ({node['type']})"
        for key in ("id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties"):
            if key not in node:
                errors.append(f"{where}: missing {key!r}")
        if node["type"] in virtual:
            continue
        info = object_info.get(node["type"])
        if info is None:
            errors.append(f"{where}: unknown node type")
            continue
        specs = {name: (section, spec) for section, name, spec in ordered_inputs(info)}
        # outputs: same names/types/order as the definition
        declared = list(zip(info["output_name"], info["output"]))
        saved = [(o["name"], o["type"]) for o in node["outputs"]]
        if saved != declared:
            errors.append(f"{where}: outputs {saved} differ from the definition {declared}")
        # inputs: every socket entry is a known input with the right type; required sockets are linked
        seen = set()
        for slot in node["inputs"]:
            name = slot["name"]
            seen.add(name)
            if name not in specs:
                errors.append(f"{where}: input {name!r} does not exist")
                continue
            section, spec = specs[name]
            if slot["type"] != input_type(spec):
                errors.append(f"{where}: input {name!r} has type {slot['type']!r}, expected {input_type(spec)!r}")
            if is_widget(spec) != ("widget" in slot):
                errors.append(f"{where}: input {name!r} widget marker does not match the definition")
            if not is_widget(spec) and section == "required" and slot.get("link") is None:
                errors.append(f"{where}: required input {name!r} is not connected")
        for name, kind, optional in socket_inputs(info):
            if name not in seen and not optional:
                errors.append(f"{where}: required input {name!r} is missing")
        # widgets
        mapped, widget_errors = _split_widget_values(info, node.get("widgets_values", []))
        errors += [f"{where}: {e}" for e in widget_errors]
        dynamic = validate_inputs_names(classes.get(node["type"])) if node["type"] in classes else set()
        for name, (value, widget) in mapped.items():
            errors += [f"{where}: {e}" for e in _check_value(name, value, widget, media, name in dynamic)]

    for link_id, link in links.items():
        if len(link) != 6:
            errors.append(f"link {link_id}: expected [id, from, from_slot, to, to_slot, type]")
            continue
        _, src, src_slot, dst, dst_slot, kind = link
        if src not in nodes or dst not in nodes:
            errors.append(f"link {link_id}: endpoint node missing")
            continue
        source, target = nodes[src], nodes[dst]
        if src_slot >= len(source["outputs"]) or link_id not in (source["outputs"][src_slot].get("links") or []):
            errors.append(f"link {link_id}: not listed on node {src} output {src_slot}")
        elif source["outputs"][src_slot]["type"] != kind:
            errors.append(f"link {link_id}: type {kind} but node {src} output {src_slot} is "
                          f"{source['outputs'][src_slot]['type']}")
        if dst_slot >= len(target["inputs"]) or target["inputs"][dst_slot].get("link") != link_id:
            errors.append(f"link {link_id}: not the link of node {dst} input {dst_slot}")
        elif target["inputs"][dst_slot]["type"] not in (kind, "*"):
            errors.append(f"link {link_id}: {kind} into node {dst} input "
                          f"{target['inputs'][dst_slot]['name']} of type {target['inputs'][dst_slot]['type']}")
    for node in workflow["nodes"]:
        for slot in node["inputs"]:
            if slot.get("link") is not None and slot["link"] not in links:
                errors.append(f"node {node['id']}: input {slot['name']} names missing link {slot['link']}")
        for output in node["outputs"]:
            for link_id in output.get("links") or []:
                if link_id not in links:
                    errors.append(f"node {node['id']}: output {output['name']} names missing link {link_id}")
    return errors


# ------------------------------------------------------------------------------------------ UI -> API

def to_prompt(workflow: dict, object_info: dict, virtual: tuple[str, ...] = ("Note", "MarkdownNote")) -> dict:
    """The API prompt the front end would queue: {id: {class_type, inputs, _meta}} (muted nodes dropped,
    bypassed nodes bridged: an output is fed by the bypassed node's first input of the same type)."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}

    def source_of(link_id):
        _, src, src_slot, _, _, kind = links[link_id]
        node = nodes[src]
        if node.get("mode", 0) == 4:  # bypass
            for slot in node["inputs"]:
                if slot["type"] == kind and slot.get("link") is not None:
                    return source_of(slot["link"])
            return None
        if node.get("mode", 0) == 2:  # muted
            return None
        return [str(src), src_slot]

    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in virtual or node.get("mode", 0) in (2, 4):
            continue
        info = object_info[node["type"]]
        inputs: dict[str, Any] = {}
        mapped, errors = _split_widget_values(info, node.get("widgets_values", []))
        if errors:
            raise ValueError(f"node {node['id']}: {errors}")
        for name, (value, _) in mapped.items():
            inputs[name] = value
        for slot in node["inputs"]:
            if slot.get("link") is not None:
                source = source_of(slot["link"])
                if source is None:
                    inputs.pop(slot["name"], None)
                else:
                    inputs[slot["name"]] = source
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title", info["display_name"])}}
    return prompt


# ------------------------------------------------------------------------------------------ execution

class ExecutionError(RuntimeError):
    def __init__(self, node_id: str, class_type: str, error: BaseException):
        super().__init__(f"node {node_id} ({class_type}): {type(error).__name__}: {error}")
        self.node_id, self.class_type, self.error = node_id, class_type, error


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def execute(prompt: dict, classes: dict, env=None) -> dict:
    """Run the prompt; returns {"outputs": {id: tuple}, "ui": {id: ui dict}, "order": [ids]}.

    Raises ExecutionError (with the node id) for any node failure, ValueError for validation failures.
    """
    for node_id, node in prompt.items():
        cls = classes[node["class_type"]]
        names = validate_inputs_names(cls)
        if names:
            constants = {k: v for k, v in node["inputs"].items() if k in names and not _is_link(v)}
            verdict = cls.VALIDATE_INPUTS(**constants)
            if verdict is not True:
                raise ValueError(f"node {node_id} ({node['class_type']}) failed validation: {verdict}")

    outputs: dict[str, tuple] = {}
    ui: dict[str, dict] = {}
    order: list[str] = []

    def run(node_id: str, stack: tuple = ()):
        if node_id in outputs:
            return
        if node_id in stack:
            raise ValueError(f"cycle through node {node_id}")
        node = prompt[node_id]
        kwargs = {}
        for name, value in node["inputs"].items():
            if _is_link(value):
                run(value[0], stack + (node_id,))
                kwargs[name] = outputs[value[0]][value[1]]
            else:
                kwargs[name] = value
        cls = classes[node["class_type"]]
        if env is not None:
            env.current_node = node_id
        try:
            result = getattr(cls(), cls.FUNCTION)(**kwargs)
        except Exception as exc:
            raise ExecutionError(node_id, node["class_type"], exc) from exc
        finally:
            if env is not None:
                env.current_node = None
        if isinstance(result, dict):
            ui[node_id] = result.get("ui", {})
            result = result.get("result", ())
        outputs[node_id] = tuple(result or ())
        order.append(node_id)

    for node_id, node in prompt.items():
        if getattr(classes[node["class_type"]], "OUTPUT_NODE", False):
            run(node_id)
    return {"outputs": outputs, "ui": ui, "order": order}
