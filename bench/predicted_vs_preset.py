"""The allocator's predicted objective of a preset's own per-tensor types against the plan bitplan chose.

Reads an ``allocation-problem.json`` (each unit's options: format, bytes, predicted distortion), the manifest of the
run that wrote it (the chosen format per unit) and a llama.cpp preset GGUF (its block-linear tensors' types, mapped to
our unit names with gguf's TensorNameMap). Prints one JSON object: both assignments' predicted objective (sum of the
units' distortions) and bytes, the units where they differ with each side's predicted distortion, and the sums per
(ours format, preset format) pair. A preset type missing from a unit's options (e.g. a K-quant on a 576-column row)
is reported, not guessed.

    python bench/predicted_vs_preset.py --run runs/ours-file-Q6_K --preset runs/llama-Q6_K.gguf [--top 20]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import gguf

BLOCK_LINEAR = re.compile(r"blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight$")


def preset_types_by_unit(path: Path, units: list[str]) -> dict[str, str]:
    """Our unit name -> the GGML type name the preset gave that tensor."""
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    arch_id = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.TensorNameMap(arch_id, int(reader.fields[f"{arch}.block_count"].contents()))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    out = {}
    for unit in units:
        name = names.get_name(f"{unit}.weight", try_suffixes=(".weight",))
        if name is not None and name in types:
            out[unit] = types[name]
    return out


def compare(run: Path, preset: Path, top: int) -> dict[str, object]:
    problem = json.loads((run / "allocation-problem.json").read_text())
    manifest = json.loads((run / "manifest.json").read_text())
    chosen = {u["name"]: u["format"] for u in manifest["units"]}
    options = {u["name"]: {o["format"]: o for o in u["options"]} for u in problem["units"]}
    theirs = preset_types_by_unit(preset, list(options))
    totals = {"ours": [0.0, 0.0], "preset": [0.0, 0.0]}
    missing, diffs, pairs = [], [], defaultdict(lambda: [0, 0.0, 0.0, 0.0])
    for unit, opts in options.items():
        mine, their = chosen[unit], theirs.get(unit)
        if their not in opts:
            missing.append({"unit": unit, "preset": their, "options": sorted(opts)})
            continue
        for side, fmt in (("ours", mine), ("preset", their)):
            totals[side][0] += opts[fmt]["distortion"]
            totals[side][1] += opts[fmt]["bytes"]
        if mine != their:
            d_ours, d_their = opts[mine]["distortion"], opts[their]["distortion"]
            diffs.append({"unit": unit, "ours": mine, "preset": their, "d_ours": d_ours, "d_preset": d_their,
                          "delta": d_ours - d_their, "bytes_ours": opts[mine]["bytes"],
                          "bytes_preset": opts[their]["bytes"]})
            pair = pairs[f"{mine}<-{their}"]
            pair[0] += 1
            pair[1] += d_ours - d_their
            pair[2] += opts[mine]["bytes"] - opts[their]["bytes"]
    diffs.sort(key=lambda d: -abs(d["delta"]))
    return {"run": str(run), "preset": str(preset), "budget_bytes": problem["budget"]["bytes"],
            "solver_objective": manifest.get("solver", {}).get("objective"),
            "predicted": {side: {"objective": v[0], "bytes": v[1]} for side, v in totals.items()},
            "units": len(options), "missing_preset_option": missing,
            "pairs": {k: {"units": v[0], "delta_distortion": v[1], "delta_bytes": v[2]} for k, v in pairs.items()},
            "largest_differences": diffs[:top]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a bitplan gguf run folder (manifest, problem)")
    parser.add_argument("--preset", type=Path, required=True, help="llama.cpp's preset GGUF of the same source")
    parser.add_argument("--top", type=int, default=20, help="largest per-unit differences to list")
    args = parser.parse_args()
    sys.stdout.write(json.dumps(compare(args.run, args.preset, args.top), indent=1) + "\n")


if __name__ == "__main__":
    main()
