import pytest
import torch

from tuili.data import calibration_samples, eval_windows
from tuili.errors import DataError


def test_eval_windows_are_consecutive_and_drop_the_tail():
    w = eval_windows(list(range(25)), seq_len=8)
    assert w.tolist() == [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]


def test_eval_windows_respect_max_tokens():
    assert eval_windows(list(range(100)), seq_len=10, max_tokens=35).shape == (3, 10)


def test_too_little_text_is_a_clear_error():
    with pytest.raises(DataError, match="too few for one 8-token window"):
        eval_windows([1, 2, 3], seq_len=8)


def test_calibration_samples_are_seeded_windows_of_the_text():
    ids = torch.arange(1000)
    a = calibration_samples(ids, num_samples=6, seq_len=32, seed=1)
    assert a.shape == (6, 32)
    assert torch.equal(a, calibration_samples(ids, 6, 32, seed=1))
    assert not torch.equal(a, calibration_samples(ids, 6, 32, seed=2))
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)  # contiguous slices of the text
