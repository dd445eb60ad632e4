"""The ComfyUI node layer: definitions, registration, import cost, and each node's behaviour and messages.

Runs without ComfyUI: either with the pack's own fallbacks (no comfy modules at all) or inside
``FakeComfy`` (fake folder_paths / comfy.utils / comfy.model_management with the 0.3.64 contracts).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from comfy_stub import (
    CORE_OBJECT_INFO,
    InterruptProcessingException,
    VideoComponents,
    VideoFromComponents,
    VideoFromFile,
)
from comfy_stub_fixtures import *
from comfy_stub_fixtures import random_motion

ROOT = Path(__file__).resolve().parent.parent
SHARED_OBJECT_INFO = Path("/work/shared/comfyui/object_info_comfyui_0.3.64.json")
NODE_IDS = {  # stored in users' workflows: renaming one breaks them
    "XNeMoModelLoader", "XNeMoExtractMotion", "XNeMoSampler", "XNeMoPasteBack", "XNeMoMotionKeyframes",
    "XNeMoMotionSlice", "XNeMoMotionConcat", "XNeMoMotionLoop", "XNeMoMotionResample", "XNeMoMotionInfo",
    "XNeMoSaveMotion", "XNeMoLoadMotion"}
WIDGETS = ("INT", "FLOAT", "STRING", "BOOLEAN")


def node(pack, node_id):
    return pack.NODE_CLASS_MAPPINGS[node_id]()


# ------------------------------------------------------------------------------------------ definitions

def test_registration_ids_and_display_names(pack):
    assert set(pack.NODE_CLASS_MAPPINGS) == NODE_IDS
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == NODE_IDS
    assert all(name.startswith("X-NeMo ") for name in pack.NODE_DISPLAY_NAME_MAPPINGS.values())


@pytest.mark.parametrize("node_id", sorted(NODE_IDS))
def test_node_definition_is_well_formed(pack, node_id):
    cls = pack.NODE_CLASS_MAPPINGS[node_id]
    assert cls.CATEGORY == "X-NeMo"
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 20
    assert callable(getattr(cls, cls.FUNCTION))
    assert isinstance(cls.RETURN_TYPES, tuple) and all(isinstance(t, str) and t for t in cls.RETURN_TYPES)
    assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS)
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"} and spec["required"]
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            assert isinstance(entry, tuple) and len(entry) == 2, (name, entry)
            kind, options = entry
            assert isinstance(options, dict) and options.get("tooltip"), f"{node_id}.{name} has no tooltip"
            if isinstance(kind, list):
                assert kind and all(isinstance(v, str) for v in kind)
                assert options.get("default", kind[0]) in kind, name
            elif kind in ("INT", "FLOAT"):
                assert options["min"] <= options["default"] <= options["max"], name
                if kind == "INT":
                    assert all(isinstance(options[k], int) for k in ("min", "default", "max")), name
            elif kind in ("STRING", "BOOLEAN"):
                assert "default" in options or options.get("forceInput"), name
            else:
                assert kind.isupper(), name  # a socket type such as IMAGE / XNEMO_MOTION
    signature = __import__("inspect").signature(getattr(cls, cls.FUNCTION))
    declared = set(spec["required"]) | set(spec.get("optional", {}))
    assert declared <= set(signature.parameters), f"{node_id}.{cls.FUNCTION} misses inputs"


def test_engine_constants_match_widget_lists():
    from comfyui_xnemo.nodes.model_paths import OFFICIAL_FILES
    from comfyui_xnemo.nodes.sampler import INITS, SCHEDULERS

    from xnemo_core.checkpoints import OFFICIAL_FILES as ENGINE_FILES
    from xnemo_core.config import INITS as ENGINE_INITS
    from xnemo_core.config import SCHEDULERS as ENGINE_SCHEDULERS

    assert tuple(SCHEDULERS) == tuple(ENGINE_SCHEDULERS)
    assert tuple(INITS) == tuple(ENGINE_INITS)
    assert set(OFFICIAL_FILES) == set(ENGINE_FILES.values())


def test_embedded_core_object_info_matches_the_0_3_64_snapshot():
    if not SHARED_OBJECT_INFO.is_file():
        pytest.skip("shared object_info snapshot not on this machine")
    snapshot = json.loads(SHARED_OBJECT_INFO.read_text())
    for name, entry in CORE_OBJECT_INFO.items():
        assert snapshot[name] == entry, name


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, cwd=str(ROOT.parent), check=False)


def test_import_is_light_and_survives_missing_optional_packages():
    result = _run_python(f"""
        import importlib.util, sys, time
        for name in ("mediapipe", "huggingface_hub", "av"):
            sys.modules[name] = None  # not installed
        start = time.perf_counter()
        spec = importlib.util.spec_from_file_location("xnemo_pack", {str(ROOT / '__init__.py')!r},
                                                      submodule_search_locations=[{str(ROOT)!r}])
        module = importlib.util.module_from_spec(spec); sys.modules["xnemo_pack"] = module
        spec.loader.exec_module(module)
        for cls in module.NODE_CLASS_MAPPINGS.values():
            cls.INPUT_TYPES()
        heavy = [m for m in ("diffusers", "transformers", "mediapipe", "scipy", "huggingface_hub") if sys.modules.get(m)]
        print(len(module.NODE_CLASS_MAPPINGS), heavy)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "12 []", result.stdout


