"""Score GGUF files the way ``bench/peers.py --target gguf`` does: llama.cpp's own logits on the first N
WikiText-2 windows, per-token KL to the source's log-probabilities (mean, p99, p99.9), perplexity, top-1 agreement,
plus the block-linear tensors' type histogram. The source's log-probabilities are read from a ``reference-logprobs.npy``
an earlier peers run wrote (``--reference``, checked against the window count, length and vocabulary) or computed
from ``--source`` and written there. One JSON line per file, as each is scored.

    python bench/score_gguf.py --source runs/fq/src/smollm2-135m-rotated-f16.gguf \
        --reference runs/fq/peers/reference-logprobs.npy --windows 32 FILE.gguf [FILE.gguf ...]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import _own_folder_off_path  # (before any first-party import)
import numpy
import torch

from bitplan.report.evaluation import tokenize_for_perplexity
from bitplan.sources.calibration import read_text

peers = _own_folder_off_path.sibling("peers")


def windows_of(source: str, text: Path, count: int, seq_len: int) -> list[torch.Tensor]:
    """The evaluation windows peers.py scores on: the text's first ``count`` windows of ``seq_len`` tokens."""
    ids = tokenize_for_perplexity(peers.source_tokenizer(source), read_text(text))
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(count)]


def reference_of(source: str, windows: list[torch.Tensor], store: Path) -> list[torch.Tensor]:
    """The source's llama.cpp log-probabilities: ``store`` when it holds as many windows of this length, else
    computed (and written to ``store``)."""
    if store.is_file():
        array = numpy.load(store, mmap_mode="c")
        if array.shape[:2] == (len(windows), len(windows[0])):
            return [torch.from_numpy(array[i]) for i in range(len(windows))]
        raise SystemExit(f"{store}: shape {array.shape} does not fit {len(windows)} windows of {len(windows[0])}")
    return peers.reference_logprobs(peers.resolve_reference(source)[1], windows, "llama.cpp", store)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", type=Path, nargs="+")
    parser.add_argument("--source", required=True, help="the float GGUF the files were made from")
    parser.add_argument("--reference", type=Path, required=True, help="the source's log-probabilities (.npy)")
    parser.add_argument("--text", type=Path, default=peers.DEFAULT_TEXT)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    windows = windows_of(args.source, args.text, args.windows, args.seq_len)
    reference = reference_of(args.source, windows, args.reference)
    for path in args.files:
        _, _, types = peers.block_linear(path)
        row = {"file": str(path), **peers.score(path, windows, reference, "llama.cpp"), "types": types}
        sys.stdout.write(json.dumps(row) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
