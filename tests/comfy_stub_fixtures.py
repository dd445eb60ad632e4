"""pytest fixtures shared by the node and workflow tests (import with ``from comfy_stub_fixtures import *``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from comfy_stub import CORE_CLASSES, FakeComfy
from comfy_stub_build import load_pack, object_info

MEDIA = {"xnemo_astronaut.png", "xnemo_driving_carphone.mp4"}

__all__ = [
    "MEDIA",
    "all_classes",
    "comfy",
    "demo_model",
    "driving_images",
    "info",
    "one_torch_thread",
    "pack",
    "pipe",
    "random_motion",
    "reference_image",
]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run the tiny demo-size models on one thread: on 2 shared cores, torch's intra-op threads make these
    small convolutions 10-50x slower when another process competes for the CPU. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def pack():
    return load_pack()


@pytest.fixture(scope="session")
def all_classes(pack):
    classes = dict(CORE_CLASSES)
    classes.update(pack.NODE_CLASS_MAPPINGS)
    return classes


@pytest.fixture(scope="session")
def info(pack):
    return object_info()


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory):
    """The bundled demo model; while it is not in the repo yet, a random model of the demo's size."""
    from xnemo_core import animate

    if animate.DEMO_MODEL.is_file():
        yield animate.DEMO_MODEL
        return
    from xnemo_core.checkpoints import save_bundle
    from xnemo_core.config import XNeMoConfig
    from xnemo_core.models.stack import build_models

    path = tmp_path_factory.mktemp("demo") / "demo_model.safetensors"
    torch.manual_seed(0)
    save_bundle(build_models(XNeMoConfig.demo()), path, license_text="random weights for tests")
    patch = pytest.MonkeyPatch()
    patch.setattr(animate, "DEMO_MODEL", path)
    yield path
    patch.undo()


@pytest.fixture()
def comfy(tmp_path, monkeypatch, pack):
    """A fake ComfyUI (folders, progress hook, Cancel flag) with the demo media in its input folder."""
    from comfyui_xnemo.nodes.media import install_demo_media

    env = FakeComfy(tmp_path / "comfy").install(monkeypatch)
    install_demo_media(env.input_dir)
    return env


@pytest.fixture(scope="session")
def pipe(pack, demo_model):
    return pack.NODE_CLASS_MAPPINGS["XNeMoModelLoader"]().load("demo")[0]


@pytest.fixture(scope="session")
def reference_image():
    from xnemo_core.animate import DEMO_REFERENCE
    from xnemo_core.video import read_image

    return torch.from_numpy(read_image(DEMO_REFERENCE).copy()).float()[None] / 255.0


@pytest.fixture(scope="session")
def driving_images():
    from xnemo_core.animate import DEMO_DRIVING
    from xnemo_core.video import read_video

    return torch.from_numpy(read_video(DEMO_DRIVING, max_frames=8).frames).float() / 255.0


def random_motion(frames: int = 6, fps: float = 25.0, dim: int = 512, seed: int = 0, **kwargs):
    from xnemo_core.motion import MotionSequence

    g = torch.Generator().manual_seed(seed)
    rts = torch.zeros(frames, 3)
    rts[:, 2] = 1.0
    rts[:, 0] = torch.linspace(0, 0.1, frames)
    boxes = torch.tensor(np.tile([10.0, 10.0, 50.0, 50.0], (frames, 1)), dtype=torch.float32)
    return MotionSequence(descriptors=torch.randn(frames, dim, generator=g), f_rts=rts, boxes=boxes, fps=fps,
                          source_size=(176, 144), **kwargs)

