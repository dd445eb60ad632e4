"""Faithful minimal stand-ins for the ComfyUI pieces the X-NeMo pack touches, for tests without ComfyUI.

* :class:`FakeComfy` puts fake ``folder_paths``, ``comfy.utils`` and ``comfy.model_management`` modules
  into ``sys.modules`` (through pytest's monkeypatch, so they vanish after the test). They follow the
  0.3.64 contracts the pack relies on: ProgressBar updates go through a hook that first raises
  ``InterruptProcessingException`` when Cancel was requested (as ComfyUI's main.py hook does), then
  records the update; folders are per-test temporary directories.
* Core nodes used by the shipped workflows (LoadImage, LoadVideo, GetVideoComponents, CreateVideo,
  SaveVideo, PreviewImage) as small classes with the same inputs/outputs, over PyAV and PIL.
* ``CORE_OBJECT_INFO``: what a real ComfyUI 0.3.64 serves at /object_info for those nodes (copied
  from a live server; the LoadImage/LoadVideo file lists are that server's input folder).
"""
from __future__ import annotations

import json
import os
import sys
import types
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

CORE_OBJECT_INFO = json.loads(r'''
{"LoadImage": {"input": {"required": {"image": [["broken.png", "example.png", "harness_astronaut.png"], {"image_upload": true}]}}, "input_order": {"required": ["image"]}, "output": ["IMAGE", "MASK"], "output_is_list": [false, false], "output_name": ["IMAGE", "MASK"], "name": "LoadImage", "display_name": "Load Image", "description": "", "python_module": "nodes", "category": "image", "output_node": false}, "LoadVideo": {"input": {"required": {"file": ["COMBO", {"multiselect": false, "options": ["harness_clip.mp4"], "video_upload": true}]}}, "input_order": {"required": ["file"]}, "output": ["VIDEO"], "output_is_list": [false], "output_name": ["VIDEO"], "output_tooltips": [null], "name": "LoadVideo", "display_name": "Load Video", "description": "", "python_module": "comfy_extras.nodes_video", "category": "image/video", "output_node": false, "deprecated": false, "experimental": false, "api_node": false}, "GetVideoComponents": {"input": {"required": {"video": ["VIDEO", {"tooltip": "The video to extract components from."}]}}, "input_order": {"required": ["video"]}, "output": ["IMAGE", "AUDIO", "FLOAT"], "output_is_list": [false, false, false], "output_name": ["images", "audio", "fps"], "output_tooltips": [null, null, null], "name": "GetVideoComponents", "display_name": "Get Video Components", "description": "Extracts all components from a video: frames, audio, and framerate.", "python_module": "comfy_extras.nodes_video", "category": "image/video", "output_node": false, "deprecated": false, "experimental": false, "api_node": false}, "CreateVideo": {"input": {"required": {"images": ["IMAGE", {"tooltip": "The images to create a video from."}], "fps": ["FLOAT", {"default": 30.0, "min": 1.0, "max": 120.0, "step": 1.0}]}, "optional": {"audio": ["AUDIO", {"tooltip": "The audio to add to the video."}]}}, "input_order": {"required": ["images", "fps"], "optional": ["audio"]}, "output": ["VIDEO"], "output_is_list": [false], "output_name": ["VIDEO"], "output_tooltips": [null], "name": "CreateVideo", "display_name": "Create Video", "description": "Create a video from images.", "python_module": "comfy_extras.nodes_video", "category": "image/video", "output_node": false, "deprecated": false, "experimental": false, "api_node": false}, "SaveVideo": {"input": {"required": {"video": ["VIDEO", {"tooltip": "The video to save."}], "filename_prefix": ["STRING", {"tooltip": "The prefix for the file to save. This may include formatting information such as %date:yyyy-MM-dd% or %Empty Latent Image.width% to include values from nodes.", "default": "video/ComfyUI", "multiline": false}], "format": ["COMBO", {"tooltip": "The format to save the video as.", "default": "auto", "multiselect": false, "options": ["auto", "mp4"]}], "codec": ["COMBO", {"tooltip": "The codec to use for the video.", "default": "auto", "multiselect": false, "options": ["auto", "h264"]}]}, "hidden": {"prompt": ["PROMPT"], "extra_pnginfo": ["EXTRA_PNGINFO"]}}, "input_order": {"required": ["video", "filename_prefix", "format", "codec"], "hidden": ["prompt", "extra_pnginfo"]}, "output": [], "output_is_list": [], "output_name": [], "output_tooltips": [], "name": "SaveVideo", "display_name": "Save Video", "description": "Saves the input images to your ComfyUI output directory.", "python_module": "comfy_extras.nodes_video", "category": "image/video", "output_node": true, "deprecated": false, "experimental": false, "api_node": false}, "PreviewImage": {"input": {"required": {"images": ["IMAGE"]}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}, "input_order": {"required": ["images"], "hidden": ["prompt", "extra_pnginfo"]}, "output": [], "output_is_list": [], "output_name": [], "name": "PreviewImage", "display_name": "Preview Image", "description": "Saves the input images to your ComfyUI output directory.", "python_module": "nodes", "category": "image", "output_node": true}}
''')
CORE_NODES = tuple(CORE_OBJECT_INFO)
VIRTUAL_NODES = ("Note", "MarkdownNote")  # front-end only: never sent to the server


