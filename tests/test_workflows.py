"""The shipped workflows: each validates against our node definitions plus ComfyUI 0.3.64's core ones, and
runs end to end (UI format -> API prompt -> small executor with core-node stand-ins) to a written video
with the demo model. Everything runs as shipped (all frames, context windows, schedules) except that the
Animate node takes 1 denoising step instead of 4-8, to keep CI fast.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import av
import pytest
from comfy_stub_fixtures import *
from comfy_stub_fixtures import MEDIA
from comfy_stub_workflow import ExecutionError, execute, to_prompt, validate_workflow, widget_specs

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
NAMES = sorted(p.name for p in WORKFLOWS.glob("*.json"))


def load(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text())


def set_widget(workflow: dict, info: dict, node_type: str, name: str, value, title: str | None = None) -> None:
    """Change one widget value the way a user would in the UI (by position in widgets_values)."""
    hits = 0
    for node in workflow["nodes"]:
        if node["type"] != node_type or (title is not None and node.get("title") != title):
            continue
        index = next(i for i, w in enumerate(widget_specs(info[node_type])) if w["name"] == name and not w["extra"])
        node["widgets_values"][index] = value
        hits += 1
    assert hits, (node_type, name, title)


def video_stats(path: Path) -> tuple[int, float, tuple[int, int], bool]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return frames, float(stream.average_rate), (stream.width, stream.height), bool(container.streams.audio)


def test_the_four_workflows_are_shipped():
    assert NAMES == ["xnemo_keyframe_interpolation.json", "xnemo_long_video.json", "xnemo_motion_save_load.json",
                     "xnemo_portrait_animation.json"]
    readme = (WORKFLOWS / "README.md").read_text()
    assert all(name in readme for name in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_workflow_validates(name, info, all_classes, comfy):
    workflow = load(name)
    assert workflow["version"] == 0.4
    assert validate_workflow(workflow, info, all_classes, MEDIA) == []
    notes = [n for n in workflow["nodes"] if n["type"] == "Note"]
    assert notes and len(notes[0]["widgets_values"][0]) > 80  # a short description on the canvas
    types = {n["type"] for n in workflow["nodes"]}
    assert {"LoadImage", "LoadVideo", "SaveVideo", "CreateVideo", "XNeMoModelLoader", "XNeMoSampler"} <= types
    loader = next(n for n in workflow["nodes"] if n["type"] == "XNeMoModelLoader")
    assert loader["widgets_values"][0] == "demo"
    prompt = to_prompt(workflow, info)
    assert "Note" not in {n["class_type"] for n in prompt.values()}
    assert json.loads((WORKFLOWS / "api" / name).read_text()) == prompt  # the API copy is the same graph


def test_validator_catches_broken_workflows(info, all_classes):
    good = load("xnemo_portrait_animation.json")
    sampler = next(n for n in good["nodes"] if n["type"] == "XNeMoSampler")
    cases = []
    bad = copy.deepcopy(good)
    next(n for n in bad["nodes"] if n["id"] == sampler["id"])["widgets_values"].pop(1)  # lost the seed control
    cases.append((bad, "widget values"))
    bad = copy.deepcopy(good)
    next(n for n in bad["nodes"] if n["id"] == sampler["id"])["widgets_values"][4] = "heun"
    cases.append((bad, "'heun' not in"))
    bad = copy.deepcopy(good)
    bad["links"][0][5] = "IMAGE"
    cases.append((bad, "type IMAGE"))
    bad = copy.deepcopy(good)
    next(n for n in bad["nodes"] if n["type"] == "SaveVideo")["widgets_values"][1] = "webm"
    cases.append((bad, "'webm' not in"))
    bad = copy.deepcopy(good)
    next(n for n in bad["nodes"] if n["type"] == "LoadImage")["widgets_values"][0] = "missing.png"
    cases.append((bad, "shipped media"))
    bad = copy.deepcopy(good)
    next(n for n in bad["nodes"] if n["type"] == "XNeMoSampler")["type"] = "XNeMoSamplerOld"
    cases.append((bad, "unknown node type"))
    for workflow, expected in cases:
        errors = validate_workflow(workflow, info, all_classes, MEDIA)
        assert any(expected in e for e in errors), (expected, errors)


def run(workflow, info, classes, comfy) -> dict:
    return execute(to_prompt(workflow, info), classes, comfy)


def test_portrait_animation_runs(info, all_classes, comfy, demo_model):
    workflow = load("xnemo_portrait_animation.json")
    set_widget(workflow, info, "XNeMoSampler", "steps", 1)
    result = run(workflow, info, all_classes, comfy)
    frames, fps, size, _ = video_stats(comfy.output_dir / "xnemo" / "portrait_00001_.mp4")
    assert frames == 60 and fps == pytest.approx(29.97, abs=0.01) and size == (256, 256)
    sampler_nodes = {str(n["id"]) for n in workflow["nodes"] if n["type"] in ("XNeMoSampler", "XNeMoExtractMotion")}
    assert {e["node"] for e in comfy.progress} == sampler_nodes  # each long node drives its own progress bar
    assert any(e["preview"] for e in comfy.progress)
    assert any(len(ui.get("images", [])) == 60 for ui in result["ui"].values())  # the crops preview


def test_keyframe_interpolation_runs(info, all_classes, comfy, demo_model):
    workflow = load("xnemo_keyframe_interpolation.json")
    set_widget(workflow, info, "XNeMoSampler", "steps", 1)
    run(workflow, info, all_classes, comfy)
    frames, fps, size, _ = video_stats(comfy.output_dir / "xnemo" / "keyframes_00001_.mp4")
    assert frames == 37 and fps == pytest.approx(29.97, abs=0.01) and size == (256, 256)


def test_long_video_runs_with_context_windows(info, all_classes, comfy, demo_model, monkeypatch):
    from xnemo_core import pipeline

    windows = []
    real = pipeline.context_windows
    monkeypatch.setattr(pipeline, "context_windows", lambda *a, **k: windows.append(real(*a, **k)) or windows[-1])
    workflow = load("xnemo_long_video.json")
    set_widget(workflow, info, "XNeMoSampler", "steps", 1)
    run(workflow, info, all_classes, comfy)
    frames, fps, _, _ = video_stats(comfy.output_dir / "xnemo" / "long_00001_.mp4")
    assert frames == 300 and fps == pytest.approx(29.97, abs=0.01)
    assert len(windows) == 1 and len(windows[0]) == 15 and all(len(w) == 24 for w in windows[0])


def test_motion_save_load_runs_and_reuses_the_file(info, all_classes, comfy, demo_model):
    workflow = load("xnemo_motion_save_load.json")
    set_widget(workflow, info, "XNeMoSampler", "steps", 1)
    run(workflow, info, all_classes, comfy)
    saved = comfy.output_dir / "xnemo" / "carphone_motion_00001_.safetensors"
    assert saved.is_file()
    assert video_stats(comfy.output_dir / "xnemo" / "reused_motion_00001_.mp4")[0] == 60
    # second use: the extraction nodes bypassed, the motion comes from the saved file alone
    for node in workflow["nodes"]:
        if node["type"] in ("XNeMoExtractMotion", "XNeMoSaveMotion"):
            node["mode"] = 4
    prompt = to_prompt(workflow, info)
    assert "file" not in next(p for p in prompt.values() if p["class_type"] == "XNeMoLoadMotion")["inputs"]
    result = execute(prompt, all_classes, comfy)
    assert "XNeMoExtractMotion" not in {prompt[i]["class_type"] for i in result["order"]}
    assert video_stats(comfy.output_dir / "xnemo" / "reused_motion_00002_.mp4")[0] == 60


def test_failures_carry_the_node_and_a_message(info, all_classes, comfy, demo_model):
    workflow = load("xnemo_portrait_animation.json")
    set_widget(workflow, info, "XNeMoModelLoader", "weights", "official (models/xnemo)")
    with pytest.raises(ExecutionError) as err:
        run(workflow, info, all_classes, comfy)
    assert err.value.class_type == "XNeMoModelLoader"
    assert "xnemo_motion_encoder.pth" in str(err.value) and "CC BY-NC 4.0" in str(err.value)
