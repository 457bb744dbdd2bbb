"""``benchmarks/import_cost.py``: ``-X importtime`` parsed by module, and two environments compared for real."""

from __future__ import annotations

import pytest

from benchmarks import import_cost

SAMPLE = """import time: self [us] | cumulative | imported package
import time:       120 |        120 |   _io
import time:      5795 |    1106436 | onnx
import time:    748417 |     748417 |             ml_dtypes._ml_dtypes_ext
import time:        40 |         60 | json
garbage line
"""


def test_importtime_is_read_by_module_and_only_top_level_imports_are_summed():
    own, total = import_cost.parse_importtime(SAMPLE)
    assert own == {"_io": 120, "onnx": 5795, "ml_dtypes._ml_dtypes_ext": 748417, "json": 40}
    assert total == 1106436 + 60


def test_a_module_made_slower_by_the_other_path_shows_in_the_ratio_and_the_table(tmp_path, monkeypatch, capsys):
    here, slow = tmp_path / "here", tmp_path / "slow"
    here.mkdir()
    slow.mkdir()
    (here / "probe_module.py").write_text("VALUE = 1\n")
    (slow / "probe_module.py").write_text("import time\ntime.sleep(0.3)\nVALUE = 2\n")
    monkeypatch.setenv("PYTHONPATH", str(here))
    result = import_cost.main(["--with", str(slow), "--rounds", "1", "--top", "3",
                               "--modules", "probe_module,json,no_such_module_here"])
    out = capsys.readouterr().out
    assert result["modules"] == ["probe_module", "json"] and result["left_out"] == ["no_such_module_here"]
    assert result["median_s"]["with"] - result["median_s"]["here"] > 0.25
    assert result["ratio_here_over_with"] < 1
    assert result["top_self_ms"]["probe_module"]["with"] >= 300 > result["top_self_ms"]["probe_module"]["here"]
    assert "not importable here, left out: no_such_module_here" in out and "probe_module" in out


def test_a_folder_that_is_not_there_is_refused():
    with pytest.raises(SystemExit):
        import_cost.main(["--with", "/no/such/folder", "--modules", "json"])
