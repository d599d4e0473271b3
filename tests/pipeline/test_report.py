from tuili.pipeline.report import human_bytes, human_count, markdown_table


def test_markdown_table_aligns_numbers_right():
    table = markdown_table(["name", "value"], [["a", "1.5"], ["bb", "22"]])
    assert table.splitlines() == ["| name | value |", "|------|------:|", "| a    |   1.5 |", "| bb   |    22 |"]


def test_human_units():
    assert human_bytes(512) == "512 B"
    assert human_bytes(3 * 1024**2) == "3.0 MiB"
    assert human_count(2.5e9, "FLOP") == "2.50 GFLOP"
