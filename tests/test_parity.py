"""Numerical parity with the official release (public fixture set) and the full-size key manifest."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import MANIFEST, PARITY_DIR
from xnemo_core.__main__ import main
from xnemo_core.parity import CASES, check_manifest, run_fixture_dir


def test_fixture_set_without_its_weight_rule_is_refused(tmp_path):
    shutil.copy(PARITY_DIR / "unet_step.json", tmp_path / "unet_step.json")
    with pytest.raises(FileNotFoundError, match="fixture_weights.py"):
        run_fixture_dir(tmp_path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_public_fixture_case(case):
    lines = []
    passed, comparisons = run_fixture_dir(PARITY_DIR, only=[case], log=lines.append)
    print("\n".join(lines))
    checked = [c for c in comparisons if c.checked]
    assert checked, f"case {case} produced no checked outputs"
    assert passed, "\n".join(lines)
    for c in checked:  # well inside the contract, not just at its edge
        assert c.max_abs_error < 0.25 * c.tolerance, c


def test_corrupted_fixture_fails_the_command(tmp_path):
    shutil.copy(PARITY_DIR / "fixture_weights.py", tmp_path / "fixture_weights.py")
    for suffix in (".json", ".safetensors"):
        shutil.copy(PARITY_DIR / f"unet_step{suffix}", tmp_path / f"unet_step{suffix}")
    tensors = load_file(str(tmp_path / "unet_step.safetensors"))
    tensors["output.noise_pred_nocfg"] = tensors["output.noise_pred_nocfg"] + 1e-2
    save_file(tensors, str(tmp_path / "unet_step.safetensors"))
    assert main(["parity", "--fixture", str(tmp_path)]) == 1


def test_unknown_case_fails(tmp_path):
    shutil.copy(PARITY_DIR / "fixture_weights.py", tmp_path / "fixture_weights.py")
    (tmp_path / "odd.json").write_text(json.dumps({"case": "something_new"}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "odd.safetensors"))
    passed, _ = run_fixture_dir(tmp_path)
    assert not passed


def test_full_size_manifest_maps_completely():
    report = check_manifest(MANIFEST)
    assert report.ok, "\n".join(report.lines)
    text = "\n".join(report.lines)
    assert "denoising_unet: official 1820 keys, ours 1820; missing 0, unexpected 0, wrong shape 0" in text
    assert "reference_unet: official 682 keys, ours 682" in text
    assert "motion_encoder: official 407 keys, ours 407" in text


def test_manifest_with_a_renamed_key_fails(tmp_path):
    manifest = json.loads(MANIFEST.read_text())
    shape = manifest["reference_unet"].pop("conv_in.weight")
    manifest["reference_unet"]["conv_in.weights"] = shape
    path = tmp_path / "m.json"
    path.write_text(json.dumps(manifest))
    report = check_manifest(path)
    assert not report.ok
    assert "conv_in.weights" in "\n".join(report.lines)
    assert main(["parity", "--manifest", str(path)]) == 1
