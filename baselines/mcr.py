"""``mcr``: the multimodal competition regularizer (Kontras et al., NeurIPS 2025).

``L = CE(fused) + λ_uni Σ_m CE(z_m) + λ_M · L_MIPD + w_con · L_con (+ w_ceb · L_CEB)``:

- latent permutations: modality m's pooled features are permuted within the batch (σ random,
  ``num_permutations`` of them), the others kept, and the same head gives ``p̃^(m)``; the encoders
  run once per batch;
- ``JSD_m = JS(p_fused ‖ p̃^(m))``, averaged over permutations and batch;
- the game: encoder m minimises ``−JSD_m`` plus ``k·(−JSD_j)`` for every other modality j, with
  ``k = −1`` (greedy), ``0`` (independent) or ``+1`` (collaborative); each JS term is computed with
  every modality other than the one it trains detached (in both arguments), so its gradient reaches
  only that encoder;
- ``L_con``: supervised NT-Xent on the L2-normalised features of all modalities (class labels
  define positives), temperature 0.5;
- ``L_CEB`` (off by default): MSE between ``[f_1; …; f_M]`` and a small head's reconstruction from
  the detached fused logits;
- ``init="unimodal"``: encoders and unimodal heads start from unimodal checkpoints, trained (or
  reused from the cache) through ``benchmark.unimodal.train_unimodal``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from baselines.joint import FusedModel, Joint
from benchmark.config import opt
from benchmark.device import derive_seed, seeded
from benchmark.errors import UsageError
from benchmark.losses import js_divergence
from benchmark.method import Batch, EvalOutput, StepContext, shared_search_space
from benchmark.registry import register_method
from benchmark.unimodal import train_unimodal

GAMES = {"greedy": -1.0, "independent": 0.0, "collaborative": 1.0}
ALL = "*"  # routing key of a JS term whose gradient reaches every encoder


@dataclass
class MCROptions:
    lambda_m: float = opt(0.1, "λ_M: weight of the permutation (JS divergence) game regularizer")
    lambda_uni: float = opt(0.01, "λ_uni: weight of the unimodal cross-entropies (separate heads)")
    contrastive_weight: float = opt(1.0, "weight of the supervised contrastive loss")
    temperature: float = opt(0.5, "temperature of the supervised contrastive loss")
    ceb_weight: float = opt(0.0, "weight of the CEB reconstruction term (0 = off)")
    num_permutations: int = opt(32, "latent permutations per modality and batch")
    game: str = opt("greedy", "gradient routing: greedy (k=-1), independent (k=0) or collaborative (k=1)")
    init: str = opt("unimodal", "encoder initialisation: unimodal (from unimodal checkpoints) or scratch")
    route_target: bool = opt(True, "detach the other modalities in the unpermuted prediction too, so a JS "
                                   "term reaches only its encoder (false: the reference, whose unpermuted "
                                   "prediction stays attached to every encoder)")

    def validate(self) -> None:
        for name in ("lambda_m", "lambda_uni", "contrastive_weight", "ceb_weight"):
            if getattr(self, name) < 0:
                raise UsageError(f"method.{name} must be >= 0, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise UsageError(f"method.temperature must be > 0, got {self.temperature}")
        if self.num_permutations < 1:
            raise UsageError(f"method.num_permutations must be >= 1, got {self.num_permutations}")
        if self.game not in GAMES:
            raise UsageError(f"method.game must be one of {', '.join(GAMES)}, got {self.game!r}")
        if self.init not in ("unimodal", "scratch"):
            raise UsageError(f"method.init must be unimodal or scratch, got {self.init!r}")


def supervised_nt_xent(features: list[torch.Tensor], labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised NT-Xent on the L2-normalised rows of every modality's features.

    With ``s_ij`` the cosine similarity over ``τ`` of rows i and j of the stacked set (labels
    repeated per modality), each positive pair (i ≠ j, same label) contributes
    ``−log(e^{s_ij} / (e^{s_ij} + Σ_{k: label_k ≠ label_i} e^{s_ik}))``; the loss is the mean over
    positive pairs (zero when the set has no positive or no negative pair).

    Written with masks only (no data-dependent shapes or branches), so it never makes the host
    wait for the device.
    """
    z = F.normalize(torch.cat([f.float() for f in features]), p=2, dim=1)
    lab = labels.repeat(len(features))
    sim = z @ z.t() / temperature
    same = lab.unsqueeze(0) == lab.unsqueeze(1)
    eye = torch.eye(len(lab), dtype=torch.bool, device=z.device)
    pos = same & ~eye
    # row i: log Σ_{k: label_k ≠ label_i} e^{s_ik}; a very negative finite fill (not −inf) keeps
    # the value and the gradient finite when a row has no negative at all
    neg_lse = torch.logsumexp(sim.masked_fill(same, torch.finfo(sim.dtype).min), dim=1, keepdim=True)
    has_neg = (~same).any(dim=1, keepdim=True)
    per_pair = F.softplus(neg_lse - sim)  # −log(e^{s_ij} / (e^{s_ij} + Σ_neg e^{s_ik})) = log(1 + e^{lse_neg − s_ij})
    weight = (pos & has_neg).to(sim.dtype)
    return (per_pair * weight).sum() / weight.sum().clamp_min(1.0)


