import torch

from tokencredit.batch import RolloutBatch


def _batch():
    # 3 rows; prompts left-padded (pad 0), responses right-padded
    return RolloutBatch(
        prompt_ids=torch.tensor([[0, 5, 6], [7, 8, 9], [0, 0, 4]]),
        prompt_mask=torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1]]),
        response_ids=torch.tensor([[11, 12, 0, 0], [13, 0, 0, 0], [14, 15, 16, 17]]),
        response_mask=torch.tensor([[1.0, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]),
        group_id=torch.tensor([0, 0, 1]),
        reward=torch.tensor([1.0, 0.0, 1.0]),
        prompt_text=["a", "b", "c"],
    )


def test_model_inputs_positions_ignore_left_padding():
    b = _batch()
    mi = b.model_inputs()
    assert mi["input_ids"].shape == (3, 7)
    assert mi["position_ids"][0].tolist() == [0, 0, 1, 2, 3, 3, 3]
    assert mi["position_ids"][2].tolist() == [0, 0, 0, 1, 2, 3, 4]


def test_select_trims_dead_columns_and_keeps_lists():
    b = _batch().select([1, 0])
    assert b.response_ids.tolist() == [[13, 0], [11, 12]]  # longest kept response = 2
    assert b.prompt_ids.tolist() == [[7, 8, 9], [0, 5, 6]]
    assert b.prompt_text == ["b", "a"] and b.reward.tolist() == [0.0, 1.0]
    one = _batch().select([2])
    assert one.prompt_ids.tolist() == [[4]]  # left padding trimmed from the left


def test_concat_pads_both_sides():
    a = _batch().select([1])  # T = 1, P = 3
    c = _batch().select([2])  # T = 4, P = 1
    cat = RolloutBatch.concat([a, c])
    assert cat.response_ids.tolist() == [[13, 0, 0, 0], [14, 15, 16, 17]]
    assert cat.prompt_ids.tolist() == [[7, 8, 9], [0, 0, 4]]
    assert cat.prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert cat.num_tokens == 5 and cat.response_lengths.tolist() == [1, 4]


def test_row_count_mismatch_is_an_error():
    import pytest

    with pytest.raises(ValueError, match="reward has 2 rows"):
        b = _batch()
        RolloutBatch(b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask, b.group_id, reward=torch.ones(2))
