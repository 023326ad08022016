"""``python -m benchmark evaluate RECORD_OR_CHECKPOINT``: re-evaluate a saved model.

The method is rebuilt from the configuration saved in the checkpoint, its weights loaded, and one
split (test by default) evaluated as the run did; the imbalance diagnostics on request. Given a
record, the checkpoint is the ``.pt`` file of the same name beside it (written by a run with
``--set save_checkpoint=true``). No torch import at this module's top level.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmark.errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="re-evaluate a run's saved model (a run made with --set save_checkpoint=true)",
        description="Rebuild the method of a run from the configuration saved in its checkpoint, load the "
                    "selected model's weights and evaluate one split: its accuracy (and, with --diagnostics, "
                    "the imbalance diagnostics). Given a record file, its checkpoint is the .pt file of the "
                    "same name beside it.",
    )
    p.add_argument("path", metavar="RECORD_OR_CHECKPOINT", help="a run's record (.json) or its checkpoint (.pt)")
    p.add_argument("--split", choices=("val", "test"), default="test", help="split evaluated [test]")
    p.add_argument("--diagnostics", action=argparse.BooleanOptionalAction, default=False,
                   help="also compute the imbalance diagnostics on the split [off]")
    p.add_argument("--device", default=None,
                   help="auto, cpu, cuda, cuda:<i> or mps [the run's device option]; the same kind of device "
                        "as the run's gives the same accuracy")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the results as JSON to FILE")
    p.set_defaults(handler=cmd_evaluate)


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"record {path} does not exist; give a run's record (.json) or checkpoint (.pt)") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read record {path} ({type(exc).__name__}); give a run's record written by "
                         "`python -m benchmark run`") from None
    if not isinstance(record, dict) or "status" not in record:
        raise UsageError(f"{path} is not a run record; give a record written by `python -m benchmark run`")
    return record


def locate(path: Path) -> tuple[Path, Path | None]:
    """(checkpoint, record or None) for a record or checkpoint path."""
    from benchmark.checkpoint import SUFFIX, checkpoint_path

    if path.suffix == ".json":
        record = _read_record(path)
        if record.get("status") != "ok":
            raise UsageError(f"the run of {path} failed ({record.get('error', 'no error recorded')}); it has no "
                             "model to evaluate")
        ckpt = checkpoint_path(path)
        if not ckpt.is_file():
            raise UsageError(f"no checkpoint {ckpt.name} beside {path}: the run was made without "
                             "save_checkpoint; re-run it with --set save_checkpoint=true")
        return ckpt, path
    if path.suffix != SUFFIX:
        raise UsageError(f"{path} is neither a record (.json) nor a checkpoint ({SUFFIX})")
    record_file = path.with_suffix(".json")
    return path, record_file if record_file.is_file() else None


def evaluate_checkpoint(path: Path, split: str = "test", diagnostics: bool = False,
                        device: str | None = None) -> dict[str, Any]:
    """Rebuild, load and evaluate; returns the results (accuracy, macro-F1, per-modality heads,
    the diagnostics when asked)."""
    from benchmark.checkpoint import config_of, load_checkpoint, restore
    from benchmark.data import MultimodalData, create_dataset
    from benchmark.device import pick_device
    from benchmark.diagnostics import Diagnostics
    from benchmark.metrics import accuracy, macro_f1
    from benchmark.trainer import Trainer

    ckpt_file, record_file = locate(path)
    ckpt = load_checkpoint(ckpt_file)
    cfg = config_of(ckpt, device or "")
    torch_device = pick_device(cfg.device)
    data = create_dataset(cfg.dataset, cfg.dataset_options)
    if split != "test":  # the diagnostics read the "test" split: point it at the split asked for
        data = MultimodalData(data.info, {**data.splits, "test": data.splits[split]}, data.manifest)
    method = restore(ckpt, cfg, data, torch_device)
    trainer = Trainer(cfg, data, torch_device)
    outputs, labels = trainer.collect(method.eval_forward, method.model, "test")
    result: dict[str, Any] = {
        "checkpoint": str(ckpt_file), "record": str(record_file) if record_file else None,
        "key": ckpt.get("key"), "method": cfg.method, "dataset": cfg.dataset, "seed": cfg.seed,
        "split": split, "samples": len(labels),
        "accuracy": accuracy(outputs.logits, labels),
        "macro_f1": macro_f1(outputs.logits, labels, data.info.num_classes),
        "unimodal_accuracy": {m: accuracy(z, labels) for m, z in (outputs.unimodal or {}).items()},
        "recorded_accuracy": (ckpt.get("metrics") or {}).get("accuracy" if split == "test" else "val_accuracy"),
    }
    if diagnostics:
        result["diagnostics"] = Diagnostics(method, cfg, trainer).evaluate((outputs, labels))
    return result


def cmd_evaluate(args: argparse.Namespace) -> int:
    from benchmark.files import write_json_atomic

    out = Path(args.out).expanduser() if args.out else None
    if out is not None and (out.is_dir() or not out.resolve().parent.is_dir()):
        raise UsageError(f"--out {args.out} must be a file in an existing folder")
    result = evaluate_checkpoint(Path(args.path).expanduser(), args.split, args.diagnostics, args.device)
    line = (f"{result['method']} on {result['dataset']} seed {result['seed']}: {result['split']} accuracy "
            f"{result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f} ({result['samples']} samples)")
    if result["recorded_accuracy"] is not None:
        line += f"; recorded {result['recorded_accuracy']:.4f}"
    print(line)
    diag = result.get("diagnostics")
    if diag:
        shapley = ", ".join(f"{m} {v:.4f}" for m, v in (diag.get("shapley") or {}).items())
        degree = diag.get("imbalance_degree")
        print(f"  Shapley [{shapley}], imbalance degree {degree:.4f}" if degree is not None
              else f"  Shapley [{shapley}], imbalance degree undefined")
        for m, accs in (diag.get("noise_accuracy") or {}).items():
            noisy = ", ".join(f"σ={s:g} {a:.4f}" for s, a in zip(diag.get("noise_levels") or [], accs))
            print(f"  {m}: absent {diag['absent_accuracy'].get(m, float('nan')):.4f}, noise [{noisy}]")
    if out is not None:
        write_json_atomic(out, result)
        print(f"→ {out}")
    return 0
