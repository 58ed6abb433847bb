"""OKDDip: online knowledge distillation with diverse peers (Chen, Mei, Wang, Feng, Chen; AAAI 2020).

No pre-trained teacher. One network is cut at ``split_at`` into a shared trunk and ``branches``
heads (``kdforge.models.BranchedNetwork``): the first ``m = branches - 1`` heads are *peers*, the
last one is the *group leader*, the only network deployed.

First level (peers). Every peer gets its own target, an attention-weighted mix of the peers'
logits. With ``h_i`` the pooled feature of peer ``i`` (the classifier's input, ``d`` wide) and
two projections shared by all peers, ``W_q, W_k: R^d -> R^(d/8)`` without bias::

    alpha_ij = softmax_j( (W_q h_i) . (W_k h_j) )       j over all peers, i itself included
    t_i      = sum_j alpha_ij z_j                          (logit space)

Second level (leader). The leader distils from the plain mean of the peers' logits.

    L = sum_i CE(z_i, y) + CE(z_L, y)
        + lambda * w(e) * [ sum_i T^2 KL_T(t_i || z_i) + T^2 KL_T(mean_i z_i || z_L) ]

``KL_T(t || s) = sum_c p_c (log p_c - log softmax(s/T)_c)`` averaged over the batch, with
``p = softmax(t/T) + 1e-7`` (the reference adds 1e-7 to the target probabilities, which then
enter both the weight and the log). ``w(e) = exp(-5 (1 - min(e, L)/L)^2)`` is the consistency
ramp-up over the first ``L = rampup_epochs`` epochs (``e`` counted from 0, fractional within an
epoch by default; ``rampup_by: epoch`` holds it constant over each epoch as the reference does).

Targets are **not detached** (as in the reference ``train_GL.py``): the attention projections
learn only through ``t_i``, and peers also receive gradient through the targets they help to
form. ``detach_targets: true`` is an ablation (the attention then never learns).
``aggregation: uniform`` replaces ``alpha`` by ``1/m`` (every peer then distils from the peer
mean; no projections are created), the ablation against which attention's diversity is judged.

Logged each step: ``diversity`` (mean pairwise L2 distance between the peers' softmax outputs at
T=1, averaged over the batch; the reference logs it on the test set), ``rampup`` (``w(e)``) and
``attention_self`` (mean ``alpha_ii``).

Defaults are those of the reference code (``DefangChen/OKDDip``, ``train_GL.py``): T = 3,
lambda (``--alpha``) = 1, 4 branches, ramp length 80 epochs (of 300), projection factor 8.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdforge.core.errors import ConfigError
from kdforge.core.schedules import consistency_rampup
from kdforge.data.batch import Batch
from kdforge.methods.base import METHODS, Distiller, MethodParams, Output, Step
from kdforge.methods.features import full_precision
from kdforge.methods.losses import soft_kl
from kdforge.models.branches import BranchedNetwork


class OKDDipParams(MethodParams):
    temperature: float = Field(3.0, gt=0)
    kd_weight: float = Field(1.0, ge=0, description="lambda (--alpha in the reference)")
    branches: int = Field(4, ge=2, description="peers + 1 leader (the last branch)")
    split_at: str = Field("stage2", description="last top-level module of the shared trunk")
    rampup_epochs: float = Field(80.0, ge=0, description="ramp-up length L in epochs (0: no ramp)")
    rampup_by: Literal["step", "epoch"] = "step"
    aggregation: Literal["attention", "uniform"] = "attention"
    attend_self: bool = Field(
        True,
        description="peer i's attention includes itself (reference code); "
        "false masks it out (the paper's 'other peers')",
    )
    projection_factor: int = Field(8, ge=1, description="query/key width = d // factor")
    detach_targets: bool = Field(False, description="ablation: stop gradients through the targets")
    target_epsilon: float = Field(1e-7, ge=0, description="added to target probabilities before the log")


def rampup_weight(epoch: float, length: float) -> float:
    """``exp(-5 (1 - min(e, L)/L)^2)``; 1 when ``length`` is 0 (``kdforge.schedules.consistency_rampup``)."""
    return consistency_rampup(epoch, length)


def epoch_position(step: Step, by: str = "step") -> float:
    """The epoch as a number: ``epoch + fraction of its batches done`` (or the whole epoch)."""
    if by == "epoch" or step.total_steps <= 0 or step.epochs <= 0:
        return float(step.epoch)
    position = step.global_step / (step.total_steps / step.epochs)
    if step.epoch <= position < step.epoch + 1:
        return position
    return float(step.epoch)  # a Step not made by the trainer: trust the epoch


def softened_kl(student: Tensor, target: Tensor, temperature: float, epsilon: float) -> Tensor:
    """``T^2 KL(softmax(target/T) + eps || softmax(student/T))``, batch mean (the reference's KL_Loss)."""
    probs = F.softmax(target / temperature, dim=-1) + epsilon
    return soft_kl(student, probs, temperature)


def peer_diversity(peer_logits: Tensor) -> Tensor:
    """Mean over peer pairs and samples of ``||softmax(z_i) - softmax(z_j)||_2`` (B x m x C input)."""
    probs = F.softmax(peer_logits.float(), dim=-1)
    m = probs.shape[1]
    if m < 2:
        return probs.new_zeros(())
    distances = [(probs[:, i] - probs[:, j]).norm(dim=-1) for i in range(m) for j in range(i + 1, m)]
    return torch.stack(distances).mean()


class PeerEnsemble(nn.Module):
    """Trunk + the mean of the peers' logits (evaluated each epoch as ``ensemble``)."""

    def __init__(self, group: BranchedNetwork, peers: int) -> None:
        super().__init__()
        self.group = group
        self.peers = peers

    def forward(self, x: Tensor) -> Tensor:
        shared = self.group.run_trunk(x)
        return torch.stack([self.group.run_head(i, shared)[1] for i in range(self.peers)]).mean(0)


def _feature_width(group: BranchedNetwork, model: nn.Module, input_shape: Sequence[int] | None) -> int:
    """Width ``d`` of a branch's pooled feature: probed when the input shape is known."""
    if input_shape is not None:
        was_training = group.training
        group.eval()
        try:
            with torch.no_grad():
                feature, _ = group.run_head(0, group.run_trunk(torch.zeros(2, *input_shape)))
        finally:
            group.train(was_training)
        return int(feature.flatten(1).shape[1])
    width = getattr(model, "feature_dim", None)
    if isinstance(width, int):
        return width
    last = group.heads[0][group.head_names[-1]]
    if isinstance(last, nn.Linear):
        return last.in_features
    raise ConfigError(f"okddip: cannot tell the feature width of {type(model).__name__}; pass input_shape=(C, H, W)")


@METHODS.register("okddip")
class OKDDip(Distiller):
    """OKDDip (Chen et al. AAAI 2020): peers distil from attention-mixed peer logits, the leader from their mean."""

    name = "okddip"
    Params = OKDDipParams

    def __init__(
        self,
        student: nn.Module,
        teachers: Sequence[nn.Module] = (),
        params: OKDDipParams | dict | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        p = params if isinstance(params, OKDDipParams) else OKDDipParams(**(params or {}))
        group = BranchedNetwork(student, p.split_at, p.branches, input_shape=input_shape)
        # the distiller's ``student`` is the whole group (trunk + every branch, each parameter
        # once); the deployed network is the leader's view of it
        super().__init__(group, teachers, p)
        self.num_peers = p.branches - 1
        if not p.attend_self and self.num_peers < 2:
            raise ConfigError(
                f"okddip: attend_self: false needs at least 2 peers, got {self.num_peers} (branches {p.branches}); "
                "set method.branches to 3 or more"
            )
        if p.aggregation == "attention":
            width = _feature_width(group, student, input_shape)
            projected = max(1, width // p.projection_factor)
            self.query = nn.Linear(width, projected, bias=False)
            self.key = nn.Linear(width, projected, bias=False)

    @property
    def group(self) -> BranchedNetwork:
        return self.student  # type: ignore[return-value]

    # ------------------------------------------------------------------ pieces
    def peer_targets(self, peer_features: Tensor, peer_logits: Tensor) -> tuple[Tensor, Tensor]:
        """``(t, alpha)``: targets ``t_i = sum_j alpha_ij z_j`` (B x m x C) and weights (B x m x m)."""
        batch, m, _ = peer_logits.shape
        p: OKDDipParams = self.params  # type: ignore[assignment]
        others = ~torch.eye(m, dtype=torch.bool, device=peer_logits.device)
        if p.aggregation == "uniform":
            alpha = peer_logits.new_full((batch, m, m), 1.0 / m)
            if not p.attend_self:
                alpha = others.to(peer_logits.dtype).expand(batch, m, m) / (m - 1)
        else:
            energy = self.query(peer_features) @ self.key(peer_features).transpose(1, 2)
            if not p.attend_self:
                energy = energy.masked_fill(~others, float("-inf"))
            alpha = F.softmax(energy, dim=-1)
        return alpha @ peer_logits, alpha

    # ------------------------------------------------------------------ contract
    def forward(self, batch: Batch, step: Step) -> Output:
        p: OKDDipParams = self.params  # type: ignore[assignment]
        _, features, logits = self.group.forward_all(batch.image)
        m = self.num_peers
        leader_logits = logits[m]
        with full_precision(leader_logits):
            peer_logits = torch.stack([z.float() for z in logits[:m]], dim=1)  # B x m x C
            peer_features = torch.stack([h.float().flatten(1) for h in features[:m]], dim=1)
            leader = leader_logits.float()
            targets, alpha = self.peer_targets(peer_features, peer_logits)
            ensemble = peer_logits.mean(1)
            if p.detach_targets:
                targets, ensemble = targets.detach(), ensemble.detach()
            y = batch.targets
            ce_peers = sum(F.cross_entropy(peer_logits[:, i], y) for i in range(m))
            kd_peers = sum(
                softened_kl(peer_logits[:, i], targets[:, i], p.temperature, p.target_epsilon) for i in range(m)
            )
            kd_leader = softened_kl(leader, ensemble, p.temperature, p.target_epsilon)
            ramp = rampup_weight(epoch_position(step, p.rampup_by), p.rampup_epochs)
            scale = p.kd_weight * ramp
            losses = {
                "ce_peers": ce_peers,
                "ce_leader": F.cross_entropy(leader, y),
                "kd_peers": scale * kd_peers,
                "kd_leader": scale * kd_leader,
            }
            metrics = {
                "diversity": peer_diversity(peer_logits.detach()),
                "rampup": ramp,
                "attention_self": alpha.detach().diagonal(dim1=1, dim2=2).mean(),
            }
        return Output(leader_logits, losses, metrics)

    def inference_model(self) -> nn.Module:
        """The group leader (trunk + last branch) as a network of the student's class."""
        view = self.group.branch_network(self.num_peers)
        view.training = self.training  # the view is out of the module tree: keep its flag in step
        return view

    def evaluation_models(self) -> dict[str, nn.Module]:
        members: dict[str, nn.Module] = {f"peer{i}": self.group.branch_network(i) for i in range(self.num_peers)}
        members["leader"] = self.group.branch_network(self.num_peers)
        members["ensemble"] = PeerEnsemble(self.group, self.num_peers)
        for member in members.values():  # evaluation restores each member's own flag afterwards
            member.training = self.training
        return members


__all__ = ["OKDDip", "OKDDipParams", "epoch_position", "peer_diversity", "rampup_weight", "softened_kl"]
