"""The gguf target from a Hugging Face folder (issue 17): small Llama, Qwen2 and Qwen3 models with SmolLM2's real
byte-level BPE tokenizer, quantized with ``--target gguf``, loaded by llama.cpp itself (llama-cpp-python): its
tokenizer splits text as transformers' does, and its logits are those of our own loader of the same artifact (Gemma3
with its SentencePiece vocabulary: ``test_gguf_gemma3.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bitplan.errors import ModelReferenceError
from bitplan.job.pipeline import run_pipeline
from bitplan.sources.models import load_model
from bitplan.sources.units import find_units
from bitplan.spec import JobSpec
from bitplan.targets.artifact import load_artifact

VOCAB = 49152  # SmolLM2's tokenizer
TEXT = "The capital of France is Paris. In 1998, 33 people said: it's \"fine\"!"


@pytest.fixture(scope="module")
def smollm2_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer as transformers saves it (``tokenizer.json``), from the bundled GGUF."""
    from transformers import AutoTokenizer

    from bitplan.sources.models import resolve_reference

    _, path = resolve_reference("smollm2-135m")
    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(folder)
    return folder


def hf_folder(tmp_path: Path, tokenizer: Path, arch: str, *, tied: bool = True) -> Path:
    import shutil

    import transformers

    torch.manual_seed(0)
    common = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
              "tie_word_embeddings": tied, "rms_norm_eps": 1e-5}
    config_class, model_class = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                                 "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                                 "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}[arch]
    config = getattr(transformers, config_class)(**common, **({"head_dim": 32} if arch == "qwen3" else {}))
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():  # norm weights no fp16 holds exactly (a copy through the artifact's fp16 would show)
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(1 + 0.1 * torch.randn_like(parameter))
    folder = tmp_path / (arch if tied else f"{arch}-untied")
    model.save_pretrained(folder, safe_serialization=True)
    for file in tokenizer.iterdir():
        shutil.copy(file, folder / file.name)
    return folder


def llama_cpp_runs_it_as_our_loader(runtime: object, artifact: Path, ids: list[int], *, argmax: bool = False) -> None:
    """llama.cpp's logits of ``ids`` (``runtime``: a ``Llama`` of the artifact's GGUF) are our loader's of the
    artifact, within 5 % of the largest logit (llama.cpp rounds activations to 8 bits)."""
    runtime.eval(ids)  # type: ignore[attr-defined]
    theirs = torch.tensor(runtime.scores[: len(ids)])  # type: ignore[attr-defined]
    ours, _, _ = load_artifact(artifact)
    with torch.no_grad():
        expected = ours(torch.tensor([ids])).logits[0]
    assert float((theirs - expected).abs().max()) < 0.05 * float(expected.abs().max())
    if argmax:
        assert (theirs.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("arch", ["llama", pytest.param("qwen2", marks=pytest.mark.slow),
                                  pytest.param("qwen3", marks=pytest.mark.slow)])  # the slow ones: in .ci/run
def test_issue17_a_gguf_from_a_hugging_face_folder_runs_in_llama_cpp(arch: str, tmp_path: Path,
                                                                   smollm2_tokenizer: Path) -> None:
    from llama_cpp import Llama
    from tokenizers import Tokenizer

    folder = hf_folder(tmp_path, smollm2_tokenizer, arch)
    run = run_pipeline(JobSpec.from_flat(model=str(folder), bits_per_weight=5.5, target="gguf", num_samples=2,
                                         seq_len=32, kl_windows=0, quality_windows=0), out=tmp_path / "out")
    assert {u["format"] for u in run.units} <= {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}  # 64-wide rows: 32-blocks
    gguf_path = Path(run.artifact) / "model.gguf"
    runtime = Llama(model_path=str(gguf_path), n_ctx=64, logits_all=True, verbose=False)
    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(TEXT, add_special_tokens=False).ids
    assert runtime.tokenize(TEXT.encode(), add_bos=False, special=False) == ids  # the vocabulary and pre-tokenizer
    llama_cpp_runs_it_as_our_loader(runtime, Path(run.artifact), ids, argmax=True)


def assert_a_whole_file_budget_chooses_the_tied_head_too(source: Path, tmp_path: Path) -> None:
    """A whole-file budget counts the output head (here tied: the file's F16 ``token_embd``, most of the file), so
    the allocator chooses its type too; llama.cpp runs the file as our loader runs the artifact."""
    import gguf
    from llama_cpp import Llama

    embedding_bytes = next(int(t.n_bytes) for t in gguf.GGUFReader(source).tensors if t.name == "token_embd.weight")
    budget = source.stat().st_size - embedding_bytes // 2  # more than the blocks can give up: the head must shrink
    run = run_pipeline(JobSpec.from_flat(model=str(source), file_bytes=budget, target="gguf", num_samples=2,
                                         seq_len=32, kl_windows=0, quality_windows=0), out=tmp_path / "file")
    path = Path(run.artifact) / "model.gguf"
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert run.file_bytes == path.stat().st_size <= budget
    assert run.head is not None and [h["name"] for h in run.head] == ["lm_head"] and "output.weight" not in tensors
    embedding = tensors["token_embd.weight"]
    assert embedding.tensor_type.name == run.head[0]["format"] != "F16"
    assert int(embedding.n_bytes) == run.head[0]["bytes"]
    linear = sum(int(t.n_bytes) for name, t in tensors.items() if name.startswith("blk.") and len(t.shape) == 2)
    assert run.bytes == linear and len(run.units) == 14  # bytes and units: the block linear layers, as before
    ids = list(range(1, 40))
    llama_cpp_runs_it_as_our_loader(Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False),
                                    Path(run.artifact), ids)
    # the packed folder beside it: transformers' from_pretrained computes our loader's logits (the head in its
    # chosen type, the embedding lookup in the source's)
    from tests.bitplan.test_formats_pipeline import from_pretrained_matches_our_loader

    from_pretrained_matches_our_loader(Path(run.artifact))