def test_setup_inside_comfyui_registers_model_folder_and_demo_media(pack, comfy):
    for name in os.listdir(comfy.input_dir):
        os.remove(comfy.input_dir / name)
    pack.nodes._setup_inside_comfyui()
    assert str(comfy.models_dir / "xnemo") in comfy.folders["xnemo"][0]
    assert sorted(os.listdir(comfy.input_dir)) == sorted(MEDIA)


# ------------------------------------------------------------------------------------------ comfy_compat

def test_fallback_progress_and_cancel_outside_comfyui(pack):
    compat = pack.nodes.comfy_compat
    from xnemo_core.errors import Cancelled

    assert not compat.in_comfyui()
    events = []
    compat.set_progress_hook(lambda value, total, preview: events.append((value, total)))
    try:
        bar = compat.progress_bar(3)
        bar.update_absolute(1)
        bar.update(1)
        assert events == [(1, 3), (2, 3)]
    finally:
        compat.set_progress_hook(None)
    compat.interrupt_processing(True)
    assert compat.processing_interrupted()
    with pytest.raises(Cancelled):
        compat.raise_interrupted()
    assert not compat.processing_interrupted()


def test_cancel_maps_to_comfyui_interrupt_inside_comfyui(pack, comfy):
    from xnemo_core.errors import Cancelled

    guarded = pack.nodes.common.guarded

    @guarded("Test Node")
    def job():
        raise Cancelled("stop")

    comfy.interrupted = True
    with pytest.raises(InterruptProcessingException):
        job()
    assert comfy.interrupted is False  # the flag is consumed, as ComfyUI's own check does


# ------------------------------------------------------------------------------------------ loader

def test_loader_loads_demo_and_states_licence(pack, demo_model):
    pipe, info = node(pack, "XNeMoModelLoader").load("demo", precision="fp32")
    assert pipe.native_size == 64 and pipe.dtype == torch.float32
    assert "licence:" in info and "demo" in info
    assert pipe.load_device.type == "cpu"


