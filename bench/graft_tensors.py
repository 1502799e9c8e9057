"""A diagnostic GGUF: ``--base`` with the named tensors taken from ``--donor`` (any type; same logical shape), every
other tensor and all metadata kept. Measures what a handful of one plan's type choices cost against another's
(score the result with ``bench/score_gguf.py``); the file's size moves by the tensors' difference.

    python bench/graft_tensors.py --base ours/model.gguf --donor llama-Q6_K.gguf --out hybrid.gguf \
        --where-base-type Q5_0,Q5_1          # every block-linear tensor of those types in base, from donor
    python bench/graft_tensors.py ... --names blk.0.ffn_down.weight,blk.29.ffn_down.weight
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import _own_folder_off_path  # (before any first-party import)
import gguf
import numpy

peer = _own_folder_off_path.sibling("_importance_peer")  # its GGUF metadata copy
BLOCK_LINEAR = re.compile(r"blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight$")


def graft(base: Path, donor: Path, out: Path, names: set[str]) -> list[dict[str, str]]:
    """Write ``out``; return each grafted tensor's name and its type in base and donor."""
    reader, donors = gguf.GGUFReader(base), {t.name: t for t in gguf.GGUFReader(donor).tensors}
    missing = names - set(donors)
    if missing:
        raise SystemExit(f"{donor}: no tensor {sorted(missing)[0]}")
    writer = peer.writer_with_metadata(reader, out)
    swapped = []
    for tensor in reader.tensors:
        source = donors[tensor.name] if tensor.name in names else tensor
        if list(source.shape) != list(tensor.shape):
            raise SystemExit(f"{tensor.name}: shape {list(source.shape)} in donor, {list(tensor.shape)} in base")
        if source is not tensor:
            swapped.append({"tensor": tensor.name, "base": tensor.tensor_type.name, "donor": source.tensor_type.name})
        writer.add_tensor(tensor.name, numpy.asarray(source.data), raw_shape=None, raw_dtype=source.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return swapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--donor", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--names", default="", help="comma-separated GGUF tensor names")
    parser.add_argument("--where-base-type", default="",
                        help="comma-separated GGML types: every block-linear tensor of base in one of them")
    args = parser.parse_args()
    names = {n for n in args.names.split(",") if n}
    if args.where_base_type:
        types = set(args.where_base_type.split(","))
        names |= {t.name for t in gguf.GGUFReader(args.base).tensors
                  if BLOCK_LINEAR.search(t.name) and t.tensor_type.name in types}
    if not names:
        parser.error("name no tensor (--names or --where-base-type)")
    swapped = graft(args.base, args.donor, args.out, names)
    sys.stdout.write(json.dumps({"out": str(args.out), "file_bytes": args.out.stat().st_size,
                                 "grafted": len(swapped), "tensors": swapped}) + "\n")


if __name__ == "__main__":
    main()
