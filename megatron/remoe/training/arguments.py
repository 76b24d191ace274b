"""Training configuration from the command line: Megatron-style flags and YAML files with the same keys.

Every feature of the trainer sits behind a field of `TrainConfig` (training/config.py, torchtitan style).
The flag of a field is its name with dashes (`micro_batch_size` -> `--micro-batch-size`); a YAML file
may spell keys either way. Precedence: dataclass defaults < `--config FILE.yaml` (and its `base:`
chain) < flags.

`parse_config(argv)` returns a validated config (validation.py holds the rules) or raises
`ConfigError` with one line naming the value and the fix; `pretrain.main` turns that into exit code 2
before anything is written to disk. `TrainConfig` and its helpers live in config.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import typing
from typing import Optional

import yaml

from megatron.remoe.errors import ConfigError
from megatron.remoe.training.config import FIELDS, GROUPS, TrainConfig
from megatron.remoe.training.validation import finalize_config

_HINTS = typing.get_type_hints(TrainConfig)


# ------------------------------------------------------------------------------------------------
# Flags
# ------------------------------------------------------------------------------------------------
def _base_type(name: str):
    hint = _HINTS[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def build_parser(prog: str = "remoe train") -> argparse.ArgumentParser:
    """Flags for every TrainConfig field. Defaults are SUPPRESSed so that only the flags actually
    given override the YAML file."""
    parser = argparse.ArgumentParser(
        prog=prog, argument_default=argparse.SUPPRESS,
        description="Pretrain a ReMoE / TopK-MoE / dense GPT with megatron-core.")
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="YAML with the same keys as the flags (underscored or dashed); "
                             "flags override it; `base: other.yaml` inherits")
    groups = {g: parser.add_argument_group(g) for g in GROUPS}
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        kind = _base_type(name)
        extra = dict(f.metadata["argparse"])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata['help']} [default: {default}]"
        if kind is bool:
            # --x / --no-x; argparse would read a field named no_* as the negation of "--load-optim"
            action = "store_true" if name.startswith("no_") else argparse.BooleanOptionalAction
            groups[f.metadata["group"]].add_argument(flag, action=action, help=help_text)
            continue
        if name == "moe_layer_freq":
            extra["type"] = _parse_layer_freq
        elif kind in (int, float, str):
            extra.setdefault("type", kind)
        groups[f.metadata["group"]].add_argument(flag, help=help_text, **extra)
    return parser


def _parse_layer_freq(text):
    try:
        if isinstance(text, (int, list)):
            return text
        text = str(text).strip()
        if "," in text:
            return [int(x) for x in text.strip("[]").split(",") if x.strip()]
        return int(text)
    except ValueError:
        raise ConfigError(f"moe_layer_freq={text!r} must be an int or a 0/1 pattern like "
                          "'1,0,1,0'") from None


def _raise_on_error(parser: argparse.ArgumentParser) -> None:
    # argparse prints usage and exits 2 on bad flags; we want our one-line error instead.
    def error(message):
        m = re.match(r"argument (\S+): invalid (int|float) value: (.*)$", message)
        if m:
            kind = "an integer" if m.group(2) == "int" else "a number"
            raise ConfigError(f"{m.group(1)}={m.group(3)}: invalid {m.group(2)} value; pass "
                              f"{kind} (see `{parser.prog} --help`)")
        raise ConfigError(f"{message}; see `{parser.prog} --help`")

    parser.error = error


# ------------------------------------------------------------------------------------------------
# YAML
# ------------------------------------------------------------------------------------------------
def read_yaml_mapping(path: str, what: str = "config", fix: str = "fix the --config path",
                      error=ConfigError) -> dict:
    """The top-level mapping of YAML file `path`; `error` (one line, naming the file) otherwise."""
    if not os.path.isfile(path):
        raise error(f"{what} file {path} does not exist; {fix}")
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise error(f"{what} {path}{where}: invalid YAML ({getattr(e, 'problem', e)}); fix the file")
    if not isinstance(raw, dict):
        raise error(f"{what} {path}: expected a mapping of keys to values at top level")
    return raw


def load_yaml_config(path: str, _seen: Optional[set] = None) -> dict:
    """Read a config file, following `base:` (a path relative to the file, or a list of them,
    applied in order; the file's own keys win). Keys are normalised to underscores."""
    _seen = _seen or set()
    real = os.path.realpath(path)
    if real in _seen:
        raise ConfigError(f"config {path}: `base:` chain loops back to itself; fix the base keys")
    _seen = _seen | {real}
    raw = read_yaml_mapping(path)
    raw = {str(k).replace("-", "_"): v for k, v in raw.items()}
    merged: dict = {}
    bases = raw.pop("base", None)
    for base in ([bases] if isinstance(bases, str) else bases or []):
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        merged.update(load_yaml_config(base_path, _seen))
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        hint = closest_field_name(unknown[0])
        raise ConfigError(f"config {path}: unknown key {unknown[0]!r}"
                          + (f" (did you mean {hint!r}?)" if hint else "")
                          + "; remove it or fix the spelling")
    merged.update(raw)
    return merged


def closest_field_name(name: str) -> Optional[str]:
    match = difflib.get_close_matches(name, list(FIELDS), n=1)
    return match[0] if match else None


def coerce_field_value(name: str, value):
    """YAML values to the field's type (PyYAML reads `5e-4` as a string, for instance)."""
    if value is None:
        return None
    kind = _base_type(name)
    try:
        if name == "moe_layer_freq":
            return _parse_layer_freq(value)
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1"):
                return True
            if str(value).lower() in ("false", "no", "0"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            return float(value)
        if kind is str:
            return str(value)
        if kind is list:  # items of the flag's type (float budgets), else strings
            item = FIELDS[name].metadata["argparse"].get("type", str)
            return [item(v) for v in (value if isinstance(value, (list, tuple))
                                      else str(value).split())]
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} is not a valid {getattr(kind, '__name__', kind)}; "
                          f"fix the value of {name}") from None
    return value


def config_to_yaml(cfg: TrainConfig) -> str:
    """The effective config as YAML (loadable with --config; round-trips exactly)."""
    lines = []
    data = cfg.to_dict()
    for group in GROUPS:
        lines.append(f"# {group}")
        for name, f in FIELDS.items():
            if f.metadata["group"] == group:
                lines.append(yaml.safe_dump({name: data[name]}, default_flow_style=False,
                                            width=1000, sort_keys=False).strip())
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# Parse + validate
# ------------------------------------------------------------------------------------------------
def parse_config(argv: Optional[list] = None, world_size: Optional[int] = None,
                 cuda: Optional[bool] = None, prog: str = "remoe train") -> TrainConfig:
    """defaults < YAML < flags, then `validate`. Raises ConfigError (one line) on any problem."""
    parser = build_parser(prog)
    _raise_on_error(parser)
    args = vars(parser.parse_args(argv))
    values: dict = {}
    config_path = args.pop("config", None)
    if config_path:
        values.update(load_yaml_config(config_path))
    values.update(args)
    values = {k: coerce_field_value(k, v) for k, v in values.items()}
    cfg = TrainConfig(**values)
    return finalize_config(cfg, world_size, cuda)


