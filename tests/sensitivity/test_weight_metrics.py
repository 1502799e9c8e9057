"""GWQ, SliM-LLM salience and BAQ against direct computations on small tensors and a tiny model."""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch

from bitplan.quantizer.rtn import dequantize_weight, quantize_rtn
from bitplan.sensitivity import Metric, SensitivityRequest, collect_unit_statistics, compute_sensitivity
from bitplan.sensitivity.activations import UnitStatistics
from bitplan.sensitivity.weight_metrics import (
    DAMP,
    gradient_outlier_mask,
    group_salience,
    predict_baq,
    predict_gwq,
    predict_slim_salience,
    salience,
)
from bitplan.sources.models import causal_lm_loss, causal_lm_sampled_loss, use_eager_attention
from bitplan.sources.units import find_units
from bitplan.stages import Stage
from tests.conftest import make_tiny_llama


def small_stats(seed: int = 0, out: int = 6, inp: int = 40) -> tuple[torch.Tensor, UnitStatistics]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inp, generator=gen)
    x = torch.randn(64, inp, generator=gen) * torch.linspace(0.2, 3.0, inp)
    stats = UnitStatistics(gram=x.T @ x, tokens=64, output_grad_sq=torch.rand(out, generator=gen),
                           weight_grad_sq=torch.rand(out, inp, generator=gen),
                           weight_grad_abs=torch.rand(out, inp, generator=gen), batches=4)
    return weight, stats


def test_salience_against_a_direct_inverse() -> None:
    weight, stats = small_stats()
    h = stats.gram.double() / 64
    h_inv = torch.linalg.inv(h + DAMP * h.diagonal().mean() * torch.eye(40, dtype=torch.float64))
    expected = weight.double() ** 2 / h_inv.diagonal()[None, :] ** 2
    assert torch.allclose(salience(weight, stats), expected, rtol=1e-8)
    groups = group_salience(weight, stats, group_size=16)  # 40 columns: groups of 16, 16 and 8
    assert groups.shape == (6, 3)
    assert torch.allclose(groups[:, 2], expected[:, 32:].sum(dim=1))
    predicted = predict_slim_salience(weight, stats, bits_options=(3,), group_size=16)[3]
    delta = (dequantize_weight(quantize_rtn(weight, bits=3, group_size=16)) - weight).double()
    direct = 0.5 * float(((delta ** 2 / h_inv.diagonal()[None, :]).sum(dim=1)
                          * stats.output_grad_sq.double() / 64).sum())
    assert predicted == pytest.approx(direct, rel=1e-8)


def test_gwq_against_the_formula_and_the_outlier_map() -> None:
    weight, stats = small_stats(1)
    delta = dequantize_weight(quantize_rtn(weight, bits=2, group_size=8)) - weight
    expected = 0.5 * float((stats.weight_grad_sq / 64 * delta ** 2).sum())
    assert predict_gwq(weight, stats, bits_options=(2,), group_size=8)[2] == pytest.approx(expected, rel=1e-6)
    mask = gradient_outlier_mask(stats, fraction=0.05)
    assert int(mask.sum()) == round(0.05 * 240)
    assert float(stats.weight_grad_abs[mask].min()) >= float(stats.weight_grad_abs[~mask].max())


def test_baq_against_a_loop_over_groups() -> None:
    weight, stats = small_stats(2)
    predicted = predict_baq(weight, stats, bits_options=(2, 4), group_size=16)
    for bits in (2, 4):
        total = 0.0
        for o in range(6):
            for start in range(0, 40, 16):
                cols = list(range(start, min(start + 16, 40)))
                values = weight[o, cols].double()
                step = (max(float(values.max()), 0.0) - min(float(values.min()), 0.0)) / (2 ** bits - 1)
                for j in cols:
                    total += float(stats.output_grad_sq[o]) / 64 * step ** 2 / 12 * float(stats.gram[j, j]) / 64
        assert predicted[bits] == pytest.approx(0.5 * total, rel=1e-8)
    assert predicted[2] / predicted[4] == pytest.approx((2 ** 4 - 1) ** 2 / (2 ** 2 - 1) ** 2)


