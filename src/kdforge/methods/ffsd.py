"""FFSD: online distillation with feature fusion and self-distillation (Li, Lin, Wang, Wu, Tian,
Shao, Ji; IEEE TNNLS, arXiv 2103.14473), following the official code ``SJLeo/FFSD``.

Networks: ``m`` students (student 0 is the network given, the others fresh copies) and a
**student leader** (a fresh copy), the only network deployed. Taps at ``layers`` (default
``stage1..stage3``); ``F^k`` is the map at level ``k``, ``F^L`` the last one. With
``A(F)`` = channel mean of ``F^2``, ``n(.)`` = flatten + L2-normalise per sample and
``D(u, v) = mean((n(u) - n(v))^2)``:

* students: ``CE(z_i) + T^2 mean_{j != i} KL_T(z_j.detach || z_i)``, and for ``i >= 1``
  ``lambda_div * Div(A(F_i^L), A(F_{i-1}^L).detach) + lambda_div * SD_i``;
* fusion module (input: the students' detached last maps, concatenated): depthwise 3x3 + BN +
  ReLU -> 1x1 conv (mC -> C) + BN + ReLU (the *fused feature*) -> GAP -> FC;
  loss ``CE(z_f) + T^2 KL_T(mean_i z_i .detach || z_f)``;
* leader: ``CE(z_L) + T^2 KL_T(z_f.detach || z_L) + lambda_fus * [D(A(F_L^L), A(fused).detach)
  + D(A(trans(F_L^L)), A(concat of student maps, detached)) + SD_L]`` where ``trans`` is the
  leader's trans-fusion head (depthwise 3x3 + BN + ReLU -> 1x1 conv C -> mC + BN + ReLU);
* self-distillation decoders (one per student ``i >= 1``, one for the leader): blocks of
  ConvTranspose2d(3x3) + BN + ReLU mapping the last map back to the shallower levels' shapes.
  ``SD_i = sum_k D(A(F_i^k), A(dec_i(shift(F_{i-1}^L))_k))`` (decoder in eval mode, output
  detached) and ``SD_L`` the same for the leader's decoder fed with the fused feature. The
  decoders' own loss ``lambda_sd * sum_k [D(dec(F^L.detach)_k, F^k.detach) + D(A(.), A(.))]``
  reaches only the decoders, which have their own Adam optimizer (``optimizer_groups``).

Diversity (``Div``): from the previous student's map, ``y = n(A)`` with raw norm ``r = ||A||``
and ``tau`` = the ``int(N/3)``-th smallest entry of ``y``, the target is
``(r/2 - y) sign(y - tau) + r/2``: ``y`` below ``tau``, ``r - y`` above it, ``r/2`` at ``tau``
itself (the positions the previous student attends to most are inverted). ``Div(x, y)`` is the
mean squared difference between ``n(x)`` and that target. ``shift(F)`` adds
``(target - y) * r / C`` to every channel of ``F`` (the "diversity-shifted" input of the SD
target). All three lambdas warm up as ``lambda * exp(-5 (1 - e/5)^2)`` for ``e <= 5`` with ``e``
the 1-based epoch (the reference starts counting at epoch 1).

Every cross-network input is detached, so summing all the terms and back-propagating once gives
each network exactly the gradient of its own loss in the reference's sequential updates.
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
from kdforge.methods.base import METHODS, Distiller, MethodParams, OptimizerGroup, Output, Step
from kdforge.methods.common import attention_map
from kdforge.methods.features import full_precision
from kdforge.methods.losses import kd_loss
from kdforge.models import FeatureTap
from kdforge.models.branches import fresh_copy, reinitialise


class FFSDParams(MethodParams):
    students: int = Field(2, ge=1, description="m, the number of students beside the leader")
    temperature: float = Field(2.0, gt=0)
    lambda_div: float = Field(1e-5, ge=0, description="diversity and students' self-distillation")
    lambda_sd: float = Field(1000.0, ge=0, description="decoders' own training loss")
    lambda_fus: float = Field(10.0, ge=0, description="leader's fusion, trans-fusion and SD terms")
    warmup_epochs: float = Field(5.0, ge=0, description="lambda warm-up length (0: none)")
    layers: list[str] = Field(default_factory=lambda: ["stage1", "stage2", "stage3"], min_length=1)
    diversity_fraction: float = Field(1 / 3, gt=0, lt=1, description="tau = the int(N*fraction)-th smallest")
    fusion_weight_decay: float | None = Field(1e-5, ge=0, description="None: the run's weight decay")
    decoder_optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    decoder_lr: float = Field(1e-3, gt=0)
    decoder_weight_decay: float | None = Field(None, ge=0, description="None: the run's weight decay")


# ---------------------------------------------------------------------- loss pieces
def normalised(x: Tensor) -> Tensor:
    """``n(x)``: flatten per sample and L2-normalise."""
    return F.normalize(x.float().flatten(1), dim=1)


def feature_distance(u: Tensor, v: Tensor) -> Tensor:
    """``D(u, v) = mean((n(u) - n(v))^2)``."""
    return (normalised(u) - normalised(v)).pow(2).mean()


def attention_distance(u: Tensor, v: Tensor) -> Tensor:
    """``D(A(u), A(v))`` with ``A`` the channel mean of squares."""
    return (attention_map(u) - attention_map(v)).pow(2).mean()


def inverted_target(attention: Tensor, fraction: float = 1 / 3) -> tuple[Tensor, Tensor, Tensor]:
    """``(target, y, r)`` for a raw attention map (B x ...): ``y = n(A)``, ``r = ||A||`` (B x 1) and
    ``target = (r/2 - y) sign(y - tau) + r/2`` with ``tau`` the ``int(N*fraction)``-th smallest ``y``."""
    flat = attention.float().flatten(1)
    norm = flat.norm(dim=1, keepdim=True)
    y = F.normalize(flat, dim=1)
    k = max(1, int(y.shape[1] * fraction + 1e-9))
    tau = y.kthvalue(k, dim=1, keepdim=True).values
    target = (norm / 2 - y) * torch.sign(y - tau) + norm / 2
    return target, y, norm


def diversity_loss(current: Tensor, previous: Tensor, fraction: float = 1 / 3) -> Tensor:
    """``mean((n(A_i) - target(A_{i-1}))^2)`` on raw attention maps (the previous one detached)."""
    target, _, _ = inverted_target(previous.detach(), fraction)
    return (normalised(current) - target).pow(2).mean()


def diversity_shift(feature: Tensor, fraction: float = 1 / 3) -> Tensor:
    """The previous student's map moved towards its inverted attention: ``F + (target - y) r / C``."""
    feature = feature.detach().float()
    attention = feature.pow(2).mean(1)
    target, y, norm = inverted_target(attention, fraction)
    shift = ((target - y) * norm / feature.shape[1]).view(feature.shape[0], 1, *feature.shape[2:])
    return feature + shift


