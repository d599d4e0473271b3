"""Speed measurements: each stage's batch-1 decode is timed in turns with the baseline where a copy
of the baseline fits in memory, and the report's ratio is taken against those runs."""

import pytest
from helpers import random_tiny

import tuili.pipeline.bench as bench
from tuili.pipeline import optimize
from tuili.pipeline.bench import Speed, measure_speed, speed_reference
from tuili.pipeline.stages import QuantizeStage


def test_a_reference_model_is_timed_in_turns():
    model, reference = random_tiny(), random_tiny(seed=1)
    alone = measure_speed(model, prompt_tokens=16, new_tokens=4, repeats=2)
    paired = measure_speed(model, prompt_tokens=16, new_tokens=4, repeats=2, reference=reference)
    assert alone.baseline_decode_tokens_per_second is None
    assert paired.baseline_decode_tokens_per_second > 0


def test_the_decode_ratio_uses_the_runs_in_turns_where_there_were_any():
    base = Speed(16, 100.0, 4, 50.0, 0.1)
    alone = Speed(16, 100.0, 4, 150.0, 0.1)
    paired = Speed(16, 100.0, 4, 150.0, 0.1, baseline_decode_tokens_per_second=40.0)
    assert alone.decode_speedup(base) == pytest.approx(3.0)
    assert paired.decode_speedup(base) == pytest.approx(3.75)


def test_a_copy_of_the_baseline_is_kept_only_where_it_fits(monkeypatch):
    model = random_tiny()
    copy = speed_reference(model)
    assert copy is not None and copy.module is not model.module
    monkeypatch.setattr(bench, "_available_memory", lambda: 1024)
    assert speed_reference(model) is None
    monkeypatch.setattr(bench, "_available_memory", lambda: None)
    assert speed_reference(model) is None


def test_optimize_times_every_stage_in_turns_with_the_baseline(tmp_path, monkeypatch):
    text = tmp_path / "t.txt"
    text.write_text("some text to score and to calibrate on " * 60)
    report = optimize(
        random_tiny(),
        [QuantizeStage("w8a16")],
        data=str(text),
        seq_len=64,
        max_tokens=256,
        progress=False,
        sensitivity=False,
    )
    base, stage = report.stages
    assert base.speed.baseline_decode_tokens_per_second is None
    assert stage.speed.baseline_decode_tokens_per_second > 0
    assert "timed in turns with it" in report.to_markdown()
    monkeypatch.setattr(bench, "_available_memory", lambda: 1024)  # no room for a copy: one baseline run
    report = optimize(
        random_tiny(),
        [QuantizeStage("w8a16")],
        data=str(text),
        seq_len=64,
        max_tokens=256,
        progress=False,
        sensitivity=False,
    )
    assert report.stages[1].speed.baseline_decode_tokens_per_second is None
    assert "timed in turns" not in report.to_markdown()


def test_the_peak_memory_leaves_out_the_baseline_copy(monkeypatch):
    model = random_tiny()
    reference = speed_reference(model)
    monkeypatch.setattr(bench, "_reset_peak_rss", lambda: True)
    monkeypatch.setattr(bench, "_peak_rss", lambda: 1 << 30)
    paired = measure_speed(model, prompt_tokens=16, new_tokens=4, repeats=1, reference=reference)
    assert paired.peak_memory_bytes == (1 << 30) - bench._resident_bytes(reference)


def test_resident_bytes_count_a_tied_head_once():
    tied = random_tiny("llama-mqa-tied")
    embedding = tied.module.model.embed_tokens.weight
    assert tied.module.lm_head.weight.data_ptr() == embedding.data_ptr()
    total = sum(t.numel() * t.element_size() for t in tied.module.state_dict().values())
    assert bench._resident_bytes(tied) == total - embedding.numel() * embedding.element_size()