def test_loader_choices_find_bundles_and_official_sets(pack, comfy, demo_model):
    import shutil

    from comfyui_xnemo.nodes import model_paths

    xnemo = comfy.models_dir / "xnemo"
    (xnemo / "mine").mkdir(parents=True)
    shutil.copyfile(demo_model, xnemo / "mine" / "bundle.safetensors")
    (xnemo / "release2").mkdir()
    (xnemo / "release2" / "xnemo_denoising_unet.pth").write_bytes(b"")
    (xnemo / "sd-image-variations-diffusers" / "unet").mkdir(parents=True)
    (xnemo / "sd-image-variations-diffusers" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    choices = model_paths.weights_choices()
    assert choices[:2] == ["demo", "official (models/xnemo)"]
    assert "mine/bundle.safetensors" in choices and "official: release2/" in choices
    assert not any("diffusion_pytorch_model" in c for c in choices)
    pipe, info = node(pack, "XNeMoModelLoader").load("mine/bundle.safetensors")
    assert pipe.native_size == 64 and "bundle.safetensors" in info


def test_loader_missing_official_weights_say_which_files_and_where(pack, comfy):
    from comfyui_xnemo.nodes.common import XNeMoNodeError

    with pytest.raises(XNeMoNodeError) as err:
        node(pack, "XNeMoModelLoader").load("official (models/xnemo)")
    text = str(err.value)
    assert text.startswith("X-NeMo Load Model:")
    assert "xnemo_denoising_unet.pth" in text and str(comfy.models_dir / "xnemo") in text
    assert "CC BY-NC 4.0" in text and "download_base_models" in text


def test_loader_validation_names_missing_bundle(pack, comfy):
    verdict = pack.NODE_CLASS_MAPPINGS["XNeMoModelLoader"].VALIDATE_INPUTS("gone.safetensors", "auto", "auto")
    assert isinstance(verdict, str) and "gone.safetensors" in verdict and "models" in verdict
    assert pack.NODE_CLASS_MAPPINGS["XNeMoModelLoader"].VALIDATE_INPUTS("demo", "auto", "auto") is True


def test_loader_incompatible_checkpoint_reports_mismatch(pack, comfy, demo_model):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(demo_model), "pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (a safetensors handle)
    key = next(k for k in tensors if k.startswith("motion_encoder.") and tensors[k].ndim == 2)
    tensors[key] = tensors[key][:, :-1].contiguous()
    (comfy.models_dir / "xnemo").mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(comfy.models_dir / "xnemo" / "broken.safetensors"), metadata=metadata)
    with pytest.raises(Exception) as err:
        node(pack, "XNeMoModelLoader").load("broken.safetensors")
    text = str(err.value)
    assert text.startswith("X-NeMo Load Model:") and "wrong shape" in text and key.split(".", 1)[1] in text


def test_single_file_base_models_are_staged_with_a_config(pack, comfy):
    from comfyui_xnemo.nodes import model_paths

    vae_file = comfy.models_dir / "vae" / "svd_vae.safetensors"
    vae_file.parent.mkdir(parents=True, exist_ok=True)
    vae_file.write_bytes(b"x")
    assert "vae: svd_vae.safetensors" in model_paths.vae_choices()
    folder = model_paths._choice_dir("vae: svd_vae.safetensors", "vae")
    assert folder.name == "vae" and json.loads((folder / "config.json").read_text())["block_out_channels"]
    assert (folder / "diffusion_pytorch_model.safetensors").resolve() == vae_file.resolve()


def test_official_base_models_found_or_downloaded(pack, comfy, monkeypatch):
    import types

    from comfyui_xnemo.nodes import model_paths

    release = comfy.models_dir / "xnemo"
    release.mkdir(parents=True)
    for name in model_paths.OFFICIAL_FILES:
        (release / name).write_bytes(b"")
    calls = []

    def snapshot_download(repo_id, allow_patterns, local_dir):
        calls.append(repo_id)
        for pattern in allow_patterns:
            folder = Path(local_dir) / pattern.split("/")[0]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.json").write_text("{}")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    paths = model_paths.resolve_official(release, download=True)
    assert calls == [model_paths.BASE_REPO, model_paths.VAE_REPO]
    assert paths.vae_dir == str(release / "stable-video-diffusion-img2vid-xt" / "vae")
    assert paths.base_unet_dir == str(release / "sd-image-variations-diffusers" / "unet")
    model_paths.resolve_official(release, download=True)  # found now: no second download
    assert len(calls) == 2

    def offline(**kwargs):
        raise OSError("network unreachable")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=offline))
    import shutil

    shutil.rmtree(release / "stable-video-diffusion-img2vid-xt")
    with pytest.raises(FileNotFoundError, match="gated.*by hand"):
        model_paths.resolve_official(release, download=True)


# ------------------------------------------------------------------------------------------ extract motion