def test_weight_gradient_statistics_match_autograd() -> None:
    model = make_tiny_llama()
    units = find_units(model)
    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(3))
    stats = collect_unit_statistics(model, units, [tokens[:1], tokens[1:]], loss_fn=causal_lm_loss,
                                    weight_grads=True)
    name = "model.layers.1.mlp.down_proj"
    weight = units[name].weight
    expected_sq = torch.zeros_like(weight)
    for i in range(2):
        (grad,) = torch.autograd.grad(causal_lm_loss(model, tokens[i : i + 1]), [weight.requires_grad_(True)])
        expected_sq += grad ** 2
    weight.requires_grad_(False)
    assert stats[name].batches == 2
    assert torch.allclose(stats[name].weight_grad_sq, expected_sq, rtol=1e-4, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("metric", [Metric.GWQ, Metric.SLIM_SALIENCE, Metric.BAQ, Metric.TOKEN_FISHER,
                                    Metric.TOKEN_TAYLOR, Metric.TOKEN_KL, Metric.TOKEN_TAYLOR_KL])
def test_every_metric_through_the_interface(metric: Metric) -> None:
    model = make_tiny_llama()
    units = find_units(model)
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    flags = [p.requires_grad for p in model.parameters()]
    loss_fn = causal_lm_sampled_loss if metric is Metric.TOKEN_KL else causal_lm_loss
    curvature = causal_lm_sampled_loss if metric is Metric.TOKEN_TAYLOR_KL else None
    result = compute_sensitivity(model, units, [tokens[:1], tokens[1:]],
                                 SensitivityRequest(metric, bits_options=(2, 4, 8), group_size=32),
                                 loss_fn=loss_fn, curvature_loss_fn=curvature)
    assert [u.name for u in result.units] == list(units)
    for unit in result.units:
        assert unit.delta_loss[2] >= unit.delta_loss[4] >= unit.delta_loss[8]
        assert unit.score >= 0
        if metric not in (Metric.TOKEN_TAYLOR, Metric.TOKEN_TAYLOR_KL):  # their first-order term may be negative
            assert unit.delta_loss[8] >= 0
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_token_fisher_against_a_direct_per_token_computation() -> None:
    from bitplan.sensitivity.token_fisher import token_fisher
    from tests.sensitivity.test_output_error import captured_io

    model = make_tiny_llama()
    units = find_units(model)
    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(5))
    request = SensitivityRequest(Metric.TOKEN_FISHER, bits_options=(2, 4), group_size=32, precision="float32")
    terms = token_fisher(model, units, [tokens[:1], tokens[1:]], request, loss_fn=causal_lm_loss)
    skipped = token_fisher(model, units, [tokens[:1], tokens[1:]], replace(request, skip_first_position=True),
                           loss_fn=causal_lm_loss)
    for name in ("model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"):
        xs, grads = zip(*(captured_io(model, name, tokens[i : i + 1]) for i in range(2)), strict=True)
        x, g = torch.cat(xs), torch.cat(grads)
        weight = units[name].weight.detach()
        for bits in (2, 4):
            delta = dequantize_weight(quantize_rtn(weight, bits=bits, group_size=32)) - weight
            per_token = ((x @ delta.T) * g).sum(dim=1)
            assert terms.second_order[name][bits] == pytest.approx(0.5 * float((per_token ** 2).sum()) / 40, rel=1e-4)
            not_first = torch.arange(40) % 20 != 0  # each window's first position (the attention sink) left out
            assert skipped.second_order[name][bits] == pytest.approx(
                0.5 * float((per_token[not_first] ** 2).sum()) / 40, rel=1e-4)
            assert skipped.first_order[name][bits] == pytest.approx(terms.first_order[name][bits], rel=1e-6)
            assert terms.first_order[name][bits] == pytest.approx(float(per_token.sum()) / 40, rel=1e-4, abs=1e-9)
            # the first-order term is the directional derivative of the mean loss along the quantization error
            weight_param = units[name].weight
            weight_param.requires_grad_(True)
            loss = sum(causal_lm_loss(model, tokens[i : i + 1]) for i in range(2)) / 40
            (gradient,) = torch.autograd.grad(loss, [weight_param])
            weight_param.requires_grad_(False)
            assert terms.first_order[name][bits] == pytest.approx(float((gradient * delta).sum()), rel=1e-3, abs=1e-8)
        assert terms.energy[name] == pytest.approx(float((g ** 2).sum()) / 40, rel=1e-4)
        for bits in (2, 4):  # two batches: the standard error of the per-token mean from their two sums
            delta = dequantize_weight(quantize_rtn(weight, bits=bits, group_size=32)) - weight
            halves = [float(((xs[i] @ delta.T) * grads[i]).sum()) for i in range(2)]
            expected = abs(halves[0] - halves[1]) / 40  # sqrt(2 * var) / N with var = (a - b)^2 / 2
            assert terms.first_order_std_error[name][bits] == pytest.approx(expected, rel=1e-3)