# ------------------------------------------------------------------------------------------ fake ComfyUI modules

class InterruptProcessingException(Exception):
    """Stand-in of comfy.model_management.InterruptProcessingException."""


class FakeComfy:
    """Per-test fake ComfyUI: folders under ``root``, a recorded progress hook, a Cancel flag."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.input_dir = self.root / "input"
        self.output_dir = self.root / "output"
        self.temp_dir = self.root / "temp"
        self.models_dir = self.root / "models"
        for folder in (self.input_dir, self.output_dir, self.temp_dir, self.models_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.folders: dict[str, tuple[list[str], set]] = {
            key: ([str(self.models_dir / key)], {".safetensors", ".pt", ".pth", ".bin", ".ckpt"})
            for key in ("checkpoints", "vae", "clip_vision", "diffusion_models", "unet")}
        self.folders["diffusers"] = ([str(self.models_dir / "diffusers")], {"folder"})
        self.progress: list[dict] = []  # every ProgressBar update: node, value, total, preview
        self.interrupted = False
        self.cancel_after: int | None = None  # request Cancel once this many updates were recorded
        self.current_node: str | None = None
        self.cache_cleared = 0

    # -- comfy.model_management
    def _model_management(self) -> types.ModuleType:
        mm = types.ModuleType("comfy.model_management")
        env = self
        mm.InterruptProcessingException = InterruptProcessingException

        def interrupt_current_processing(value=True):
            env.interrupted = bool(value)

        def throw_exception_if_processing_interrupted():
            if env.interrupted:
                env.interrupted = False
                raise InterruptProcessingException()

        def soft_empty_cache(force=False):
            env.cache_cleared += 1

        mm.interrupt_current_processing = interrupt_current_processing
        mm.processing_interrupted = lambda: env.interrupted
        mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
        mm.get_torch_device = lambda: torch.device("cpu")
        mm.unet_offload_device = lambda: torch.device("cpu")
        mm.intermediate_device = lambda: torch.device("cpu")
        mm.soft_empty_cache = soft_empty_cache
        mm.free_memory = lambda memory_required, device, keep_loaded=(): None
        return mm

    # -- comfy.utils
    def _utils(self) -> types.ModuleType:
        utils = types.ModuleType("comfy.utils")
        env = self

        class ProgressBar:
            def __init__(self, total, node_id=None):
                self.total = int(total)
                self.current = 0
                self.node_id = node_id if node_id is not None else env.current_node

            def update_absolute(self, value, total=None, preview=None):
                if total is not None:
                    self.total = int(total)
                self.current = min(int(value), self.total)
                env._hook(self.node_id, self.current, self.total, preview)

            def update(self, value):
                self.update_absolute(self.current + int(value))

        utils.ProgressBar = ProgressBar
        return utils

    def _hook(self, node_id, value, total, preview):
        """What ComfyUI's main.py progress hook does: check Cancel first, then report (and send the preview)."""
        if self.interrupted:
            self.interrupted = False
            raise InterruptProcessingException()
        if preview is not None:
            kind, image, max_size = preview
            assert kind in ("JPEG", "PNG") and hasattr(image, "size") and isinstance(max_size, int), preview
        self.progress.append({"node": node_id, "value": value, "total": total, "preview": preview is not None})
        if self.cancel_after is not None and len(self.progress) >= self.cancel_after:
            self.interrupted = True  # the user presses Cancel now

    # -- folder_paths
    def _folder_paths(self) -> types.ModuleType:
        fp = types.ModuleType("folder_paths")
        env = self
        fp.models_dir = str(self.models_dir)
        fp.folder_names_and_paths = self.folders
        fp.get_input_directory = lambda: str(env.input_dir)
        fp.get_output_directory = lambda: str(env.output_dir)
        fp.get_temp_directory = lambda: str(env.temp_dir)

        def get_folder_paths(key):
            return list(env.folders[key][0])

        def add_model_folder_path(key, path, is_default=False):
            paths = env.folders.setdefault(key, ([], set()))[0]
            if path not in paths:
                paths.insert(0, path) if is_default else paths.append(path)

        def get_filename_list(key):
            paths, exts = env.folders.get(key, ([], set()))
            names = []
            for root in paths:
                for dirpath, _, files in os.walk(root):
                    for name in files:
                        if not exts or os.path.splitext(name)[1] in exts:
                            names.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
            return sorted(set(names))

        def get_full_path(key, name):
            for root in env.folders.get(key, ([], set()))[0]:
                path = os.path.join(root, name)
                if os.path.isfile(path):
                    return path
            return None

        def get_annotated_filepath(name, default_dir=None):
            for suffix, base in ((" [output]", env.output_dir), (" [input]", env.input_dir), (" [temp]", env.temp_dir)):
                if name.endswith(suffix):
                    return os.path.join(base, name[: -len(suffix)])
            return os.path.join(default_dir or env.input_dir, name)

        fp.get_folder_paths = get_folder_paths
        fp.add_model_folder_path = add_model_folder_path
        fp.get_filename_list = get_filename_list
        fp.get_full_path = get_full_path
        fp.get_annotated_filepath = get_annotated_filepath
        return fp

    def install(self, monkeypatch) -> FakeComfy:
        comfy = types.ModuleType("comfy")
        comfy.__path__ = []
        mm, utils = self._model_management(), self._utils()
        comfy.model_management, comfy.utils = mm, utils
        for name, mod in (("comfy", comfy), ("comfy.model_management", mm), ("comfy.utils", utils),
                          ("folder_paths", self._folder_paths())):
            monkeypatch.setitem(sys.modules, name, mod)
        return self


