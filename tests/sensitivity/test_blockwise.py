"""Block-by-block Gram collection against the all-at-once pass (tiny Llama and tiny BERT)."""

from __future__ import annotations

import pytest
import torch

from bitplan.sensitivity.activations import Cancelled, collect_unit_statistics
from bitplan.sensitivity.blockwise import block_grams
from bitplan.sources.units import find_block_stack, find_units
from tests.conftest import make_tiny_llama


def tiny_bert() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64)
    return BertModel(config).eval()


@pytest.mark.parametrize("make_model", [make_tiny_llama, tiny_bert], ids=["llama", "bert"])
def test_block_by_block_grams_equal_the_all_at_once_pass(make_model) -> None:  # type: ignore[no-untyped-def]
    model = make_model()
    units = find_units(model)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 300, (1, 17), generator=generator), torch.randint(0, 300, (2, 9), generator=generator)]
    reference = collect_unit_statistics(model, units, batches)
    seen: dict[str, torch.Tensor] = {}
    blocks = find_block_stack(model)
    per_block = []
    for stats in block_grams(model, blocks, units, batches):
        per_block.append(sorted(stats))
        for name, entry in stats.items():
            assert entry.tokens == reference[name].tokens == 17 + 18
            seen[name] = entry.gram
    assert len(per_block) == len(blocks[1])  # one yield per block, each with only that block's units
    assert all(name.startswith(f"{blocks[0]}.{i}.") for i, names in enumerate(per_block) for name in names)
    assert set(seen) == set(units)
    for name, gram in seen.items():
        torch.testing.assert_close(gram, reference[name].gram, rtol=1e-5, atol=1e-5)


def test_block_by_block_grams_can_be_cancelled_between_blocks() -> None:
    model = make_tiny_llama()
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 1

    stream = block_grams(model, find_block_stack(model), find_units(model), [torch.zeros(1, 5, dtype=torch.long)],
                         should_stop=should_stop)
    next(stream)
    with pytest.raises(Cancelled):
        next(stream)


@pytest.mark.parametrize("metric", ["output_error", "fisher_output_error", "slim_salience", "baq", "gwq"])
def test_metrics_give_the_same_predictions_block_by_block(metric: str) -> None:
    from bitplan.sensitivity import Metric, SensitivityRequest, compute_sensitivity
    from bitplan.sources.models import causal_lm_loss

    model = make_tiny_llama()
    units = find_units(model)
    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(3))
    request = SensitivityRequest(Metric(metric), bits_options=(2, 4), group_size=32)
    results = [compute_sensitivity(model, units, [tokens[:1], tokens[1:]], request, loss_fn=causal_lm_loss,
                                   blocks=blocks)
               for blocks in (None, find_block_stack(model))]
    assert [u.name for u in results[1].units] == list(units)
    for whole, by_block in zip(results[0].units, results[1].units, strict=True):
        assert by_block.score == pytest.approx(whole.score, rel=1e-4, abs=1e-9)
        for bits in (2, 4):
            assert by_block.delta_loss[bits] == pytest.approx(whole.delta_loss[bits], rel=1e-4, abs=1e-9)