def test_sampled_labels_are_seeded_by_the_window_and_drawn_from_the_model() -> None:
    model = make_tiny_llama()
    tokens = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(3))
    first, again = causal_lm_sampled_loss(model, tokens), causal_lm_sampled_loss(model, tokens)
    assert float(first) == float(again)  # the same window, the same labels: the same bytes from the same inputs
    assert float(causal_lm_sampled_loss(model, tokens, seed=1)) != float(first)
    other = tokens.clone()
    other[0, -1] = (other[0, -1] + 1) % 512
    assert float(causal_lm_sampled_loss(model, other)) != float(first)
    # the mean loss over many draws is the model's own entropy (labels from p give E[-log p_y] = H(p))
    with torch.no_grad():
        logits = model(tokens).logits[0, :-1].float()
        entropy = float(-(logits.softmax(-1) * logits.log_softmax(-1)).sum())
        draws = torch.tensor([float(causal_lm_sampled_loss(model, tokens, seed=k)) for k in range(200)])
    assert abs(float(draws.mean()) - entropy) < 4 * float(draws.std()) / 200 ** 0.5


def test_token_kl_is_the_models_fisher_in_expectation() -> None:
    """Averaged over label draws, token_kl's term is 0.5 / N sum_t sum_s Var_{y ~ p_s}(u_s[y]), where u_s is the
    change of the logits at position s (its prediction of token s + 1) that the unit's error moves the unit's
    output at token t alone by (a forward-mode derivative through the model): the quadratic form of the Fisher of
    the model's own next-token distribution, which is the second-order KL divergence from the model's outputs."""
    from bitplan.sensitivity.token_fisher import token_fisher
    from tests.sensitivity.test_output_error import captured_io

    model = make_tiny_llama()
    use_eager_attention(model)  # forward-mode derivatives through attention
    units = find_units(model)
    name = "model.layers.0.mlp.down_proj"
    tokens = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(4))
    weight = units[name].weight.detach()
    delta = dequantize_weight(quantize_rtn(weight, bits=2, group_size=32)) - weight
    x, _ = captured_io(model, name, tokens)
    moved = x @ delta.T  # (tokens, out): the unit's output change at each token

    def logits_with(change: torch.Tensor) -> torch.Tensor:
        handle = units[name].register_forward_hook(lambda module, inputs, output: output + change[None])
        try:
            return model(tokens).logits[0, :-1].float()
        finally:
            handle.remove()

    zero = torch.zeros_like(moved)
    with torch.no_grad():
        p = logits_with(zero).softmax(dim=-1)
    expected = 0.0
    for t in range(tokens.numel()):
        tangent = torch.zeros_like(moved)
        tangent[t] = moved[t]
        _, u = torch.func.jvp(logits_with, (zero,), (tangent,))
        expected += float(((p * u ** 2).sum(-1) - (p * u).sum(-1) ** 2).sum())
    expected *= 0.5 / tokens.numel()
    request = SensitivityRequest(Metric.TOKEN_KL, bits_options=(2,), group_size=32, options={name: ["e"]},
                                 error_of=lambda n, key: delta, precision="float32")
    draws = torch.tensor([
        token_fisher(model, {name: units[name]}, [tokens], request,
                     loss_fn=functools.partial(causal_lm_sampled_loss, seed=k)).second_order[name]["e"]
        for k in range(300)])
    assert expected > 0
    assert abs(float(draws.mean()) - expected) < 4 * float(draws.std()) / 300 ** 0.5
    assert abs(float(draws.mean()) - expected) < 0.1 * expected


