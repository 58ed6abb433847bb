"""Online distillation without a pre-trained teacher: DML, ONE and CL-ILR.

All three train a *group* of networks from scratch and deploy one member.

* ``dml``: K independent peers (the student plus ``fresh_copy`` clones) teach each other.
* ``one`` and ``cl_ilr``: a ``BranchedNetwork`` (shared trunk cut at ``split_at``, ``branches``
  heads); branch ``deploy`` with the trunk is deployed as a network of the student's own class.

Shared pieces: the KL term is ``T^2 KL_T(target || z)`` summed over classes and averaged over
the batch (``soft_kl``, "batchmean"); the OKDDip repository's consistency ramp-up
``w(e) = exp(-5 (1 - min(e, L)/L)^2)`` with ``e`` the (0-based, integer) epoch and ``L`` =
``rampup_epochs`` (0 switches it off, w = 1) multiplies the distillation term.

Every method reports ``diversity``: the mean over member pairs of the per-sample L2 distance
between their softmax outputs (the quantity the OKDDip code logs).
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError, model_validator
from torch import Tensor, nn

from kdforge.core.errors import ConfigError
from kdforge.core.schedules import consistency_rampup
from kdforge.core.validation import validation_message
from kdforge.data.batch import Batch
from kdforge.methods.base import METHODS, Distiller, MethodParams, Output, Step
from kdforge.methods.losses import soft_kl
from kdforge.models.branches import BranchedNetwork, fresh_copy, scale_gradient


# --------------------------------------------------------------------------- shared helpers
def softmax_diversity(logits: list[Tensor]) -> Tensor:
    """Mean over member pairs of the per-sample L2 distance between softmax outputs (no grad)."""
    with torch.no_grad():
        probs = [F.softmax(z.float(), dim=-1) for z in logits]
        distances = [(a - b).norm(dim=-1).mean() for a, b in combinations(probs, 2)]
        return torch.stack(distances).mean() if distances else probs[0].new_zeros(())


def _parse_params(cls: type[Distiller], params: MethodParams | dict | None) -> MethodParams:
    """Validate ``params`` into the method's Params, turning pydantic errors into one-line ConfigErrors."""
    if isinstance(params, MethodParams):
        return params
    try:
        return cls.Params(**(params or {}))
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["loc"]:
            message = validation_message(exc, cls.Params, prefix="method.")
        else:  # a cross-field check: its message already names the keys and the fix
            message = str(first["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"{cls.method_name()}: {message}") from None


class MeanLogits(nn.Module):
    """Average of several networks' logits (a group's plain ensemble, for evaluation)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([member(x) for member in self.members]).mean(0)


def _keep_out_of_tree(owner: nn.Module, name: str, value: Any) -> None:
    """Attach ``value`` without registering it (its parameters already belong to ``owner``)."""
    object.__setattr__(owner, name, value)


# --------------------------------------------------------------------------- DML
class DMLParams(MethodParams):
    peers: int = 2
    temperature: float = Field(1.0, gt=0)
    detach_targets: bool = True
    rampup_epochs: float = Field(0.0, ge=0)
    deploy: int = 0

    @model_validator(mode="after")
    def _check(self) -> DMLParams:
        if self.peers < 2:
            raise ValueError(f"DML needs at least 2 peers, got peers={self.peers}; set method.peers to 2 or more")
        if not 0 <= self.deploy < self.peers:
            raise ValueError(
                f"deploy={self.deploy} is not a peer index (0..{self.peers - 1}); set method.deploy in that range"
            )
        return self


def mutual_losses(
    logits: list[Tensor], targets: Tensor, temperature: float, detach_targets: bool = True
) -> tuple[list[Tensor], list[Tensor]]:
    """Per-peer ``CE(z_k, y)`` and ``(1/(K-1)) sum_{l != k} T^2 KL_T(z_l || z_k)``."""
    K = len(logits)
    probs = [F.softmax(z / temperature, dim=-1) for z in logits]
    if detach_targets:
        probs = [p.detach() for p in probs]
    ce = [F.cross_entropy(z, targets) for z in logits]
    kl = [
        sum(soft_kl(logits[k], probs[l], temperature) for l in range(K) if l != k) / (K - 1)  # type: ignore[operator]  # noqa: E741
        for k in range(K)
    ]
    return ce, kl


@METHODS.register("dml")
class DeepMutualLearning(Distiller):
    """DML (Zhang et al. 2018): K peers, each ``CE + mean_{l!=k} T^2 KL(p_l || p_k)``; deploy one peer.

    Loss, summed over peers k = 0..K-1 and minimised jointly (one backward pass)::

        L = sum_k [ CE(z_k, y) + w(e) * (1/(K-1)) * sum_{l != k} T^2 KL_T(p_l || p_k) ]

    with the other peers' predictions ``p_l`` treated as constants (``detach_targets: true``, as
    the paper). The paper updates the peers *alternately* (peer 1 steps on its loss, then peer 2
    recomputes with the updated peer 1, ...); we use the joint form of most re-implementations:
    with detached targets peer k's parameters only receive gradient from peer k's own loss, so
    the only difference is that every peer sees the others' predictions from before the step.

    Peer 0 is the student passed in; the others are ``fresh_copy(student)`` (same architecture,
    independently initialised). Defaults: 2 peers, T = 1 (paper), no ramp-up, deploy peer 0.
    (The OKDDip repository's DML baseline uses T = 3 and non-detached targets: set
    ``temperature: 3, detach_targets: false``.) ``evaluation_models()``: each peer and the mean
    of their logits (``ensemble``).
    """

    name = "dml"
    Params = DMLParams
    teachers_required = (0, 0)

    def __init__(self, student: nn.Module, teachers=(), params: MethodParams | dict | None = None) -> None:
        params = _parse_params(type(self), params)
        super().__init__(student, teachers, params)
        p: DMLParams = self.params  # type: ignore[assignment]
        self.others = nn.ModuleList([fresh_copy(student) for _ in range(p.peers - 1)])
        _keep_out_of_tree(self, "_ensemble", MeanLogits(self.peers))

    @property
    def peers(self) -> list[nn.Module]:
        return [self.student, *self.others]

    def forward(self, batch: Batch, step: Step) -> Output:
        p: DMLParams = self.params  # type: ignore[assignment]
        logits = [peer(batch.image).float() for peer in self.peers]
        ce, kl = mutual_losses(logits, batch.targets, p.temperature, p.detach_targets)
        weight = consistency_rampup(step.epoch, p.rampup_epochs)
        losses = {"ce": sum(ce), "kl": weight * sum(kl)}  # type: ignore[dict-item]
        metrics = {"diversity": softmax_diversity(logits), "rampup": weight}
        return Output(logits[p.deploy], losses, metrics)  # type: ignore[arg-type]

    def inference_model(self) -> nn.Module:
        return self.peers[self.params.deploy]  # type: ignore[attr-defined]

    def evaluation_models(self) -> dict[str, nn.Module]:
        ensemble: nn.Module = self._ensemble  # type: ignore[assignment]
        ensemble.training = self.training  # out of the tree: keep its flag in step with the peers
        return {**{f"peer{i}": peer for i, peer in enumerate(self.peers)}, "ensemble": ensemble}


# --------------------------------------------------------------------------- branched group (ONE, CL-ILR)
class BranchParams(MethodParams):
    branches: int = 3
    split_at: str = "stage2"
    temperature: float = Field(3.0, gt=0)
    kd_weight: float = Field(1.0, ge=0)
    rampup_epochs: float = Field(80.0, ge=0)
    detach_targets: bool = False
    deploy: int = 0

    @model_validator(mode="after")
    def _check(self) -> BranchParams:
        if self.branches < 2:
            raise ValueError(
                f"an online group needs at least 2 branches, got branches={self.branches}; "
                "set method.branches to 2 or more"
            )
        if not 0 <= self.deploy < self.branches:
            raise ValueError(
                f"deploy={self.deploy} is not a branch index (0..{self.branches - 1}); set method.deploy in that range"
            )
        return self


def pooled_vector(shared: Tensor) -> Tensor:
    """Trunk output as one vector per sample: global average pool of maps, vectors unchanged."""
    if shared.dim() == 4:
        return shared.mean(dim=(2, 3))
    if shared.dim() == 3:
        return shared.mean(dim=2)
    if shared.dim() == 2:
        return shared
    raise ConfigError(
        f"the trunk output has shape {tuple(shared.shape)}; the gate needs (B, C), (B, C, L) or (B, C, H, W): "
        "choose another split_at"
    )


class BranchGate(nn.Module):
    """ONE's gate: ``softmax(ReLU(BN(Linear(GAP(trunk output)))))``, one weight per branch."""

    def __init__(self, in_features: int, branches: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, branches)
        self.bn = nn.BatchNorm1d(branches)

    def forward(self, shared: Tensor) -> Tensor:
        return F.softmax(F.relu(self.bn(self.fc(pooled_vector(shared)))), dim=-1)


def gated_sum(weights: Tensor, logits: list[Tensor]) -> Tensor:
    """``z_e = sum_i g_i z_i`` with per-sample gate weights (B x m) and m logits tensors (B x C)."""
    return (weights.unsqueeze(-1) * torch.stack(logits, dim=1)).sum(dim=1)


class GatedEnsemble(nn.Module):
    """ONE's gated ensemble of every branch, as a classifier (for evaluation)."""

    def __init__(self, network: BranchedNetwork, gate: BranchGate) -> None:
        super().__init__()
        self.network = network
        self.gate = gate

    def forward(self, x: Tensor) -> Tensor:
        shared, _, logits = self.network.forward_all(x)
        return gated_sum(self.gate(shared), logits)


class BranchEnsemble(nn.Module):
    """Mean of every branch's logits (trunk run once), for evaluation."""

    def __init__(self, network: BranchedNetwork) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack(self.network.forward_all(x)[2]).mean(0)


def _trunk_width(network: BranchedNetwork, model: nn.Module, split_at: str, input_shape) -> int:
    """Channels (or features) of the trunk output: probed on ``input_shape``, else read from the zoo model."""
    if input_shape is not None:
        was_training = network.training
        network.eval()
        try:
            with torch.no_grad():
                shared = network.run_trunk(torch.zeros(2, *input_shape))
        finally:
            network.train(was_training)
        return pooled_vector(shared).shape[1]
    stages = getattr(model, "stage_channels", None)
    if stages and split_at.startswith("stage") and split_at[5:].isdigit() and 1 <= int(split_at[5:]) <= len(stages):
        return int(stages[int(split_at[5:]) - 1])
    raise ConfigError(
        f"cannot tell the width of the trunk output at '{split_at}'; pass input_shape=(C, H, W) to the method"
    )


class BranchedDistiller(Distiller):
    """Common body of ONE and CL-ILR: the student becomes a ``BranchedNetwork``."""

    Params = BranchParams
    teachers_required = (0, 0)

    def __init__(
        self,
        student: nn.Module,
        teachers=(),
        params: MethodParams | dict | None = None,
        input_shape: tuple[int, int, int] | None = None,
    ) -> None:
        params = _parse_params(type(self), params)
        p: BranchParams = params  # type: ignore[assignment]
        network = BranchedNetwork(student, p.split_at, p.branches, input_shape=input_shape)
        # the distiller's ``student`` is the whole group; the deployed network is one branch of it
        super().__init__(network, teachers, params)

    @property
    def network(self) -> BranchedNetwork:
        return self.student  # type: ignore[return-value]

    def rampup(self, step: Step) -> float:
        return consistency_rampup(step.epoch, self.params.rampup_epochs)  # type: ignore[attr-defined]

    def inference_model(self) -> nn.Module:
        view = self.network.branch_network(self.params.deploy)  # type: ignore[attr-defined]
        view.training = self.training  # the view is out of the tree: keep its flag in step
        return view

    def ensemble_model(self) -> nn.Module:  # pragma: no cover - overridden
        raise NotImplementedError

    def evaluation_models(self) -> dict[str, nn.Module]:
        members = {f"branch{i}": self.network.branch_network(i) for i in range(self.network.num_branches)}
        members["ensemble"] = self.ensemble_model()
        for member in members.values():
            member.training = self.training
        return members


@METHODS.register("one")
class OnTheFlyNativeEnsemble(BranchedDistiller):
    """ONE (Lan et al. 2018): branches on a shared trunk + gated ensemble teacher ``sum_i CE + CE(z_e) + T^2 KL``.

    The student is cut at ``split_at`` (a ``BranchedNetwork``); a gate reads the trunk output::

        g   = softmax(ReLU(BN1d(Linear(GAP(trunk output)))))          (m weights per sample)
        z_e = sum_i g_i z_i
        L   = sum_i CE(z_i, y) + CE(z_e, y) + lambda * w(e) * sum_i T^2 KL_T(z_e || z_i)

    GAP is applied only to 4-D trunk outputs (3-D: mean over the last axis; 2-D vectors, e.g. an
    MLP's hidden layer, go to the Linear as they are).

    Detaching: the OKDDip repository's ONE (``DefangChen/OKDDip``, ``train_one.py`` with
    ``models/*/resnet_one.py``, the re-implementation followed here) does **not** detach ``z_e``: the KL term also trains the
    gate and every branch through the ensemble. We follow it (``detach_targets: false``);
    ``detach_targets: true`` gives the usual "teacher as constant" reading of the paper.

    Defaults: 3 branches (ONE paper; the OKDDip script defaults to 4), split after ``stage2``
    (shared stem + stage1 + stage2 of a CIFAR ResNet), T = 3, lambda = 1, ramp-up over 80 epochs
    (OKDDip ``--length 80``: scale it with the run length), deploy branch 0. That code's KL adds
    1e-7 to the target probabilities; ours does not (the difference is ~1e-7 in the loss).
    """  # noqa: E501

    name = "one"

    def __init__(
        self,
        student: nn.Module,
        teachers=(),
        params: MethodParams | dict | None = None,
        input_shape: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__(student, teachers, params, input_shape=input_shape)
        p: BranchParams = self.params  # type: ignore[assignment]
        width = _trunk_width(self.network, self.network._template, p.split_at, input_shape)  # type: ignore[arg-type]
        self.gate = BranchGate(width, p.branches)
        _keep_out_of_tree(self, "_ensemble", GatedEnsemble(self.network, self.gate))

    def ensemble_model(self) -> nn.Module:
        return self._ensemble  # type: ignore[return-value]

    def forward(self, batch: Batch, step: Step) -> Output:
        p: BranchParams = self.params  # type: ignore[assignment]
        shared, _, logits = self.network.forward_all(batch.image)
        logits = [z.float() for z in logits]
        gate = self.gate(shared.float())
        ensemble = gated_sum(gate, logits)
        target = F.softmax(ensemble / p.temperature, dim=-1)
        if p.detach_targets:
            target = target.detach()
        ramp = self.rampup(step)
        losses = {
            "ce": sum(F.cross_entropy(z, batch.targets) for z in logits),
            "ce_ensemble": F.cross_entropy(ensemble, batch.targets),
            "kl": p.kd_weight * ramp * sum(soft_kl(z, target, p.temperature) for z in logits),
        }
        metrics = {
            "diversity": softmax_diversity(logits),
            "rampup": ramp,
            "gate_max": gate.detach().max(-1).values.mean(),
        }
        return Output(logits[p.deploy], losses, metrics)  # type: ignore[arg-type]


def leave_one_out_kl(logits: list[Tensor], temperature: float, detach_targets: bool = False) -> list[Tensor]:
    """Per branch i: ``T^2 KL_T(t_i || z_i)`` with ``t_i`` the mean of the other branches' logits."""
    m = len(logits)
    terms = []
    for i, z in enumerate(logits):
        target_logits = sum(logits[j] for j in range(m) if j != i) / (m - 1)
        target = F.softmax(target_logits / temperature, dim=-1)  # type: ignore[operator]
        terms.append(soft_kl(z, target.detach() if detach_targets else target, temperature))
    return terms


class CLILRParams(BranchParams):
    backprop_scaling: bool = True


@METHODS.register("cl_ilr")
class CollaborativeLearningILR(BranchedDistiller):
    """CL-ILR (Song & Chai 2018): branches on a shared trunk, each distilled from the mean of the others.

    OKDDip repository form (``train_one.py --avg --bpscale``)::

        t_i = (1/(m-1)) sum_{j != i} z_j                                (logit average)
        L   = sum_i CE(z_i, y) + lambda * w(e) * sum_i T^2 KL_T(t_i || z_i)

    and *backprop rescaling*: the trunk output enters the heads through
    ``scale_gradient(shared, 1/m)`` (identity forward, gradient divided by the number of heads),
    so the trunk receives the average rather than the sum of the heads' gradients
    (``backprop_scaling: false`` turns it off). The paper's ``beta CE + (1 - beta) KL`` weighting
    is replaced by that code's ``CE + lambda KL``.

    Detaching: that code does **not** detach ``t_i`` (branch j also learns from branch i's KL
    term); we follow it (``detach_targets: false``); ``true`` treats targets as constants.

    Defaults: 3 branches (as ``one``; the OKDDip script defaults to 4), split after ``stage2``,
    T = 3, lambda = 1, ramp-up over 80 epochs (``--length 80``), deploy branch 0.
    ``evaluation_models()``: each branch and the plain mean of their logits (``ensemble``).
    """

    name = "cl_ilr"
    Params = CLILRParams

    def __init__(
        self,
        student: nn.Module,
        teachers=(),
        params: MethodParams | dict | None = None,
        input_shape: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__(student, teachers, params, input_shape=input_shape)
        _keep_out_of_tree(self, "_ensemble", BranchEnsemble(self.network))

    def ensemble_model(self) -> nn.Module:
        return self._ensemble  # type: ignore[return-value]

    def forward(self, batch: Batch, step: Step) -> Output:
        p: CLILRParams = self.params  # type: ignore[assignment]
        network = self.network
        m = network.num_branches
        shared = network.run_trunk(batch.image)
        if p.backprop_scaling:
            shared = scale_gradient(shared, 1.0 / m)
        logits = [network.run_head(i, shared)[1].float() for i in range(m)]
        kl = leave_one_out_kl(logits, p.temperature, p.detach_targets)
        ramp = self.rampup(step)
        losses = {
            "ce": sum(F.cross_entropy(z, batch.targets) for z in logits),
            "kl": p.kd_weight * ramp * sum(kl),
        }
        metrics = {"diversity": softmax_diversity(logits), "rampup": ramp}
        return Output(logits[p.deploy], losses, metrics)  # type: ignore[arg-type]


__all__ = [
    "BranchGate",
    "CollaborativeLearningILR",
    "DeepMutualLearning",
    "OnTheFlyNativeEnsemble",
    "consistency_rampup",
    "gated_sum",
    "leave_one_out_kl",
    "mutual_losses",
    "softmax_diversity",
]
