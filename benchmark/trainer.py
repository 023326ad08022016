"""The one training loop: epochs, devices, mixed precision, validation, best-epoch checkpoint,
timing and logging. Methods plug in through :class:`benchmark.method.Stage`."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from benchmark.config import RunConfig
from benchmark.convergence import stage_facts
from benchmark.data.base import MultimodalData, iterate_batches
from benchmark.device import amp_dtype, derive_seed
from benchmark.errors import DivergedError
from benchmark.method import Batch, EvalOutput, Stage, StepContext, make_optimizer
from benchmark.precise_bn import recompute_batchnorm

MAX_LR_DECAYS = 2  # a stage's learning rate falls at most to 1/100 of its start (Stage.lr_decay_after)


@dataclass
class StageResult:
    name: str
    best_epoch: int
    best_val_accuracy: float
    epochs_run: int
    train_seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    budget: int = 0
    patience: int = 0
    stopped_early: bool = False
    still_improving: bool = False


def _scheduler(opt: torch.optim.Optimizer, cfg: RunConfig, epochs: int) -> Any:
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    return None


def _epoch_means(logged: dict[str, tuple[list[torch.Tensor], list[int]]]) -> dict[str, float]:
    """Sample-weighted means of per-step scalars (one read from the device per epoch)."""
    if not logged:
        return {}
    means = []
    for values, sizes in logged.values():
        weights = torch.tensor(sizes, dtype=torch.float32, device=values[0].device)
        means.append((torch.stack(values).float() * weights).sum() / weights.sum())
    return dict(zip(logged, torch.stack(means).tolist()))


class Trainer:
    """Runs stages on one dataset and device; keeps the per-epoch history of every stage."""

    def __init__(
        self,
        cfg: RunConfig,
        data: MultimodalData,
        device: torch.device,
        log: Callable[[str], None] | None = None,
        cache_dir: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.data = data
        self.device = device
        self.log = log or (lambda msg: None)
        self.cache_dir = cache_dir
        self.dtype = amp_dtype(cfg.amp, device)
        use_scaler = self.dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.history: list[dict[str, Any]] = []
        self.stages: dict[str, StageResult] = {}
        self.epoch_seconds: list[float] = []
        self.data_wait_seconds = 0.0
        # Called with each per-epoch history row (e.g. to prune a tuning trial); may raise.
        self.on_epoch_end: Callable[[dict[str, Any]], None] | None = None
        self.stage: Stage | None = None  # the stage being trained (read by per-epoch diagnostics)
        self.patience_from = -1  # early stopping's patience counts from here (see restart_patience)

    # --- helpers a step may call ------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def combined_backward(self, stage: Stage, out: dict[str, torch.Tensor], params: list[nn.Parameter],
                          ctx: StepContext) -> None:
        """The gradient of each of ``stage.losses`` with respect to ``params`` (scaled like
        ``backward`` under mixed precision), combined by ``stage.combine_gradients`` into the
        parameters' ``.grad``."""
        names = stage.losses or []
        missing = [n for n in names if n not in out]
        if missing or not names:
            raise KeyError(f"stage {stage.name}: its step returned no {missing or 'losses'} "
                           f"(it returned {sorted(out)})")
        grads: dict[str, list[torch.Tensor]] = {}
        reached = [False] * len(params)
        for i, name in enumerate(names):
            loss = self.scaler.scale(out[name]) if self.scaler else out[name]
            got = torch.autograd.grad(loss, params, retain_graph=i < len(names) - 1, allow_unused=True)
            reached = [r or g is not None for r, g in zip(reached, got)]
            grads[name] = [torch.zeros_like(p) if g is None else g for g, p in zip(got, params)]
        assert stage.combine_gradients is not None
        for p, g, hit in zip(params, stage.combine_gradients(grads, ctx), reached):
            if hit:  # a parameter no loss reaches keeps no gradient, as after backward()
                p.grad = g

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def to_device(self, batch: Batch) -> Batch:
        if self.device.type == "cpu":
            return batch
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def batches(self, split: str | Dataset, *, shuffle: bool, generator: torch.Generator | None = None,
                batch_size: int | None = None) -> Iterator[Batch]:
        """Mini-batches of a split of the run's data (by name) or of a given dataset."""
        size = batch_size or (self.cfg.batch_size if shuffle else self.cfg.eval_batch_size)
        pin = self.device.type == "cuda"
        data = self.data.splits[split] if isinstance(split, str) else split
        for batch in iterate_batches(data, size, shuffle=shuffle,
                                     generator=generator, num_workers=self.cfg.num_workers,
                                     pin_memory=pin):
            yield self.to_device(batch)

    # --- evaluation ---------------------------------------------------------------------------
    @torch.inference_mode()
    def accuracy(self, predict: Callable[[Batch], torch.Tensor], module: nn.Module, split: str) -> float:
        was_training = module.training
        module.eval()
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        total = 0
        for batch in self.batches(split, shuffle=False):
            with self.autocast():
                logits = predict(batch)
            correct += (logits.argmax(dim=1) == batch["label"]).sum()
            total += len(batch["label"])
        module.train(was_training)
        return correct.item() / max(total, 1)

    @torch.inference_mode()
    def collect(self, forward: Callable[[Batch], EvalOutput], module: nn.Module, split: str
                ) -> tuple[EvalOutput, torch.Tensor]:
        """Concatenated eval outputs (on the CPU, float32) and labels of a whole split."""
        module.eval()
        logits, labels = [], []
        unimodal: dict[str, list[torch.Tensor]] = {}
        feats: dict[str, list[torch.Tensor]] = {}
        has_unimodal = True
        for batch in self.batches(split, shuffle=False):
            with self.autocast():
                out = forward(batch)
            logits.append(out.logits.float().cpu())
            labels.append(batch["label"].cpu())
            if out.unimodal is None:
                has_unimodal = False
            else:
                for m, z in out.unimodal.items():
                    unimodal.setdefault(m, []).append(z.float().cpu())
            for m, f in out.features.items():
                feats.setdefault(m, []).append(f.float().cpu())
        merged = EvalOutput(
            logits=torch.cat(logits),
            unimodal={m: torch.cat(v) for m, v in unimodal.items()} if has_unimodal and unimodal else None,
            features={m: torch.cat(v) for m, v in feats.items()},
        )
        return merged, torch.cat(labels)

    def recalibrate(self, stage: Stage) -> int:
        """Precise BatchNorm statistics of the stage's trained layers (see benchmark.precise_bn),
        from the first ``cfg.precise_bn`` training samples in a fixed order."""
        if not self.cfg.precise_bn:
            return 0

        def forward(batch: Batch) -> None:
            with self.autocast():
                stage.predict(batch)

        return recompute_batchnorm(stage.module, self.batches(self.train_samples(stage), shuffle=False, batch_size=self.cfg.batch_size),
                                   forward, self.cfg.precise_bn)

    def train_samples(self, stage: Stage) -> Dataset:
        """What ``stage`` trains on: its own ``train_split``, else the run's training split."""
        return self.data.splits["train"] if stage.train_split is None else stage.train_split

    def restart_patience(self, epoch: int) -> None:
        """Patience counts from ``epoch`` in the stage being fitted (StepContext.restart_patience)."""
        self.patience_from = epoch

    # --- training -----------------------------------------------------------------------------
    def fit(self, stage: Stage) -> StageResult:
        """Train one stage; afterwards ``stage.module`` holds its best-validation weights."""
        cfg = self.cfg
        self.stage = stage
        stage.module.to(self.device)
        if self.device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in stage.module.modules()):
            stage.module.to(memory_format=torch.channels_last)  # faster convolutions with tensor cores
        params = stage.trainable_parameters()
        optimizers = stage.make_optimizers(params) if stage.make_optimizers else [make_optimizer(params, cfg)]
        epochs = cfg.epochs if stage.epochs is None else stage.epochs
        patience = cfg.patience if stage.patience is None else stage.patience
        schedulers = [s for s in (_scheduler(o, cfg, epochs) for o in optimizers) if s is not None] \
            if stage.scheduler else []
        generator = torch.Generator().manual_seed(derive_seed(cfg.seed, stage.seed_key or stage.name))
        train = self.train_samples(stage)
        num_batches = math.ceil(len(train) / cfg.batch_size)

        best_acc, best_epoch, best_state = -1.0, -1, None
        history: list[dict[str, Any]] = []
        train_seconds = 0.0
        epoch = -1
        stopped = False
        decays, last_decay = 0, -1
        self.patience_from = -1
        for epoch in range(epochs):
            stage.module.train()
            ctx = StepContext(self, stage, epoch, 0, num_batches, optimizers)
            if stage.on_epoch_start:
                stage.on_epoch_start(ctx)
            logged: dict[str, tuple[list[torch.Tensor], list[int]]] = {}
            start = time.perf_counter()
            waited = 0.0
            batches = self.batches(train, shuffle=True, generator=generator)
            step = 0
            while True:
                t0 = time.perf_counter()
                batch = next(batches, None)
                waited += time.perf_counter() - t0
                if batch is None:
                    break
                if len(batch["label"]) < 2:  # BatchNorm cannot train on a batch of one sample
                    continue
                ctx.step = step
                if stage.manual:
                    out = stage.step(batch, ctx)
                else:
                    with self.autocast():
                        out = stage.step(batch, ctx)
                    for opt in optimizers:
                        opt.zero_grad(set_to_none=True)
                    if stage.combine_gradients:
                        self.combined_backward(stage, out, params, ctx)
                    else:
                        self.backward(out["loss"])
                    if self.scaler:
                        for opt in optimizers:
                            self.scaler.unscale_(opt)
                    if stage.after_backward:
                        stage.after_backward(ctx, out)
                    for opt in optimizers:
                        self.optimizer_step(opt)
                n = len(batch["label"])
                for key, value in out.items():  # kept on the device; averaged once per epoch
                    if key.startswith("_"):  # handed to after_backward, not logged
                        continue
                    values, sizes = logged.setdefault(key, ([], []))
                    values.append(value.detach())
                    sizes.append(n)
                step += 1
            epoch_time = time.perf_counter() - start
            train_seconds += epoch_time
            self.epoch_seconds.append(epoch_time)
            self.data_wait_seconds += waited
            means = _epoch_means(logged)
            if step == 0:  # every batch skipped: nothing was trained, there is no finite loss
                raise DivergedError(f"stage {stage.name}: no batch of two or more samples at epoch {epoch}; "
                                    "raise batch_size or the number of training samples")
            bad = [k for k, v in means.items() if not math.isfinite(v)]
            if bad:
                raise DivergedError(
                    f"stage {stage.name}: non-finite {', '.join(bad)} at epoch {epoch}; "
                    "lower the learning rate (--set lr=...)"
                )
            self.recalibrate(stage)
            val_acc = self.accuracy(stage.predict, stage.module, "val")
            row = {"stage": stage.name, "epoch": epoch, **{f"train_{k}": v for k, v in means.items()},
                   "val_accuracy": val_acc, "lr": optimizers[0].param_groups[0]["lr"],
                   "epoch_seconds": epoch_time, "data_wait_seconds": waited}
            if stage.epoch_log:
                row.update(stage.epoch_log())
            history.append(row)
            self.history.append(row)
            if self.on_epoch_end:
                self.on_epoch_end(row)
            # epochs are numbered from 0, on screen as in the record (history, best_epoch); "k of n" counts them
            self.log(f"[{stage.name}] epoch {epoch} ({epoch + 1} of {epochs})  loss "
                     f"{means.get('loss', float('nan')):.4f}  val acc {val_acc:.4f}  {epoch_time:.1f}s")
            if val_acc > best_acc:
                best_acc, best_epoch = val_acc, epoch
                best_state = {k: v.detach().clone() for k, v in stage.module.state_dict().items()}
            for sched in schedulers:
                sched.step()
            if (stage.lr_decay_after and decays < MAX_LR_DECAYS
                    and epoch - max(best_epoch, last_decay) >= stage.lr_decay_after):
                decays, last_decay = decays + 1, epoch
                for opt in optimizers:
                    for group in opt.param_groups:
                        group["lr"] *= 0.1
                self.log(f"[{stage.name}] learning rate x0.1: no better validation accuracy for "
                         f"{stage.lr_decay_after} epochs")
            if patience and epoch - max(best_epoch, self.patience_from) >= patience:
                self.log(f"[{stage.name}] early stop: no better validation accuracy for {patience} epochs")
                stopped = True
                break
        if best_state is not None:
            stage.module.load_state_dict(best_state)
            self.log(f"[{stage.name}] best epoch {best_epoch} (val acc {best_acc:.4f}): its weights restored")
        facts = stage_facts([row["val_accuracy"] for row in history], epochs, patience, stopped)
        result = StageResult(stage.name, best_epoch, best_acc, epoch + 1, train_seconds, history,
                             budget=epochs, patience=patience, stopped_early=stopped,
                             still_improving=facts["still_improving"])
        self.stages[stage.name] = result
        return result
