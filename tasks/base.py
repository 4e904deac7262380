"""``NormTask``, the base of every task module: the normalizer choice, the training step's
guards (non-finite losses and updates), per-device statistics, skipped data and the run's identity.

Around it, one concern per module: the optimisation recipe in :mod:`tasks.recipe`, pretrained
loading and freezing in :mod:`tasks.pretrained`, the callbacks it adds in :mod:`tasks.callbacks`.
"""

from __future__ import annotations

import logging
import os
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

import ssn
from ssn import SYNC_NAMES, SparseSwitchNormBase
from ssn.checks import check_range
from ssn.transfer import TransferReport

from .pretrained import Pretrained, freeze_backbone, split_backbone_groups
from .recipe import (
    Recipe,
    check_training_batches,
    global_batch_size,
    lr_factor,
    ratio_parameters,
    steps_per_epoch,
)

__all__ = ["NormTask", "lr_factor"]  # lr_factor: tasks.recipe's, re-exported (tests import it from here)

log = logging.getLogger(__name__)


def _to_channels_last(net: nn.Module) -> None:
    """Weights of ``net`` and every 4-D/5-D input it gets in the channels-last memory format.

    NOTE: the format follows each weight's rank (a 3-D network's convolutions are 5-D), and a
    forward pre-hook converts the input, so the tasks' data pipelines stay as they are.
    """
    net._apply(
        lambda t: t.contiguous(memory_format=_CHANNELS_LAST[t.dim()]) if t.dim() in _CHANNELS_LAST else t
    )

    def to_format(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0] if args else None
        if isinstance(x, Tensor) and x.dim() in _CHANNELS_LAST:
            return (x.contiguous(memory_format=_CHANNELS_LAST[x.dim()]), *args[1:])
        return args

    net.register_forward_pre_hook(to_format)


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


# The accepted range of each numeric NormTask option (ssn.checks.check_range; None passes).
_RANGES = {
    "lr": "(0, inf)",
    "lr_batch_size": "[1, inf)",
    "momentum": "[0, 1)",
    "weight_decay": "[0, inf)",
    "ratio_lr_scale": "[0, inf)",
    "ratio_weight_decay": "[0, inf)",
    "ratio_grad_clip": "(0, inf)",
    "norm_weight_decay": "[0, inf)",
    "warmup_epochs": "[0, inf)",
    "gamma": "(0, 1]",
    "poly_power": "(0, inf)",
    "min_lr": "[0, inf)",
    "radius_ramp_fraction": "(0, 1]",
    "radius_delay_fraction": "[0, 1)",
    "radius_end": "(0, inf)",
    "pretrained_radius_start": "[0, inf)",
    "backbone_lr_scale": "[0, inf)",
}


