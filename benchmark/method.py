"""The Method interface: what a method supplies to the one training loop.

A method owns its modules and says how to train them through :class:`Stage` objects: the
module trained, the per-batch step, the prediction used for validation, and optional hooks
(after backward: OGM-GE; at each epoch start: UDI's controller; a manual step: MLA). Single-
stage methods implement :meth:`Method.training_step` and inherit :meth:`Method.run`; multi-phase
methods (ensemble, UDI) override :meth:`Method.run` and call ``trainer.fit`` once per phase.

Methods never read files or write results; the trainer and the runner do.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from benchmark.config import RunConfig, apply_overrides
from benchmark.data.base import DataInfo
from benchmark.device import seeded
from benchmark.errors import UsageError
from benchmark.models import create_encoder, create_fusion
from benchmark.registry import METHODS

Batch = dict[str, torch.Tensor]


class Loop(Protocol):
    """What a method uses of the training loop (``benchmark.trainer.Trainer``; named here by what
    it does, so that this module does not import the loop that imports it)."""

    def fit(self, stage: Stage) -> Any: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None: ...

    def autocast(self) -> contextlib.AbstractContextManager[Any]: ...

    def restart_patience(self, epoch: int) -> None: ...


@dataclass
class NoOptions:
    pass


@dataclass
class StepContext:
    """What a step may need from the loop: where it is, and the loop's backward/step helpers."""

    trainer: Loop
    stage: Stage
    epoch: int
    step: int  # index of the batch within the epoch
    num_batches: int
    optimizers: list[torch.optim.Optimizer]

    def backward(self, loss: torch.Tensor) -> None:
        self.trainer.backward(loss)

    def restart_patience(self) -> None:
        """Early stopping counts its patience from this epoch: for a method that deliberately
        perturbs the model (D&R's re-initialisation), which would otherwise be stopped before
        it could recover. The best epoch is still chosen over every epoch of the stage."""
        self.trainer.restart_patience(self.epoch)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.trainer.optimizer_step(optimizer)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The run's mixed precision (a no-op in float32) for a manual step's forward passes."""
        return self.trainer.autocast()


@dataclass
class EvalOutput:
    """One evaluation forward pass: fused logits, unimodal logits (if any), pooled features."""

    logits: torch.Tensor
    unimodal: dict[str, torch.Tensor] | None
    features: dict[str, torch.Tensor]


@dataclass
class Stage:
    """One training phase run by ``Trainer.fit``.

    ``step(batch, ctx)`` returns a dict of scalar tensors; unless ``manual`` is set the loop
    backpropagates ``"loss"`` and steps the optimizers. With ``combine_gradients`` the loop
    instead takes the gradient of each loss named in ``losses`` (outputs of the step) with respect
    to the trainable parameters, one by one, and the parameters receive what
    ``combine_gradients(grads, ctx)`` makes of them (``grads[name][i]``: loss ``name``'s gradient
    of parameter ``i``, zeros where it does not reach), before ``after_backward`` and the step. ``predict(batch)`` gives the logits whose
    validation accuracy selects the best epoch. ``seed_key`` names the data-order stream, so two
    stages with the same key see the batches in the same order.
    """

    name: str
    module: nn.Module
    step: Callable[[Batch, StepContext], dict[str, torch.Tensor]]
    predict: Callable[[Batch], torch.Tensor]
    seed_key: str = ""
    params: list[nn.Parameter] | None = None
    make_optimizers: Callable[[list[nn.Parameter]], list[torch.optim.Optimizer]] | None = None
    manual: bool = False
    # called between backward and the optimizer step with the step's outputs; outputs whose name
    # starts with "_" (a step's readouts, say) are for it alone and are not logged
    after_backward: Callable[[StepContext, dict[str, torch.Tensor]], None] | None = None
    on_epoch_start: Callable[[StepContext], None] | None = None
    epoch_log: Callable[[], dict[str, Any]] | None = None
    # per-loss gradients (methods that combine them: MMPareto, AGM, UDI's controller)
    losses: list[str] | None = None
    combine_gradients: Callable[[dict[str, list[torch.Tensor]], StepContext], list[torch.Tensor]] | None = None
    epochs: int | None = None
    patience: int | None = None
    # Multiply the learning rate by 0.1 after this many epochs without a better validation accuracy
    # (at most twice; 0 = never): with early stopping, training to convergence.
    lr_decay_after: int = 0
    modalities: list[str] = field(default_factory=list)
    # the samples the stage trains on (batches and precise BatchNorm statistics) when not the run's
    # training split: G-Blending trains on train minus the hold-out it carves out
    train_split: Any = None
    # False: the run's learning-rate scheduler (cfg.scheduler) does not apply, the method schedules
    # its learning rates itself (ReconBoost's one-epoch fits under its stage-wise decay)
    scheduler: bool = True

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = self.params if self.params is not None else list(self.module.parameters())
        return [p for p in params if p.requires_grad]


def fused_on_cpu(params: list[nn.Parameter]) -> dict[str, bool]:
    """``{"fused": True}`` when every parameter is a float32/float64 tensor on the CPU, else ``{}``.

    PyTorch's default optimiser step on the CPU loops over the parameters in Python, several small
    operations each; the fused step is one kernel per parameter (at the size of UDI's CLUB
    estimators, an Adam step took 0.59 ms so and 0.12 ms fused, an SGD step 0.19 and 0.05). The update is the
    same formula, rounded differently in the last bits (a test bounds the difference to the
    library's default step). On accelerators the library's default (foreach) is kept."""
    ok = bool(params) and all(p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64) for p in params)
    return {"fused": True} if ok else {}


def zero_momentum(sgd: torch.optim.SGD) -> None:
    """Give every parameter a zero momentum buffer before the first step. The fused step refuses a
    step in which some parameters have a buffer and others none yet (MLA steps one encoder at a time,
    MMPareto and others leave parts without gradient); without dampening, a zero buffer's first
    update, 0·μ + g, is g to the bit, which is the buffer the library starts from."""
    for group in sgd.param_groups:
        if group.get("dampening", 0) or group.get("nesterov"):
            continue
        for p in group["params"]:
            sgd.state[p].setdefault("momentum_buffer", torch.zeros_like(p, memory_format=torch.preserve_format))


def make_optimizer(params: list[nn.Parameter], cfg: RunConfig) -> torch.optim.Optimizer:
    fused = fused_on_cpu(params)
    if cfg.optimizer == "sgd":
        sgd = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **fused)
        if fused and cfg.momentum:
            zero_momentum(sgd)
        return sgd
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)


def shared_search_space(trial: Any) -> dict[str, Any]:
    """The optimiser settings every method's tuning searches (Optuna trial → ``--set`` assignments)."""
    return {"lr": trial.suggest_float("lr", 1e-4, 1e-1, log=True),
            "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True)}


class Method:
    """Base class of every training method. Subclasses are registered with
    ``@register_method(name)`` and set ``Options`` to a dataclass of their own options.

    Every hook is declared here with its default, and the loop (``Trainer.fit``) fires them the
    same way for every method:

    - facts: ``summary``, ``Options``, ``min_modalities``/``max_modalities``, ``recommended`` (the
      paper's shared settings), ``search_space`` (what ``tune`` searches), ``run_first`` (trains
      the shared unimodal checkpoints), ``shares_streams_with`` (whose initialisation and data
      order it shares; :meth:`stream` names the seed streams);
    - building: :meth:`check` (dataset-dependent option checks), :meth:`build` (the model);
    - training: :meth:`run` (the phases; by default one :meth:`stage`), :meth:`training_step` (one
      loss, or named losses whose sum is ``loss``; a manual stage steps its optimisers itself
      through ``StepContext``), :meth:`after_backward` (between backward and the optimiser step,
      with the step's outputs), :meth:`on_epoch_start`, :meth:`epoch_log` (extra numbers for the
      epoch's history row), :meth:`record_facts` (facts for the result record);
    - evaluation: :meth:`predict`, :meth:`eval_forward`;
    - diagnostics: ``absent_rule``, :meth:`predict_subset`, :meth:`head_logits`,
      :meth:`fuse_heads`, :meth:`modalities_read`, :meth:`frozen_checkpoint`,
      :meth:`training_readouts`;
    - checkpoints: :meth:`checkpoint_state`, :meth:`load_checkpoint_state`.
    """

    Options: ClassVar[type] = NoOptions
    min_modalities: ClassVar[int] = 1
    max_modalities: ClassVar[int | None] = None
    summary: ClassVar[str] = ""
    # Shared settings the method's paper uses (a sweep applies them with use_recommended = true).
    recommended: ClassVar[dict[str, Any]] = {}
    # It trains the unimodal checkpoints other methods reuse (benchmark.unimodal): a sweep runs it
    # before every other method.
    run_first: ClassVar[bool] = False
    # Whose initialisation and data order it shares: its model is built, and its batches drawn,
    # from the named streams of that method (e.g. "joint": the same encoders and batches as joint
    # for a seed); None: its own.
    shares_streams_with: ClassVar[str | None] = None
    # Options that only choose, during the run, between computations the grid may hold anyway (UDI's
    # ``method.anchor``: auto resolves to one of the modalities): two planned runs that differ in
    # these alone may be the same computation; :meth:`same_run_facts` says when.
    resolved_options: ClassVar[tuple[str, ...]] = ()
    # --- report and perf facts (read by benchmark.report and benchmark.perf, which name no method)
    # These are the class's own: a subclass does not inherit them (OGM-GE is no reference because
    # it extends joint); read them with :meth:`fact`.
    # Position in the tables (methods with equal order come by name).
    table_order: ClassVar[int] = 100
    # The reference every other method is compared with (report: paired gaps; perf: step-time
    # ratios and the hand-written floor loop over its model). Exactly one registered method sets it.
    reference: ClassVar[bool] = False
    # Its runs train one modality alone (option ``method.modality``): the report shows its rows per
    # modality and measures every encoder's shortfall against them; perf times it as the unimodal
    # step other methods compare with.
    single_modality: ClassVar[bool] = False
    # Bound of its training-step time as a ratio to the reference method's (``nox -s perf``), or None.
    perf_bound: ClassVar[float | None] = None
    # Bound of its last stage's step time as a ratio to a single-modality model of the same
    # modality (a method that trains one modality at a time), or None.
    perf_bound_vs_single: ClassVar[float | None] = None
    # A module of its own report sections, importable without torch (the report runs without it),
    # or None; see benchmark.report for the functions it may define.
    report_module: ClassVar[str | None] = None
    # Published accuracies (%) to print beside ours: dataset → source → (mean, std or None).
    published: ClassVar[dict[str, dict[str, tuple[float, float | None]]]] = {}

    @classmethod
    def fact(cls, name: str) -> Any:
        """The class's own value of the fact ``name`` (see above), else the base class's default."""
        return cls.__dict__[name] if name in cls.__dict__ else getattr(Method, name)

    @classmethod
    def perf_variants(cls, modalities: list[str]) -> list[tuple[str, dict[str, Any]]]:
        """The configurations ``nox -s perf`` times, as (label, ``--set`` options), on data with
        these modalities (override beside the method, e.g. one per controller mode)."""
        return [(cls.registered_name, {})]  # type: ignore[attr-defined]

    @staticmethod
    def search_space(trial: Any) -> dict[str, Any]:
        """What ``tune`` searches for this method: the shared optimiser settings plus the options its
        paper tunes (override beside the method)."""
        return shared_search_space(trial)

    def check(self) -> None:
        """Refuse (UsageError) or complete option values that depend on the dataset, before any
        training (e.g. a modality name); called once the method is created."""

    def __init__(self, info: DataInfo, cfg: RunConfig, options: Any) -> None:
        self.info = info
        self.cfg = cfg
        self.options = options
        self.modalities = info.modality_names
        self.device = torch.device("cpu")
        self.model: nn.Module = nn.Module()

    # --- building blocks -------------------------------------------------------------------
    def encoder_name(self, modality: str) -> str:
        return self.cfg.encoder.get(modality) or self.info.modality(modality).encoder

    def make_encoder(self, modality: str) -> nn.Module:
        return create_encoder(self.encoder_name(modality), self.info.modality(modality),
                              self.cfg.encoder_weights.get(modality, ""))

    def make_encoders(self, modalities: list[str] | None = None) -> nn.ModuleDict:
        return nn.ModuleDict({m: self.make_encoder(m) for m in modalities or self.modalities})

    def require_equal_feature_sizes(self, reason: str, fix: str) -> None:
        """Refuse encoders whose feature sizes differ (methods that compare or share features)."""
        with seeded(self.cfg.seed, f"method/{self.name}/check"):  # leaves the global RNG untouched
            dims = {m: self.make_encoder(m).out_dim for m in self.modalities}
        if len(set(dims.values())) > 1:
            shown = ", ".join(f"{m}: {d}" for m, d in dims.items())
            raise UsageError(f"{self.name} {reason}, so every encoder needs the same feature size "
                             f"(got {shown}); {fix}")

    def make_fusion(self, encoders: nn.ModuleDict) -> nn.Module:
        dims = {m: enc.out_dim for m, enc in encoders.items()}
        return create_fusion(self.cfg.fusion, dims, self.info.num_classes)

    def encode(self, batch: Batch, encoders: nn.ModuleDict | None = None) -> dict[str, torch.Tensor]:
        encoders = encoders if encoders is not None else self.model.encoders
        return {m: enc(batch[m]) for m, enc in encoders.items()}

    # --- the interface ---------------------------------------------------------------------
    def build(self) -> nn.Module:
        """Create the modules (called under the run's seed); returns the model to be evaluated."""
        raise NotImplementedError

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict(self, batch: Batch) -> torch.Tensor:
        return self.eval_forward(batch).logits

    def eval_forward(self, batch: Batch) -> EvalOutput:
        raise NotImplementedError

    # --- imbalance diagnostics (benchmark.diagnostics) -----------------------------------------
    # How a modality is made absent: "input" (its encoder sees a fill value: zeros or the
    # training mean) or "head" (a late fusion of unimodal heads, which overrides head_logits and
    # fuse_heads, leaves that head out).
    absent_rule: ClassVar[str] = "input"

    def predict_subset(self, batch: Batch, present: Collection[str], fill: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits with only the modalities in ``present``: every other modality's input is
        replaced by ``fill[m]`` (one sample, broadcast over the batch), or, for a late fusion of
        unimodal heads, its head is left out."""
        if self.absent_rule == "head":
            return self.fuse_heads({m: self.head_logits(batch, m) for m in self.modalities if m in present})
        masked = {k: (fill[k].expand_as(v) if k in fill and k not in present else v) for k, v in batch.items()}
        return self.predict(masked)

    def head_logits(self, batch: Batch, modality: str) -> torch.Tensor:
        """A late fusion's unimodal head: the logits of ``modality`` alone."""
        raise NotImplementedError

    def modalities_read(self) -> list[str]:
        """The modalities the prediction depends on (a unimodal model reads one): noise on any
        other leaves the prediction as it is, so the diagnostics do not evaluate it again."""
        return list(self.modalities)

    def frozen_checkpoint(self, modality: str) -> str | None:
        """The cached unimodal checkpoint (benchmark.unimodal) whose model, unchanged, gives this
        method's logits of ``modality`` alone (:meth:`head_logits`), if there is one: the
        diagnostics then share that model's noisy-input logits with every run that loads it."""
        return None

    def fuse_heads(self, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        """A late fusion's test-time rule over the heads given (in modality order); over every
        head it gives :meth:`predict`'s logits."""
        raise NotImplementedError

    def training_readouts(self, stage: Stage, batch: Batch) -> dict[str, torch.Tensor] | None:
        """Per-modality logits of the model ``stage`` is training (the ρ trace), or None. By
        default the unimodal readouts of :meth:`eval_forward` while the stage trains the whole model."""
        if stage.module is not self.model:
            return None
        return self.eval_forward(batch).unimodal

    @classmethod
    def same_run_facts(cls, record: dict[str, Any], assignments: dict[str, Any]) -> dict[str, Any] | None:
        """Given the ok ``record`` of a finished run of this method and the resolved ``assignments``
        of another planned run that differs from it only in :attr:`resolved_options`: the
        ``method_record`` entries that run would record differently if it is the same computation
        (its weights, metrics and history would be those of ``record`` to the bit), else None."""
        return None

    def stream(self, purpose: str = "") -> str:
        """The name of the seed stream this method draws ``purpose`` from: ``method/<name>`` for
        its data order, ``method/<name>/build`` for its initialisation, ``<name>`` being
        :attr:`shares_streams_with` when set."""
        base = f"method/{self.shares_streams_with or self.name}"
        return f"{base}/{purpose}" if purpose else base

    def epoch_log(self) -> dict[str, Any]:
        """Extra numbers for the epoch's history row (read once per epoch, after validation)."""
        return {}

    def record_facts(self) -> dict[str, Any]:
        """Method-specific facts for the result record, read once training is over."""
        return {}

    def stage(self) -> Stage:
        """The single stage of a one-phase method."""
        return Stage(
            name=self.name,
            module=self.model,
            step=self.training_step,
            predict=self.predict,
            seed_key=self.stream(),
            after_backward=self.after_backward if _overrides(self, "after_backward") else None,
            on_epoch_start=self.on_epoch_start if _overrides(self, "on_epoch_start") else None,
            epoch_log=self.epoch_log if _overrides(self, "epoch_log") else None,
            losses=list(self.gradient_losses) if self.gradient_losses else None,
            combine_gradients=self.combine_gradients if self.gradient_losses else None,
            modalities=list(self.modalities),
        )

    def after_backward(self, ctx: StepContext, outputs: dict[str, torch.Tensor]) -> None:
        """Between backward and the optimizer step (gradient modulation), with what
        :meth:`training_step` returned (its "_"-named entries are not logged)."""

    # The named losses of training_step whose gradients combine_gradients combines (None: the
    # loop backpropagates "loss" as usual).
    gradient_losses: ClassVar[list[str] | None] = None

    def combine_gradients(self, grads: dict[str, list[torch.Tensor]], ctx: StepContext) -> list[torch.Tensor]:
        """Per-loss gradients (``grads[name][i]``, in the order of the stage's trainable
        parameters) → the gradient each parameter receives; by default their sum, which is the
        gradient of the summed losses."""
        names = list(grads)
        return [sum((grads[n][i] for n in names[1:]), grads[names[0]][i]) for i in range(len(grads[names[0]]))]

    def on_epoch_start(self, ctx: StepContext) -> None:
        """Before the first batch of each epoch."""

    def run(self, trainer: Loop) -> dict[str, Any]:
        """Train; returns method-specific facts for the result record (:meth:`record_facts`)."""
        trainer.fit(self.stage())
        return self.record_facts()

    # --- checkpoints (benchmark.checkpoint) ------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        """What evaluation needs besides ``model.state_dict()`` (plain JSON-able values), kept in a
        checkpoint; a method whose prediction reads attributes set while training overrides this."""
        return {}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`checkpoint_state` after :meth:`build` (before the weights are loaded)."""

    @property
    def name(self) -> str:
        return getattr(type(self), "registered_name", type(self).__name__)


def _overrides(obj: Method, attr: str) -> bool:
    return getattr(type(obj), attr) is not getattr(Method, attr)


def resolve_method_options(name: str, overrides: dict[str, Any]) -> Any:
    method_cls = METHODS.get(name)
    options = method_cls.Options()
    apply_overrides(options, overrides, prefix="method.")
    if hasattr(options, "validate"):
        options.validate()
    return options


def create_method(name: str, info: DataInfo, cfg: RunConfig) -> Method:
    """Instantiate method ``name`` for dataset ``info``; refuses modality counts it cannot handle."""
    method_cls = METHODS.get(name)
    options = resolve_method_options(name, cfg.method_options)
    n = len(info.modalities)
    if n < method_cls.min_modalities or (method_cls.max_modalities and n > method_cls.max_modalities):
        most = method_cls.max_modalities or "any number of"
        raise UsageError(
            f"method {name!r} takes {method_cls.min_modalities} to {most} modalities, "
            f"dataset {info.name!r} has {n}; choose a dataset with fewer modalities"
        )
    for option, mapping in (("encoder", cfg.encoder), ("encoder_weights", cfg.encoder_weights)):
        for modality in mapping:
            if modality not in info.modality_names:
                raise UsageError(
                    f"{option}.{modality}: dataset {info.name!r} has no modality {modality!r}; "
                    f"its modalities: {', '.join(info.modality_names)}"
                )
    method = method_cls(info, cfg, options)
    method.check()
    return method


def build_method(method: Method) -> nn.Module:
    """Build ``method``'s model under its run's build stream (``method/<name>/build``), the one
    place a run's model is made: the same seed gives the same weights in a run, a re-evaluation,
    a timing or a test."""
    with seeded(method.cfg.seed, f"method/{method.name}/build"):
        return method.build()


def options_of(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else {}