def folder_paths():
    return sys.modules["folder_paths"]


# ------------------------------------------------------------------------------------------ core VIDEO type


@dataclass
class VideoComponents:
    images: torch.Tensor  # IMAGE [F,H,W,3]
    audio: dict | None  # AUDIO {"waveform": [1,C,N], "sample_rate": int}
    frame_rate: Fraction
    metadata: dict | None = None


def _read_audio(path: str) -> dict | None:
    import av

    with av.open(path) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="fltp", layout=stream.layout, rate=stream.rate)
        chunks = [f.to_ndarray() for frame in container.decode(stream) for f in resampler.resample(frame)]
        if not chunks:
            return None
        return {"waveform": torch.from_numpy(np.concatenate(chunks, axis=1))[None], "sample_rate": int(stream.rate)}


class VideoFromFile:
    """comfy_api VideoInput backed by a file (decoded only when asked)."""

    def __init__(self, path: str):
        self._path = path

    def get_stream_source(self) -> str:
        return self._path

    def get_components(self) -> VideoComponents:
        import av

        from xnemo_core.video import read_video

        video = read_video(self._path)
        with av.open(self._path) as container:
            rate = container.streams.video[0].average_rate
        images = torch.from_numpy(video.frames).float() / 255.0
        return VideoComponents(images, _read_audio(self._path), Fraction(rate))

    def get_duration(self) -> float:
        import av

        with av.open(self._path) as container:
            stream = container.streams.video[0]
            return float(stream.frames / stream.average_rate)

    def get_dimensions(self) -> tuple[int, int]:
        import av

        with av.open(self._path) as container:
            stream = container.streams.video[0]
            return stream.width, stream.height


class VideoFromComponents:
    """comfy_api VideoInput made of frames (+ audio) in memory, as CreateVideo makes it."""

    def __init__(self, components: VideoComponents):
        self._components = components

    def get_components(self) -> VideoComponents:
        return self._components

    def get_duration(self) -> float:
        return float(self._components.images.shape[0] / self._components.frame_rate)

    def get_dimensions(self) -> tuple[int, int]:
        return int(self._components.images.shape[2]), int(self._components.images.shape[1])

    def save_to(self, path: str, format="auto", codec="auto", metadata=None) -> None:
        """mp4, H.264 (yuv420p) plus AAC audio when there is audio, as core SaveVideo writes."""
        import av

        images = (self._components.images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        height, width = images.shape[1] // 2 * 2, images.shape[2] // 2 * 2
        rate = Fraction(round(float(self._components.frame_rate) * 1000), 1000)
        audio = self._components.audio
        with av.open(path, mode="w") as container:
            if metadata:
                container.metadata.update({k: json.dumps(v) for k, v in metadata.items()})
            stream = container.add_stream("h264", rate=rate)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            audio_stream = None
            if audio is not None:
                audio_stream = container.add_stream("aac", rate=int(audio["sample_rate"]))
            for image in images:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image[:height, :width]), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
            if audio_stream is not None:
                waveform = audio["waveform"][0].float().numpy()
                layout = "mono" if waveform.shape[0] == 1 else "stereo"
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(waveform[:2]), format="fltp", layout=layout)
                frame.sample_rate = int(audio["sample_rate"])
                for packet in audio_stream.encode(frame):
                    container.mux(packet)
                for packet in audio_stream.encode():
                    container.mux(packet)


