"""flex/metadata.json against the CLI: every template parameter is a classify_images flag that takes a
value, its regex accepts what the flag accepts (and the flag's choices only), and the pipeline parses it.

A template parameter the CLI does not know fails the job at launch on Dataflow, long after the
template was built; this catches it in CI.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.settings import ClassifyOptions

METADATA = json.loads((Path(__file__).resolve().parent.parent / "flex" / "metadata.json").read_text())
#: A value the CLI accepts for each parameter, as a scheduler would pass it.
EXAMPLES = {"input": "gs://b/photos/dt={date}/**", "output": "gs://b/scored/dt={date}", "run_date": "2024-05-31",
            "skip_scored": "gs://b/scored", "model": "gs://b/m.onnx", "providers": "cuda,cpu",
            "engine_path": "gs://b/e.plan", "onnx_path": "gs://b/m.onnx", "engine_cache": "gs://b/plans",
            "num_contexts": "2", "batch_size": "64", "min_batch_size": "16", "top_k": "5", "output_name": "logits",
            "labels_file": "gs://b/labels.txt", "resize": "256", "crop": "224", "decode_threads": "-1",
            "prefetch": "8", "model_copies": "1", "dali_threads": "-1", "hw_decoder_load": "0.65",
            "read_timeout_s": "30.5", "output_table": "my-project:scoring.predictions",
            "mean": "0.485,0.456,0.406", "std": "0.229,0.224,0.225", "threshold": "0.5",
            "model_version": "resnet50-v2@2026-12-01", "keep_columns": "sku,label_gt"}


def _actions():
    parser = argparse.ArgumentParser()
    ClassifyOptions._add_argparse_args(parser)
    return {option: action for action in parser._actions for option in action.option_strings}


@pytest.mark.parametrize("param", METADATA["parameters"], ids=lambda p: p["name"])
def test_parameter_is_a_flag_with_a_value_and_a_fitting_regex(param):
    action = _actions().get(f"--{param['name']}")
    assert action is not None, f"flex/metadata.json names {param['name']!r}, which classify_images does not accept"
    assert action.nargs != 0, f"--{param['name']} takes no value; a template passes --{param['name']}=VALUE"
    assert action.help != argparse.SUPPRESS and param["label"] and param["helpText"]
    regexes = [re.compile(r) for r in param.get("regexes", [])]
    assert regexes, f"{param['name']} has no regex"
    values = list(action.choices) if action.choices else [EXAMPLES[param["name"]]]
    for value in values:
        assert all(r.search(value) for r in regexes), (param["name"], value)
        parsed = PipelineOptions([f"--{param['name']}={value}"]).view_as(ClassifyOptions)
        # A repeatable flag (--output_name) collects its values in a list; a template passes it once.
        assert getattr(parsed, action.dest) == [value] if action.default is None and isinstance(
            action, argparse._AppendAction) else str(getattr(parsed, action.dest)) == value
    if action.choices:
        assert not any(r.search("not-a-choice") for r in regexes)
    if action.type is int:
        assert not any(r.search("0x10") or r.search("") for r in regexes)


def test_required_parameters_and_the_users_settings_are_all_there():
    names = {p["name"] for p in METADATA["parameters"]}
    assert {p["name"] for p in METADATA["parameters"] if not p["isOptional"]} == {"input", "output"}
    assert {"input", "output", "run_date", "skip_scored", "model", "engine", "engine_path", "onnx_path",
            "batch_size", "top_k", "output_format", "decode", "decode_threads", "read_timeout_s"} <= names
    assert len(names) == len(METADATA["parameters"])


def test_run_date_regex_is_the_one_the_cli_checks():
    from pipelines.partitions import RUN_DATE_PATTERN

    (param,) = [p for p in METADATA["parameters"] if p["name"] == "run_date"]
    assert param["regexes"] == [RUN_DATE_PATTERN.replace(r"\d", "[0-9]")]


def test_paths_the_workers_list_or_write_take_buckets_only():
    # A template always launches on Dataflow, where pipelines/launch_checks.py refuses these on a local
    # disk; the regex says so before the launch. Model files may be paths in the image the workers run.
    by_name = {p["name"]: p for p in METADATA["parameters"]}
    for name in ("input", "output", "skip_scored", "engine_cache"):
        regexes = [re.compile(r) for r in by_name[name]["regexes"]]
        assert not any(r.search("/data/photos/") for r in regexes), name
        assert all(r.search("gs://b/x/") for r in regexes), name
    for name in ("model", "onnx_path", "engine_path"):
        assert all(re.compile(r).search("/opt/models/m.onnx") for r in by_name[name]["regexes"]), name
