"""The decoder build benchmark builds each variant in a process of its own and reports its timings (DALI's CPU
graph here; the GPU variants add decoder options that only the mixed decoder takes)."""

import pytest

pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI (the test extra installs nvidia-dali-cuda130)")


def test_each_variant_is_built_in_its_own_process_and_timed(capsys):
    from benchmarks import dali_build

    rows = dali_build.main(["--device", "cpu", "--rounds", "2", "--threads", "1"])
    assert [r["variant"] for r in rows] == ["default", "threads4"] * 2
    assert all(r["device"] == "cpu" and 0 < r["pipeline_build_s"] <= r["decoder_s"] for r in rows)
    assert "threads4   Pipeline.build s:" in capsys.readouterr().out


def test_a_variant_that_does_not_apply_to_the_device_is_refused():
    from benchmarks import dali_build

    with pytest.raises(SystemExit, match="unknown variants for --device cpu"):
        dali_build.main(["--device", "cpu", "--variants", "default,hw0"])


def test_a_variants_options_reach_the_decoder(tmp_path):
    import subprocess
    import sys

    from benchmarks.throughput import REPO_ROOT

    # In a child, as the benchmark builds each variant: the patch it makes to DALI is for that process only.
    code = ("from benchmarks import dali_build; dali_build.VARIANTS['odd'] = {'no_such_option': 1}; "
            "dali_build.build_once('odd', 'cpu', 1)")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert run.returncode != 0 and "no_such_option" in run.stderr


def test_rounds_below_one_are_refused():
    from benchmarks import dali_build

    with pytest.raises(SystemExit, match="--rounds must be >= 1"):
        dali_build.main(["--device", "cpu", "--rounds", "0"])