def test_extract_from_images_with_progress_stride_and_audio(pack, comfy, pipe, driving_images, reference_image):
    rate = 8000
    audio = {"waveform": torch.linspace(-1, 1, rate * 2)[None, None].repeat(1, 2, 1), "sample_rate": rate}
    motion, crops, report, fps, out_audio = node(pack, "XNeMoExtractMotion").extract(
        pipe, frame_stride=2, max_frames=3, start_frame=1, fps=30.0, driving_images=driving_images,
        reference=reference_image, audio=audio)
    assert len(motion) == 3 and motion.descriptor_dim == 512
    assert fps == pytest.approx(15.0) and motion.fps == pytest.approx(15.0)
    assert crops.shape[0] == 3 and crops.dtype == torch.float32 and 0 <= float(crops.min()) <= float(crops.max()) <= 1
    assert "face found in all 3 frames" in report
    # audio cut to [1/30 s, 1/30 s + 3*2/30 s)
    assert out_audio["waveform"].shape == (1, 2, round(rate * 6 / 30))
    assert float(out_audio["waveform"][0, 0, 0]) == pytest.approx(float(audio["waveform"][0, 0, round(rate / 30)]))
    values = [e["value"] for e in comfy.progress]
    assert values[-1] == 6 and values == sorted(values) and all(e["total"] == 6 for e in comfy.progress)


def test_extract_reports_filled_frames_and_fails_clearly_without_any_face(pack, pipe, driving_images):
    from comfyui_xnemo.nodes.common import XNeMoNodeError

    frames = driving_images[:5].clone()
    frames[2] = 0.5  # a grey frame: no face
    motion, crops, report, _, _ = node(pack, "XNeMoExtractMotion").extract(pipe, driving_images=frames)
    assert motion.filled_frames == [2] and "interpolated for frames 2" in report
    assert torch.allclose(crops[2, 0, 0], torch.tensor([1.0, 0.0, 0.0]))  # marked red
    with pytest.raises(XNeMoNodeError) as err:
        node(pack, "XNeMoExtractMotion").extract(pipe, driving_images=torch.full((3, 64, 64, 3), 0.5))
    assert "X-NeMo Extract Motion: no face found in any of the 3 frame(s)" in str(err.value)


def test_extract_needs_exactly_one_driving_input(pack, pipe, driving_images):
    from comfyui_xnemo.nodes.common import XNeMoNodeError

    with pytest.raises(XNeMoNodeError, match="exactly one driving input"):
        node(pack, "XNeMoExtractMotion").extract(pipe)
    with pytest.raises(XNeMoNodeError, match="connect the reference"):
        node(pack, "XNeMoExtractMotion").extract(pipe, f_rts_mode="paper", driving_images=driving_images)


def test_extract_paper_f_rts_follows_the_face_box(pack, pipe, driving_images, reference_image):
    motion = node(pack, "XNeMoExtractMotion").extract(pipe, f_rts_mode="paper", max_frames=3,
                                                       driving_images=driving_images, reference=reference_image)[0]
    assert motion.reference_descriptor is not None
    assert not torch.equal(motion.f_rts, torch.tensor([[0.0, 0.0, 1.0]]).expand(3, 3))


def test_extract_cancel_stops_during_tracking(pack, comfy, pipe, driving_images):
    comfy.cancel_after = 2
    with pytest.raises(InterruptProcessingException):
        node(pack, "XNeMoExtractMotion").extract(pipe, driving_images=driving_images)
    assert len(comfy.progress) == 2 and comfy.interrupted is False


def test_extract_from_core_video_keeps_fps_and_audio(pack, comfy, pipe, driving_images):
    rate = 16000
    tone = torch.sin(torch.arange(rate) / rate * 2 * np.pi * 440)[None, None] * 0.5
    clip = VideoFromComponents(VideoComponents(driving_images[:6], {"waveform": tone, "sample_rate": rate},
                                               Fraction(24)))
    path = str(comfy.input_dir / "with_audio.mp4")
    clip.save_to(path)
    motion, _, report, fps, audio = node(pack, "XNeMoExtractMotion").extract(
        pipe, driving_video=VideoFromFile(path), max_frames=4, frame_stride=1)
    assert len(motion) == 4 and fps == pytest.approx(24.0) and "with_audio.mp4" in report
    assert audio["sample_rate"] == rate
    assert audio["waveform"].shape[-1] == pytest.approx(rate * 4 / 24, abs=2)
    # an in-memory VIDEO (no file behind it) goes through get_components
    motion, _, _, fps, audio = node(pack, "XNeMoExtractMotion").extract(pipe, driving_video=clip, frame_stride=2)
    assert len(motion) == 3 and fps == pytest.approx(12.0)
    assert audio["waveform"].shape[-1] == rate * 3 * 2 // 24  # 3 frames, each 2 source frames of 1/24 s


