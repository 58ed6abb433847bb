"""How a run finds its place in a multi-node job (docs/gpus-and-clusters.md): Fabric, as kdforge
creates it, takes ranks and the world size from the torchrun or SLURM environment. Simulated on the
CPU (no process group is started); real multi-node runs are not part of CI."""

from __future__ import annotations

import os

import pytest

from kdforge.config import build_config
from kdforge.engine.trainer import _make_fabric

TORCHRUN = {  # the variables torchrun sets: 2 nodes x 2 processes, this is node 1's second process
    "TORCHELASTIC_RUN_ID": "job",
    "WORLD_SIZE": "4",
    "RANK": "3",
    "LOCAL_RANK": "1",
    "GROUP_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "29500",
}
SAVED_MASTER_ADDR = os.environ.get("MASTER_ADDR")
SAVED_SLURM = {name for name in os.environ if name.startswith("SLURM_")}  # a real SLURM job running the tests
SLURM = {  # sbatch --nodes=2 --ntasks-per-node=2, then srun: task 2 runs on the second node
    "SLURM_NTASKS": "4",
    "SLURM_NTASKS_PER_NODE": "2",
    "SLURM_NNODES": "2",
    "SLURM_PROCID": "2",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "1",
    "SLURM_NODELIST": "gpu[07-08]",
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "kd",
}


@pytest.fixture
def clean_env(monkeypatch):
    # Lightning's cluster environments write variables of their own (SLURM's sets MASTER_ADDR and
    # MASTER_PORT); the whole environment is restored so no later test (a real DDP run) inherits them
    saved = dict(os.environ)
    for name in [*TORCHRUN, *SLURM, "LT_NUM_NODES"]:
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def config():
    return build_config(
        {"data": {"name": "digits"}, "student": {"name": "mlp"}, "train": {"accelerator": "cpu", "devices": 2}}
    )


@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_ranks_and_world_size_come_from_the_launcher(clean_env, launcher):
    for name, value in (TORCHRUN if launcher == "torchrun" else SLURM).items():
        clean_env.setenv(name, value)
    clean_env.setenv("LT_NUM_NODES", "2")
    fabric = _make_fabric(config())
    expected_rank = 3 if launcher == "torchrun" else 2
    assert (fabric.world_size, fabric.global_rank, fabric.node_rank) == (4, expected_rank, 1)
    assert fabric.strategy.num_nodes == 2 and type(fabric.strategy).__name__ == "DDPStrategy"
    environment = fabric.strategy.cluster_environment
    assert type(environment).__name__ == ("TorchElasticEnvironment" if launcher == "torchrun" else "SLURMEnvironment")
    assert environment.main_address == ("10.0.0.1" if launcher == "torchrun" else "gpu07")


def test_without_the_node_count_fabric_stops_before_the_rendezvous(clean_env):
    for name, value in TORCHRUN.items():
        clean_env.setenv(name, value)
    fabric = _make_fabric(config())
    with pytest.raises(ValueError, match=r"devices=2. and .num_nodes=1.*world size \(4\)"):
        fabric.launch()


def test_the_simulated_clusters_leave_no_variables_behind():
    """Runs after the tests above (file order): a leaked MASTER_ADDR sent later DDP tests to 'gpu07'."""
    assert os.environ.get("MASTER_ADDR") == SAVED_MASTER_ADDR
    assert not any(name.startswith("SLURM_") for name in os.environ if name not in SAVED_SLURM)