class NormTask(pl.LightningModule):
    """Base of the task modules.

    Args:
        norm: normalizer name for every norm layer of the network (``bn``, ``syncbn``, ``gn``,
            ``in``, ``ln``, ``sn``, ``ssn``, ``syncsn``, ``syncssn``; see ``ssn.create_norm``). The
            name alone decides synchronisation: ``bn``/``sn``/``ssn`` use each device's own batch
            statistics (the paper's per-GPU batch sizes), the ``sync*`` names all-reduce them.
            Per-device layers average their running statistics over the processes before each
            validation and each checkpoint, so every rank evaluates and saves the same model.
        norm_kwargs: extra arguments of the norm layers (e.g. ``{"groups": 32}`` for ``gn``).
            ``{"virtual_devices": G}`` splits each device's batch into G groups with their own BN
            statistics, as G devices with per-device layers (``ssn.virtual``: the paper's "8 GPUs x
            2 images" on one process); ``gn``/``in``/``ln`` ignore it, the ``sync*`` names refuse it.
        lr: learning rate for a global batch of ``lr_batch_size``; scaled linearly with the real
            global batch (per-device batch x devices x nodes x gradient accumulation).
        lr_batch_size: the reference batch of ``lr`` (the paper: 0.1 for 256).
        momentum, nesterov, weight_decay: SGD.
        ratio_lr_scale, ratio_weight_decay: SN/SSN ratio logits train at ``lr * ratio_lr_scale``
            with their own decay (the SSN authors: lr/10, none).
        ratio_grad_clip: clip the gradient norm of all ratio logits together to this value every
            step (the SSN authors: 1.0); None: no clipping.
        norm_weight_decay: weight decay of the norm affine parameters (None: ``weight_decay``).
        schedule: ``cosine``, ``step`` (x ``gamma`` at each epoch of ``milestones``) or ``poly``
            (``poly_power``, down to ``min_lr``), per optimizer step.
        warmup_epochs: linear warm-up length (fractions allowed).
        radius_ramp_fraction, radius_delay_fraction, radius_end: the SSN radius stays at its start
            for the delay fraction of the optimizer steps, then ramps linearly towards
            ``radius_end`` (default 1.0, the authors': every layer latched by ~82% of the ramp)
            over the ramp fraction (``tasks.callbacks.RadiusSchedule``, added automatically when
            the network has SSN layers).
        monitor_ratios: log per-layer ratios, heatmaps and the final selection
            (``tasks.callbacks.NormRatioMonitor``) when the network has SN/SSN layers.
        pretrained: a checkpoint to initialise the backbone from (``~`` expanded): a Lightning
            checkpoint of any of our tasks, a native export (``*.state_dict.pt``; the ``*.pt2``
            program beside it is for inference and refused with that hint), an authors'
            checkpoint, a torchvision ResNet state_dict (plain, with DDP's ``module.`` prefix, or
            a reference-script ``{"model": ...}`` checkpoint). Norms of another type are converted
            (statistics copied); only the head may be new; a missing backbone key and a NaN/Inf
            tensor are errors naming the key. Read once, when training starts from it: a run
            restoring a checkpoint (resume, validate, test) does not read it again. The run's
            folders must not hold it (``tasks.cli``): a run never writes beside its source.
        pretrained_ratios: ``keep`` (ratios, latches and radius inherited: latched layers run the
            native kernels from the first step, the radius ramp continues from the inherited
            radius), ``reopen`` (ratios inherited as the start, latches cleared, a new ramp from
            ``pretrained_radius_start``; refused for a native export, which holds no ratios),
            ``reset`` (ratios re-initialised).
        pretrained_radius_start: the radius the new ramp starts from in ``reopen`` mode.
        pretrained_trusted: allow a pretrained file that needs unpickling arbitrary objects (off:
            ``torch.load(weights_only=True)``, which cannot execute code).
        pretrained_head: also load the checkpoint's head when it fits (default: a new head, for a
            new label set even of the same size).
        backbone_lr_scale: learning rate of the pretrained backbone relative to the new head.
        freeze: parameter-name prefixes of the backbone to freeze (e.g. ``["conv1", "bn1", "layer1"]``).
            Frozen norms run in eval mode as Lightning's ``BaseFinetuning`` freezes them (running
            statistics kept, no latching) and frozen SSN layers keep their radius.
        compile: compile the network (the backbone for segmentation) with ``torch.compile`` in place
            (``nn.Module.compile``: state_dict keys unchanged). SN/SSN layers trace to one graph;
            the latches are decided between steps, and a new latch recompiles its layer's path.
        channels_last: keep the network's weights and its input in the channels-last memory
            format (``channels_last`` for 2-D networks, ``channels_last_3d`` for 3-D), where the
            CPU's convolutions are faster for the small ResNet (its training step:
            ``benchmarks/bench_e2e.py --models resnet_small --channels-last``). Results are unchanged.
        nonfinite: what a NaN/Inf loss or gradient does: ``stop`` the run (default) or ``skip`` the
            step (no update; counted in ``train/skipped_nonfinite``). Either way the message names
            the step and the first layer where it appeared, and nothing non-finite reaches a
            checkpoint: parameters that become non-finite in an update always stop the run.

    Every numeric option is checked against its range when the task is built (``_RANGES``;
    e.g. ``backbone_lr_scale`` in ``[0, inf)``), and a training split that gives no batch
    (fewer samples than ``batch_size`` with ``drop_last``) is refused before the first step.
    """

    # Whether the CLI exports ``net`` to native layers after fit (a task whose ``net`` maps one
    # input tensor to its output sets it).
    exportable: ClassVar[bool] = False

    def __init__(
        self,
        norm: str = "bn",
        norm_kwargs: dict[str, Any] | None = None,
        lr: float = 0.1,
        lr_batch_size: int = 256,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 1e-4,
        ratio_lr_scale: float = 0.1,
        ratio_weight_decay: float = 0.0,
        ratio_grad_clip: float | None = None,
        norm_weight_decay: float | None = None,
        schedule: Literal["cosine", "step", "poly"] = "cosine",
        warmup_epochs: float = 0.0,
        milestones: list[int] = [30, 60, 90],  # noqa: B006 (jsonargparse needs the literal)
        gamma: float = 0.1,
        poly_power: float = 0.9,
        min_lr: float = 0.0,
        radius_ramp_fraction: float = 1.0,
        radius_delay_fraction: float = 0.0,
        radius_end: float | None = None,
        monitor_ratios: bool = True,
        pretrained: str | None = None,
        pretrained_ratios: Literal["keep", "reopen", "reset"] = "keep",
        pretrained_radius_start: float = 0.0,
        pretrained_trusted: bool = False,
        pretrained_head: bool = False,
        backbone_lr_scale: float = 1.0,
        freeze: list[str] = [],  # noqa: B006
        compile: bool = False,
        channels_last: bool = False,
        nonfinite: Literal["stop", "skip"] = "stop",
    ) -> None:
        super().__init__()
        # NOTE: collects the subclass's arguments too (Lightning walks the __init__ frames).
        self.save_hyperparameters()
        # an unknown name, a bad virtual_devices (or one with a sync* name) fail now
        ssn.get_norm_layer(norm, **{k: v for k, v in (norm_kwargs or {}).items() if k == "virtual_devices"})
        Pretrained.from_hparams(
            self.hparams
        )  # checks the ratio mode now; the file is read in configure_model
        for name, interval in _RANGES.items():
            check_range(name, self.hparams[name], interval)
        for m in milestones:
            check_range("milestones (each)", m, "[0, inf)")
        if radius_delay_fraction + radius_ramp_fraction > 1:
            raise ValueError(
                f"radius_delay_fraction + radius_ramp_fraction must be at most 1, got "
                f"{radius_delay_fraction} + {radius_ramp_fraction}"
            )
        self.norm = norm
        self.norm_kwargs = dict(norm_kwargs or {})
        self.initial_radius: float | None = None  # where the radius ramp starts (fine-tuning)
        # configure_model runs once per module; pretrained is read once (not when restoring)
        self._configured = False
        self._pretrained_loaded = False
        # frozen norm layers (kept in eval mode), and the radius each frozen SSN layer keeps
        self._frozen_norms: list[nn.Module] = []
        self._frozen_radius: dict[nn.Module, float] = {}
        self._skipped_nonfinite = 0  # steps skipped under nonfinite: skip
        self._epoch_start_step = -1  # global step at the start of this training epoch

    def norm_layer(self, dim: int = 2):
        return ssn.get_norm_layer(self.norm, dim=dim, **self.norm_kwargs)

    @property
    def virtual_devices(self) -> int:
        """Virtual devices per process (``norm_kwargs``' ``virtual_devices``; 1 without)."""
        return int(self.norm_kwargs.get("virtual_devices", 1))

    @property
    def sync_stats(self) -> bool:
        """Whether batch statistics are all-reduced across processes (decided by the name)."""
        return self.norm.lower() in SYNC_NAMES

    # ------------------------------------------------------------------- pretrained backbone
    def pretrained_module(self) -> nn.Module:
        """The module receiving pretrained backbone weights, in torchvision's ResNet naming."""
        raise NotImplementedError(f"{type(self).__name__} does not support pretrained backbones")

    def map_pretrained(self, state: dict[str, Tensor], target: nn.Module) -> dict[str, Tensor]:
        """Turn a torchvision-layout backbone state_dict into ``target``'s keys and shapes
        (identity here; e.g. 2D -> 3D inflation in the video task)."""
        return state

    def head_prefixes(self) -> tuple[str, ...]:
        """Keys of :meth:`pretrained_module` allowed to stay new (its head)."""
        return ()

    def pretrained_stem(self) -> str:
        """The key of the backbone's first convolution in the pretrained layout (it locates the
        backbone in a checkpoint, and its input channels may be adapted)."""
        return "conv1.weight"

    def load_pretrained(self, path: str) -> TransferReport:
        """Load ``path`` into :meth:`pretrained_module` (see the ``pretrained`` argument and
        :class:`tasks.pretrained.Pretrained`)."""
        source = Pretrained.from_hparams(self.hparams, path)
        report, radius = source.load(
            self.pretrained_module(),
            stem=self.pretrained_stem(),
            head=self.head_prefixes(),
            map_state=self.map_pretrained,
            owner=type(self).__name__,
        )
        if source.ratios != "reset":
            self.initial_radius = radius
        return report

    def restoring_checkpoint(self) -> None:
        """Called before a run that restores a whole checkpoint (resume, validate, test): the
        checkpoint holds the fine-tuned weights, so ``pretrained`` is not read (it may have moved)."""
        self._pretrained_loaded = True

    def configure_model(self) -> None:
        # NOTE: once per module, before the optimizer is built (Lightning calls it at every fit,
        # validate and test; a copy, e.g. the CLI's exported model, is configured already). A
        # resumed run's checkpoint is restored after this and wins (it is the fine-tuned state).
        if self._configured:
            return
        if self.hparams.pretrained and not self._pretrained_loaded:
            self.load_pretrained(self.hparams.pretrained)
            self._pretrained_loaded = True
        self._frozen_norms = freeze_backbone(self.pretrained_module(), self.hparams.freeze)
        if self.hparams.channels_last:
            _to_channels_last(self.pretrained_module())
        if self.hparams.compile:
            self.pretrained_module().compile()
        self._configured = True

    def train(self, mode: bool = True) -> NormTask:
        super().train(mode)
        for m in self._frozen_norms:  # as Lightning's BaseFinetuning.freeze: statistics kept, no latching
            m.eval()
        return self

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # NOTE: after the callbacks' hook (Lightning calls those first): RadiusSchedule has ramped
        # every SSN layer; a frozen one goes back to its radius at the start of training
        for m, radius in self._frozen_radius.items():
            m.radius.fill_(radius)

    # ------------------------------------------------------------------------- optimisation
    def global_batch_size(self) -> int:
        return global_batch_size(self.trainer)

    def effective_lr(self) -> float:
        return Recipe.from_hparams(self.hparams).scaled_lr(self.global_batch_size())

    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.trainer)

    def _param_groups(self, lr: float) -> list[dict[str, Any]]:
        """The recipe's groups; a pretrained backbone's parts at ``backbone_lr_scale``."""
        hp = self.hparams
        groups = Recipe.from_hparams(hp).param_groups(self, lr)
        if hp.backbone_lr_scale == 1.0 or not hp.pretrained:
            return groups
        return split_backbone_groups(
            groups, self.pretrained_module(), head=self.head_prefixes(), scale=hp.backbone_lr_scale
        )

    def configure_optimizers(self) -> dict[str, Any]:
        recipe = Recipe.from_hparams(self.hparams)
        lr = self.effective_lr()
        opt = recipe.optimizer(self._param_groups(lr), lr)
        total = int(self.trainer.estimated_stepping_batches)
        check_training_batches(self.trainer)
        per_epoch = self.steps_per_epoch() if recipe.needs_epochs else 1
        sched = recipe.scheduler(opt, total_steps=total, steps_per_epoch=per_epoch)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def ratio_parameters(self) -> list[nn.Parameter]:
        return ratio_parameters(self)

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        # NOTE: the non-finite guard: the closure (forward + backward) runs first, so a bad loss or
        # gradient can stop the run or skip the update before the optimizer touches any weight.
        skip = self.hparams.nonfinite == "skip"
        # the forward updates running statistics before the loss is known: a skipped step puts
        # them back (per-channel vectors: a cheap copy)
        buffers = [(b, b.clone()) for b in self.buffers()] if skip else []
        loss = optimizer_closure()
        where = self._nonfinite(loss, grads=True)
        if where is not None:
            message = f"step {self.global_step} (epoch {epoch}, batch {batch_idx}): non-finite {where}"
            if not skip:
                raise FloatingPointError(
                    f"{message}; stopping before anything non-finite is saved "
                    "(nonfinite: skip skips such steps instead)"
                )
            log.warning("%s; step skipped (no update)", message)
            optimizer.zero_grad()
            for buffer, before in buffers:
                buffer.copy_(before)
            self._skipped_nonfinite += 1
            self.log("train/skipped_nonfinite", float(self._skipped_nonfinite), on_step=True, on_epoch=False)
            return
        optimizer.step(closure=lambda: loss)
        where = self._nonfinite(None, grads=False)
        if where is not None:
            raise FloatingPointError(
                f"step {self.global_step} (epoch {epoch}, batch {batch_idx}): the update "
                f"made {where} non-finite (learning rate {optimizer.param_groups[0]['lr']}); "
                "stopping before it is saved"
            )

    def _nonfinite(self, loss: Tensor | None, grads: bool) -> str | None:
        """Where the first non-finite value is (``loss``, or a parameter/gradient by module name),
        or None. One reduction over all tensors; the names are looked up only on a failure."""
        tensors = [
            p.grad if grads else p for p in self.parameters() if (p.grad is not None if grads else True)
        ]
        checks = [torch.stack(torch._foreach_norm(tensors)).sum()] if tensors else []
        if loss is not None:
            checks.append(loss.detach().float().reshape(()))
        if not checks or bool(torch.isfinite(torch.stack(checks)).all()):
            return None
        if loss is not None and not torch.isfinite(loss).all():
            return f"loss ({loss.item()})"
        for name, p in self.named_parameters():
            t = p.grad if grads else p
            if t is not None and not torch.isfinite(t).all():
                return f"{'gradient of ' if grads else ''}{name} (layer {name.rsplit('.', 1)[0]})"
        return "values"

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # NOTE: after DDP's gradient averaging and AMP's unscaling, as the authors clip after
        # their all-reduce; latched logits have no (or a zero) gradient and add nothing.
        norm = Recipe.from_hparams(self.hparams).clip_ratio_grads(self)
        if norm is not None:
            self.log("ssn/ratio_grad_norm", norm, on_step=True, on_epoch=False)

    def configure_callbacks(self) -> list[pl.Callback]:
        from .callbacks import NormRatioMonitor, RadiusSchedule, RunSummary

        layers = [m for _, m in ssn.switch_norms(self)]
        callbacks: list[pl.Callback] = [RunSummary()]  # <default_root_dir>/summary.json, for compare
        if any(isinstance(m, SparseSwitchNormBase) for m in layers):
            hp = self.hparams
            callbacks.append(
                RadiusSchedule(
                    end=hp.radius_end,
                    ramp_fraction=hp.radius_ramp_fraction,
                    delay_fraction=hp.radius_delay_fraction,
                )
            )
        if layers and self.hparams.monitor_ratios:
            callbacks.append(NormRatioMonitor())
        return callbacks

    # ------------------------------------------------------------- per-device statistics
    def on_validation_epoch_start(self) -> None:
        ssn.average_running_stats(self)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the loggers' run ids, so that a resumed run continues the same dashboard run (tasks.cli)
        checkpoint["logger_versions"] = {
            type(lg).__name__: lg.version for lg in self.loggers if isinstance(lg.version, str)
        }
        # NOTE: every rank gets here (a collective is safe); the state_dict was collected before
        # this hook, so the averaged statistics are written into it as well.
        if ssn.average_running_stats(self):
            sd = checkpoint["state_dict"]
            for k, v in self.state_dict().items():
                if k.endswith(("running_mean", "running_var")) and k in sd:
                    sd[k] = v.detach().clone()

    # ------------------------------------------------------------------------- metrics
    @staticmethod
    def accuracy_metrics(num_classes: int, splits: tuple[str, ...] = ("val", "test")) -> nn.ModuleDict:
        """Top-1 (and top-5 when there are more than 5 classes) accuracy per split."""
        from torchmetrics.classification import MulticlassAccuracy

        ks = sorted({1, min(5, num_classes)})
        return nn.ModuleDict(
            {f"{s}_acc{k}": MulticlassAccuracy(num_classes, top_k=k) for s in splits for k in ks}
        )

    def log_accuracy(self, split: str, scores: Tensor, y: Tensor) -> None:
        """Update and log ``self.metrics`` of ``split`` (``{split}/acc1``, ``{split}/acc5``)."""
        for name, metric in self.metrics.items():
            if name.startswith(split):
                metric(scores, y)
                self.log(
                    f"{split}/{name.split('_')[1]}", metric, prog_bar=name.endswith("acc1"), batch_size=len(y)
                )

    # ------------------------------------------------------------------------- the data
    def skip_batch(self) -> Tensor:
        """The loss of a batch whose samples were all unreadable: a zero connected to every
        trainable parameter, so that under DDP every rank still takes part in the step's
        gradient reduction (returning None there deadlocks the other ranks)."""
        log.warning("step %d: every sample of the batch was unreadable; zero loss", self.global_step)
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.stack([p.sum() for p in params]).sum() * 0.0

    def on_train_start(self) -> None:
        # NOTE: Lightning hands a resumed run's loader states (datamodules.resumable) to the loader
        # only when it builds the loader after restoring the checkpoint; configure_optimizers
        # builds it earlier (estimated_stepping_batches), so they are applied here, before the
        # first batch (a no-op when not resuming). Pinned by tests/test_resume.py.
        self.trainer.fit_loop._load_combined_loader_states()
        # after a resumed run's checkpoint is restored: the radius its frozen SSN layers keep
        self._frozen_radius = {
            m: float(m.radius) for m in self._frozen_norms if isinstance(m, SparseSwitchNormBase)
        }

    def on_train_epoch_start(self) -> None:
        self._epoch_start_step = self.global_step
        set_epoch = getattr(self.trainer.datamodule, "set_epoch", None)
        if callable(set_epoch):  # epoch-dependent augmentation (e.g. the authors' final-epochs crop)
            set_epoch(self.current_epoch, self.trainer.max_epochs)

    def on_train_epoch_end(self) -> None:
        dm = self.trainer.datamodule
        skipped = getattr(dm, "skipped_samples", getattr(dm, "skipped_images", None))
        # an epoch in which no batch could be read (Lightning skips a batch that collates to None)
        # trained nothing: an error, not a "successful" run; decided together, so under DDP every
        # rank stops
        nothing = float(self.global_step == self._epoch_start_step)
        if self.trainer.strategy.reduce(torch.tensor(nothing, device=self.device), reduce_op="sum") > 0:
            raise RuntimeError(
                f"epoch {self.current_epoch}: every training batch was unreadable ({skipped} samples "
                "skipped, each logged with its path): check the training files"
            )
        if skipped is not None:
            self.log("data/skipped_images", float(skipped), sync_dist=True, reduce_fx="sum")

    # ------------------------------------------------------------------------ summaries
    def run_info(self) -> dict[str, Any]:
        """What dashboards and ``ssn-bench compare`` group and compare runs by."""
        dm = self.trainer.datamodule
        batch = getattr(dm, "batch_size", None)
        return {
            "task": type(self).__name__,
            "dataset": type(dm).__name__ if dm is not None else None,
            "arch": getattr(self.hparams, "arch", None),
            "norm": self.norm,
            "sync_stats": self.sync_stats,
            "batch_size": batch,
            # the batch each (virtual) device's BN statistics come from: the paper's per-GPU batch
            "virtual_devices": self.virtual_devices,
            "device_batch_size": batch // self.virtual_devices if isinstance(batch, int) else None,
            "global_batch_size": self.global_batch_size(),
            "effective_lr": self.effective_lr(),
            "seed": int(os.environ["PL_GLOBAL_SEED"]) if "PL_GLOBAL_SEED" in os.environ else None,
            "world_size": self.trainer.world_size,
            "pretrained": self.hparams.pretrained,
            "pretrained_ratios": self.hparams.pretrained_ratios if self.hparams.pretrained else None,
        }

    def on_fit_start(self) -> None:
        summary = self.run_info()
        for logger in self.loggers:
            logger.log_hyperparams(summary)
