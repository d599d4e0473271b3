import json

import pytest

from tuili.data import builtin_text, load_text
from tuili.errors import DataError


def test_builtin_specs():
    assert load_text("builtin") == builtin_text("evaluation")
    assert load_text("builtin", split="calibration") == builtin_text("calibration")
    assert load_text("builtin:calibration") == builtin_text("calibration")


def test_text_file(tmp_path):
    (tmp_path / "a.txt").write_text("hello\nworld")
    assert load_text(str(tmp_path / "a.txt")) == "hello\nworld"


def test_jsonl_default_and_named_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"text": "a", "body": "x"}, {"text": "b", "body": "y"}]) + "\n\n")
    assert load_text(str(path)) == "a\n\nb"
    assert load_text(f"{path}:body") == "x\n\ny"


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{broken\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not a JSON object"):
        load_text(str(path))
    path.write_text('{"text": "a"}\n{"content": "b"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: no string field 'text'"):
        load_text(str(path))


def test_missing_file_says_what_is_accepted(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        load_text(str(tmp_path / "missing.txt"))


def test_binary_file_is_refused(tmp_path):
    (tmp_path / "b.bin").write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(DataError, match="not UTF-8"):
        load_text(str(tmp_path / "b.bin"))
