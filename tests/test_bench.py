"""The benchmark suite at micro size: cases, JSON schema, comparison table, GPU peak lookup, CLI."""
from __future__ import annotations

import json

import pytest
import torch

from xnemo_core import bench
from xnemo_core.bench import SuiteSpec, gpu_peak_tflops, run_suite, suite_table

MICRO_SUITE = SuiteSpec("micro", sizes=(None,), frames=(2, 4), steps=1, context=2, overlap=1, extraction_frames=2,
                        decode_frames=2)


@pytest.fixture(scope="module")
def suite_results(micro_models):
    return run_suite(models=micro_models, suite=MICRO_SUITE)


def test_suite_cases_and_schema(suite_results):
    r = suite_results
    assert r["schema"] == bench.SUITE_SCHEMA and r["model"] == "micro" and r["dtype"] == "float32"
    assert r["device"]["type"] == "cpu" and r["device"]["torch"] == torch.__version__
    assert set(r["git"]) == {"commit", "dirty"}
    kinds = [c["kind"] for c in r["cases"]]
    assert kinds == ["motion_extraction"] + ["sampling"] * 4 + ["vae_decode"]
    sampling = [c for c in r["cases"] if c["kind"] == "sampling"]
    assert {(c["frames"], c["cfg"]) for c in sampling} == {(2, 1.0), (2, 2.5), (4, 1.0), (4, 2.5)}
    for c in r["cases"]:
        assert c["s_per_frame"] > 0 and c["peak_memory_mb"] > 0
    for c in sampling:
        assert c["size"] == 128 and c["achieved_tflops"] > 0 and c["peak_tflops"] is None  # no peak on CPU
        assert c["s_per_frame"] == pytest.approx(c["s_per_frame_per_step"] * 35)
    four = {c["cfg"]: c for c in sampling if c["frames"] == 4}
    assert four[2.5]["tflop"] == pytest.approx(2 * four[1.0]["tflop"], rel=0.05)  # CFG doubles the UNet rows
    from xnemo_core.windows import context_windows

    assert four[1.0]["unet_calls"] == len(context_windows(4, 2, 1, 0)) == 4  # windows of 2, overlap 1, closed loop
    json.dumps(r)  # serialisable


def test_suite_table_and_comparison(suite_results):
    table = suite_table(suite_results)
    assert "| case | s/frame | peak MB | TFLOP/s | % of peak |" in table
    assert "sampling 128px 4f cfg" in table and table.count("\n| ") == 1 + len(suite_results["cases"])
    slower = json.loads(json.dumps(suite_results))
    for c in slower["cases"]:
        c["s_per_frame"] *= 2
    assert "2.00x time" in suite_table(slower, suite_results)


def test_gpu_peak_table():
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", torch.bfloat16) == pytest.approx(989.4)
    assert gpu_peak_tflops("NVIDIA H100 PCIe", torch.float16) == pytest.approx(756.5)
    assert gpu_peak_tflops("NVIDIA H200", torch.bfloat16) == pytest.approx(989.4)
    assert gpu_peak_tflops("NVIDIA L40S", torch.float32) == pytest.approx(91.6)
    assert gpu_peak_tflops("NVIDIA L4", torch.float16) == pytest.approx(121.0)
    assert gpu_peak_tflops("Some Future GPU", torch.float16) is None


def test_peak_memory_sees_an_allocation():
    with bench._PeakMemory(torch.device("cpu")) as small:
        torch.zeros(1)
    with bench._PeakMemory(torch.device("cpu")) as big:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB
        del x
    assert big.peak_mb >= small.peak_mb + 32


def test_bench_suite_cli_writes_json_and_compares(tmp_path, micro_models, suite_results, monkeypatch, capsys):
    from xnemo_core.__main__ import main
    from xnemo_core.checkpoints import save_bundle

    bundle = tmp_path / "micro.safetensors"
    save_bundle(micro_models, bundle, license_text="random test weights")
    monkeypatch.setitem(bench.SUITES, "tiny", MICRO_SUITE)
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps(suite_results))
    out = tmp_path / "bench.json"
    assert main(["bench", "--suite", "--suite-size", "tiny", "--weights", str(bundle), "--json", str(out),
                 "--compare", str(earlier)]) == 0
    saved = json.loads(out.read_text())
    assert saved["schema"] == bench.SUITE_SCHEMA and len(saved["cases"]) == 6 and saved["suite"]["name"] == "micro"
    printed = capsys.readouterr().out
    assert "vs baseline" in printed and "x time" in printed and f"saved {out}" in printed


def test_single_bench_reports_one_case_of_each_kind(tmp_path, micro_models):
    from xnemo_core.checkpoints import save_bundle

    bundle = tmp_path / "micro.safetensors"
    save_bundle(micro_models, bundle, license_text="random test weights")
    result = bench.run_bench(weights=str(bundle), size=128, frames=3, steps=1, cfg=2.5, extraction_frames=2)
    assert result["device"] == "cpu" and result["size_px"] == 128 and result["frames"] == 3
    for key in ("motion_extraction_fps", "sampling_s_per_frame_per_step", "vae_decode_s_per_frame",
                "peak_memory_mb", "unet_gflop_per_window_call", "achieved_tflops"):
        assert result[key] > 0, key
    assert result["sampling_s_per_frame_35_steps"] == pytest.approx(result["sampling_s_per_frame_per_step"] * 35,
                                                                    rel=1e-2)
