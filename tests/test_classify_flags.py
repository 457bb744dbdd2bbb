"""Flag checks of ``pipelines.classify_images`` (``check_flags``): every numeric flag is range-checked
before anything runs, so ``inf``, ``nan``, a negative or a huge value stops the command at start with
exit status 2 and one line naming the flag, the value and the accepted range, instead of an
OverflowError or a traceback midway.

Each case runs the real CLI entry point in-process with an --input that does not exist: a value the
checks let through would reach the input check and fail with another message.
"""

from __future__ import annotations

import argparse
import time

import pytest

from pipelines import classify_images
from pipelines.settings import ClassifyOptions


def _numeric_flags():
    """Every flag of ClassifyOptions that argparse parses as a number: (flag, int or float)."""
    parser = argparse.ArgumentParser()
    ClassifyOptions._add_argparse_args(parser)
    return sorted((action.option_strings[0], action.type) for action in parser._actions
                  if action.type in (int, float))


NUMERIC_FLAGS = _numeric_flags()
#: Flags for which -1 means "choose for me": the first value below their range is -2.
AUTO_AT_MINUS_ONE = {"--decode_threads", "--dali_threads"}


def _cli(capsys, tmp_path, *flags):
    """(exit status, stderr, seconds) of the CLI; argparse's own refusals exit through SystemExit."""
    argv = ["--input", str(tmp_path / "no-such-input" / "*.jpg"), "--output", str(tmp_path / "o"), *flags]
    start = time.monotonic()
    try:
        code = classify_images.main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err, time.monotonic() - start


def test_the_numeric_flags_are_found():
    # The parametrization below is only as good as this list: a new numeric flag joins it by itself.
    flags = dict(NUMERIC_FLAGS)
    assert {"--read_timeout_s", "--progress_every_s", "--batch_size", "--top_k", "--workspace_gib",
            "--hw_decoder_load", "--max_pixels", "--num_contexts"} <= set(flags)
    assert flags["--read_timeout_s"] is float and flags["--batch_size"] is int


@pytest.mark.parametrize("value", ["inf", "nan", "below", "huge"])
@pytest.mark.parametrize("flag,kind", NUMERIC_FLAGS, ids=[flag for flag, _ in NUMERIC_FLAGS])
def test_every_numeric_flag_out_of_range_stops_at_start_naming_flag_value_and_range(tmp_path, capsys, flag, kind,
                                                                                    value):
    if value == "below":
        value = "-2" if flag in AUTO_AT_MINUS_ONE else "-1"
    elif value == "huge":
        value = "1e12" if kind is float else str(10 ** 21)
    code, err, seconds = _cli(capsys, tmp_path, flag, value)
    assert code == 2, err
    assert seconds < 5 and not (tmp_path / "o").exists()  # refused before anything ran
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    if kind is int and value in ("inf", "nan"):
        assert last.endswith(f"argument {flag}: invalid int value: '{value}'"), err  # argparse's own check
        return
    shown = {"1e12": "1e+12"}.get(value, value)
    assert last.startswith(f"error: {flag} ") and f"got {shown}" in last and "accepted: " in last, err


@pytest.mark.parametrize("flag,value", [("--read_timeout_s", "86400"), ("--progress_every_s", "0"),
                                        ("--read_timeout_s", "0"), ("--hw_decoder_load", "1"),
                                        ("--decode_threads", "-1"), ("--workspace_gib", "0.5")])
def test_values_at_the_edges_of_the_ranges_pass_the_checks(tmp_path, capsys, flag, value):
    code, err, _ = _cli(capsys, tmp_path, flag, value)
    assert code == 2 and "matches no files" in err, err  # the next check, on --input, is what stops it


@pytest.mark.parametrize("profile", ["1,64,99999999999999", "1,inf,64", "0,1,2", "64"])
def test_trt_profile_out_of_range_or_malformed_stops_at_start(tmp_path, capsys, profile):
    code, err, _ = _cli(capsys, tmp_path, "--engine", "tensorrt", "--onnx_path", str(tmp_path / "m.onnx"),
                        "--trt_profile", profile)
    assert code == 2, err
    assert f"error: --trt_profile {profile} " in err and "accepted: " in err, err