# ------------------------------------------------------------------------------------------ sampler

def test_sampler_progress_preview_and_memory_release(pack, comfy, pipe, reference_image):
    motion = random_motion(5, fps=12.5)
    frames, fps, crop = node(pack, "XNeMoSampler").sample(pipe, reference_image, motion, seed=3, steps=2, cfg=2.0,
                                                          context_frames=4, context_overlap=1)
    assert frames.shape == (5, 64, 64, 3) and fps == 12.5
    # 2 windows per step x 2 steps + 1 decode chunk; a preview with every finished step
    assert [(e["value"], e["total"], e["preview"]) for e in comfy.progress] == [
        (1, 5, False), (2, 5, True), (3, 5, False), (4, 5, True), (5, 5, False)]
    assert comfy.cache_cleared >= 1
    assert crop.crop.image_size == (256, 256) and crop.size == 64


def test_sampler_cancel_mid_run(pack, comfy, pipe, reference_image):
    comfy.cancel_after = 1
    with pytest.raises(InterruptProcessingException):
        node(pack, "XNeMoSampler").sample(pipe, reference_image, random_motion(4), steps=3, context_frames=4,
                                          context_overlap=0)
    assert len(comfy.progress) == 1 and comfy.interrupted is False and comfy.cache_cleared >= 1


def test_sampler_cancel_with_fallback_shims(pack, pipe, reference_image):
    compat = pack.nodes.comfy_compat
    from xnemo_core.errors import Cancelled

    seen = []

    def press_cancel(value, total, preview):
        seen.append(value)
        compat.interrupt_processing(True)  # the engine's cancel() sees it before the next window

    compat.set_progress_hook(press_cancel)
    try:
        with pytest.raises(Cancelled, match="cancelled"):
            node(pack, "XNeMoSampler").sample(pipe, reference_image, random_motion(4), steps=3, context_frames=4,
                                              context_overlap=0, cfg=1.0)
    finally:
        compat.set_progress_hook(None)
        compat.interrupt_processing(False)
    assert seen == [1]


def test_sampler_checks_settings(pack, pipe, reference_image):
    from comfyui_xnemo.nodes.common import XNeMoNodeError

    cls = pack.NODE_CLASS_MAPPINGS["XNeMoSampler"]
    assert "smaller than context_frames" in cls.VALIDATE_INPUTS(context_frames=4, context_overlap=4)
    assert "multiple of 8" in cls.VALIDATE_INPUTS(size=100)
    assert cls.VALIDATE_INPUTS(context_frames=24, context_overlap=4, size=0) is True
    assert cls.VALIDATE_INPUTS() is True  # linked widgets are not passed at validation time
    with pytest.raises(XNeMoNodeError, match="temporal modules"):
        cls().sample(pipe, reference_image, random_motion(40), steps=1, context_frames=40, context_overlap=4)
    with pytest.raises(XNeMoNodeError, match="X-NeMo Animate: no face found"):
        cls().sample(pipe, torch.full((1, 96, 96, 3), 0.5), random_motion(2), steps=1)
    with pytest.raises(XNeMoNodeError, match="X-NeMo Animate: denoise < 1 needs an init latent"):
        cls().sample(pipe, reference_image, random_motion(2), steps=1, init="noise", denoise=0.5)


# ------------------------------------------------------------------------------------------ paste back

def test_feather_mask_and_paste_back(pack):
    from xnemo_core.compositing import feather_mask, paste_back

    mask = feather_mask((20, 10, 60, 50), (80, 100), 0.25)
    assert mask.shape == (80, 100) and float(mask[30, 40]) == 1.0 and float(mask[5, 5]) == 0.0
    assert 0 < float(mask[30, 22]) < 1  # soft inner edge
    edge = feather_mask((-10, -10, 30, 30), (80, 100), 0.25)  # box leaves the image: no ramp at the border
    assert float(edge[0, 0]) == 1.0 and float(edge[10, 29]) < 1.0
    background = torch.zeros(1, 80, 100, 3)
    frames = torch.ones(3, 16, 16, 3)
    images, out_mask = paste_back(background, frames, (20, 10, 60, 50), 0.25)
    assert images.shape == (3, 80, 100, 3) and out_mask.shape == (1, 80, 100)
    assert float(images[:, 30, 40].min()) == pytest.approx(1.0) and float(images[:, 5, 5].max()) == 0.0
    assert torch.allclose(images[0, ..., 0], out_mask[0])


