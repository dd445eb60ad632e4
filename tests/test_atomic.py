"""Atomic writes: the target is replaced whole on success and untouched on failure."""
import pytest

from xnemo_core.atomic import atomic_path


def test_success_replaces_and_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "motion.safetensors"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp != str(target) and tmp.endswith(".safetensors.tmp")
        open(tmp, "w").write("new")
    assert target.read_text() == "new"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["motion.safetensors"]  # no temp file left