def test_token_fisher_of_a_tied_output_head_counts_its_embedding_use_too() -> None:
    """The output head of a tied model is the input embedding's tensor: its per-token scalar is the head's
    ``g . dW x`` plus the lookup's ``g_in . dW[token]``. First order: the directional derivative of the loss along
    ``dW`` through both uses (autograd on the shared parameter); second order: the direct per-token sum."""
    from bitplan.sensitivity.token_fisher import tied_inputs, token_fisher

    model = make_tiny_llama()
    head = {"lm_head": model.lm_head}
    assert tied_inputs(model, head) == {"lm_head": model.model.embed_tokens}
    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(7))
    weight = model.lm_head.weight.detach()
    deltas = {b: dequantize_weight(quantize_rtn(weight, bits=b, group_size=32)) - weight for b in (2, 4)}
    request = SensitivityRequest(Metric.TOKEN_FISHER, bits_options=(2, 4), group_size=32, precision="float32")
    terms = token_fisher(model, head, [tokens[:1], tokens[1:]], request, loss_fn=causal_lm_loss,
                         blocks=model.model.layers)
    skipped = token_fisher(model, head, [tokens[:1], tokens[1:]], replace(request, skip_first_position=True),
                           loss_fn=causal_lm_loss, blocks=model.model.layers)
    shared = model.lm_head.weight
    for bits, delta in deltas.items():
        per_token = []
        for i in range(2):
            batch = tokens[i : i + 1]
            embedded = model.model.embed_tokens(batch).detach().requires_grad_(True)
            captured: dict[str, torch.Tensor] = {}
            handle = model.lm_head.register_forward_hook(
                lambda m, inputs, out: captured.update(x=inputs[0].detach(), logits=out))
            logits = model(inputs_embeds=embedded).logits
            handle.remove()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], batch[0, 1:], reduction="sum")
            g_logits, g_in = torch.autograd.grad(loss, [captured["logits"], embedded])
            head_part = ((captured["x"][0] @ delta.T) * g_logits[0]).sum(dim=1)
            lookup_part = (delta[batch[0]] * g_in[0]).sum(dim=1)
            per_token.append(head_part + lookup_part)
        every = torch.cat(per_token)
        assert terms.second_order["lm_head"][bits] == pytest.approx(0.5 * float((every ** 2).sum()) / 40, rel=1e-4)
        later = torch.cat([p[1:] for p in per_token])  # without each window's first position
        assert skipped.second_order["lm_head"][bits] == pytest.approx(0.5 * float((later ** 2).sum()) / 40, rel=1e-4)
        shared.requires_grad_(True)  # the tokens looked up by the model itself: the gradient has both uses
        loss = sum(causal_lm_loss(model, tokens[i : i + 1], graph_from_embeddings=False) for i in range(2)) / 40
        (gradient,) = torch.autograd.grad(loss, [shared])
        shared.requires_grad_(False)
        assert terms.first_order["lm_head"][bits] == pytest.approx(float((gradient * delta).sum()), rel=1e-3)
    assert all(not m._forward_hooks for m in (model.lm_head, model.model.embed_tokens))
    # a loss that lets the model look the tokens up itself: the graph starts at the lookup, the same terms
    by_ids = token_fisher(model, head, [tokens[:1], tokens[1:]], request,
                          loss_fn=functools.partial(causal_lm_loss, graph_from_embeddings=False))
    assert by_ids.second_order["lm_head"] == pytest.approx(terms.second_order["lm_head"], rel=1e-5)
    assert by_ids.first_order["lm_head"] == pytest.approx(terms.first_order["lm_head"], rel=1e-5)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_text_slope_with_model_curvature_is_each_loss_own_term(precision: str) -> None:
    """token_taylor_kl's pass: its first-order term (and standard error) is the text-label pass's on every window,
    its second-order term and energy the model-label pass's on every other window, unit by unit (the tied head's
    embedding use included), whatever chunks the errors are held in."""
    from bitplan.sensitivity.token_fisher import token_fisher

    model = make_tiny_llama()
    units = {**find_units(model), "lm_head": model.lm_head}  # the head is tied to the input embedding
    tokens = torch.randint(0, 512, (4, 20), generator=torch.Generator().manual_seed(9))
    batches = list(torch.split(tokens, 1))
    request = SensitivityRequest(Metric.TOKEN_TAYLOR_KL, bits_options=(2, 4), group_size=32, precision=precision)
    blocks = model.model.layers
    text = token_fisher(model, units, batches, request, loss_fn=causal_lm_loss, blocks=blocks)
    sampled = token_fisher(model, units, batches[::2], request, loss_fn=causal_lm_sampled_loss, blocks=blocks)
    budget = 2 * max(m.weight.numel() for m in units.values()) * 2 * 4
    both = token_fisher(model, units, batches, replace(request, curvature_stride=2, max_error_bytes=budget),
                        loss_fn=causal_lm_loss, curvature_loss_fn=causal_lm_sampled_loss, blocks=blocks)
    for name in units:
        assert both.first_order[name] == pytest.approx(text.first_order[name], rel=1e-3, abs=1e-9)
        assert both.first_order_std_error[name] == pytest.approx(text.first_order_std_error[name], rel=1e-3,
                                                                 abs=1e-9)
        assert both.second_order[name] == pytest.approx(sampled.second_order[name], rel=1e-5)
        assert both.energy[name] == pytest.approx(sampled.energy[name], rel=1e-5)
        assert both.second_order[name] != text.second_order[name]
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="curvature_stride"):
        token_fisher(model, units, batches, replace(request, curvature_stride=0), loss_fn=causal_lm_loss,
                     curvature_loss_fn=causal_lm_sampled_loss, blocks=blocks)
    with pytest.raises(ValueError, match="curvature_loss_fn"):
        compute_sensitivity(model, units, batches, request, loss_fn=causal_lm_loss)


