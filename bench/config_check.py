"""Check config-group choices on the command line before Hydra composes them, for one-line errors."""

from __future__ import annotations

from pathlib import Path

from bench.errors import ConfigError

CONF = Path(__file__).resolve().parent.parent / "conf"


def group_choices(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def check_group_overrides(args: list[str]) -> None:
    """Raise for ``group=choice`` (or a sweep ``group=a,b``) naming a config that does not exist."""
    for arg in args:
        if "=" not in arg or arg.startswith(("hydra.", "+", "~")):
            continue
        group, value = arg.split("=", 1)
        group = group.split("@")[0]
        if not (CONF / group).is_dir() or "/" in group:
            continue
        choices = group_choices(group)
        for choice in value.strip("[]").split(","):
            if choice and choice not in choices:
                raise ConfigError(f"{group}={choice!r} is not a config in conf/{group}/; choose one of {choices}")