def warmup_factor(epoch: int, length: float) -> float:
    """``exp(-5 (1 - e/length)^2)`` for the 1-based epoch ``e <= length``, else 1: the shared
    consistency ramp evaluated at ``e = epoch + 1`` (the reference counts epochs from 1)."""
    return consistency_rampup(epoch + 1, length)


# ---------------------------------------------------------------------- modules
def _bn_relu(channels: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(channels), nn.ReLU()]


class FusionModule(nn.Module):
    """Fuse m concatenated C-channel maps: depthwise 3x3 -> 1x1 to C (the fused feature) -> GAP -> FC."""

    def __init__(self, channels: int, members: int, num_classes: int) -> None:
        super().__init__()
        wide = channels * members
        self.mix = nn.Sequential(nn.Conv2d(wide, wide, 3, padding=1, groups=wide, bias=False), *_bn_relu(wide))
        self.reduce = nn.Sequential(nn.Conv2d(wide, channels, 1, bias=False), *_bn_relu(channels))
        self.classifier = nn.Linear(channels, num_classes)
        reinitialise(self)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        fused = self.reduce(self.mix(x))
        return self.classifier(fused.mean((2, 3))), fused


class TransFusion(nn.Module):
    """The leader's head: depthwise 3x3 + BN + ReLU -> 1x1 conv C -> mC + BN + ReLU."""

    def __init__(self, channels: int, members: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
            *_bn_relu(channels),
            nn.Conv2d(channels, channels * members, 1, bias=False),
            *_bn_relu(channels * members),
        )
        reinitialise(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def _upsampling(size_in: int, size_out: int, what: str) -> tuple[int, int]:
    """(stride, output_padding) of a 3x3, padding-1 transposed conv taking size_in to size_out."""
    stride = max(1, round(size_out / size_in))
    extra = size_out - (size_in - 1) * stride - 1
    if not 0 <= extra < stride:
        raise ConfigError(
            f"ffsd: cannot decode {what} from size {size_in} to {size_out} with a 3x3 transposed "
            "convolution; choose 'layers' whose spatial sizes shrink by an integer factor"
        )
    return stride, extra


class Decoder(nn.Module):
    """Self-distillation decoder: the last tapped map back to every shallower tapped shape.

    ``shapes`` are the tapped (C, H, W), shallow first; one ConvTranspose2d(3x3) + BN + ReLU
    block per level. ``forward`` returns the pseudo features shallow first (one per ``shapes[:-1]``).
    """

    def __init__(self, shapes: Sequence[Sequence[int]]) -> None:
        super().__init__()
        blocks = []
        for deep, shallow in zip(reversed(shapes[1:]), reversed(shapes[:-1])):
            (c_in, h_in, w_in), (c_out, h_out, w_out) = deep, shallow
            stride_h, pad_h = _upsampling(h_in, h_out, "height")
            stride_w, pad_w = _upsampling(w_in, w_out, "width")
            blocks.append(
                nn.Sequential(
                    nn.ConvTranspose2d(
                        c_in,
                        c_out,
                        3,
                        stride=(stride_h, stride_w),
                        padding=1,
                        output_padding=(pad_h, pad_w),
                        bias=False,
                    ),
                    *_bn_relu(c_out),
                )
            )
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> list[Tensor]:
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs[::-1]


class Members(nn.Module):
    """Evaluation wrapper: ``ensemble`` (mean of the students' logits) or ``fusion`` (the fusion
    classifier on the students' last maps)."""

    def __init__(
        self, students: Sequence[nn.Module], taps: Sequence[FeatureTap], layer: str, fusion: FusionModule | None = None
    ) -> None:
        super().__init__()
        self.students = nn.ModuleList(students)
        self.fusion = fusion
        object.__setattr__(self, "_taps", list(taps))
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        logits = [net(x) for net in self.students]
        if self.fusion is None:
            return torch.stack(logits).mean(0)
        maps = torch.cat([tap.features[self.layer] for tap in self._taps], dim=1)  # type: ignore[attr-defined]
        return self.fusion(maps)[0]


@METHODS.register("ffsd")
class FFSD(Distiller):
    """FFSD (Li et al. TNNLS): m mutual students, fusion module, diversity + self-distillation; deploys the leader."""

    name = "ffsd"
    Params = FFSDParams

    def __init__(
        self,
        student: nn.Module,
        teachers: Sequence[nn.Module] = (),
        params: FFSDParams | dict | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(student, teachers, params)
        p: FFSDParams = self.params  # type: ignore[assignment]
        self.others = nn.ModuleList([fresh_copy(student) for _ in range(p.students - 1)])
        self.leader = fresh_copy(student)
        self.layers = list(dict.fromkeys(p.layers))
        self.taps = [FeatureTap(net, self.layers) for net in self.students]
        self.leader_tap = FeatureTap(self.leader, self.layers)

        shapes, num_classes = self._probe(input_shape or (3, 32, 32))
        self.shapes = shapes
        channels = shapes[-1][0]
        self.fusion = FusionModule(channels, p.students, num_classes)
        self.trans_fusion = TransFusion(channels, p.students)
        self.student_decoders = nn.ModuleList([Decoder(shapes) for _ in range(p.students - 1)])
        self.leader_decoder = Decoder(shapes)

    @property
    def students(self) -> list[nn.Module]:
        return [self.student, *self.others]

    def _probe(self, input_shape: Sequence[int]) -> tuple[list[tuple[int, int, int]], int]:
        net, tap = self.student, self.taps[0]
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                logits = net(torch.zeros(2, *input_shape))
            features = dict(tap.features)
        finally:
            net.train(was_training)
        shapes = []
        for name in self.layers:
            value = features.get(name)
            if not isinstance(value, Tensor) or value.ndim != 4:
                raise ConfigError(
                    f"ffsd: layer '{name}' of {type(net).__name__} is not a B x C x H x W feature map; "
                    "choose convolutional stages in method.layers"
                )
            shapes.append(tuple(int(s) for s in value.shape[1:]))
        return shapes, int(logits.shape[-1])

    # ------------------------------------------------------------------ contract
    def forward(self, batch: Batch, step: Step) -> Output:
        p: FFSDParams = self.params  # type: ignore[assignment]
        x, y = batch.image, batch.targets
        students = self.students
        logits, maps = [], []
        for net, tap in zip(students, self.taps):
            logits.append(net(x))
            maps.append([tap.features[name] for name in self.layers])
        leader_logits = self.leader(x)
        leader_maps = [self.leader_tap.features[name] for name in self.layers]
        fusion_input = torch.cat([m[-1].detach() for m in maps], dim=1)
        fusion_logits, fused = self.fusion(fusion_input)
        trans = self.trans_fusion(leader_maps[-1])

        warm = warmup_factor(step.epoch, p.warmup_epochs)
        lam_div, lam_sd, lam_fus = p.lambda_div * warm, p.lambda_sd * warm, p.lambda_fus * warm
        T = p.temperature
        m = len(students)
        with full_precision(leader_logits):
            z = [v.float() for v in logits]
            zero = z[0].new_zeros(())
            ce, mutual, diversity, sd_students = zero, zero, zero, zero
            for i in range(m):
                ce = ce + F.cross_entropy(z[i], y)
                if m > 1:
                    mutual = mutual + sum(kd_loss(z[i], z[j].detach(), T) for j in range(m) if j != i) / (m - 1)
                if i >= 1:
                    previous = maps[i - 1][-1].detach()
                    diversity = diversity + diversity_loss(
                        maps[i][-1].float().pow(2).mean(1), previous.float().pow(2).mean(1), p.diversity_fraction
                    )
                    shifted = diversity_shift(previous, p.diversity_fraction)
                    pseudo = self._decode_targets(self.student_decoders[i - 1], shifted)
                    sd_students = sd_students + self._sd_loss(maps[i], pseudo)

            zf, zl = fusion_logits.float(), leader_logits.float()
            ensemble = torch.stack(z).mean(0).detach()
            leader_pseudo = self._decode_targets(self.leader_decoder, fused.detach())
            losses = {
                "ce_students": ce,
                "mutual": mutual,
                "diversity": lam_div * diversity,
                "sd_students": lam_div * sd_students,
                "fusion_ce": F.cross_entropy(zf, y),
                "fusion_kd": kd_loss(zf, ensemble, T),
                "leader_ce": F.cross_entropy(zl, y),
                "leader_kd": kd_loss(zl, zf.detach(), T),
                "leader_fusion": lam_fus * attention_distance(leader_maps[-1], fused.detach()),
                "leader_trans_fusion": lam_fus * attention_distance(trans, fusion_input),
                "leader_sd": lam_fus * self._sd_loss(leader_maps, leader_pseudo),
                "decoders": lam_sd * self._decoder_loss(),
            }
        return Output(leader_logits, losses, {"warmup": warm})

    # ------------------------------------------------------------------ self-distillation
    def _decode_targets(self, decoder: Decoder, source: Tensor) -> list[Tensor]:
        """Pseudo shallow features from ``decoder`` in eval mode, without gradient (targets)."""
        was_training = decoder.training
        decoder.eval()
        try:
            with torch.no_grad():
                return [t.detach() for t in decoder(source.detach().float())]
        finally:
            decoder.train(was_training)

    @staticmethod
    def _sd_loss(maps: Sequence[Tensor], pseudo: Sequence[Tensor]) -> Tensor:
        """``sum_k D(A(F^k), A(pseudo_k))`` over the shallower levels."""
        terms = [attention_distance(f, t) for f, t in zip(maps, pseudo)]
        return torch.stack(terms).sum() if terms else maps[-1].new_zeros(()).float()

    def _decoder_loss(self) -> Tensor:
        """Each decoder reconstructs its own network's shallow maps from its detached last map."""
        pairs = [(dec, tap) for dec, tap in zip(self.student_decoders, self.taps[1:])]
        pairs.append((self.leader_decoder, self.leader_tap))
        terms = []
        for decoder, tap in pairs:
            maps = [tap.features[name].detach().float() for name in self.layers]
            for output, target in zip(decoder(maps[-1]), maps[:-1]):
                terms.append(feature_distance(output, target) + attention_distance(output, target))
        if not terms:
            return self.leader_tap.features[self.layers[-1]].new_zeros(()).float()
        return torch.stack(terms).sum()

    # ------------------------------------------------------------------ engine hooks
    def decoder_parameters(self) -> list[nn.Parameter]:
        return [*self.student_decoders.parameters(), *self.leader_decoder.parameters()]

    def optimizer_groups(self) -> list[OptimizerGroup]:
        """SGD (the run's optimizer) for the networks and the trans-fusion head, the fusion module
        with its own weight decay (1e-5), and the decoders with Adam (lr 1e-3) as the reference."""
        p: FFSDParams = self.params  # type: ignore[assignment]
        fusion = [q for q in self.fusion.parameters() if q.requires_grad]
        decoders = [q for q in self.decoder_parameters() if q.requires_grad]
        taken = {id(q) for q in fusion + decoders}
        main = [q for q in self.parameters() if q.requires_grad and id(q) not in taken]
        decoder_settings: dict = {"name": p.decoder_optimizer, "lr": p.decoder_lr}
        if p.decoder_weight_decay is not None:
            decoder_settings["weight_decay"] = p.decoder_weight_decay
        groups = [
            OptimizerGroup("main", main),
            OptimizerGroup(
                "fusion", fusion, None if p.fusion_weight_decay is None else {"weight_decay": p.fusion_weight_decay}
            ),
        ]
        if decoders:
            groups.append(OptimizerGroup("decoders", decoders, decoder_settings))
        return groups

    def inference_model(self) -> nn.Module:
        return self.leader

    def evaluation_models(self) -> dict[str, nn.Module]:
        students = self.students
        members: dict[str, nn.Module] = {f"student{i}": net for i, net in enumerate(students)}
        members["leader"] = self.leader
        members["fusion"] = Members(students, self.taps, self.layers[-1], self.fusion)
        members["ensemble"] = Members(students, self.taps, self.layers[-1])
        for member in members.values():  # evaluation restores each member's own flag afterwards
            member.training = self.training
        return members


__all__ = [
    "FFSD",
    "Decoder",
    "FFSDParams",
    "FusionModule",
    "TransFusion",
    "attention_distance",
    "diversity_loss",
    "diversity_shift",
    "feature_distance",
    "inverted_target",
    "warmup_factor",
]