def test_token_fisher_in_chunks_equals_one_pass() -> None:
    from bitplan.sensitivity.token_fisher import token_fisher, unit_chunks

    model = make_tiny_llama()
    units = find_units(model)
    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(6))
    sizes = {name: m.weight.numel() * 2 * 4 for name, m in units.items()}
    budget = 2 * max(sizes.values())
    chunks = unit_chunks(units, widths=2, max_bytes=budget)
    assert [name for chunk in chunks for name in chunk] == list(units)
    assert len(chunks) > 2 and all(sum(sizes[n] for n in chunk) <= budget for chunk in chunks)
    assert unit_chunks(units, widths=2, max_bytes=1) == [[name] for name in units]  # one unit is never split
    steps: list[tuple[int, int]] = []
    errors: list[tuple[int, int]] = []  # "weight errors": units x options across the chunks, 0 first
    request = SensitivityRequest(Metric.TOKEN_FISHER, bits_options=(2, 4), group_size=32, precision="float32")
    whole = token_fisher(model, units, [tokens[:1], tokens[1:]], request, loss_fn=causal_lm_loss)
    # with the blocks known, each chunk's backward passes stop at the input of its first block
    chunked = token_fisher(model, units, [tokens[:1], tokens[1:]], replace(request, max_error_bytes=budget),
                           loss_fn=causal_lm_loss, blocks=model.model.layers,
                           on_progress=lambda stage, done, total: steps.append((done, total))
                           if stage == Stage.TOKEN_FISHER else errors.append((done, total)))
    assert all(not block._forward_pre_hooks for block in model.model.layers)
    assert steps == [(i + 1, 2 * len(chunks)) for i in range(2 * len(chunks))]
    options = len(request.bits_options) * len(units)  # every unit's error at every width, each reported once
    assert errors == [(i, options) for i in range(options + 1)]
    for field in ("second_order", "first_order", "first_order_std_error"):
        for name in units:
            assert getattr(chunked, field)[name] == pytest.approx(getattr(whole, field)[name], rel=1e-6, abs=1e-12)
    assert chunked.energy == pytest.approx(whole.energy, rel=1e-6)


