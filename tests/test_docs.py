"""The commands the docs tell users to run, held to what the image and Dataflow need.

- ``docker run`` of the image must keep NVIDIA's entrypoint in front of the command: it sets up CUDA
  forward compatibility (the image's compat libcuda where the host driver is older than the image's
  CUDA), and ``--entrypoint python3`` skips it. The image's ENTRYPOINT is NVIDIA's script followed by
  Beam's boot; to run another program, the docs name NVIDIA's script as the entrypoint and the program
  as the command (the script ends with ``exec "$@"``).
- The GPU driver option is one rule, stated once in docs/tensorrt.md ("GPU workers and the driver")
  and used the same way everywhere else: ``install-nvidia-driver:latest``.
- The README's "Use your own model" commands run as written (the ``make`` steps, which CI's ``make test``
  has already made, are checked to exist; the demo photos and ``/tmp/own`` go to a test folder).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
SOURCES = sorted(p for folder in ("engines", "images", "model_tools", "pipelines", "benchmarks", "flex")
                 for p in (REPO / folder).rglob("*")
                 if p.suffix in (".py", ".json", ".md"))


def _image_entrypoint():
    (line,) = re.findall(r"^ENTRYPOINT (.*)$", (REPO / "Dockerfile").read_text(), flags=re.M)
    return json.loads(line)


def _docker_runs(text):
    """Each ``docker run ...`` command in the text, continuation lines joined."""
    return [re.sub(r"\\\n\s*", " ", m) for m in re.findall(r"docker run (?:[^\n]*\\\n)*[^\n]*", text)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docker_run_keeps_nvidias_entrypoint(doc):
    nvidia = _image_entrypoint()[0]
    for command in _docker_runs(doc.read_text()):
        entrypoint = re.search(r"--entrypoint[ =](\S+)", command)
        assert entrypoint is None or entrypoint.group(1) == nvidia, \
            f"{doc.name}: `{command[:120]}` replaces NVIDIA's entrypoint ({nvidia}), which sets up CUDA forward " \
            f"compatibility; pass --entrypoint {nvidia} and the program as the command"


def test_the_docs_run_programs_through_nvidias_entrypoint():
    nvidia = _image_entrypoint()[0]
    commands = [c for doc in DOCS for c in _docker_runs(doc.read_text())]
    assert commands and all(f"--entrypoint {nvidia}" in c for c in commands if " -m " in c), commands


def test_one_driver_rule_used_everywhere():
    rule = "install-nvidia-driver:latest"
    tensorrt_md = (REPO / "docs" / "tensorrt.md").read_text()
    assert re.search(r"^### GPU workers and the driver$", tensorrt_md, flags=re.M), "the rule's one home is missing"
    for path in DOCS + SOURCES:
        text = path.read_text()
        if path.name == "tensorrt.md":  # the rule's home compares it with the other values
            text = re.sub(r"^### GPU workers and the driver$.*?(?=^#)", "", text, flags=re.M | re.S)
        for use in re.findall(r"install-nvidia-driver[\w:.-]*", text):
            assert use == rule, f"{path.relative_to(REPO)} says {use}; the rule is {rule} (docs/tensorrt.md)"


def _section_commands(heading: str):
    """The README's first bash block under ``heading``, as lines with continuations joined."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(heading):]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [line for line in re.sub(r"\\\n\s*", " ", block).splitlines() if line.strip()]


def test_the_use_your_own_model_commands_run_as_written(tmp_path):
    import os
    import subprocess
    import sys

    from pipelines.demo import write_broken, write_photos

    images = tmp_path / "demo_images"
    images.mkdir()
    write_photos(str(images))
    write_broken(str(images))
    script = []
    for line in _section_commands("## Use your own model"):
        if line.startswith("make "):
            target = line.split("#")[0].split()[1]
            made = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True)
            assert made.returncode == 0, f"README: `make {target}` is not a target: {made.stderr}"
            continue
        if line.startswith("source "):
            continue
        script.append(line.replace("demo_images", str(images)).replace("/tmp/own", str(tmp_path / "own")))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-e", "-c", "\n".join(script)], cwd=REPO, capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(re.findall(r"scored 11 images, 5 dead letters", result.stdout)) == 2, result.stdout
    assert "top-1 agreement 100.0%" in result.stdout and result.stdout.rstrip().endswith("OK"), result.stdout