class CEBHead(nn.Module):
    """Reconstructs ``[f_1; …; f_M]`` from the (detached) fused logits."""

    def __init__(self, num_classes: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_classes, hidden, bias=False), nn.ReLU(),
                                 nn.Linear(hidden, out_dim, bias=False))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.net(logits)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def _scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 0.0:
        return x.detach()
    return x if scale == 1.0 else _ScaleGrad.apply(x, scale)


@register_method("mcr")
class MCR(Joint):
    summary = "MCR: joint CE + latent-permutation JS game regularizer + supervised contrastive term"
    table_order = 7
    perf_bound = 1.5
    published: ClassVar[dict[str, dict[str, tuple[float, float | None]]]] = {
        "crema-d": {"MCR reruns (3 folds, val-selected)": (76.1, 1.6)},
    }
    shares_streams_with = "joint"  # joint's initial weights and batches for a seed
    Options = MCROptions
    min_modalities = 2
    # The reference's CREMA-D settings (run.sh); the shared configuration is never changed silently.
    recommended: ClassVar[dict[str, Any]] = {
        "optimizer": "adam", "lr": 1e-4, "weight_decay": 1e-4, "batch_size": 32,
    }

    @staticmethod
    def search_space(trial: Any) -> dict[str, Any]:
        return {**shared_search_space(trial),
                "method.lambda_m": trial.suggest_float("method.lambda_m", 0.01, 1.0, log=True),
                "method.lambda_uni": trial.suggest_float("method.lambda_uni", 1e-3, 1.0, log=True),
                "method.contrastive_weight": trial.suggest_float("method.contrastive_weight", 0.1, 2.0, log=True)}

    def check(self) -> None:
        if self.options.contrastive_weight > 0:
            self.require_equal_feature_sizes("compares features across modalities in its contrastive term",
                                             "choose encoders with equal out_dim or set method.contrastive_weight=0")

    def build(self) -> nn.Module:
        with seeded(self.cfg.seed, self.stream("build")):  # joint's encoders and head for this seed
            super().build()
        model: FusedModel = self.model
        dims = {m: enc.out_dim for m, enc in model.encoders.items()}
        with seeded(self.cfg.seed, f"method/{self.name}/build/extra"):
            model.unimodal_heads = nn.ModuleDict(
                {m: nn.Linear(d, self.info.num_classes) for m, d in dims.items()})
            if self.options.ceb_weight > 0:
                model.ceb = CEBHead(self.info.num_classes, max(dims.values()), sum(dims.values()))
        self._perm_gen = self._new_generator(torch.device("cpu"))  # moved to the training device on first use
        return self.model

    # --- the regularizer ---------------------------------------------------------------------
    def routed_logits(self, feats: dict[str, torch.Tensor], attached: str,
                      readouts: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """Fused logits whose gradient reaches only modality ``attached`` (``ALL``: every one).

        Linear heads (concat, sum) are the sum of their unimodal readouts: the readouts of the
        other modalities are detached. Other heads see the other modalities' features detached.
        """
        if readouts is not None:
            return sum(z if attached in (ALL, m) else z.detach() for m, z in readouts.items())
        return self.model.head({m: f if attached in (ALL, m) else f.detach() for m, f in feats.items()})

    def _new_generator(self, device: torch.device) -> torch.Generator:
        gen = torch.Generator(device=device)
        gen.manual_seed(derive_seed(self.cfg.seed, f"method/{self.name}/perm"))
        return gen

    def _generator(self, device: torch.device) -> torch.Generator:
        """The permutations' own generator, seeded from the run seed, on the features' device so
        that no permutation is copied from the host at each step."""
        if self._perm_gen.device.type != device.type:
            self._perm_gen = self._new_generator(device)
        return self._perm_gen

    def permutations(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """``num_permutations`` random permutations of the batch, stacked and flattened."""
        gen = self._generator(device)
        keys = torch.rand(self.options.num_permutations, batch_size, generator=gen, device=gen.device)
        return keys.argsort(dim=1).flatten()  # one draw for all permutations

    def js_terms(self, feats: dict[str, torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
        """``{(routed encoder or ALL, permuted modality): JSD}`` for the configured game."""
        head = self.model.head
        linear = getattr(head, "has_unimodal_readout", False)
        readouts = head.unimodal_logits(feats) if linear else None
        n = next(iter(feats.values())).shape[0]
        p = self.options.num_permutations
        game = self.options.game
        routes = {ALL} if game == "collaborative" else set(self.modalities)
        targets = {k: self.routed_logits(feats, k if self.options.route_target else ALL, readouts).repeat(p, 1)
                   for k in routes}
        terms: dict[tuple[str, str], torch.Tensor] = {}
        for m in self.modalities:
            perm = self.permutations(n, next(iter(feats.values())).device)
            if readouts is not None:  # a linear head: permuting f_m permutes its readout rows
                shuffled_r = {j: (z[perm] if j == m else z.repeat(p, 1)) for j, z in readouts.items()}
                shuffled_f: dict[str, torch.Tensor] = {}
            else:
                shuffled_r = None
                shuffled_f = {j: (f[perm] if j == m else f.repeat(p, 1)) for j, f in feats.items()}
            for k in sorted(routes):
                if game == "independent" and k != m:
                    continue
                terms[(k, m)] = js_divergence(targets[k], self.routed_logits(shuffled_f, k, shuffled_r), from_logits=True)
        return terms

    def game_regularizer(self, terms: dict[tuple[str, str], torch.Tensor]) -> torch.Tensor:
        """``Σ_m [−JSD[enc m, perm m] − k Σ_{j≠m} JSD[enc j, perm m]]`` (collaborative: ``−Σ_m JSD[all, perm m]``)."""
        k = GAMES[self.options.game]
        total = torch.zeros((), device=next(iter(terms.values())).device)
        for (route, m), value in terms.items():
            if route in (ALL, m):
                total = total - value
            else:
                total = total - k * value
        return total

    def game_coefficients(self, permuted: str) -> tuple[dict[str, float], dict[str, float], float]:
        """For the JS term of permuting ``permuted``: the weight of its gradient into each encoder
        through the permuted prediction, through the unpermuted one, and the weight of its value
        in the regularizer (the sum of the weights of the routed terms it stands for)."""
        k = GAMES[self.options.game]
        names = self.modalities
        if self.options.game == "collaborative":
            through_permuted = {j: -1.0 for j in names}
            total = -1.0
        else:
            through_permuted = {j: (-1.0 if j == permuted else -k) for j in names}
            total = -1.0 - (k * (len(names) - 1) if self.options.game == "greedy" else 0.0)
        through_target = through_permuted if self.options.route_target else {j: total for j in names}
        return through_permuted, through_target, total

    def scaled_game_regularizer(self, feats: dict[str, torch.Tensor]
                                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The game regularizer with one JS term per permuted modality (linear heads).

        A linear head's fused logits are the sum of its unimodal readouts, so a routed term
        (``js_terms``) differs from its siblings only in which readouts are detached. One term
        per permuted modality, with each readout's gradient scaled by the weight that modality's
        encoder and head slice carry in the game, has the same value per term and the same
        gradient as ``game_regularizer(js_terms(feats))``, at a fraction of the cost. The
        returned regularizer has the game's value too.
        """
        readouts = self.model.head.unimodal_logits(feats)
        n = next(iter(readouts.values())).shape[0]
        p = self.options.num_permutations
        jsd: dict[str, torch.Tensor] = {}
        surrogate = value = 0.0
        for m in self.modalities:
            perm = self.permutations(n, readouts[m].device)
            w_perm, w_target, total = self.game_coefficients(m)
            target = sum(_scale_grad(z, w_target[j]) for j, z in readouts.items())
            shuffled = sum(_scale_grad(z[perm] if j == m else z.repeat(p, 1), w_perm[j])
                           for j, z in readouts.items())
            term = js_divergence(target.repeat(p, 1), shuffled, from_logits=True)
            jsd[m] = term.detach()
            surrogate = surrogate + term
            value = value + total * term.detach()
        # the gradient of the scaled terms, the value of the game
        return surrogate - surrogate.detach() + value, jsd

    # --- training ----------------------------------------------------------------------------
    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        o = self.options
        y = batch["label"]
        feats = self.encode(batch)
        logits = self.model.head(feats)
        ce = F.cross_entropy(logits, y)
        loss = ce
        out: dict[str, torch.Tensor] = {"ce": ce.detach()}
        if o.lambda_uni > 0:
            uni = sum(F.cross_entropy(self.model.unimodal_heads[m](f), y) for m, f in feats.items())
            loss = loss + o.lambda_uni * uni
            out["unimodal_ce"] = uni.detach()
        if o.lambda_m > 0:
            if getattr(self.model.head, "has_unimodal_readout", False):
                reg, jsd = self.scaled_game_regularizer(feats)
            else:
                terms = self.js_terms(feats)
                reg = self.game_regularizer(terms)
                jsd = {m: value for (route, m), value in terms.items() if route in (ALL, m)}
            loss = loss + o.lambda_m * reg
            out["game_reg"] = reg.detach()
            out.update({f"jsd_{m}": value.detach() for m, value in jsd.items()})
        if o.contrastive_weight > 0:
            con = supervised_nt_xent([feats[m] for m in self.modalities], y, o.temperature)
            loss = loss + o.contrastive_weight * con
            out["contrastive"] = con.detach()
        if o.ceb_weight > 0:
            recon = self.model.ceb(logits.detach().float())
            ceb = F.mse_loss(torch.cat([feats[m].float() for m in self.modalities], dim=1), recon)
            loss = loss + o.ceb_weight * ceb
            out["ceb"] = ceb.detach()
        out["loss"] = loss
        return out

    def run(self, trainer: Any) -> dict[str, Any]:
        facts: dict[str, Any] = {"init": self.options.init}
        if self.options.init == "unimodal":
            infos = {}
            for m in self.modalities:
                uni, infos[m] = train_unimodal(trainer, self, m)
                self.model.encoders[m].load_state_dict(uni.encoder.state_dict())
                self.model.unimodal_heads[m].load_state_dict(uni.head.state_dict())
            facts["unimodal"] = infos
        trainer.fit(self.stage())
        return facts

    def eval_forward(self, batch: Batch) -> EvalOutput:
        logits, feats = self.forward(batch)
        unimodal = {m: self.model.unimodal_heads[m](f) for m, f in feats.items()}
        return EvalOutput(logits, unimodal, feats)