@pytest.mark.slow  # in .ci/run's slow subset (three jobs and two tokenizer conversions: about 90 s here)
def test_issue17_a_gguf_made_from_a_hugging_face_folder_as_the_source_of_more_jobs(tmp_path: Path,
                                                                                   smollm2_tokenizer: Path) -> None:
    folder = hf_folder(tmp_path, smollm2_tokenizer, "llama")
    first = run_pipeline(JobSpec.from_flat(model=str(folder), bits_per_weight=5.5, target="gguf", num_samples=2,
                                           seq_len=32, kl_windows=0, quality_windows=0), out=tmp_path / "out")
    source = Path(first.artifact) / "model.gguf"
    assert_a_gguf_source_keeps_its_other_tensors_byte_for_byte(source, tmp_path)
    assert_a_whole_file_budget_chooses_the_tied_head_too(source, tmp_path)


@pytest.mark.slow  # in .ci/run's slow subset (a tokenizer conversion and a job: about 40 s here)
def test_issue17_a_whole_file_budget_from_a_hugging_face_folder(tmp_path: Path, smollm2_tokenizer: Path) -> None:
    """``--file-bytes`` with a Hugging Face folder as the source: what the file holds besides the units is predicted
    from the header as it will be written and the other tensors in their written types (an upper bound, within the
    margin), the tied head is chosen too, the file meets the budget and llama.cpp runs it as our loader does."""
    import gguf
    from llama_cpp import Llama

    from bitplan.targets.exports.gguf_file import FILE_BUDGET_MARGIN, hf_file_overhead

    folder = hf_folder(tmp_path, smollm2_tokenizer, "llama")
    units = list(find_units(load_model(str(folder)).model))
    other = hf_file_overhead(folder, [*units, "lm_head"])  # all but the units' bytes (the tied head a unit too)
    q8_0 = {name: m.weight.numel() // 32 * 34 for name, m in find_units(load_model(str(folder)).model).items()}
    head_q8_0 = VOCAB * 64 // 32 * 34  # the embedding: most of the file
    budget = other + sum(q8_0.values()) + 3 * head_q8_0 // 4  # Q8_0 blocks fit, a Q8_0 head does not
    run = run_pipeline(JobSpec.from_flat(model=str(folder), file_bytes=budget, target="gguf", num_samples=2,
                                         seq_len=32, kl_windows=0, quality_windows=0), out=tmp_path / "file")
    path = Path(run.artifact) / "model.gguf"
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert run.file_bytes == path.stat().st_size <= budget
    assert run.head is not None and tensors["token_embd.weight"].tensor_type.name == run.head[0]["format"] != "Q8_0"
    actual = path.stat().st_size - run.bytes - run.head[0]["bytes"]
    assert actual <= other <= actual + FILE_BUDGET_MARGIN + 32 * (len(units) + 1)
    ids = list(range(1, 40))
    llama_cpp_runs_it_as_our_loader(Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False),
                                    Path(run.artifact), ids)


