"""The fractional-zero grid search, done once per weight and width (quantizer.search_memo): the same bytes as a
search per call, one search for ``-fzero``/``-dq4``/``-dq6`` even on two threads at once, and no reuse across
different bytes."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from bitplan.quantizer import rtn, search_memo
from bitplan.quantizer.formats import FORMATS

FZERO = ("int4-g32-fzero", "int4-g32-fzero-dq4", "int4-g32-fzero-dq6", "int3-g32-fzero-dq4")


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A fresh memo, and the number of searches run."""
    monkeypatch.setattr(search_memo, "SEARCHES", search_memo.SearchMemo())
    calls = [0]
    real = rtn.offset_search

    def search(*args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(rtn, "offset_search", search)
    return calls


def _weight(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(64, 200, generator=generator) * (1 + 5 * torch.rand(1, 200, generator=generator) ** 8)
    return weight, torch.rand(200, generator=generator) + 0.01


def _encoded(names: tuple[str, ...], weight: torch.Tensor, importance: torch.Tensor) -> list[rtn.QuantizedWeight]:
    return [FORMATS[name].encode(weight, importance) for name in names]


def _same(a: rtn.QuantizedWeight, b: rtn.QuantizedWeight) -> bool:
    fields = ("codes", "scales", "zeros", "scale_codes", "zero_codes", "scale_range")
    return all((getattr(a, f) is None and getattr(b, f) is None) or torch.equal(getattr(a, f), getattr(b, f))
               for f in fields)


def test_issue45_a_memoized_search_gives_the_bytes_of_a_search_per_call(counted: list[int],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    weight, importance = _weight(0)
    memoized = _encoded(FZERO, weight, importance) + _encoded(FZERO, weight, importance)
    assert counted[0] == 2  # one per width: 4 bits for three formats and both rounds, 3 bits
    monkeypatch.setenv("BITPLAN_SEARCH_MEMO", "0")
    reference = _encoded(FZERO, weight, importance)
    assert counted[0] == 2 + len(FZERO)
    assert all(_same(a, b) for a, b in zip(memoized, reference + reference, strict=True))


def test_issue45_two_threads_asking_for_one_search_run_it_once(counted: list[int]) -> None:
    weight, importance = _weight(1)
    with ThreadPoolExecutor(4) as pool:
        encoded = list(pool.map(lambda name: FORMATS[name].encode(weight, importance), FZERO[:3] * 4))
    assert counted[0] == 1
    assert all(torch.equal(e.codes, encoded[0].codes) for e in encoded[::3])


def test_issue45_other_bytes_or_another_importance_search_again(counted: list[int]) -> None:
    weight, importance = _weight(2)
    first = FORMATS["int4-g32-fzero"].encode(weight, importance)
    moved = weight.clone()
    moved[3, 7] += 0.5
    FORMATS["int4-g32-fzero"].encode(moved, importance)
    FORMATS["int4-g32-fzero"].encode(weight, importance * 2 + 0.1)
    assert counted[0] == 3
    weight[3, 7] += 0.0  # the same bytes again, changed in place and back: found
    assert _same(FORMATS["int4-g32-fzero"].encode(weight, importance), first) and counted[0] == 3


def test_issue45_the_memo_keeps_what_its_bound_allows() -> None:
    memo = search_memo.SearchMemo(max_bytes=3 * 2 * 4 * 10)  # three results of two 10-float tensors
    for key in range(5):
        memo.get((key,), lambda: (torch.zeros(10), torch.zeros(10)))
    assert memo.misses == 5
    memo.get((4,), lambda: (torch.ones(10), torch.ones(10)))
    memo.get((0,), lambda: (torch.ones(10), torch.ones(10)))
    assert (memo.hits, memo.misses) == (1, 6)


def test_issue45_a_memoized_salience_search_gives_the_same_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search_memo, "SEARCHES", search_memo.SearchMemo())
    weight, importance = _weight(3)  # 200 columns: a narrower last group of 64 and of 128
    names = ("int3-g64", "int4-g128", "int2-g128")
    memoized = _encoded(names, weight, importance) + _encoded(names, weight, importance)
    assert (search_memo.SEARCHES.misses, search_memo.SEARCHES.hits) == (3, 3)
    monkeypatch.setenv("BITPLAN_SEARCH_MEMO", "0")
    reference = _encoded(names, weight, importance)
    assert all(_same(a, b) for a, b in zip(memoized, reference + reference, strict=True))


def test_issue45_a_failed_search_is_not_kept() -> None:
    memo = search_memo.SearchMemo()

    def fail() -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        memo.get(("k",), fail)
    assert torch.equal(memo.get(("k",), lambda: (torch.ones(2), torch.ones(2)))[0], torch.ones(2))
