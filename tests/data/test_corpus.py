from tuili.data import builtin_text
from tuili.data.corpus import _topics, in_evaluation


def test_splits_are_disjoint_and_cover_every_topic():
    topics = _topics()
    evaluation = {n for n in topics if in_evaluation(n)}
    calibration = set(topics) - evaluation
    assert evaluation and calibration
    eval_text, calib_text = builtin_text("evaluation"), builtin_text("calibration")
    assert all(topics[n] in eval_text for n in evaluation)
    assert all(topics[n] in calib_text for n in calibration)
    assert not any(topics[n] in calib_text for n in evaluation if len(topics[n]) > 200)


def test_split_is_deterministic():
    assert builtin_text("evaluation") == builtin_text("evaluation")
    assert len(builtin_text("all")) > len(builtin_text("evaluation")) > len(builtin_text("calibration"))
