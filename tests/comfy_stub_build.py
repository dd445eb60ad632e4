"""Writes the shipped workflows (workflows/*.json) in the front end's UI ("Save") format, plus their API
prompt form (workflows/api/*.json, for POST /prompt on a headless server).

Run ``python tests/comfy_stub_build.py`` after changing a node's inputs, then check the diff. The
workflow files, not this script, are what users load and what the tests validate and execute; this
only keeps their layout bookkeeping (slots, link lists, widget order, execution order) consistent.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests")]

from comfy_stub import CORE_OBJECT_INFO
from comfy_stub_workflow import input_options, node_info, socket_inputs, to_prompt, widget_specs

IMAGE = "xnemo_astronaut.png"
VIDEO = "xnemo_driving_carphone.mp4"


def load_pack():
    """Import the pack as ComfyUI does (a package named after its folder)."""
    if "comfyui_xnemo" in sys.modules:
        return sys.modules["comfyui_xnemo"]
    spec = importlib.util.spec_from_file_location("comfyui_xnemo", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_xnemo"] = module
    spec.loader.exec_module(module)
    return module


def object_info() -> dict:
    pack = load_pack()
    info = dict(CORE_OBJECT_INFO)
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        info[node_id] = node_info(node_id, cls, pack.NODE_DISPLAY_NAME_MAPPINGS[node_id])
    return info


def _default(widget: dict):
    spec, kind = widget["spec"], widget["type"]
    options = input_options(spec)
    if "default" in options:
        return options["default"]
    if kind == "COMBO":
        choices = spec[0] if isinstance(spec[0], (list, tuple)) else options.get("options", [])
        return choices[0] if choices else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind]


class Builder:
    def __init__(self, info: dict, workflow_id: str):
        self.info = info
        self.workflow_id = workflow_id
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(self, node_type: str, pos, widgets: dict | None = None, title: str | None = None, size=None) -> dict:
        info = self.info[node_type]
        widgets = dict(widgets or {})
        inputs = []
        for name, kind, optional in socket_inputs(info):
            slot = {"name": name, "type": kind, "link": None}
            if optional:
                slot["shape"] = 7
            inputs.append(slot)
        values = []
        for widget in widget_specs(info):
            if widget["extra"] == "control":
                values.append("fixed")
            elif widget["extra"] == "upload":
                values.append("image")
            else:
                values.append(widgets.pop(widget["name"], _default(widget)))
                inputs.append({"name": widget["name"], "type": widget["type"], "widget": {"name": widget["name"]},
                               "link": None})
        if widgets:
            raise KeyError(f"{node_type} has no widgets {sorted(widgets)}")
        outputs = [{"name": name, "type": kind, "links": [], "slot_index": i}
                   for i, (name, kind) in enumerate(zip(info["output_name"], info["output"]))]
        rows = len(inputs) + len(outputs)
        node = {"id": len(self.nodes) + 1, "type": node_type, "pos": list(pos),
                "size": list(size or [320, 46 + 24 * rows]), "flags": {}, "order": 0, "mode": 0,
                "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": node_type} | (
                    {"cnr_id": "comfy-core", "ver": "0.3.64"} if node_type in CORE_OBJECT_INFO else {}),
                "widgets_values": values}
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

    def note(self, text: str, pos, size=(420, 220)) -> dict:
        node = {"id": len(self.nodes) + 1, "type": "Note", "pos": list(pos), "size": list(size), "flags": {},
                "order": 0, "mode": 0, "inputs": [], "outputs": [], "properties": {"text": ""},
                "widgets_values": [text], "color": "#432", "bgcolor": "#653"}
        self.nodes.append(node)
        return node

    def link(self, src: dict, output: str, dst: dict, input_name: str) -> None:
        out_slot = next(i for i, o in enumerate(src["outputs"]) if o["name"] == output)
        in_slot = next(i for i, s in enumerate(dst["inputs"]) if s["name"] == input_name)
        link_id = len(self.links) + 1
        kind = src["outputs"][out_slot]["type"]
        self.links.append([link_id, src["id"], out_slot, dst["id"], in_slot, kind])
        src["outputs"][out_slot]["links"].append(link_id)
        dst["inputs"][in_slot]["link"] = link_id

    def finish(self) -> dict:
        incoming = {n["id"]: {link[1] for link in self.links if link[3] == n["id"]} for n in self.nodes}
        done, order = set(), []
        while len(order) < len(self.nodes):
            ready = [n for n in self.nodes if n["id"] not in done and incoming[n["id"]] <= done]
            for node in ready:
                node["order"] = len(order)
                order.append(node["id"])
                done.add(node["id"])
        for node in self.nodes:
            for output in node["outputs"]:
                output["links"] = output["links"] or None
        return {"id": self.workflow_id, "revision": 0, "last_node_id": len(self.nodes),
                "last_link_id": len(self.links), "nodes": self.nodes, "links": self.links, "groups": [],
                "config": {}, "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}}, "version": 0.4}


# ------------------------------------------------------------------------------------------ the workflows

def _inputs(b: Builder, y: int = 260):
    image = b.add("LoadImage", (0, y), {"image": IMAGE}, size=(300, 330))
    video = b.add("LoadVideo", (0, y + 380), {"file": VIDEO}, size=(300, 330))
    loader = b.add("XNeMoModelLoader", (340, y), {"weights": "demo"}, size=(340, 240))
    return image, video, loader


def _finish_video(b: Builder, image, sampler, x: int, y: int, prefix: str, audio=None, paste=True):
    frames = sampler
    if paste:
        frames = b.add("XNeMoPasteBack", (x, y), {"feather": 0.1})
        b.link(image, "IMAGE", frames, "reference")
        b.link(sampler, "frames", frames, "frames")
        b.link(sampler, "crop", frames, "crop")
    create = b.add("CreateVideo", (x + 360, y), {"fps": 30.0})
    b.link(frames, "images" if paste else "frames", create, "images")
    b.link(sampler, "fps", create, "fps")
    if audio is not None:
        b.link(audio[0], audio[1], create, "audio")
    save = b.add("SaveVideo", (x + 720, y), {"filename_prefix": prefix, "format": "auto", "codec": "auto"},
                 size=(360, 420))
    b.link(create, "VIDEO", save, "video")


def portrait_animation(info) -> dict:
    b = Builder(info, "5d0e7c1a-0b1d-4a55-9c51-0e7a1c0d0001")
    b.note("X-NeMo portrait animation (core video nodes in and out).\n\n"
           "Load Image (the portrait) + Load Video (the driving clip) -> Get Video Components -> X-NeMo Extract "
           "Motion -> X-NeMo Animate -> X-NeMo Paste Back -> Create Video (fps from the motion, audio from the "
           "clip) -> Save Video.\n\nRuns on CPU with the bundled demo model (64 px face, 8 steps: about a minute). "
           "For the official weights pick them in X-NeMo Load Model and set steps 25-35. The demo media are "
           "copied into ComfyUI/input/ when the pack loads.", (0, 0), (680, 220))
    image, video, loader = _inputs(b)
    components = b.add("GetVideoComponents", (340, 560))
    b.link(video, "VIDEO", components, "video")
    extract = b.add("XNeMoExtractMotion", (720, 260), {"fps": 29.97}, size=(340, 420))
    b.link(loader, "pipe", extract, "pipe")
    b.link(components, "images", extract, "driving_images")
    b.link(image, "IMAGE", extract, "reference")
    b.link(components, "audio", extract, "audio")
    b.link(components, "fps", extract, "fps")
    crops = b.add("PreviewImage", (720, 720), size=(340, 300), title="Driving face crops")
    b.link(extract, "crops", crops, "images")
    sampler = b.add("XNeMoSampler", (1100, 260), {"steps": 8}, size=(340, 420))
    b.link(loader, "pipe", sampler, "pipe")
    b.link(image, "IMAGE", sampler, "reference")
    b.link(extract, "motion", sampler, "motion")
    _finish_video(b, image, sampler, 1480, 260, "xnemo/portrait", audio=(extract, "audio"))
    return b.finish()


def keyframe_interpolation(info) -> dict:
    b = Builder(info, "5d0e7c1a-0b1d-4a55-9c51-0e7a1c0d0002")
    b.note("X-NeMo latent keyframe interpolation from two driving clips.\n\n"
           "Motion is extracted from clip A and clip B (here two parts of the demo clip: replace the second Load "
           "Video with your own). X-NeMo Motion Keyframes places chosen frames of each clip on a timeline "
           "(OUTPUT_FRAME: CLIP[FRAME] [hold=N] [easing] [linear|spherical]) and blends X-NeMo's motion "
           "descriptors in between; head translation/scale (f_rts) has its own setting. Then animate as usual.",
           (0, 0), (680, 220))
    image, video, loader = _inputs(b)
    video_b = b.add("LoadVideo", (0, 1020), {"file": VIDEO}, title="Driving clip B", size=(300, 330))
    video["title"] = "Driving clip A"
    extract_a = b.add("XNeMoExtractMotion", (720, 260), {"max_frames": 30}, title="Extract Motion A",
                      size=(340, 420))
    extract_b = b.add("XNeMoExtractMotion", (720, 720), {"start_frame": 30, "max_frames": 30},
                      title="Extract Motion B", size=(340, 420))
    for extract, clip in ((extract_a, video), (extract_b, video_b)):
        b.link(loader, "pipe", extract, "pipe")
        b.link(clip, "VIDEO", extract, "driving_video")
        b.link(image, "IMAGE", extract, "reference")
    keys = b.add("XNeMoMotionKeyframes", (1100, 260), {
        "schedule": "# OUTPUT_FRAME: CLIP[FRAME] options (easing/mode apply to the move leaving the keyframe)\n"
                    "0: a[0]\n10: b[12] ease_in_out\n20: a[29] hold=4 spherical\n36: b[-1]",
        "easing": "ease_in_out", "mode": "linear", "f_rts": "follow", "fps": 0.0}, size=(380, 330))
    b.link(extract_a, "motion", keys, "motion_a")
    b.link(extract_b, "motion", keys, "motion_b")
    sampler = b.add("XNeMoSampler", (1520, 260), {"steps": 8}, size=(340, 420))
    b.link(loader, "pipe", sampler, "pipe")
    b.link(image, "IMAGE", sampler, "reference")
    b.link(keys, "motion", sampler, "motion")
    _finish_video(b, image, sampler, 1900, 260, "xnemo/keyframes")
    return b.finish()


def long_video(info) -> dict:
    b = Builder(info, "5d0e7c1a-0b1d-4a55-9c51-0e7a1c0d0003")
    b.note("X-NeMo long video with context windows.\n\n"
           "The 2 s demo clip's motion is extracted once, looped forward and back (seamless) to 300 frames, and "
           "sampled in overlapping windows of 24 frames (overlap 4), so memory does not grow with the length. "
           "With the demo model on a CPU this takes a few minutes (4 steps); with a real driving video just "
           "remove the loop node. Frames whose face was not found are listed in the Extract Motion report.",
           (0, 0), (680, 220))
    image, video, loader = _inputs(b)
    extract = b.add("XNeMoExtractMotion", (720, 260), size=(340, 420))
    b.link(loader, "pipe", extract, "pipe")
    b.link(video, "VIDEO", extract, "driving_video")
    b.link(image, "IMAGE", extract, "reference")
    loop = b.add("XNeMoMotionLoop", (720, 720), {"mode": "ping_pong", "times": 2, "frames": 300})
    b.link(extract, "motion", loop, "motion")
    sampler = b.add("XNeMoSampler", (1100, 260), {"steps": 4, "context_frames": 24, "context_overlap": 4},
                    size=(340, 420))
    b.link(loader, "pipe", sampler, "pipe")
    b.link(image, "IMAGE", sampler, "reference")
    b.link(loop, "motion", sampler, "motion")
    _finish_video(b, image, sampler, 1480, 260, "xnemo/long")
    return b.finish()


def motion_save_load(info) -> dict:
    b = Builder(info, "5d0e7c1a-0b1d-4a55-9c51-0e7a1c0d0004")
    b.note("X-NeMo motion save -> load -> reuse.\n\n"
           "Extract Motion -> Save Motion writes output/xnemo/carphone_motion_00001_.safetensors (tensors + JSON "
           "header, no pickle: safe to share). Load Motion reads it back (its 'file' input takes the name Save "
           "Motion just wrote) and the motion is reused, here played in reverse. To reuse a saved or shared motion "
           "without the driving video, bypass the Extract/Save nodes (Ctrl+B) and pick the file in Load Motion "
           "(shared files go into ComfyUI/input/).", (0, 0), (680, 220))
    image, video, loader = _inputs(b)
    extract = b.add("XNeMoExtractMotion", (720, 260), size=(340, 420))
    b.link(loader, "pipe", extract, "pipe")
    b.link(video, "VIDEO", extract, "driving_video")
    b.link(image, "IMAGE", extract, "reference")
    save = b.add("XNeMoSaveMotion", (720, 720), {"filename_prefix": "xnemo/carphone_motion"})
    b.link(extract, "motion", save, "motion")
    load = b.add("XNeMoLoadMotion", (1100, 720),
                 {"motion_file": "xnemo/carphone_motion_00001_.safetensors [output]"}, size=(380, 150))
    b.link(save, "file", load, "file")
    reuse = b.add("XNeMoMotionLoop", (1100, 260), {"mode": "reverse", "times": 1, "frames": 0})
    b.link(load, "motion", reuse, "motion")
    sampler = b.add("XNeMoSampler", (1520, 260), {"steps": 8}, size=(340, 420))
    b.link(loader, "pipe", sampler, "pipe")
    b.link(image, "IMAGE", sampler, "reference")
    b.link(reuse, "motion", sampler, "motion")
    _finish_video(b, image, sampler, 1900, 260, "xnemo/reused_motion")
    return b.finish()


WORKFLOWS = {
    "xnemo_portrait_animation.json": portrait_animation,
    "xnemo_keyframe_interpolation.json": keyframe_interpolation,
    "xnemo_long_video.json": long_video,
    "xnemo_motion_save_load.json": motion_save_load,
}


def main() -> None:
    """Write workflows/*.json (UI format) and workflows/api/*.json (API prompts for POST /prompt)."""
    info = object_info()
    out = ROOT / "workflows"
    (out / "api").mkdir(parents=True, exist_ok=True)
    for name, build in WORKFLOWS.items():
        workflow = build(info)
        (out / name).write_text(json.dumps(workflow, indent=2) + "\n")
        (out / "api" / name).write_text(json.dumps(to_prompt(workflow, info), indent=2) + "\n")
        print("wrote", out / name, "and", out / "api" / name)


if __name__ == "__main__":
    main()
