"""Same inputs, same bytes (issue 14, findings 6 and 7)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bitplan.hashing import sha256_file
from bitplan.targets.artifact import load_artifact

SMALL = ["--samples", "2", "--seq-len", "32", "--group-size", "64"]


def _run(model: Path, out: Path) -> dict:
    command = [sys.executable, "-m", "bitplan.service.cli", "run", "--model", str(model), "--bpw", "3.5", *SMALL,
               "--out", str(out), "--json", "--quiet", "--no-cache"]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])


def test_issue14_two_runs_of_the_same_job_write_identical_files(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Each run in its own process (safetensors' metadata order differed between processes)."""
    first, second = _run(tiny_llama_dir, tmp_path / "a"), _run(tiny_llama_dir, tmp_path / "b")
    assert first["units"] == second["units"]
    names = sorted(p.name for p in (tmp_path / "a").iterdir() if p.name != "manifest.json")
    assert "quantized.safetensors" in names and "float.safetensors" in names
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir() if p.name != "manifest.json")
    for name in names:
        assert sha256_file(tmp_path / "a" / name) == sha256_file(tmp_path / "b" / name), name
    manifests = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("a", "b")]
    assert manifests[0]["files"] == manifests[1]["files"]


def test_issue14_load_artifact_takes_a_str(tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = _run(tiny_llama_dir, tmp_path / "a")
    model, _, manifest = load_artifact(result["artifact"])
    assert manifest.achieved.bytes == result["bytes"] and model is not None


def test_issue14_float_tensors_keep_the_source_dtype_and_the_folder_size_is_reported(tiny_llama_dir: Path,
                                                                                     tmp_path: Path) -> None:
    import shutil

    from safetensors import safe_open

    folder = tmp_path / "fp16-source"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": "float16"}))
    result = _run(folder, tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "float.safetensors"), "pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {__import__("torch").float16}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    achieved = manifest["achieved"]
    assert achieved["file_bits_per_parameter"] == result["file_bits_per_parameter"] > result["bits_per_weight"]
    assert achieved["file_bits_per_parameter"] == 8 * achieved["file_bytes"] / achieved["parameters"]
    load_artifact(tmp_path / "out")