def test_paste_back_node_checks_image_size(pack):
    from comfyui_xnemo.nodes.common import ReferenceInfo, XNeMoNodeError

    from xnemo_core.faces import ReferenceCrop

    crop = ReferenceCrop(appearance=np.zeros((16, 16, 3), np.uint8), motion=np.zeros((8, 8, 3), np.uint8),
                         face_box=np.array([40, 40, 60, 60], np.float32), appearance_box=np.array([30, 30, 70, 70]),
                         motion_box=np.zeros(4, np.float32), padded=False, score=1.0, image_size=(100, 80))
    info = ReferenceInfo(crop=crop, size=16)
    images, mask = node(pack, "XNeMoPasteBack").paste(torch.zeros(1, 80, 100, 3), torch.ones(2, 16, 16, 3), info)
    assert images.shape == (2, 80, 100, 3) and mask.shape == (1, 80, 100)
    with pytest.raises(XNeMoNodeError, match="same image"):
        node(pack, "XNeMoPasteBack").paste(torch.zeros(1, 50, 50, 3), torch.ones(2, 16, 16, 3), info)


# ------------------------------------------------------------------------------------------ motion editing

def test_schedule_parsing(pack):
    from comfyui_xnemo.nodes.common import XNeMoNodeError
    from comfyui_xnemo.nodes.motion_nodes import parse_schedule

    entries = parse_schedule("# comment\n0: a[0]\n 12 : B[ -1 ] hold 3 ease_in spherical ; 20: a[4] mode=linear "
                             "easing = constant")
    assert [(e.frame, e.clip, e.index, e.hold, e.easing, e.mode) for e in entries] == [
        (0, "a", 0, 0, None, None), (12, "b", -1, 3, "ease_in", "spherical"), (20, "a", 4, 0, "constant", "linear")]
    for bad in ("", "a[0]", "0: a[0] wobble", "0: a[0] hold=x"):
        with pytest.raises(XNeMoNodeError, match="X-NeMo Motion Keyframes"):
            parse_schedule(bad)


def test_keyframes_node_interpolates_two_clips_with_separate_f_rts(pack):
    a, b = random_motion(10, fps=30.0, seed=1), random_motion(8, fps=24.0, seed=2)
    keys = node(pack, "XNeMoMotionKeyframes")
    motion, summary = keys.interpolate(a, "0: a[0]\n4: b[-1] hold=2\n10: a[9] spherical", easing="ease_in_out",
                                       motion_b=b)
    assert len(motion) == 11 and motion.fps == 30.0 and "-> 11 frames" in summary
    assert torch.equal(motion.descriptors[0], a.descriptors[0])
    assert torch.equal(motion.descriptors[4], b.descriptors[-1]) and torch.equal(motion.descriptors[6], b.descriptors[-1])
    assert torch.equal(motion.descriptors[10], a.descriptors[9])
    follow = motion.f_rts[:, 0]
    linear = keys.interpolate(a, "0: a[0]\n4: b[-1] hold=2\n10: a[9]", f_rts="linear", motion_b=b)[0].f_rts[:, 0]
    assert torch.allclose(linear[:5], torch.linspace(float(linear[0]), float(linear[4]), 5), atol=1e-6)
    assert not torch.allclose(follow[:5], linear[:5])  # eased vs constant speed
    constant = keys.interpolate(a, "0: a[0]\n4: b[1]", f_rts="constant", motion_b=b)[0].f_rts
    assert torch.equal(constant, torch.tensor([[0.0, 0.0, 1.0]]).expand(5, 3))
    held = keys.interpolate(a, "0: a[3]\n4: b[1]", f_rts="first_keyframe", motion_b=b)[0].f_rts
    assert torch.equal(held, a.f_rts[3].expand(5, 3))
    assert keys.interpolate(a, "0: a[0]\n2: a[1]", fps=12.0)[0].fps == 12.0
    with pytest.raises(Exception, match="motion_c, which is not connected"):
        keys.interpolate(a, "0: a[0]\n4: c[0]")


