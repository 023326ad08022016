"""The resolved configuration of one run, and ``key=value`` overrides with type checking.

Every option of a run lives in :class:`RunConfig` (shared options) or in the ``Options``
dataclass of a method or dataset (their own options, addressed as ``method.<name>`` and
``dataset.<name>``). Encoders per modality are set with ``encoder.<modality>=<name>`` and their
local pretrained weights with ``encoder_weights.<modality>=<path>``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark.errors import UsageError

MAX_SEED = 2**32 - 1  # numpy and the data loaders take seeds below 2**32


def opt(default: Any, help: str, *, location: bool = False, **kw: Any) -> Any:
    """A dataclass field carrying its help text (shown by ``--help`` and in the docs).
    ``location``: the option says only where something is (a data root, a cache folder), not
    what a run computes: it is left out of every key (:func:`location_names`)."""
    metadata = {"help": help, "location": location}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


def location_names(options: Any) -> set[str]:
    """The fields of an options dataclass (or instance) marked ``location``."""
    if not dataclasses.is_dataclass(options):
        return set()
    return {f.name for f in dataclasses.fields(options) if f.metadata.get("location")}


@dataclass
class RunConfig:
    """Options shared by every method and dataset."""

    method: str = opt("joint", "training method (see `python -m benchmark list`)")
    dataset: str = opt("synthetic", "dataset name (see `python -m benchmark list`)")
    seed: int = opt(0, "seed of initialisation and data order; the dataset's own seed is dataset.seed")
    epochs: int = opt(20, "training epochs (per phase for multi-phase methods)")
    batch_size: int = opt(64, "mini-batch size for training")
    eval_batch_size: int = opt(256, "mini-batch size for evaluation (no sample is dropped)")
    optimizer: str = opt("sgd", "optimizer: sgd, adam or adamw")
    lr: float = opt(0.01, "learning rate")
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(1e-4, "weight decay")
    scheduler: str = opt("none", "learning-rate schedule: none, step or cosine")
    step_size: int = opt(70, "StepLR period in epochs (scheduler=step)")
    gamma: float = opt(0.1, "StepLR decay factor (scheduler=step)")
    patience: int = opt(0, "early stopping: epochs without a better validation accuracy (0 = off)")
    unimodal_epochs: int = opt(0, "epoch cap of unimodal training (unimodal, ensemble, UDI's anchor phase, "
                                  "MCR's initialisation), which stops early (0 = epochs)")
    unimodal_patience: int = opt(8, "the shared unimodal training stops after this many epochs without a better "
                                    "validation accuracy (0 = train all unimodal_epochs)")
    unimodal_lr_decay: int = opt(4, "the shared unimodal training multiplies the learning rate by 0.1 after this many "
                                    "epochs without a better validation accuracy, at most twice (0 = never)")
    precise_bn: int = opt(512, "before each validation, recompute the BatchNorm statistics of the trained "
                                "layers on up to this many training samples (0 = keep the running averages)")
    fusion: str = opt("concat", "fusion head for fused methods: concat, sum, film or gated")
    encoder: dict = opt({}, "encoder per modality, e.g. encoder.audio=resnet18_audio, encoder.visual=timm:resnet18, "
                            "encoder.visual=tv:resnet18 or encoder.text=hf (default: the dataset's)")
    encoder_weights: dict = opt({}, "local pretrained weights per modality, set as encoder_weights.<modality>=<path>: "
                                    "a state_dict file for timm:/tv: encoders, a save_pretrained folder for hf")
    device: str = opt("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:<i> or mps")
    amp: str = opt("auto", "mixed precision: auto (bf16/fp16 on CUDA only), off, bf16 or fp16")
    num_workers: int = opt(0, "data-loader worker processes for on-disk datasets")
    probe: bool = opt(True, "fit per-modality linear probes on frozen features after training")
    diagnostics: bool = opt(True, "imbalance diagnostics after training: Shapley values, missing/noisy-modality "
                                  "robustness, utilisation, error matrix, ρ per epoch")
    absent: str = opt("zeros", "diagnostics: an absent modality's input is zeros or the training-set mean "
                               "(late fusions of unimodal heads leave the head out instead)")
    cache_dir: str = opt("", "where unimodal checkpoints are kept for reuse (default: <out>/cache)")
    log: str = opt("", "experiment tracking besides the JSON record: tensorboard or mlflow (empty: none)")
    log_dir: str = opt("", "where the tracking logs go (default: the record's folder); each run writes "
                           "<log_dir>/<record name>.tensorboard, or an MLflow store <log_dir>/mlruns")
    save_checkpoint: bool = opt(False, "keep the selected model beside the record (<record name>.pt), "
                                       "for `python -m benchmark evaluate`")
    method_options: dict = opt({}, "method options, set as method.<name>=<value>")
    dataset_options: dict = opt({}, "dataset options, set as dataset.<name>=<value>")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "step_size"):
            low = 0 if name == "epochs" else 1
            if getattr(self, name) < low:
                raise UsageError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.batch_size < 2:  # BatchNorm cannot train on one sample: every batch would be skipped
            raise UsageError(f"batch_size must be >= 2 (BatchNorm needs two samples per batch), got {self.batch_size}")
        if self.patience < 0 or self.num_workers < 0:
            raise UsageError("patience and num_workers must be >= 0")
        if min(self.unimodal_epochs, self.unimodal_patience, self.unimodal_lr_decay, self.precise_bn) < 0:
            raise UsageError(f"unimodal_epochs, unimodal_patience, unimodal_lr_decay and precise_bn must be "
                             f">= 0, got {self.unimodal_epochs}, {self.unimodal_patience}, "
                             f"{self.unimodal_lr_decay}, {self.precise_bn}")
        if not 0 <= self.seed <= MAX_SEED:
            raise UsageError(f"seed must be in [0, {MAX_SEED}], got {self.seed}")
        ranges = {  # name: (test, the range in words); NaN and infinity fail every test
            "lr": (lambda v: 0 < v < math.inf, "a finite number > 0"),
            "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
            "weight_decay": (lambda v: 0 <= v < math.inf, "a finite number >= 0"),
            "gamma": (lambda v: 0 < v < math.inf, "a finite number > 0"),
        }
        for name, (ok, words) in ranges.items():
            if not ok(getattr(self, name)):
                raise UsageError(f"{name} must be {words}, got {getattr(self, name)}")
        choices = {
            "optimizer": ("sgd", "adam", "adamw"),
            "scheduler": ("none", "step", "cosine"),
            "amp": ("auto", "off", "bf16", "fp16"),
            "absent": ("zeros", "mean"),
        }
        if self.log not in ("", "tensorboard", "mlflow"):
            raise UsageError(f"log must be tensorboard, mlflow or empty (no tracking), got {self.log!r}")
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UsageError(
                    f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )


def config_hash(data: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able mapping (the key of a run in the result store)."""
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a command-line string (or a TOML value) to a field's declared type."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing))  # dataclass annotations under __future__
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        errors = []
        arms = typing.get_args(annotation)
        if value is None and type(None) in arms:  # a resolved configuration (a checkpoint's, a planned run's)
            return None
        for arm in arms:
            if arm is type(None):
                if isinstance(value, str) and value.lower() in ("none", "null", ""):
                    return None
                continue
            try:
                return coerce(value, arm, key)
            except UsageError as exc:
                errors.append(str(exc))
        raise UsageError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        for choice in allowed:
            if str(choice) == str(value):
                return choice
        raise UsageError(f"{key} must be one of {', '.join(map(str, allowed))}, got {value!r}")
    try:
        if annotation is bool:
            return value if isinstance(value, bool) else _bool(str(value))
        if annotation is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.strip())
        if annotation is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if annotation is str:
            return str(value)
    except ValueError:
        kind = getattr(annotation, "__name__", str(annotation))
        raise UsageError(f"{key} expects a value of type {kind}, got {value!r}") from None
    return value


