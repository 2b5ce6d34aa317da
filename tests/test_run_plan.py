"""bench/run_plan.sh: a plan's section runs step by step, each step's output kept in $OUT, a step past its limit
interrupted, a step that would pass the budget not started; the plans kept in bench/plans are well formed."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PLAN = """# a comment
[first]
hello 10 echo hello > $OUT/made.txt; echo said
slow 1 sleep 5
big 1000 echo never
[second]
other 10 echo other
"""


def run(tmp_path: Path, section: str, budget: int = 30) -> subprocess.CompletedProcess:
    (tmp_path / "plan.txt").write_text(PLAN)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return subprocess.run(["bash", str(ROOT / "bench/run_plan.sh"), str(tmp_path / "plan.txt"), section, str(budget)],
                          capture_output=True, text=True, env={"OUT": str(out), "PATH": "/usr/bin:/bin"}, timeout=60)


def test_a_section_runs_its_steps_and_keeps_their_output(tmp_path: Path) -> None:
    done = run(tmp_path, "first")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out/made.txt").read_text() == "hello\n" and (tmp_path / "out/hello.log").read_text() == "said\n"
    assert "== slow: rc 124" in done.stdout and "(its time limit)" in done.stdout
    assert "== big: not started" in done.stdout and not (tmp_path / "out/big.log").exists()
    assert not (tmp_path / "out/other.log").exists()  # another section's step


def test_an_unknown_section_names_the_plan_s_sections(tmp_path: Path) -> None:
    done = run(tmp_path, "third")
    assert done.returncode == 2 and "[first] [second]" in done.stderr


@pytest.mark.parametrize("plan", sorted((ROOT / "bench/plans").glob("*.txt")), ids=lambda p: p.name)
def test_the_kept_plans_parse(plan: Path) -> None:
    """Every step line is in a section and has a label, a limit a device call allows (600 s) and a module to run (after
    environment settings, if any, and under Nsight Compute, if so), one of the project's or pytest; labels are unique
    within a section."""
    section, labels = None, set()
    for line in plan.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("["):
            section, labels = line, set()
            continue
        label, limit, command = line.split(maxsplit=2)
        assert section and re.fullmatch(r"[A-Za-z0-9_.-]+", label) and int(limit) <= 600
        run = re.match(r"([A-Z_]+=\S+ )*(ncu .* )?python3 -m (\S+)", command)
        assert run, command
        module = run.group(3)
        assert module == "pytest" or (ROOT / (module.replace(".", "/") + ".py")).is_file(), module
        assert label not in labels
        labels.add(label)


def plan_steps(plan: Path):
    """``(section, label, module, arguments)`` of each step of ``plan`` that runs a module, its environment settings
    and Nsight Compute's prefix taken off."""
    section = None
    for line in plan.read_text().splitlines():
        if line.startswith("["):
            section = line
        elif line.strip() and not line.startswith("#"):
            label, _, command = line.split(maxsplit=2)
            words = shlex.split(command)
            at = words.index("-m")
            yield section, label, words[at + 1], words[at + 2:]


@pytest.mark.parametrize("plan", sorted((ROOT / "bench/plans").glob("*.txt")), ids=lambda p: p.name)
def test_the_kept_plans_benchmarks_take_their_arguments(plan: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    """Each benchmark step's arguments (kernels, shapes, config variants, flags) pass its own checks off the GPU, so that
    a misspelt one costs no device time: its ``main`` gets as far as asking for a GPU (and, told there is none, says so
    and returns 1) instead of refusing the arguments (``SystemExit`` 2, which names the bad value)."""
    from bench import config_ab, decode_latency, kernel_latency

    mains = {"bench.config_ab": config_ab.main, "bench.kernel_latency": kernel_latency.main, "bench.decode_latency": decode_latency.main}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    checked = 0
    for section, label, module, args in plan_steps(plan):
        if module not in mains:
            continue
        args = [a.replace("$OUT", str(tmp_path)) for a in args]
        assert mains[module](args) == 1, f"{section} {label}"
        assert "no CUDA GPU" in capsys.readouterr().err, f"{section} {label}"
        checked += 1
    assert checked
