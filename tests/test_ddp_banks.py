"""CRD and HKD memory banks under DDP: two gloo processes keep the banks of one process.

Each rank sees half of a global batch. DistributedDataParallel broadcasts rank 0's buffers at
every forward (its default), so before the banks were synchronised, bank rows seen only by rank 1
were overwritten by rank 0's copy at the next step and never moved. Here both ranks run N steps and
their banks are compared with those of one process that saw each global batch whole.
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from kdforge.data.batch import Batch
from kdforge.methods import METHODS, Step
from kdforge.methods.contrastive import NEGATIVES_KEY
from kdforge.models import create

SAMPLES, GLOBAL_BATCH, STEPS, NEGATIVES = 64, 16, 4, 8


def mlp(hidden):
    """BatchNorm-free networks, so that split batches give the same gradients as whole ones."""
    return create("mlp", num_classes=4, in_channels=1, input_size=(4, 4), hidden=hidden)


def build(name):
    torch.manual_seed(0)
    student, teacher = mlp([16]), mlp([24])
    params = {"num_negatives": NEGATIVES, "student_layers": ["stage1"], "feature_dim": 8}
    torch.manual_seed(1)
    return METHODS.get(name)(
        student, [teacher], params, input_shape=(1, 4, 4), num_samples=SAMPLES, train_labels=torch.arange(SAMPLES) % 4
    )


def global_batches():
    """STEPS global batches: images, labels, distinct indices and fixed negatives."""
    g = torch.Generator().manual_seed(2)
    images = torch.randn(SAMPLES, 1, 4, 4, generator=g)
    labels = torch.arange(SAMPLES) % 4
    out = []
    for step in range(STEPS):  # noqa: B007
        index = torch.randperm(SAMPLES, generator=g)[:GLOBAL_BATCH]
        negatives = (index.unsqueeze(1) + torch.randint(1, SAMPLES, (GLOBAL_BATCH, NEGATIVES), generator=g)) % SAMPLES
        out.append((images[index], labels[index], index, negatives))
    return out


def train(model, batches, rank=0, world=1):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    for step, (x, y, index, negatives) in enumerate(batches):
        part = slice(rank * len(index) // world, (rank + 1) * len(index) // world)
        batch = Batch({"image": x[part]}, y[part], index[part], extras={NEGATIVES_KEY: negatives[part]})
        optimizer.zero_grad()
        out = model(batch, Step(epoch=0, epochs=1, global_step=step, total_steps=STEPS))
        out.loss.backward()
        optimizer.step()
    return inner.memory_student.memory.clone(), inner.memory_teacher.memory.clone()


def worker(rank, world, port, name, result_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        distiller = build(name).train()
        model = DistributedDataParallel(distiller)  # broadcast_buffers=True, as Fabric's DDP
        banks = train(model, global_batches(), rank, world)
        torch.save(banks, f"{result_file}.{rank}")
        # both ranks finish their collectives before either tears gloo down: a rank that exits
        # while the other still has gloo threads in flight can abort with std::terminate
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", ["crd", "hkd"])
def test_banks_under_two_gloo_processes_equal_one_process(name, tmp_path):
    result = tmp_path / "banks"
    for attempt in range(3):
        try:
            mp.start_processes(
                worker, args=(2, free_port(), name, str(result)), nprocs=2, join=True, start_method="spawn"
            )
            break
        except mp.ProcessExitedException as error:
            # a rank killed by a signal (gloo's teardown aborting on a loaded machine, or a port
            # taken between free_port() and bind) is infrastructure, not a wrong bank; a Python
            # exception inside a rank raises ProcessRaisedException and is not retried
            if error.signal_name is None or attempt == 2:
                raise
    rank0 = torch.load(f"{result}.0")
    rank1 = torch.load(f"{result}.1")
    single = train(build(name).train(), global_batches())
    seen = torch.cat([b[2] for b in global_batches()]).unique()
    initial = build(name)
    for which in range(2):
        assert torch.equal(rank0[which], rank1[which]), "the ranks' banks differ"
        # every row of a global batch moved, including those only rank 1 saw
        moved = (
            (rank0[which][seen] - (initial.memory_student, initial.memory_teacher)[which].memory[seen]).abs().amax(1)
        )
        assert bool((moved > 1e-6).all())
        if name == "crd":  # no batch-level term: two half batches give exactly one process's banks
            torch.testing.assert_close(rank0[which], single[which], rtol=1e-4, atol=1e-5)
    if name == "hkd":
        # HKD's graph term is over the batch each rank sees, so weights drift from one process by
        # design; the banks still hold one row per sample, moved by every rank's samples
        assert not torch.equal(rank0[0][seen], initial.memory_student.memory[seen])