@pytest.mark.parametrize("tied", [False, True])
def test_token_fisher_in_bfloat16_against_the_float32_reference(tied: bool) -> None:
    """The fast path (errors held and projected in bfloat16, what ``precision="auto"`` picks on a CPU with native
    bfloat16 products) against float32: the second-order term within 1%; the first-order term (from the float32
    weight gradient, so only ``dW``'s rounding to bfloat16 moves it) within 5% of its standard error over the
    calibration windows, the noise that the Taylor prediction already shrinks it by; the errors take half the
    bytes, so chunks hold twice the units."""
    from bitplan.sensitivity.token_fisher import resolve_precision, token_fisher, unit_chunks

    model = make_tiny_llama()
    units = {"lm_head": model.lm_head} if tied else find_units(model)
    tokens = torch.randint(0, 512, (4, 20), generator=torch.Generator().manual_seed(8))
    batches = list(torch.split(tokens, 1))
    request = SensitivityRequest(Metric.TOKEN_FISHER, bits_options=(2, 3, 4), group_size=32, precision="float32")
    reference = token_fisher(model, units, batches, request, loss_fn=causal_lm_loss)
    fast = token_fisher(model, units, batches, replace(request, precision="bfloat16"), loss_fn=causal_lm_loss)
    for name in units:
        assert fast.second_order[name] == pytest.approx(reference.second_order[name], rel=1e-2)
        for bits, first in reference.first_order[name].items():
            assert abs(fast.first_order[name][bits] - first) <= 0.05 * reference.first_order_std_error[name][bits]
        assert fast.energy[name] == reference.energy[name]  # the gradients themselves are untouched
    assert fast.second_order != reference.second_order  # it did run in bfloat16
    assert resolve_precision("auto") in (torch.bfloat16, torch.float32)
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("float16")
    budget = 4 * max(m.weight.numel() for m in units.values()) * 2 * 2
    assert len(unit_chunks(units, widths=2, max_bytes=budget, element_bytes=2)) <= len(
        unit_chunks(units, widths=2, max_bytes=budget, element_bytes=4))


def test_token_taylor_is_both_terms_made_non_increasing_in_the_width() -> None:
    from bitplan.sensitivity.api import taylor_increase

    first = {2: -0.5, 3: 0.2, 4: -0.01, 8: 0.001}
    second = {2: 0.4, 3: 0.1, 4: 0.02, 8: 0.0001}
    assert taylor_increase(first, second) == pytest.approx({2: 0.3, 3: 0.3, 4: 0.01, 8: 0.0011})
    # a first-order term within its standard error is shrunk (to nothing at or below one standard error)
    errors = {2: 1.0, 3: 0.1, 4: 0.0, 8: 0.01}
    assert taylor_increase(first, second, errors) == pytest.approx({2: 0.4, 3: 0.2 * 0.75 + 0.1, 4: 0.01, 8: 0.0001})


def test_output_kl_against_a_direct_computation_and_restores_weights() -> None:
    from bitplan.sensitivity.kl import output_kl

    model = make_tiny_llama()
    units = find_units(model)
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    name = "model.layers.0.mlp.up_proj"
    original = units[name].weight.detach().clone()
    replaced = dequantize_weight(quantize_rtn(original, bits=2, group_size=32))
    kl = output_kl(model, units, {name: replaced}, [tokens])
    assert torch.equal(units[name].weight, original)
    with torch.no_grad():
        p = torch.log_softmax(model(input_ids=tokens).logits, dim=-1)
        units[name].weight.data = replaced
        q = torch.log_softmax(model(input_ids=tokens).logits, dim=-1)
        units[name].weight.data = original
    assert kl == pytest.approx(float((p.exp() * (p - q)).sum(dim=-1).mean()), rel=1e-5)
    assert kl > 0 and output_kl(model, units, {}, [tokens]) == pytest.approx(0.0, abs=1e-7)
