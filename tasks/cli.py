"""``ssn-bench``: the LightningCLI of the benchmark.

    ssn-bench fit --config configs/base/trainer.yaml \
        --config configs/fashion_mnist/resnet_small_fashionmnist-28.yaml \
        --config configs/norms/ssn.yaml --config configs/fashion_mnist/norms/ssn.yaml
    ssn-bench fit ... --ckpt_path last          # resume exactly where the run stopped
    ssn-bench validate|test ... --ckpt_path PATH

After ``fit`` the trained model is tested, and when every SSN layer has latched it is exported to
native layers (``ssn.export_norm``), saved as a ``torch.export`` program under
``<default_root_dir>/exported/``,
loaded back and tested again, so the two accuracies can be compared.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only

import ssn
from ssn.io import atomic_write, save_atomic
from ssn.transfer import read_checkpoint, record_norms

from .base import NormTask
from .summary import SUMMARY_FILE, complete_summary, read_summary, update_summary

__all__ = ["SSNCLI", "command", "export_model", "main", "run"]

say = rank_zero_only(print)  # the report after fit, printed once under DDP


class ExportedProgram(torch.nn.Module):
    """Runs a saved ``torch.export`` program (on the CPU) inside a LightningModule for testing.

    NOTE: the program's module refuses ``train()``/``eval()``, so it is kept out of the module tree.
    """

    def __init__(self, program_module: torch.nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_program", program_module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._program(x.cpu()).to(x.device)


def export_model(task: NormTask, path: Path, example: torch.Tensor) -> None:
    """Export ``task.net`` to native layers and save it as a ``torch.export`` program (loadable
    without this package, dynamic batch size) and as a state_dict beside it."""
    net = copy.deepcopy(task.net).cpu().eval()
    selection = {name: m._latches() for name, m in ssn.switch_norms(net)}
    net = ssn.export_norm(net)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(net, (example.cpu(),), dynamic_shapes=({0: batch},))
    atomic_write(path, lambda f: torch.export.save(program, f))
    state = net.state_dict()
    record_norms(net, state, selection)  # so `pretrained` restores the latches from this file
    save_atomic(state, path.with_suffix(".state_dict.pt"))


def checkpoint_dir(default_root_dir: str | os.PathLike) -> Path:
    """Where a run's checkpoints go unless its ModelCheckpoint names a dirpath (and so where
    ``--ckpt_path last`` looks)."""
    return Path(default_root_dir) / "checkpoints"


class SSNCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_channels", "model.init_args.in_channels", apply_on="instantiate")
        parser.add_argument(
            "--export",
            type=bool,
            default=True,
            help="after fit: test, export latched SSN layers to native ones, test again",
        )

    def before_fit(self) -> None:
        # NOTE: checkpoints go to <default_root_dir>/checkpoints unless a dirpath is configured:
        # the logger's per-run folder (a new wandb run id each time) would hide the previous run's
        # last.ckpt from `--ckpt_path last`, and a resume would silently start over. A new run
        # replaces an earlier run's last.ckpt there (no `last-v1.ckpt` beside it), so `last` is
        # always this run's own.
        for cb in self.trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint):
                if cb.dirpath is None:
                    cb.dirpath = os.path.realpath(checkpoint_dir(self.trainer.default_root_dir))
                cb._enable_version_counter = False
        self._refuse_writing_beside_source()
        self._restoring()
        saved = getattr(self, "_checkpoint", None)
        if saved is not None:  # a resumed run continues its own wandb run, not a new one
            versions = saved.get("logger_versions", {})
            for logger in self.trainer.loggers:
                run_id = versions.get(type(logger).__name__)
                init = getattr(logger, "_wandb_init", None)  # WandbLogger's arguments of wandb.init
                if run_id and isinstance(init, dict) and getattr(logger, "_experiment", None) is None:
                    init.update(id=run_id, resume="allow")
                    logger._id = run_id

    def before_validate(self) -> None:
        self._warn_untrained()
        self._restoring()

    def before_test(self) -> None:
        self._warn_untrained()
        self._restoring()

    def _restoring(self) -> None:
        """A run given a checkpoint restores everything from it: ``pretrained`` is not read again
        (the file may have moved since the fine-tuning started)."""
        if self.config_init[self.subcommand].get("ckpt_path") and isinstance(self.model, NormTask):
            self.model.restoring_checkpoint()

    def _refuse_writing_beside_source(self) -> None:
        """A run never writes into the folder its ``pretrained`` file lies in: its checkpoints
        would sit beside the source's (``last`` would then resume the source model) and its export
        or summary would overwrite the source's."""
        source = getattr(self.model.hparams, "pretrained", None)
        if not source:
            return
        root = Path(self.trainer.default_root_dir)
        written = {
            root,
            root / "exported",
            *(Path(cb.dirpath) for cb in self.trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)),
        }
        folder = Path(source).expanduser().resolve().parent
        if folder in {w.resolve() for w in written}:
            raise ValueError(
                f"pretrained {source} lies in {folder}, where this run writes its checkpoints, export or "
                f"summary (default_root_dir {root}): it would overwrite the source or resume it as its own "
                "`last`; give the run its own --trainer.default_root_dir"
            )

    def _warn_untrained(self) -> None:
        if self.config_init[self.subcommand].get("ckpt_path") is None and not getattr(
            self.model.hparams, "pretrained", None
        ):
            say(
                f"WARNING: {self.subcommand} without --ckpt_path: these are the metrics of an untrained "
                "(randomly initialised) model; pass --ckpt_path last or a checkpoint file"
            )

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` against the config, where Lightning would quietly replace the config.

        NOTE: LightningCLI builds the model from a checkpoint's hyper-parameters instead of the
        config's (another architecture or normalizer is silently swapped in), takes the newest
        ``*last*.ckpt`` for ``last`` (e.g. another config's ``last-v1.ckpt`` in a shared folder),
        and starts from scratch when there is none. Here ``last`` is exactly this run's
        ``<checkpoint dir>/last.ckpt`` and must exist; a missing, empty or corrupt file is named; a
        checkpoint of another task, architecture or normalizer is refused by name; the config
        builds the model.
        """
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt or ckpt in ("best", "hpc", "registry") or "://" in str(ckpt):
            return  # nothing to check, or Lightning's own aliases and remote paths
        cfg = self.config[sub]
        if ckpt == "last":
            dirpaths = [
                cb.init_args.get("dirpath")
                for cb in (cfg.trainer.callbacks or [])
                if str(getattr(cb, "class_path", "")).endswith("ModelCheckpoint")
            ]
            folder = Path(
                next((d for d in dirpaths if d), checkpoint_dir(cfg.trainer.default_root_dir or "."))
            )
            ckpt = str(folder / "last.ckpt")
            if not Path(ckpt).is_file():
                raise FileNotFoundError(
                    f"--ckpt_path last: no {ckpt} (this run's folder has never saved a "
                    "checkpoint); leave --ckpt_path out to start from scratch"
                )
        checkpoint = read_checkpoint(ckpt)  # safe, as Lightning reads it
        saved = dict(checkpoint.get("hyper_parameters", {}))
        saved["task"] = str(saved.get("_class_path", "")).rsplit(".", 1)[-1] or None
        current = {**dict(cfg.model.init_args or {}), "task": str(cfg.model.class_path).rsplit(".", 1)[-1]}
        for key in ("task", "arch", "depth", "model", "norm"):  # (classes and channels come from the data)
            if saved.get(key) is not None and current.get(key) is not None and saved[key] != current[key]:
                raise ValueError(
                    f"{ckpt} was trained with {key}={saved[key]!r}, the config has {key}="
                    f"{current[key]!r}: pass the matching config or another checkpoint"
                )
        cfg.ckpt_path = ckpt
        self._checkpoint = checkpoint

    def after_fit(self) -> None:
        if self.trainer.interrupted:
            return
        try:
            self._test_and_export()
        except BaseException as e:
            # NOTE: the summary said `fitted`; a sweep would re-run a `fitted` run forever
            path = Path(self.trainer.default_root_dir) / SUMMARY_FILE
            if self.trainer.is_global_zero and path.is_file():
                update_summary(path, status="failed", error=f"after fit: {type(e).__name__}: {e}"[:2000])
            raise

    def _test_and_export(self) -> None:
        if not self.config[self.subcommand].get("export", True):
            complete_summary(self.trainer)  # the run is complete without its test
            return
        trainer, model, dm = self.trainer, self.model, self.datamodule
        # NOTE: every rank runs this (trainer.test is collective under DDP); only rank 0 writes.
        results = {"model": trainer.test(model, datamodule=dm, verbose=False)}
        switch = list(ssn.switch_norms(model))
        if not (isinstance(model, NormTask) and model.exportable):
            pass  # tested only: the native export is written for tasks whose `net` takes one tensor
        elif switch and not all(all(m.latched) for _, m in switch):
            say(
                "\nnot every SN/SSN layer has latched: no native export "
                "(train longer, or let the radius ramp reach its end)"
            )
        else:
            path = Path(trainer.default_root_dir) / "exported" / "model.pt2"
            if trainer.is_global_zero:
                dm.setup("test")
                example = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)[0][:2]
                export_model(model, path, example)
                say(f"\nexported native model: {path}")
            trainer.strategy.barrier()
            exported = copy.deepcopy(model)
            exported.net = ExportedProgram(torch.export.load(path).module())
            results["exported"] = trainer.test(exported, datamodule=dm, verbose=False)
        for name, res in results.items():
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(res[0].items()) if "acc" in k or "IoU" in k)
            say(f"test ({name}): {metrics}")
        complete_summary(trainer, results)  # summary.json: test metrics, status complete


def main(args: list[str] | None = None) -> SSNCLI:
    """Entry point of ``ssn-bench``; ``args`` replaces ``sys.argv[1:]`` (for tests)."""
    # NOTE: a wandb run left active by an earlier main() in this process (a script or test calling
    # it twice) would silently receive this run's logs; finish it first. The returned trainer's
    # own run stays open, so the caller can still test or log with it.
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
    return SSNCLI(
        NormTask,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def run(args: Sequence[str]) -> dict[str, Any]:
    """Run ``ssn-bench fit ...`` in this process and return the run's summary: the one way scripts
    run the CLI from Python, ``run(["fit", "--config", ..., "--trainer.default_root_dir=OUT"])``.

    Returns:
        ``<default_root_dir>/summary.json`` (:mod:`tasks.summary`): identity, config, final and best
        metrics (``test/...`` after the test that follows ``fit`` unless ``--export=false``),
        throughput, the per-layer selection.

    Raises:
        FileNotFoundError: the run wrote no summary (``validate``/``test`` do not write one).
    """
    cli = main(list(args))
    path = Path(cli.trainer.default_root_dir) / SUMMARY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"ssn-bench {' '.join(args[:1])} wrote no {path} (only fit writes a summary)")
    return read_summary(path)


def command(argv: Sequence[str]) -> int:
    """``ssn-bench sweep ...`` (:mod:`tasks.sweep`) / ``ssn-bench compare ...`` (:mod:`tasks.report`);
    ``argv[0]`` is the subcommand. Returns the exit status."""
    if not argv or argv[0] not in ("sweep", "compare"):
        raise ValueError("expected `sweep` or `compare`")
    if argv[0] == "sweep":
        from .sweep import sweep_main

        return sweep_main(argv[1:])
    from .report import compare_main

    return compare_main(argv[1:])


def console() -> None:
    """The ``ssn-bench`` console script (returns nothing, so the exit status is 0 on success);
    ``ssn-bench sweep|compare ...`` go to :func:`command`."""
    if sys.argv[1:2] in (["sweep"], ["compare"]):
        raise SystemExit(command(sys.argv[1:]))
    main()


if __name__ == "__main__":
    console()
