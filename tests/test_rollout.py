import torch

from tokencredit.model.tiny import build_tiny
from tokencredit.rollout import hf
from tokencredit.rollout.hf import generate_hf, response_mask_from_ids


def test_response_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0]])
    mask, finished = response_mask_from_ids(ids, [2])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert finished.tolist() == [True, False, True]


def _prompts(tok):
    return [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True) for q in ("1+2=?", "12+345=?")]


def test_layout_groups_and_padding():
    model, tok = build_tiny(seed=0)
    torch.manual_seed(0)
    b = generate_hf(model, tok, _prompts(tok), n=3, temperature=1.0, top_p=1.0, max_new_tokens=12, answers=["3", "357"], group_offset=10)
    assert b.group_id.tolist() == [10, 10, 10, 11, 11, 11]
    assert b.answer == ["3"] * 3 + ["357"] * 3
    # prompts left-padded: the shorter prompt's rows start with padding, the last column is real
    assert (b.prompt_mask[:, -1] == 1).all() and (b.prompt_mask[0] == 0).any()
    # responses right-padded: the mask is a prefix of ones, padding holds the pad id
    for row, m in zip(b.response_ids, b.response_mask):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any() and (row[n:] == b.pad_id).all()
    assert len(b.response_text) == 6 and b.response_ids.shape[1] <= 12


def test_shared_prompt_cache_gives_the_same_tokens():
    model, tok = build_tiny(seed=0)
    prompts = _prompts(tok)
    outs = []
    for shared in (True, False):
        orig = hf._shared_prompt_cache
        if not shared:
            hf._shared_prompt_cache = lambda *a: None
        try:
            torch.manual_seed(0)
            outs.append(generate_hf(model, tok, prompts, n=4, temperature=1.0, top_p=1.0, max_new_tokens=10))
        finally:
            hf._shared_prompt_cache = orig
    assert torch.equal(outs[0].response_ids, outs[1].response_ids)
    assert outs[0].response_text == outs[1].response_text


def test_static_and_dynamic_caches_give_the_same_greedy_tokens():
    """The hf backend's cache choice is a speed setting only: greedy tokens are equal,
    and auto takes the static cache exactly when no prompt is shared by two rows."""
    import pytest

    model, tok = build_tiny(seed=0)
    prompts = _prompts(tok)
    for n in (1, 3):
        outs = {c: generate_hf(model, tok, prompts, n=n, temperature=0.0, top_p=1.0, max_new_tokens=10, cache=c)
                for c in hf.HF_CACHES}
        assert torch.equal(outs["dynamic"].response_ids, outs["static"].response_ids), n
        assert torch.equal(outs["auto"].response_ids, outs["static"].response_ids), n
    seen = []
    orig = model.generate

    def spy(*a, **kw):
        seen.append(kw.get("cache_implementation", "past_key_values" if "past_key_values" in kw else None))
        return orig(*a, **kw)

    model.generate = spy
    generate_hf(model, tok, prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=4)
    generate_hf(model, tok, prompts, n=3, temperature=0.0, top_p=1.0, max_new_tokens=4)
    assert seen == ["static", "past_key_values"]
    with pytest.raises(ValueError, match="cache"):
        generate_hf(model, tok, prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=4, cache="paged")
