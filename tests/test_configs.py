"""Configs compose: every task x normalizer config is ``configs/base/trainer.yaml`` + the task's base
file + ``configs/norms/<norm>.yaml`` (+ ``configs/<task>/norms/<norm>.yaml`` where the normalizer's
recipe differs for that task), and resolves to the same values as the per-normalizer file it
replaces.

``tests/data/resolved_configs.json`` holds, per replaced file (``configs/<task>/<arch>_<norm>_<data>.yaml``),
its composition and the config it resolved to (``ssn-bench fit --config configs/base/trainer.yaml
--config OLD --print_config``, through the parser here; generated from the old files before they
were removed). Values the normalizer never reads may differ: a network without SN/SSN layers has
no ratio group (``ratio_*``), one without SSN layers no radius schedule (``radius_*``); the old
per-normalizer files of a task repeated the task's SSN recipe in its BN/GN/... files, the
compositions leave those at NormTask's defaults (checked too).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import yaml

import ssn
from tasks.base import NormTask
from tasks.cli import SSNCLI

from helpers import ROOT

FIXTURE = ROOT / "tests" / "data" / "resolved_configs.json"
EXPECTED = json.loads(FIXTURE.read_text())
RATIO_KEYS = ("ratio_lr_scale", "ratio_weight_decay", "ratio_grad_clip")
RADIUS_KEYS = ("radius_end", "radius_ramp_fraction", "radius_delay_fraction")
# NOTE: LightningCLI warns when given args while sys.argv holds pytest's own
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")


class _ParseOnly(SSNCLI):
    """The CLI's parser and config, nothing instantiated or run."""

    def _set_seed(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str | None) -> None:
        pass


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}{key}.").items()}
    return {prefix[:-1]: value}


def resolve(configs: list[str]) -> dict[str, Any]:
    """The config ``ssn-bench fit --config C1 --config C2 ... --print_config`` prints, flattened to
    dotted keys (lists, e.g. the callbacks, stay whole)."""
    args = ["fit"]
    for c in configs:
        args += ["--config", str(ROOT / c)]
    cli = _ParseOnly(
        NormTask, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, args=args
    )
    cfg = cli.config["fit"].clone()
    del cfg["config"]
    parser = cli.parser._subcommands_action._name_parser_map["fit"]
    return _flatten(yaml.safe_load(parser.dump(cfg, skip_none=False)))


def unread_keys(norm: str, norm_kwargs: dict[str, Any] | None) -> set[str]:
    """The model arguments a network of this normalizer never reads."""
    layer = ssn.get_norm_layer(norm, **(norm_kwargs or {}))(64)
    unread = set()
    if not isinstance(layer, ssn.SwitchNormBase):
        unread.update(RATIO_KEYS)
    if not isinstance(layer, ssn.SparseSwitchNormBase):
        unread.update(RADIUS_KEYS)
    return {f"model.init_args.{k}" for k in unread}


DEFAULTS = {
    f"model.init_args.{k}": p.default for k, p in inspect.signature(NormTask.__init__).parameters.items()
}


@pytest.mark.parametrize("old", sorted(EXPECTED))
def test_composition_reproduces_the_old_file(old: str) -> None:
    entry = EXPECTED[old]
    if (ROOT / old).is_file():  # NOTE: while the old file exists, the fixture is checked against it
        assert resolve(["configs/base/trainer.yaml", old]) == entry["resolved"]
    new = resolve(entry["compose"])
    want = entry["resolved"]
    norm = want["model.init_args.norm"]
    assert new["model.init_args.norm"] == norm
    unread = unread_keys(norm, want.get("model.init_args.norm_kwargs"))
    assert {k: v for k, v in new.items() if k not in unread} == {
        k: v for k, v in want.items() if k not in unread
    }
    for k in unread:  # what a normalizer never reads is not set by its composition either
        assert new.get(k, DEFAULTS[k]) == DEFAULTS[k], k


def test_every_config_file_is_composed() -> None:
    """No overlay or base file that no composition uses (configs/base/ aside)."""
    used = {c for entry in EXPECTED.values() for c in entry["compose"]}
    files = {str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "base"}
    old = {k for k in EXPECTED if (ROOT / k).is_file()}
    assert files - old == used - {"configs/base/trainer.yaml"}


def test_compositions_are_base_norm_and_task_overlay() -> None:
    """Each composition: trainer, the task's base, configs/norms/<norm>.yaml, and the task's
    configs/<task>/norms/<norm>.yaml exactly where that file exists."""
    for old, entry in EXPECTED.items():
        norm = entry["resolved"]["model.init_args.norm"]
        task = Path(old).parent
        overlay = task / "norms" / f"{norm}.yaml"
        base = [
            str(p.relative_to(ROOT))
            for p in (ROOT / task).glob("*.yaml")
            if str(p.relative_to(ROOT)) not in EXPECTED
        ]
        want = ["configs/base/trainer.yaml", *base, f"configs/norms/{norm}.yaml"]
        want += [str(overlay)] if (ROOT / overlay).is_file() else []
        assert entry["compose"] == want, old