def assert_a_gguf_source_keeps_its_other_tensors_byte_for_byte(source: Path, tmp_path: Path) -> None:
    """A GGUF as the source of a gguf-target job: every tensor but the units' is the source's own bytes and type
    (copied, not re-encoded from the artifact's fp16 copy); a tied model's file has no ``output.weight``."""
    import gguf
    import numpy as np

    run = run_pipeline(JobSpec.from_flat(model=str(source), bits_per_weight=4.6, target="gguf", num_samples=2,
                                         seq_len=32, kl_windows=0, quality_windows=0), out=tmp_path / "again")
    before = {t.name: t for t in gguf.GGUFReader(source).tensors}
    after = {t.name: t for t in gguf.GGUFReader(Path(run.artifact) / "model.gguf").tensors}
    units = {u["name"] for u in run.units}
    assert set(after) == set(before) and len(units) == 14 and "output.weight" not in before
    kept = [name for name in after if not name.endswith(("attn_q.weight", "attn_k.weight", "attn_v.weight",
                                                         "attn_output.weight", "ffn_gate.weight", "ffn_up.weight",
                                                         "ffn_down.weight"))]
    assert "token_embd.weight" in kept and len(kept) == len(after) - 14
    for name in kept:
        assert after[name].tensor_type == before[name].tensor_type, name
        assert np.array_equal(np.asarray(after[name].data), np.asarray(before[name].data)), name


def test_issue17_an_unsupported_hugging_face_architecture_is_refused_naming_the_supported(tmp_path: Path,
                                                                                          tiny_llama_dir: Path) -> None:
    import json
    import shutil

    folder = tmp_path / "other"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"],
                                                    "model_type": "mistral"}))
    with pytest.raises(ModelReferenceError, match="LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, "
                                                  "Gemma3ForCausalLM") as refused:
        run_pipeline(JobSpec.from_flat(model=str(folder), bits_per_weight=5.5, target="gguf", num_samples=2,
                                       seq_len=32), out=tmp_path / "out")
    assert refused.value.param == "model"


@pytest.mark.slow  # in .ci/run's slow subset (-k hugging_face_folder: a tokenizer conversion and two jobs, ~60 s)
def test_issue17_an_untied_token_embedding_is_chosen_under_a_whole_file_budget_from_a_hugging_face_folder(
        tmp_path: Path, smollm2_tokenizer: Path) -> None:
    """An untied model's ``token_embd`` is a tensor of its own: under a whole-file budget it is one more unit the
    allocator chooses a GGML type for (its error measured through the token lookup alone, encoded without an
    importance vector), beside the output head. The file holds each in its reported type and bytes, meets the
    budget, and llama.cpp runs it as our loader runs the artifact; the same file as the source of a second such
    job keeps working (a GGUF source with an ``output.weight`` of its own)."""
    import gguf
    from llama_cpp import Llama

    from bitplan.targets.exports.gguf_file import hf_file_overhead

    folder = hf_folder(tmp_path, smollm2_tokenizer, "llama", tied=False)
    model = load_model(str(folder)).model
    assert model.get_input_embeddings().weight is not model.get_output_embeddings().weight
    units = list(find_units(model))
    other = hf_file_overhead(folder, [*units, "lm_head", "model.embed_tokens"])
    q8_0 = sum(m.weight.numel() for m in find_units(model).values()) // 32 * 34
    matrix_q8_0 = VOCAB * 64 // 32 * 34  # the head's and the embedding's each
    budget = other + q8_0 + 3 * matrix_q8_0 // 2  # Q8_0 blocks fit, two Q8_0 vocabulary matrices do not
    run = run_pipeline(JobSpec.from_flat(model=str(folder), file_bytes=budget, target="gguf", num_samples=2,
                                         seq_len=32, kl_windows=0, quality_windows=0), out=tmp_path / "file")
    path = Path(run.artifact) / "model.gguf"
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert run.file_bytes == path.stat().st_size <= budget
    assert run.head is not None and {h["name"] for h in run.head} == {"lm_head", "model.embed_tokens"}
    chosen = {h["name"]: h for h in run.head}
    for name, tensor in (("lm_head", "output.weight"), ("model.embed_tokens", "token_embd.weight")):
        assert tensors[tensor].tensor_type.name == chosen[name]["format"], name
        assert int(tensors[tensor].n_bytes) == chosen[name]["bytes"], name
    assert sum(h["bytes"] for h in run.head) < 2 * matrix_q8_0  # at least one of them below Q8_0
    assert run.bytes == sum(int(t.n_bytes) for n, t in tensors.items() if n.startswith("blk.") and len(t.shape) == 2)
    assert len(run.units) == 14
    ids = list(range(1, 40))
    llama_cpp_runs_it_as_our_loader(Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False),
                                    Path(run.artifact), ids)
    from tests.bitplan.test_formats_pipeline import from_pretrained_matches_our_loader

    from_pretrained_matches_our_loader(Path(run.artifact))
    again = run_pipeline(JobSpec.from_flat(model=str(path), file_bytes=path.stat().st_size - matrix_q8_0 // 8,
                                           target="gguf", num_samples=2, seq_len=32, kl_windows=0,
                                           quality_windows=0), out=tmp_path / "again")
    second = Path(again.artifact) / "model.gguf"
    assert again.file_bytes == second.stat().st_size <= path.stat().st_size - matrix_q8_0 // 8
    assert {h["name"] for h in again.head or []} == {"lm_head", "model.embed_tokens"}


