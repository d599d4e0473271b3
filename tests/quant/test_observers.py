import pytest
import torch

from tuili.quant.observers import OBSERVERS, MinMax, MovingAverageMinMax, Percentile, make_observer


def test_minmax_sees_the_largest_value():
    obs = MinMax()
    obs.observe(torch.tensor([1.0, -3.0]))
    obs.observe(torch.tensor([2.0]))
    assert obs.threshold() == 3.0 and obs.scale().item() == pytest.approx(3.0 / 127)


def test_moving_average_damps_one_extreme_batch():
    obs = MovingAverageMinMax(momentum=0.1)
    for _ in range(10):
        obs.observe(torch.tensor([1.0]))
    obs.observe(torch.tensor([100.0]))
    assert 1.0 < obs.threshold() < 15.0


def test_percentile_clips_rare_outliers():
    torch.manual_seed(0)
    x = torch.randn(100_000)
    x[0] = 1000.0
    obs = Percentile(99.9)
    obs.observe(x)
    assert 2.5 < obs.threshold() < 4.0  # |N(0,1)| 99.9th percentile ≈ 3.29


@pytest.mark.parametrize("name", ["mse", "entropy", "percentile"])
def test_histogram_observers_clip_a_heavy_tail_but_keep_the_bulk(name):
    torch.manual_seed(0)
    x = torch.cat([torch.randn(50_000), torch.tensor([80.0])])
    obs = make_observer(name)
    obs.observe(x[:25_000])
    obs.observe(x[25_000:])  # the range grows: the histogram is re-binned
    assert 2.0 < obs.threshold() < 80.0  # below the outlier, above the bulk


def test_observer_of_zeros_gives_a_usable_scale():
    for name in OBSERVERS:
        obs = make_observer(name)
        obs.observe(torch.zeros(10))
        assert obs.scale().item() == 1.0


def test_unknown_observer():
    with pytest.raises(ValueError, match="observer must be one of"):
        make_observer("magic")