# ------------------------------------------------------------------------------------------ core nodes

def _input_files(kind: str) -> list[str]:
    root = folder_paths().get_input_directory()
    suffixes = (".png", ".jpg", ".jpeg", ".webp") if kind == "image" else (".mp4", ".mov", ".webm", ".mkv")
    return sorted(f for f in os.listdir(root) if f.lower().endswith(suffixes))


class LoadImage:
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"
    CATEGORY = "image"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": (_input_files("image"), {"image_upload": True})}}

    def load_image(self, image):
        from PIL import Image, ImageOps

        path = folder_paths().get_annotated_filepath(image)
        with Image.open(path) as pil:
            pil = ImageOps.exif_transpose(pil)
            rgb = torch.from_numpy(np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0)[None]
            if "A" in pil.getbands():
                mask = 1.0 - torch.from_numpy(np.asarray(pil.getchannel("A"), dtype=np.float32) / 255.0)[None]
            else:
                mask = torch.zeros((1, 64, 64), dtype=torch.float32)
        return (rgb, mask)


class LoadVideo:
    RETURN_TYPES = ("VIDEO",)
    FUNCTION = "execute"
    CATEGORY = "image/video"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"file": (_input_files("video"), {"video_upload": True})}}

    @classmethod
    def VALIDATE_INPUTS(cls, file):
        return True if os.path.isfile(folder_paths().get_annotated_filepath(file)) else f"Invalid video file: {file}"

    def execute(self, file):
        return (VideoFromFile(folder_paths().get_annotated_filepath(file)),)


class GetVideoComponents:
    RETURN_TYPES = ("IMAGE", "AUDIO", "FLOAT")
    RETURN_NAMES = ("images", "audio", "fps")
    FUNCTION = "execute"
    CATEGORY = "image/video"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"video": ("VIDEO",)}}

    def execute(self, video):
        components = video.get_components()
        return (components.images, components.audio, float(components.frame_rate))


class CreateVideo:
    RETURN_TYPES = ("VIDEO",)
    FUNCTION = "execute"
    CATEGORY = "image/video"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "fps": ("FLOAT", {"default": 30.0, "min": 1.0, "max": 120.0})},
                "optional": {"audio": ("AUDIO",)}}

    def execute(self, images, fps, audio=None):
        return (VideoFromComponents(VideoComponents(images, audio, Fraction(fps))),)


class SaveVideo:
    RETURN_TYPES = ()
    FUNCTION = "execute"
    OUTPUT_NODE = True
    CATEGORY = "image/video"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"video": ("VIDEO",), "filename_prefix": ("STRING", {"default": "video/ComfyUI"}),
                             "format": (["auto", "mp4"],), "codec": (["auto", "h264"],)},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def execute(self, video, filename_prefix, format, codec, prompt=None, extra_pnginfo=None):
        output = Path(folder_paths().get_output_directory())
        folder = output / os.path.dirname(filename_prefix)
        folder.mkdir(parents=True, exist_ok=True)
        base = os.path.basename(filename_prefix)
        counter = 1 + sum(1 for f in os.listdir(folder) if f.startswith(base + "_"))
        path = folder / f"{base}_{counter:05d}_.mp4"
        video.save_to(str(path), format=format, codec=codec, metadata={"prompt": prompt} if prompt else None)
        subfolder = os.path.relpath(folder, output)
        return {"ui": {"images": [{"filename": path.name, "subfolder": subfolder, "type": "output"}],
                       "animated": (True,)}}


class PreviewImage:
    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save_images(self, images, prompt=None, extra_pnginfo=None):
        assert images.ndim == 4 and images.shape[-1] in (3, 4), images.shape
        return {"ui": {"images": [{"filename": f"preview_{i:05d}.png", "subfolder": "", "type": "temp"}
                                  for i in range(int(images.shape[0]))]}}


CORE_CLASSES = {"LoadImage": LoadImage, "LoadVideo": LoadVideo, "GetVideoComponents": GetVideoComponents,
                "CreateVideo": CreateVideo, "SaveVideo": SaveVideo, "PreviewImage": PreviewImage}