@pytest.mark.parametrize("fmt", ["int4-g32-fzero", "int4-g32-fzero-dq4"])
def test_issue16_fractional_zero_units_export_to_a_gguf_llama_cpp_runs(fmt: str, tmp_path: Path,
                                                                      smollm2_tokenizer: Path) -> None:
    """A packed job all in the fractional-zero grid (fp16 zeros, or 4-bit codes of them): the GGUF export writes each
    unit as Q4_1 (``m = -zero * scale``), and llama.cpp computes our loader's logits from it. ``int4-g32-fzero`` is
    Q4_1's own size, so the file's blocks weigh what the artifact's units do; a ``-dq4`` unit is smaller than Q4_1
    where its rows are wide enough, so the export refuses it at its size (with the reason) unless told
    ``--inexact exact``, and the file then grows by no more than what the report lists."""
    import gguf
    from llama_cpp import Llama
    from tokenizers import Tokenizer

    from bitplan.errors import BitplanError
    from bitplan.targets.exports import export_artifact
    from tests.bitplan.test_formats_pipeline import one_format_budget

    folder = hf_folder(tmp_path, smollm2_tokenizer, "llama")
    budget = one_format_budget(load_model(str(folder)).model, fmt)
    run = run_pipeline(JobSpec.from_flat(model=str(folder), bits_per_weight=budget, formats=fmt, num_samples=2,
                                         seq_len=32, kl_windows=0, quality_windows=0), out=tmp_path / "out")
    assert {u["format"] for u in run.units} == {fmt} and run.bits_per_weight <= budget
    gguf_path = tmp_path / "gguf" / "model.gguf"
    if "-dq" in fmt:
        with pytest.raises(BitplanError, match="cannot be stored exactly in a GGML type at their size"):
            export_artifact(Path(run.artifact), format="gguf", out=gguf_path)
        report = export_artifact(Path(run.artifact), format="gguf", out=gguf_path, inexact="exact")
    else:
        report = export_artifact(Path(run.artifact), format="gguf", out=gguf_path)
    grown = sum(r["exact_bytes"] - r["artifact_bytes"] for r in report.inexact)
    assert (grown > 0) == ("-dq" in fmt)
    blocks = [t for t in gguf.GGUFReader(gguf_path).tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    assert {t.tensor_type.name for t in blocks} == {"Q4_1"}
    written = sum(int(t.n_bytes) for t in blocks)
    assert written <= run.bytes + grown and (written == run.bytes or "-dq" in fmt)  # the budget, plus what was reported
    runtime = Llama(model_path=str(gguf_path), n_ctx=64, logits_all=True, verbose=False)
    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(TEXT, add_special_tokens=False).ids
    llama_cpp_runs_it_as_our_loader(runtime, Path(run.artifact), ids, argmax=True)
