"""The rows' cost benchmark loads another checkout's top-k beside this one's, checks they agree, and times both."""

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_the_benchmark_times_both_top_ks_alone_and_beside_busy_threads(capsys):
    from benchmarks import rows_cost

    results = rows_cost.main(["--old", str(REPO), "--batch", "8", "--classes", "50", "--busy", "1", "--rounds", "2",
                              "--calls", "3"])
    assert sorted(results) == [0, 1]
    for busy in (0, 1):
        for part in ("topk", "write"):
            assert {name: len(ms) for name, ms in results[busy][part]["ms_per_batch"].items()} == {"old": 2, "new": 2}
            assert results[busy][part]["ratio_old_vs_new"] > 0
    out = capsys.readouterr().out
    assert "beside 1 busy threads, topk, batch 8 x 50 classes, top 5" in out and "beside 0 busy threads, write" in out


def test_rows_that_differ_without_a_tie_are_counted_and_tied_ones_are_not():
    from benchmarks.rows_cost import untied_rows_differing

    a = [{"class_id": 1, "score": 0.5}, {"class_id": 2, "score": 0.25}]
    tied = [{"class_id": 1, "score": 0.5}, {"class_id": 2, "score": 0.5}]
    assert untied_rows_differing([a, tied], [a, tied[::-1]]) == 0
    assert untied_rows_differing([a], [a[::-1]]) == 1
    assert untied_rows_differing([a], []) == 1


SAME_TOP_K = "from transforms.postprocess import top_k_batch\n"
SAME_SINK = "from transforms.sinks import JsonLinesSink\n"
WORST_FIRST = ("from transforms.postprocess import top_k_batch as new\n"
               "def top_k_batch(*args, **kwargs):\n"
               "    return [row[::-1] for row in new(*args, **kwargs)]\n")
LOSES_A_ROW = ("from transforms.sinks import JsonLinesSink as New\n"
               "class JsonLinesSink(New):\n"
               "    def write(self, rows):\n"
               "        super().write(rows[:-1])\n")
NO_LAST_NEWLINE = ("from transforms.sinks import JsonLinesSink as New\n"
                   "class JsonLinesSink(New):\n"
                   "    def open(self, fh):\n"
                   "        class Trimmed:\n"
                   "            def write(_, data):\n"
                   "                fh.write(data.rstrip(b'\\n'))\n"
                   "        super().open(Trimmed())\n")


@pytest.mark.parametrize("postprocess, sinks, message", [
    (WORST_FIRST, SAME_SINK, "differ in 8 rows without ties"),
    (SAME_TOP_K, LOSES_A_ROW, "different JSON values"),
    (SAME_TOP_K, NO_LAST_NEWLINE, "not one line each"),
], ids=["top-k listing other classes", "sink losing a row", "sink running blocks together"])
def test_an_old_checkout_that_computes_other_rows_stops_the_benchmark(tmp_path, postprocess, sinks, message):
    """A checkout whose rows differ (where no scores tie) or whose sink writes other values is not the same
    computation: nothing is timed."""
    from benchmarks import rows_cost

    (tmp_path / "transforms").mkdir()
    (tmp_path / "transforms" / "postprocess.py").write_text(postprocess)
    (tmp_path / "transforms" / "sinks.py").write_text(sinks)
    with pytest.raises(SystemExit, match=message):
        rows_cost.main(["--old", str(tmp_path), "--batch", "8", "--classes", "50", "--rounds", "1", "--calls", "1"])


def test_a_folder_that_is_not_a_checkout_is_refused(tmp_path):
    from benchmarks import rows_cost

    with pytest.raises(SystemExit, match="no transforms/postprocess.py"):
        rows_cost.main(["--old", str(tmp_path)])
