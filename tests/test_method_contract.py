"""The Distiller contract, checked for every registered method built from its defaults.

Each method is built as ``kdforge train`` builds it (recipe path, resnet8 student, resnet14
teachers) and takes one optimizer step on a tiny batch: every loss term is finite, the gradient
reaches the student, the teachers get no gradient and do not move, teachers stay in eval mode,
and the method has its documentation page. A method added to the package (or installed as a
plugin and registered) is checked with no edit here.
"""

from pathlib import Path

import pytest
import torch
from conftest import build_method

from kdforge.data.batch import Batch
from kdforge.methods import METHODS, Step

DOCS = Path(__file__).resolve().parents[1] / "docs" / "methods"


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_honours_the_contract(name, toy_data):
    train, info, normalised = toy_data
    distiller = build_method(name, train, info)
    teachers_before = [p.detach().clone() for p in distiller.teachers.parameters()]
    teacher_buffers = [b.detach().clone() for b in distiller.teachers.buffers()]
    groups = distiller.optimizer_groups()
    assert groups and all(g.parameters for g in groups), f"{name}: no trainable parameters"
    optimizers = [torch.optim.SGD(g.parameters, lr=0.01) for g in groups]

    index = torch.arange(16)
    batch = Batch({"image": normalised[index]}, train.labels[index], index)
    for _ in range(distiller.batch_replays):
        out = distiller(batch, Step(epoch=1, epochs=4, global_step=10, total_steps=40, lr=0.01))
        assert out.losses, f"{name}: no loss term"
        for key, value in out.losses.items():
            assert value.dim() == 0 and torch.isfinite(value), f"{name}: loss term {key} = {value}"
        assert out.logits.shape == (16, info.num_classes)
        for opt in optimizers:
            opt.zero_grad()
        out.loss.backward()
        student_grads = [p.grad for p in distiller.inference_model().parameters() if p.grad is not None]
        assert student_grads and any(float(g.abs().sum()) > 0 for g in student_grads), (
            f"{name}: no gradient reaches the deployed network"
        )
        assert all(p.grad is None for p in distiller.teachers.parameters()), f"{name}: a teacher got a gradient"
        for opt in optimizers:
            opt.step()
        after = getattr(distiller, "after_optimizer_step", None)
        if after is not None:
            after(Step())

    assert all(not t.training for t in distiller.teachers), f"{name}: a teacher left eval mode"
    assert all(torch.equal(a, b) for a, b in zip(teachers_before, distiller.teachers.parameters())), (
        f"{name}: a teacher's weights moved"
    )
    assert all(torch.equal(a, b) for a, b in zip(teacher_buffers, distiller.teachers.buffers())), (
        f"{name}: a teacher's buffers (BatchNorm statistics) moved"
    )


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_has_a_documentation_page(name):
    cls = METHODS.get(name)
    if not cls.__module__.startswith("kdforge."):
        pytest.skip(f"{name} comes from a plugin; its package documents it")
    page = DOCS / f"{name}.md"
    assert page.is_file(), f"docs/methods/{name}.md is missing"
    text = page.read_text()
    assert text.startswith(f"# `{name}`"), f"docs/methods/{name}.md must start with '# `{name}`'"
    assert cls.__doc__ and cls.__doc__.strip(), f"{name}: the class needs a docstring (kdforge list shows it)"