def apply_overrides(target: Any, overrides: dict[str, Any], prefix: str = "") -> None:
    """Set dataclass fields from ``{name: value}``; unknown names are refused with the known ones."""
    fields = {f.name: f for f in dataclasses.fields(target)}
    for name, value in overrides.items():
        if name not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise UsageError(f"unknown option {prefix + name!r}; known options: {known}")
        setattr(target, name, coerce(value, fields[name].type, prefix + name))


def parse_assignments(items: list[str]) -> dict[str, str]:
    """``["lr=0.1", "method.alpha=0.5"]`` → ``{"lr": "0.1", "method.alpha": "0.5"}``."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def build_config(assignments: dict[str, Any]) -> RunConfig:
    """A :class:`RunConfig` from flat assignments; ``method.*``, ``dataset.*``, ``encoder.*`` and
    ``encoder_weights.*`` keys go to the nested mappings (checked later against the plug-in's
    options and the dataset's modalities)."""
    cfg = RunConfig()
    flat: dict[str, Any] = {}
    nested = {"method": cfg.method_options, "dataset": cfg.dataset_options, "encoder": cfg.encoder,
              "encoder_weights": cfg.encoder_weights}
    for key, value in assignments.items():
        head, dot, rest = key.partition(".")
        if dot and head in nested and rest:
            nested[head][rest] = value if head != "encoder_weights" else str(value)
        elif key in ("method_options", "dataset_options", "encoder", "encoder_weights"):
            name = {"method_options": "method", "dataset_options": "dataset"}.get(key, key)
            raise UsageError(f"set {key} entries one by one, as {name}.<name>=<value>")
        else:
            flat[key] = value
    apply_overrides(cfg, flat)
    cfg.validate()
    return cfg


def options_help(options_cls: type) -> list[tuple[str, str, str]]:
    """(name, default, help) for each field of an options dataclass."""
    rows = []
    for f in dataclasses.fields(options_cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "required"
        rows.append((f.name, repr(default), f.metadata.get("help", "")))
    return rows


# --- configuration files (``run --config FILE.toml``, ``run --print-config``) ------------------------
# A file holds the keys of ``--set``, with TOML values: ``lr = 0.05``, ``method = "udi"``,
# ``"method.lambda_uni" = 0.5`` (a dotted key quoted, so that it can sit beside ``method = ...``).
# A table is the same as dotted keys: ``[method]`` with ``lambda_uni = 0.5`` (or the unquoted
# ``method.lambda_uni = 0.5``) is ``method.lambda_uni``; TOML forbids such a table in a file that
# also sets ``method = "..."``, so a file that names the method quotes its method keys.
def read_config_file(path: str) -> dict[str, Any]:
    """The flat assignments of a TOML configuration file; a missing or malformed file, or a value
    that is not a string, number or boolean, is a UsageError naming the file."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    file = Path(path).expanduser()
    if not file.is_file():
        why = "is a folder" if file.is_dir() else "does not exist"
        raise UsageError(f"config file {path!r} {why}; give the path of a TOML file to --config")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise UsageError(f"config file {path!r} cannot be read ({why}); give a readable TOML file") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        hint = (" (a file that sets method or dataset must quote its dotted keys: \"method.name\" = value)"
                if "overwrite" in str(exc) or "redefine" in str(exc) else "")
        raise UsageError(f"{path}: not valid TOML: {exc}{hint}") from None
    flat: dict[str, Any] = {}

    def walk(table: dict[str, Any], prefix: str) -> None:
        for key, value in table.items():
            name = prefix + key
            if isinstance(value, dict):
                walk(value, name + ".")
            elif isinstance(value, (str, int, float, bool)):
                if name in flat:
                    raise UsageError(f"{path}: {name} is set twice; keep one")
                flat[name] = value
            else:
                raise UsageError(f"{path}: {name} = {value!r}: a value must be a string, number or boolean")

    walk(data, "")
    return flat


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    text = str(value)
    escaped = "".join("\\\\" if c == "\\" else '\\"' if c == '"' else
                      f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c for c in text)
    return f'"{escaped}"'


def to_toml(flat: dict[str, Any], header: str = "") -> str:
    """Flat assignments as a TOML file that :func:`read_config_file` reads back to the same values
    (dotted keys quoted; a value of None, which TOML cannot hold, is left as a comment)."""
    lines = [f"# {header}"] if header else []
    for key, value in flat.items():
        name = key if key.replace("_", "").replace("-", "").isalnum() and key.isascii() else _toml_value(key)
        if value is None:
            lines.append(f"# {name}: no value (None)")
        else:
            lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines)


def flat_options(config: dict[str, Any]) -> dict[str, Any]:
    """The resolved configuration as ``name → value`` with nested options as ``method.<name>``,
    ``dataset.<name>``, ``encoder.<modality>`` and ``encoder_weights.<modality>``."""
    out: dict[str, Any] = {}
    for name, value in config.items():
        if name in ("method_options", "dataset_options", "encoder", "encoder_weights") and isinstance(value, dict):
            prefix = {"method_options": "method", "dataset_options": "dataset"}.get(name, name)
            for sub, v in value.items():
                out[f"{prefix}.{sub}"] = v
        else:
            out[name] = value
    return out