def test_slice_concat_loop_resample_info(pack):
    m = random_motion(10, fps=20.0)
    (s,) = node(pack, "XNeMoMotionSlice").slice(m, start=2, length=5, step=2)
    assert len(s) == 3 and torch.equal(s.descriptors[1], m.descriptors[4])
    (tail,) = node(pack, "XNeMoMotionSlice").slice(m, start=-3)
    assert len(tail) == 3 and torch.equal(tail.descriptors[0], m.descriptors[7])
    (joined,) = node(pack, "XNeMoMotionConcat").concat(m, random_motion(4, fps=10.0), "resample")
    assert len(joined) == 18 and joined.fps == 20.0
    (appended,) = node(pack, "XNeMoMotionConcat").concat(m, random_motion(4, fps=10.0), "append",
                                                         motion_c=random_motion(1))
    assert len(appended) == 15
    loop = node(pack, "XNeMoMotionLoop")
    assert len(loop.loop(m, "repeat", times=3)[0]) == 30
    assert len(loop.loop(m, "ping_pong", times=2)[0]) == 36
    pp = loop.loop(m, "ping_pong", frames=25)[0]
    assert len(pp) == 25 and torch.equal(pp.descriptors[18], m.descriptors[0])
    assert torch.equal(loop.loop(m, "reverse", times=1)[0].descriptors[0], m.descriptors[-1])
    r, fps = node(pack, "XNeMoMotionResample").resample(m, 10.0)
    assert len(r) == 5 and fps == 10.0
    text, frames, fps = node(pack, "XNeMoMotionInfo").info(r)
    assert frames == 5 and fps == 10.0 and "5 frames at 10 fps" in text and "resample" in text


# ------------------------------------------------------------------------------------------ save / load

def test_save_and_load_motion_roundtrip(pack, comfy):
    m = random_motion(7, fps=29.97, filled_frames=[3])
    save, load = node(pack, "XNeMoSaveMotion"), node(pack, "XNeMoLoadMotion")
    out = save.save(m, "xnemo/clip")
    passed, name = out["result"]
    assert passed is m and name == "xnemo/clip_00001_.safetensors [output]" and "7 frames" in out["ui"]["text"][0]
    assert save.save(m, "xnemo/clip")["result"][1] == "xnemo/clip_00002_.safetensors [output]"
    file = comfy.output_dir / "xnemo" / "clip_00001_.safetensors"
    assert b"pickle" not in file.read_bytes()[:64]
    choices = pack.NODE_CLASS_MAPPINGS["XNeMoLoadMotion"].INPUT_TYPES()["required"]["motion_file"][0]
    assert name in choices
    loaded, fps, frames, text = load.load(name)
    assert torch.equal(loaded.descriptors, m.descriptors) and loaded.filled_frames == [3]
    assert fps == pytest.approx(29.97) and frames == 7 and "1 frame(s) without a detected face: 3" in text
    # a shared file dropped into the input folder; the linked 'file' input wins over the list
    (comfy.input_dir / "shared").mkdir()
    m.save(comfy.input_dir / "shared" / "friend.safetensors")
    assert "shared/friend.safetensors" in pack.NODE_CLASS_MAPPINGS["XNeMoLoadMotion"].INPUT_TYPES()["required"][
        "motion_file"][0]
    assert len(load.load("nothing.safetensors", file="shared/friend.safetensors")[0]) == 7
    assert pack.NODE_CLASS_MAPPINGS["XNeMoLoadMotion"].IS_CHANGED(name) == os.path.getmtime(file)


def test_motion_file_errors_are_node_level(pack, comfy):
    from comfyui_xnemo.nodes.common import XNeMoNodeError

    with pytest.raises(XNeMoNodeError, match="X-NeMo Load Motion: motion file 'missing.safetensors' not found"):
        node(pack, "XNeMoLoadMotion").load("missing.safetensors")
    (comfy.input_dir / "not_motion.safetensors").write_bytes(b"garbage")
    with pytest.raises(XNeMoNodeError, match="X-NeMo Load Motion: .*not a readable safetensors"):
        node(pack, "XNeMoLoadMotion").load("not_motion.safetensors")
    with pytest.raises(XNeMoNodeError, match="outside the output folder"):
        node(pack, "XNeMoSaveMotion").save(random_motion(2), "../../escape")
