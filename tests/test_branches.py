"""Groups of networks: shared-trunk branches cut from zoo models, fresh copies, gradient scaling."""

import pytest
import torch
from torch import nn

from kdforge.core.errors import ConfigError
from kdforge.models import create
from kdforge.models.branches import BranchedNetwork, check_sequential, fresh_copy, scale_gradient, split_index


@pytest.mark.parametrize(
    "name,split,shape",
    [
        ("resnet8", "stage2", (3, 16, 16)),
        ("vgg8", "stage2", (3, 16, 16)),
        ("wrn_16_2", "stage1", (3, 16, 16)),
        ("mobilenetv2", "stage3", (3, 16, 16)),
        ("mlp", "stage1", (1, 8, 8)),
    ],
)
def test_branches_share_the_trunk_and_deploy_as_the_zoo_model(name, split, shape):
    torch.manual_seed(0)
    model = create(name, 10, in_channels=shape[0], input_size=shape[1:])
    net = BranchedNetwork(model, split, 3, input_shape=shape).eval()
    x = torch.randn(4, *shape)
    shared, features, logits = net.forward_all(x)
    assert len(features) == len(logits) == 3
    assert not torch.allclose(logits[0], logits[1])  # heads 1.. are re-initialised, not clones
    # trunk parameters are counted once: total = trunk + 3 heads
    trunk = sum(p.numel() for p in net.trunk.parameters())
    head = sum(p.numel() for p in net.heads[0].parameters())
    assert sum(p.numel() for p in net.parameters()) == trunk + 3 * head
    for index in range(3):
        view = net.branch_network(index).eval()
        assert type(view) is type(model)
        torch.testing.assert_close(view(x), logits[index])
        fresh = create(name, 10, in_channels=shape[0], input_size=shape[1:])
        fresh.load_state_dict(view.state_dict())  # strict: same keys and shapes as the zoo model
        torch.testing.assert_close(fresh.eval()(x), logits[index])
        # the view shares, not copies, the group's parameters
        assert {id(p) for p in view.parameters()} <= {id(p) for p in net.parameters()}


def test_branch_view_does_not_inherit_hooks_on_the_template():
    model = create("resnet8", 10)
    net = BranchedNetwork(model, "stage2", 2)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    net.branch_network(1)(torch.randn(1, 3, 16, 16))
    assert calls == []


def test_split_points_and_errors():
    model = create("resnet8", 10)
    assert split_index(model, "stage2") == 2
    with pytest.raises(ConfigError, match="not a top-level module"):
        BranchedNetwork(model, "stage9", 2)
    with pytest.raises(ConfigError, match="leaves nothing"):
        BranchedNetwork(model, "classifier", 2)
    with pytest.raises(ConfigError, match="at least 1"):
        BranchedNetwork(model, "stage2", 0)


class NotSequential(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        return self.b(self.a(x) + x)  # a skip connection across children


def test_models_whose_forward_is_not_their_children_in_order_are_refused():
    with pytest.raises(ConfigError, match="not the sequence of its top-level modules"):
        check_sequential(NotSequential(), (4,))
    check_sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), (4,))


def test_fresh_copy_redraws_every_parameter_and_is_seedable():
    model = create("resnet8", 10)
    a, b = fresh_copy(model, seed=1), fresh_copy(model, seed=1)
    c = fresh_copy(model, seed=2)
    for (name, p), q, r, s in zip(model.named_parameters(), a.parameters(), b.parameters(), c.parameters()):
        torch.testing.assert_close(q, r)
        if "conv" in name or "classifier.weight" in name:
            assert not torch.equal(p, q) and not torch.equal(q, s), name


def test_scale_gradient_is_identity_forward_and_scales_backward():
    x = torch.randn(5, requires_grad=True)
    y = scale_gradient(x, 0.25)
    torch.testing.assert_close(y, x)
    (y * torch.arange(5.0)).sum().backward()
    torch.testing.assert_close(x.grad, 0.25 * torch.arange(5.0))
