"""``ssn-bench``: the LightningCLI of the benchmark.

    ssn-bench fit --config configs/base/trainer.yaml --config configs/fashion_mnist/resnet_small_ssn_fashionmnist-28.yaml
    ssn-bench fit ... --ckpt_path last          # resume exactly where the run stopped
    ssn-bench validate|test ... --ckpt_path PATH

After ``fit`` the trained model is tested, and when every SSN layer has latched it is exported to
native layers (``ssn.export_norm``), saved as a ``torch.export`` program beside the checkpoints,
loaded back and tested again, so the two accuracies can be compared.
"""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI

import ssn
from ssn.io import save_atomic

from .base import NormTask

__all__ = ["SSNCLI", "main", "export_model"]


class ExportedProgram(torch.nn.Module):
    """Runs a saved ``torch.export`` program (on the CPU) inside a LightningModule for testing.

    NOTE: the program's module refuses ``train()``/``eval()``, so it is kept out of the module tree.
    """

    def __init__(self, program_module: torch.nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_program", program_module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._program(x.cpu()).to(x.device)


def export_model(task: NormTask, path: Path, example: torch.Tensor) -> torch.nn.Module:
    """Export ``task.net`` to native layers, save it as a ``torch.export`` program (loadable
    without this package) and its state_dict, and return the program's module."""
    net = ssn.export_norm(copy.deepcopy(task.net).cpu().eval())
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(net, (example.cpu(),), dynamic_shapes=({0: batch},))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.pt2")
    torch.export.save(program, tmp)
    tmp.replace(path)  # atomic: a crash leaves no half-written program
    save_atomic(net.state_dict(), path.with_suffix(".state_dict.pt"))
    return ExportedProgram(torch.export.load(path).module())


class SSNCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_channels", "model.init_args.in_channels", apply_on="instantiate")
        parser.add_argument("--export", type=bool, default=True,
                            help="after fit: test, export latched SSN layers to native ones, test again")

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("export", True) or self.trainer.interrupted:
            return
        trainer, model, dm = self.trainer, self.model, self.datamodule
        results = {"model": trainer.test(model, datamodule=dm, verbose=False)}
        switch = list(ssn.switch_norms(model))
        if switch and not all(all(m.latched) for _, m in switch):
            print("\nnot every SN/SSN layer has latched: no native export (train longer or ramp the radius to its end)")
        elif trainer.is_global_zero:
            dm.setup("test")
            example = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)[0][:2]
            path = Path(trainer.log_dir or trainer.default_root_dir) / "exported" / "model.pt2"
            exported = copy.deepcopy(model)
            exported.net = export_model(model, path, example)
            print(f"\nexported native model: {path}")
            results["exported"] = trainer.test(exported, datamodule=dm, verbose=False)
        for name, res in results.items():
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(res[0].items()) if "acc" in k)
            print(f"test ({name}): {metrics}")


def main(args: list[str] | None = None) -> SSNCLI:
    """Entry point of ``ssn-bench``; ``args`` replaces ``sys.argv[1:]`` (for tests)."""
    return SSNCLI(
        NormTask,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def console() -> None:
    """The ``ssn-bench`` console script (returns nothing, so the exit status is 0 on success)."""
    main()


if __name__ == "__main__":
    console()
