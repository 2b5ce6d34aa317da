"""bench/run_plan.sh: a plan's section runs step by step, each step's output kept in $OUT, a step past its limit
interrupted, a step that would pass the budget not started; the plans kept in bench/plans are well formed."""

import re
import subprocess
from pathlib import Path

import pytest

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
    environment settings, if any); labels are unique within a section."""
    section, labels = None, set()
    for line in plan.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("["):
            section, labels = line, set()
            continue
        label, limit, command = line.split(maxsplit=2)
        assert section and re.fullmatch(r"[A-Za-z0-9_.-]+", label) and int(limit) <= 600
        assert re.match(r"([A-Z_]+=\S+ )*python3 -m ", command), command
        assert label not in labels
        labels.add(label)
