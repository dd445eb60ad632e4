"""Speed and memory benchmark: motion extraction, sampling per frame, VAE decode, UNet FLOPs.

Why a script and not a test: timings depend on the machine; the numbers are printed (and saved as
JSON) so runs can be compared across commits and devices.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import SamplingConfig, XNeMoConfig


def _models(weights, device, precision):
    from .animate import load_models, resolve_device
    from .checkpoints import resolve_dtype
    from .models.stack import build_models

    presets = {"official-random": XNeMoConfig.official, "tiny-random": XNeMoConfig.tiny,
               "demo-random": XNeMoConfig.demo}
    if weights in presets:
        config = presets[weights]()
        dev = resolve_device(device)
        return build_models(config).to(device=dev, dtype=resolve_dtype(precision, dev))
    return load_models(weights, device, precision)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def unet_flops(models, size: int, frames: int, cfg: bool) -> float:
    """FLOPs of one denoiser call on one window (counted by torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    from .animate import native_resolution

    cfgm = models.config
    factor = native_resolution(models) // cfgm.unet.sample_size
    h = size // factor
    b = 2 if cfg else 1
    dev, dt = models.device, models.dtype
    x = torch.zeros(b, cfgm.unet.in_channels, frames, h, h, device=dev, dtype=dt)
    clip = torch.zeros(b, 1, cfgm.unet.cross_attention_dim, device=dev, dtype=dt)
    motion = torch.zeros(b, frames, cfgm.unet.motion_tokens, cfgm.unet.motion_token_dim, device=dev, dtype=dt)
    ref_lat = torch.zeros(1, cfgm.unet.in_channels, h, h, device=dev, dtype=dt)
    with torch.no_grad():
        kv = models.denoising_unet.project_reference(models.reference_unet(ref_lat, clip[-1:]))
        rows = torch.tensor([-1, 0]) if cfg else torch.tensor([0])
        with FlopCounterMode(display=False) as counter:
            models.denoising_unet(x, 500, clip, motion, kv, rows)
    return float(counter.get_total_flops())


def run_bench(weights=None, size=None, frames=24, steps=2, cfg=2.5, device="auto", precision="auto",
              extraction_frames=16) -> dict:
    """One case of each kind (the suite with a single size, length and CFG), as a flat summary."""
    spec = SuiteSpec("single", sizes=(size,), frames=(frames,), cfgs=(cfg,), steps=steps,
                     extraction_frames=extraction_frames, decode_frames=frames)
    suite = run_suite(weights, spec, device, precision)
    case = {c["kind"]: c for c in suite["cases"]}
    sampling = case["sampling"]
    return {"model": suite["model"], "device": suite["device"]["type"],
            "dtype": suite["dtype"], "size_px": sampling["size"], "frames": frames, "steps": steps, "cfg": cfg,
            "motion_extraction_fps": round(1.0 / case["motion_extraction"]["s_per_frame"], 2),
            "sampling_s_per_frame_per_step": round(sampling["s_per_frame_per_step"], 4),
            "sampling_s_per_frame_35_steps": round(sampling["s_per_frame"], 3),
            "vae_decode_s_per_frame": round(case["vae_decode"]["s_per_frame"], 4),
            "peak_memory_mb": round(max(c["peak_memory_mb"] for c in suite["cases"]), 1),
            "unet_gflop_per_window_call": round(sampling["tflop"] * 1e3 / sampling["unet_calls"], 2),
            "achieved_tflops": round(sampling["achieved_tflops"], 3)}


# ============================================================================================ suite
# A fixed list of cases whose numbers are comparable across commits (JSON with a schema version,
# the git commit and the device). `python -m xnemo_core bench --suite [--suite-size tiny|full]`.

SUITE_SCHEMA = "xnemo-bench-suite/1"

# Dense (no structured sparsity) peak TFLOP/s from the vendors' data sheets: (bf16/fp16 tensor core with
# fp32 accumulate, fp32 non-tensor). Matched against torch.cuda.get_device_name() in this order
# (first substring wins). $XNEMO_PEAK_TFLOPS overrides the number used for the run's dtype.
GPU_PEAK_TFLOPS = (
    ("H100 NVL", 835.0, 60.0),
    ("H100 PCIe", 756.5, 51.2),
    ("H200", 989.4, 66.9),
    ("H100", 989.4, 66.9),  # SXM5
    ("GH200", 989.4, 66.9),
    ("A100", 312.0, 19.5),
    ("L40S", 362.1, 91.6),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 30.3),
    ("RTX 4090", 165.2, 82.6),
    ("A10G", 70.0, 31.2),
    ("A10", 125.0, 31.2),
    ("V100", 125.0, 15.7),
    ("T4", 65.0, 8.1),
)


@dataclass(frozen=True)
class SuiteSpec:
    name: str
    sizes: tuple  # output sizes in px; None entries = the model's native size
    frames: tuple  # frames per clip
    cfgs: tuple = (1.0, 2.5)  # 1.0 = no CFG (one UNet row), 2.5 = the release's CFG (two rows)
    steps: int = 2  # timed denoising steps (s/frame at 35 steps is extrapolated)
    context: int = 24
    overlap: int = 4
    extraction_frames: int = 120
    decode_frames: int = 24


