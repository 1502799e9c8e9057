"""A mixture-of-experts model at Qwen3-30B-A3B's per-layer shape through the default job to GGUF: a random-weight
bf16 Qwen3-MoE folder (hidden 2048, 32 query and 4 key/value heads of 128, 128 experts of 768, 8 routed per token;
fewer than its 48 layers, the count in the output; SmolLM2's tokenizer) written tensor by tensor, then ``bitplan
run --target gguf --bpw 4`` in a process of its own (streamed: one layer's experts in memory at a time), with the
peak resident memory of the process tree, seconds per stage, the types chosen per kind of tensor, the bytes by
kind, the tokens each expert saw, and the GGUF loaded in llama.cpp and decoding. Prints one JSON object.

    python bench/moe.py [--layers 2] [--windows 4] [--seq-len 256] [--bpw 4] [--formats Q3_K,Q4_K,Q5_K,Q6_K]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import _own_folder_off_path  # (before any first-party import)

SHAPE = {"hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
         "moe_intermediate_size": 768, "intermediate_size": 6144, "num_experts": 128, "num_experts_per_tok": 8,
         "norm_topk_prob": True, "tie_word_embeddings": False, "rms_norm_eps": 1e-6}  # Qwen3-30B-A3B's config
SHARD_BYTES = 1 << 30


def _tensor_shapes(config, layers: int) -> list[tuple[str, tuple[int, ...]]]:  # noqa: ANN001
    hidden, head_dim, experts = config.hidden_size, config.head_dim, config.num_experts
    q, kv, inter = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim, \
        config.moe_intermediate_size
    shapes = [("model.embed_tokens.weight", (config.vocab_size, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,)),
                   (p + "self_attn.q_proj.weight", (q, hidden)), (p + "self_attn.k_proj.weight", (kv, hidden)),
                   (p + "self_attn.v_proj.weight", (kv, hidden)), (p + "self_attn.o_proj.weight", (hidden, q)),
                   (p + "self_attn.q_norm.weight", (head_dim,)), (p + "self_attn.k_norm.weight", (head_dim,)),
                   (p + "mlp.gate.weight", (experts, hidden))]
        for e in range(experts):  # the checkpoint's per-expert names, as Qwen3-MoE's files store them
            shapes += [(f"{p}mlp.experts.{e}.gate_proj.weight", (inter, hidden)),
                       (f"{p}mlp.experts.{e}.up_proj.weight", (inter, hidden)),
                       (f"{p}mlp.experts.{e}.down_proj.weight", (hidden, inter))]
    return [*shapes, ("model.norm.weight", (hidden,)), ("lm_head.weight", (config.vocab_size, hidden))]


def write_moe_folder(folder: Path, layers: int, *, seed: int = 0) -> Path:
    """The random bf16 Qwen3-MoE folder, one shard at a time; reused when its config is already there."""
    import torch
    from transformers import AutoTokenizer, Qwen3MoeConfig

    from bitplan.sources.models import BUNDLED_MODELS

    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    gguf = BUNDLED_MODELS["smollm2-135m"].path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = Qwen3MoeConfig(vocab_size=len(tokenizer), num_hidden_layers=layers, max_position_embeddings=8192,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            dtype="bfloat16", architectures=["Qwen3MoeForCausalLM"], **SHAPE)
    generator = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    for name, dims in _tensor_shapes(config, layers):
        scale = 0.1 if "norm" in name else 0.02
        tensor = ((1.0 if "norm" in name else 0.0) + scale * torch.randn(dims, generator=generator)).bfloat16()
        if sum(t.numel() * 2 for t in shard.values()) + tensor.numel() * 2 > SHARD_BYTES:
            _flush(folder, shard, weight_map)
        shard[name] = tensor
    _flush(folder, shard, weight_map)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tokenizer.save_pretrained(folder)
    config.save_pretrained(folder)
    return folder


def _flush(folder: Path, shard: dict, weight_map: dict[str, str]) -> None:  # noqa: ANN001 (torch tensors)
    from safetensors.torch import save_file

    if shard:
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard.clear()


def types_by_kind(units: list[dict[str, object]]) -> dict[str, dict[str, int]]:
    """Kind of tensor -> type -> how many units chose it."""
    from bitplan.sources.moe import unit_kind

    kinds: dict[str, dict[str, int]] = {}
    for unit in units:
        per = kinds.setdefault(unit_kind(str(unit["name"])), {})
        per[str(unit["format"])] = per.get(str(unit["format"]), 0) + 1
    return kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="layers of the 48 (each 0.6B parameters of experts)")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--bpw", type=float, default=4.0)
    parser.add_argument("--formats", default=None, help="candidate types (default: the gguf target's); fewer cut "
                        "the encoding, which dominates the job's time on two cores")
    parser.add_argument("--folders", type=Path, default=Path("runs/moe"))
    parser.add_argument("--keep-folder", action="store_true")
    args = parser.parse_args()
    scale = _own_folder_off_path.sibling("scale")
    started = time.perf_counter()
    folder = write_moe_folder(args.folders / f"qwen3-30b-a3b-shape-{args.layers}l-bf16", args.layers)
    written_s = round(time.perf_counter() - started, 1)
    result = scale.run_child(folder, windows=args.windows, seq_len=args.seq_len, bpw=args.bpw,
                             out=args.folders / "out", quality_windows=2, formats=args.formats)
    formats = result.pop("unit_formats")
    report = {"provenance": _own_folder_off_path.sibling("_provenance").provenance(), "benchmark": "moe",
              "command": " ".join(sys.argv), "shape": {**SHAPE, "num_hidden_layers": args.layers,
                                                       "of_layers": 48}, "folder_write_s": written_s, **result,
              "types_by_kind": types_by_kind([{"name": n, "format": f} for n, f in formats.items()]),
              "llama_cpp": scale.llama_cpp_decodes(Path(str(result["gguf"])))}
    if not args.keep_folder:
        shutil.rmtree(folder, ignore_errors=True)
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
