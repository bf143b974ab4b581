"""Load ``config.yaml`` (the one file of hyperparameters), apply command-line overrides, resolve paths."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import yaml

#: Repository root (the folder holding config.yaml, stages/, input/, output/, models/).
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "config.yaml"


class Config(dict):
    """Nested settings with attribute access: ``cfg.image.backbone``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    @staticmethod
    def wrap(obj: Any) -> Any:
        if isinstance(obj, dict):
            return Config({k: Config.wrap(v) for k, v in obj.items()})
        return obj

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, Config) else copy.deepcopy(v) for k, v in self.items()}

    def path(self, name: str) -> Path:
        """A path from ``paths``, relative ones taken from the repository root."""
        p = Path(self.paths[name]).expanduser()
        return p if p.is_absolute() else ROOT / p


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_override(cfg: dict, assignment: str) -> None:
    """Apply ``section.key=value`` (value parsed as YAML); unknown keys are an error, not a silent no-op."""
    if "=" not in assignment:
        raise ValueError(f"override {assignment!r} is not of the form section.key=value")
    dotted, value = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    node = cfg
    for i, key in enumerate(keys[:-1]):
        if not isinstance(node.get(key), dict):
            raise KeyError(f"override {assignment!r}: no config section {'.'.join(keys[: i + 1])!r}")
        node = node[key]
    if keys[-1] not in node:
        raise KeyError(f"override {assignment!r}: no config key {dotted!r} (see config.yaml)")
    node[keys[-1]] = _parse_value(value)


def load(path: str | Path | None = None, overrides: list[str] | None = None, **paths: str | None) -> Config:
    """Read the config file, apply ``section.key=value`` overrides and any non-None ``paths`` keys."""
    with open(path or DEFAULT_CONFIG, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    for assignment in overrides or []:
        apply_override(raw, assignment)
    for key, value in paths.items():
        if value is not None:
            raw["paths"][key] = str(value)
    return Config.wrap(raw)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The command-line options every stage shares."""
    parser.add_argument("--config", default=None, help="config file (default: config.yaml at the repository root)")
    parser.add_argument("--data", default=None, help="competition folder (default: paths.data, i.e. input/)")
    parser.add_argument("--output", default=None, help="output folder (default: output/)")
    parser.add_argument("--models", default=None, help="checkpoint folder (default: models/)")
    parser.add_argument("--demo", action="store_true", help="run on the generated demo data (made if missing)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set fusion.lr=0.01 (repeatable)",
    )
    return parser


def from_args(args: argparse.Namespace) -> Config:
    return load(args.config, args.overrides, data=args.data, output=args.output, models=args.models)