SUITES = {
    # the fixed suite of the issue: 256 and 512 px, 24 and 120 frames, with and without CFG
    "full": SuiteSpec("full", sizes=(256, 512), frames=(24, 120)),
    # the same structure scaled for a CPU: the model's native size and twice it, one window and several
    # windows (context 8, overlap 2: 24 frames = 4 windows), 1 step
    "tiny": SuiteSpec("tiny", sizes=(None, "2x"), frames=(8, 24), steps=1, context=8, overlap=2,
                      extraction_frames=16, decode_frames=8),
}


def gpu_peak_tflops(name: str, dtype: torch.dtype) -> float | None:
    override = os.environ.get("XNEMO_PEAK_TFLOPS")
    if override:
        return float(override)
    for key, half, single in GPU_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return half if dtype in (torch.float16, torch.bfloat16) else single
    return None


def git_commit(repo: Path | None = None) -> dict:
    repo = repo or Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                capture_output=True, text=True, timeout=10)
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gb=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}")
    else:
        name = platform.processor() or ""
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        info["name"] = name or "cpu"
    return info


class _PeakMemory:
    """Peak memory of one case: CUDA max-allocated; on Linux CPUs the process's peak resident set
    (VmHWM, reset per case through /proc/self/clear_refs: no sampling overhead), else a 20 ms RSS
    sampler; where /proc is missing, the process's lifetime peak (ru_maxrss)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb = 0.0
        self._mode = "cuda" if device.type == "cuda" else None
        self._stop = None

    @staticmethod
    def _status_mb(field: str) -> float | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
        except (OSError, ValueError, IndexError):
            return None
        return None

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            return True
        except OSError:
            return False

    def _poll(self):
        while not self._stop.wait(0.02):
            self.peak_mb = max(self.peak_mb, self._status_mb("VmRSS") or 0.0)

    def __enter__(self):
        if self._mode == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._status_mb("VmHWM") is not None and self._reset_hwm():
            self._mode = "hwm"
        elif self._status_mb("VmRSS") is not None:
            self._mode = "poll"
            self.peak_mb = self._status_mb("VmRSS")
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    @property
    def kind(self) -> str:
        return {"cuda": "cuda max allocated", "hwm": "process peak RSS", "poll": "process RSS (20 ms samples)"}.get(
            self._mode, "process lifetime peak RSS")

    def __exit__(self, *exc):
        if self._mode == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._mode == "hwm":
            self.peak_mb = self._status_mb("VmHWM") or 0.0
        elif self._mode == "poll":
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, self._status_mb("VmRSS") or 0.0)
        else:
            self.peak_mb = _peak_memory_mb(self.device)
        return False


def _resolve_size(value, native: int) -> int:
    if value is None:
        return native
    if value == "2x":
        return 2 * native
    return int(value)


@torch.no_grad()
def run_suite(weights=None, suite: str | SuiteSpec = "auto", device="auto", precision="auto", models=None,
              log=None) -> dict:
    """Run the fixed suite; returns the JSON-ready dict (schema SUITE_SCHEMA)."""
    from .animate import native_resolution
    from .motion import extract_motion
    from .pipeline import XNeMoPipeline

    label = "given models" if models is not None else str(weights or "demo")
    models = models if models is not None else _models(weights, device, precision)
    dev = models.device
    if isinstance(suite, str):
        suite = SUITES["full" if dev.type == "cuda" else "tiny"] if suite == "auto" else SUITES[suite]
    native = native_resolution(models)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    info = device_info(dev)
    peak = gpu_peak_tflops(info.get("name", ""), models.dtype) if dev.type == "cuda" else None
    cases = []

    def record(case: dict):
        cases.append(case)
        if log is not None:
            log(format_case(case))

    # motion extraction --------------------------------------------------------------------------
    crop = models.config.motion_encoder.image_size
    n = suite.extraction_frames
    crops = torch.randint(0, 255, (n, crop, crop, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    f_rts = torch.tensor([[0.0, 0.0, 1.0]]).repeat(n, 1)
    extract_motion(models.motion_encoder, crops[:2].numpy(), f_rts[:2])  # warm-up
    with _PeakMemory(dev) as mem:
        sync()
        t = time.perf_counter()
        extract_motion(models.motion_encoder, crops.numpy(), f_rts, batch_size=16)
        sync()
        seconds = time.perf_counter() - t
    record({"case": f"motion_extraction {crop}px x{n}", "kind": "motion_extraction", "size": crop, "frames": n,
            "s_per_frame": seconds / n, "peak_memory_mb": mem.peak_mb, "memory": mem.kind})

    pipe = XNeMoPipeline(models)
    ie = models.config.image_encoder.image_size
    prepared_by_size = {}
    for size_spec in suite.sizes:
        size = _resolve_size(size_spec, native)
        ref = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
        prepared_by_size[size] = pipe.prepare_reference(ref, torch.zeros(1, 3, ie, ie), torch.zeros(1, 3, crop, crop))

    # sampling -----------------------------------------------------------------------------------
    warmed, flop_cache = False, {}
    for size, prepared in prepared_by_size.items():
        for frames in suite.frames:
            for cfg in suite.cfgs:
                tokens = torch.randn(frames, models.config.unet.motion_tokens, models.config.unet.motion_token_dim,
                                     generator=torch.Generator().manual_seed(2))
                settings = SamplingConfig(steps=suite.steps, guidance_scale=cfg, context_frames=suite.context,
                                          context_overlap=suite.overlap)
                if not warmed:  # first-call overheads (kernels, allocator) out of the first case
                    pipe.sample(prepared, tokens[: min(frames, 2)], SamplingConfig(steps=1, guidance_scale=cfg),
                                decode=False)
                    warmed = True
                with _PeakMemory(dev) as mem:
                    sync()
                    t = time.perf_counter()
                    out = pipe.sample(prepared, tokens, settings, decode=False)
                    sync()
                    seconds = time.perf_counter() - t
                window = min(frames, suite.context)
                calls = sum(len(w) for w in out.windows)
                key = (size, window, cfg > 1)
                if key not in flop_cache:
                    flop_cache[key] = unet_flops(models, size, window, cfg > 1)
                flops = flop_cache[key] * calls
                tflops = flops / seconds / 1e12
                per_step = seconds / frames / suite.steps
                record({"case": f"sampling {size}px {frames}f {'cfg' if cfg > 1 else 'no-cfg'}", "kind": "sampling",
                        "size": size, "frames": frames, "cfg": cfg, "steps_timed": suite.steps,
                        "unet_calls": calls, "s_per_frame_per_step": per_step, "s_per_frame": per_step * 35,
                        "s_per_frame_note": "35 steps (release), extrapolated", "peak_memory_mb": mem.peak_mb,
                        "memory": mem.kind, "tflop": flops / 1e12, "achieved_tflops": tflops,
                        "peak_tflops": peak, "utilisation": (tflops / peak) if peak else None})
    # VAE decode ---------------------------------------------------------------------------------
    for size in prepared_by_size:
        h = size // models.vae_factor
        latents = torch.randn(1, models.config.vae.latent_channels, suite.decode_frames, h, h,
                              generator=torch.Generator().manual_seed(3))
        pipe.decode(latents[:, :, :1])  # warm-up
        with _PeakMemory(dev) as mem:
            sync()
            t = time.perf_counter()
            pipe.decode(latents)
            sync()
            seconds = time.perf_counter() - t
        record({"case": f"vae_decode {size}px x{suite.decode_frames}", "kind": "vae_decode", "size": size,
                "frames": suite.decode_frames, "s_per_frame": seconds / suite.decode_frames,
                "peak_memory_mb": mem.peak_mb, "memory": mem.kind})

    return {"schema": SUITE_SCHEMA, "suite": asdict(suite), "git": git_commit(),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": models.config.name,
            "weights": label,
            "device": info, "dtype": str(models.dtype).replace("torch.", ""), "peak_tflops": peak,
            "cases": cases}


def format_case(case: dict) -> str:
    text = f"{case['case']:38s} {case['s_per_frame']:9.4f} s/frame  peak {case['peak_memory_mb']:8.1f} MB"
    if case.get("achieved_tflops") is not None:
        text += f"  {case['achieved_tflops']:8.3f} TFLOP/s"
        if case.get("utilisation") is not None:
            text += f" ({100 * case['utilisation']:.1f}% of {case['peak_tflops']:.0f})"
    return text


def suite_table(results: dict, baseline: dict | None = None) -> str:
    """Markdown table of a suite run (and the ratio to an earlier run of the same cases)."""
    dev = results["device"]
    head = (f"{results['model']} on {dev.get('name', dev['type'])} ({results['dtype']}), suite {results['suite']['name']}, "
            f"commit {(results['git'].get('commit') or 'unknown')[:10]}{' (dirty)' if results['git'].get('dirty') else ''}")
    cols = ["case", "s/frame", "peak MB", "TFLOP/s", "% of peak"] + (["vs baseline"] if baseline else [])
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    old = {c["case"]: c for c in (baseline or {}).get("cases", [])}
    for c in results["cases"]:
        note = " (35 steps)" if c["kind"] == "sampling" else ""
        row = [c["case"], f"{c['s_per_frame']:.4f}{note}", f"{c['peak_memory_mb']:.0f}",
               "" if c.get("achieved_tflops") is None else f"{c['achieved_tflops']:.3f}",
               "" if c.get("utilisation") is None else f"{100 * c['utilisation']:.1f}%"]
        if baseline:
            prev = old.get(c["case"])
            row.append(f"{c['s_per_frame'] / prev['s_per_frame']:.2f}x time" if prev else "new")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def default_suite_json(results: dict, folder: str | Path = "out/bench") -> Path:
    commit = (results["git"].get("commit") or "nocommit")[:10]
    name = results["device"].get("name", results["device"]["type"])
    slug = "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")[:40]
    return Path(folder) / f"bench-{results['suite']['name']}-{commit}-{slug}.json"


def save_suite(results: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    return path
