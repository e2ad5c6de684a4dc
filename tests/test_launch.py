"""Every launcher a cluster uses forms one job (pipeline/launch.py): the torch variables each one's tasks end up
with, and the one-line refusal of a launch that cannot be joined. Across real hosts: tests/test_launchers.py."""

import os
import shutil
import subprocess

import pytest

from pipeline import launch, train
from pipeline.launch import LaunchError, detect

# A task of `srun -N 2 -n 4` in job 1234, as SLURM 22.05 sets its variables (seen on the test cluster).
SLURM_TASK = {
    "SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
    "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NODELIST": "gpu[07-08]",
    "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
}  # fmt: skip
# Rank 2 of `mpirun -np 4 -H a:2,b:2` (Open MPI 4.1).
OPEN_MPI_RANK = {
    "OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_MCA_ess_base_jobid": "1031143425",
}  # fmt: skip


def torch_variables(launch_: launch.Launch) -> dict:
    return {k: launch_.variables[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}


def test_plain_python_is_a_one_process_job():
    found = detect({})
    assert found.launcher == "none"
    assert (found.rank, found.world_size) == (0, 1)
    assert found.variables["MASTER_ADDR"] == "127.0.0.1"
    assert int(found.variables["MASTER_PORT"]) > 0


def test_torchrun_and_deepspeeds_launcher_are_taken_as_they_are():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_SIZE": "4", "MASTER_ADDR": "10.0.0.1",
           "MASTER_PORT": "29600"}  # fmt: skip
    found = detect(env)
    assert found.launcher == "torch"
    assert torch_variables(found) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    assert (found.variables["MASTER_ADDR"], found.variables["MASTER_PORT"]) == ("10.0.0.1", "29600")
    # torchrun inside an srun step: torchrun's variables win.
    assert detect({**SLURM_TASK, **env}).launcher == "torch"


def test_an_srun_task_joins_its_step():
    found = detect(SLURM_TASK)
    assert found.launcher == "SLURM"
    assert torch_variables(found) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    # The first host of the step's node list; a port from the job id, the same on every node.
    assert (found.variables["MASTER_ADDR"], found.variables["MASTER_PORT"]) == ("gpu07", str(15000 + 1234))
    # MASTER_ADDR and MASTER_PORT win over both.
    mine = detect({**SLURM_TASK, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "23456"})
    assert (mine.variables["MASTER_ADDR"], mine.variables["MASTER_PORT"]) == ("10.1.2.3", "23456")


def test_a_process_of_a_slurm_allocation_that_srun_did_not_start_is_refused():
    """`python pipeline/train.py` in an sbatch script: SLURM_NTASKS says 8 tasks, this is not one of them."""
    batch = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "n[1-2]"}
    with pytest.raises(LaunchError) as refused:
        detect(batch)
    line = str(refused.value)
    assert line.startswith("SLURM_NTASKS=8 (job 77), but this process is not a task of a job step")
    assert "start one task per GPU with srun" in line
    assert "\n" not in line
    # One task allocated: a one-process job.
    assert detect({**batch, "SLURM_NTASKS": "1"}).world_size == 1


def test_mpirun_ranks_join_one_job():
    found = detect({**OPEN_MPI_RANK, "MASTER_ADDR": "node-a"})
    assert found.launcher == "Open MPI"
    assert torch_variables(found) == {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
    assert found.variables["MASTER_ADDR"] == "node-a"
    assert found.variables["MASTER_PORT"] == str(15000 + 1031143425 % 40000)
    # Every rank on this node: rank 0 is here too.
    one_node = {**OPEN_MPI_RANK, "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    assert detect(one_node).variables["MASTER_ADDR"] == "127.0.0.1"
    # MPICH and Intel MPI (Hydra's PMI variables), MVAPICH.
    pmi = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}
    assert torch_variables(detect(pmi)) == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    mv2 = {"MV2_COMM_WORLD_RANK": "0", "MV2_COMM_WORLD_SIZE": "2", "MV2_COMM_WORLD_LOCAL_RANK": "0",
           "MV2_COMM_WORLD_LOCAL_SIZE": "1", "MASTER_ADDR": "10.0.0.5"}  # fmt: skip
    assert detect(mv2).launcher == "MVAPICH"
    assert detect(mv2).variables["MASTER_ADDR"] == "10.0.0.5"


def test_mpirun_across_nodes_without_master_addr_is_refused():
    with pytest.raises(LaunchError) as refused:
        detect(OPEN_MPI_RANK)
    line = str(refused.value)
    assert line.startswith("Open MPI started 4 ranks on several nodes (OMPI_COMM_WORLD_SIZE=4, ")
    assert "OMPI_COMM_WORLD_LOCAL_SIZE=2" in line
    assert "mpirun -x MASTER_ADDR=<first host>" in line
    assert ".deepspeed_env" in line
    assert "\n" not in line


def test_half_a_torch_launch_is_refused():
    with pytest.raises(LaunchError, match="WORLD_SIZE=4 but no RANK in the environment: start the job with torchrun"):
        detect({"WORLD_SIZE": "4", "MASTER_ADDR": "x"})


@pytest.mark.parametrize(
    "nodelist, first",
    [("node[0-1]", "node0"), ("gpu[07-09,12],cpu3", "gpu07"), ("n[7,3-4]", "n7"), ("rack[1-2]-n[03-04]", "rack1-n03"),
     ("login1", "login1"), ("a[08-10],b", "a08")],
)  # fmt: skip
def test_the_first_host_of_a_node_list_is_scontrols(tmp_path, nodelist, first):
    assert launch.first_host(nodelist) == first
    # The oracle: SLURM's own parser (scontrol reads a configuration first, any will do).
    assert shutil.which("scontrol"), "scontrol not found: make test installs slurm-wlm"
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=t\nSlurmctldHost=localhost\nNodeName=n1\nPartitionName=p Nodes=n1\n")
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True,
                           env={"SLURM_CONF": str(conf), "PATH": os.environ["PATH"]})  # fmt: skip
    assert hosts.stdout.split()[0] == first


def test_tasks_per_node_and_one_gpu_per_local_rank():
    assert [launch.tasks_on_this_node({"SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": str(i)})
            for i in range(4)] == [2, 2, 2, 1]  # fmt: skip
    assert [launch.gpu_index(r, 8, 8) for r in range(8)] == list(range(8))
    # --gpus-per-task: each task sees its own GPU as device 0.
    assert launch.gpu_index(5, 8, 1) == 0
    with pytest.raises(LaunchError, match="8 ranks on this node but 4 GPUs visible"):
        launch.gpu_index(5, 8, 4)


def test_child_processes_leave_every_launchers_variables_behind():
    env = {**SLURM_TASK, **OPEN_MPI_RANK, "RANK": "1", "LOCAL_SIZE": "2", "PMI_RANK": "1", "PATH": "/bin",
           "SLURM_CONF": "/etc/slurm/slurm.conf"}  # fmt: skip
    assert launch.without_launcher(env) == {"PATH": "/bin"}


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_train_py_refuses_a_launch_it_cannot_join_before_any_work(monkeypatch, capsys, rank, printed):
    """One line, from the launcher's task 0 only, and exit status 2, before the configuration is even read."""
    for name in (*launch.LAUNCHER_VARIABLES, *SLURM_TASK):
        monkeypatch.delenv(name, raising=False)
    for name, value in {**OPEN_MPI_RANK, "OMPI_COMM_WORLD_RANK": rank}.items():
        monkeypatch.setenv(name, value)
    assert train.main(["--deepspeed_config", "missing.json", "--data-dir", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert (err.count("\n"), err.startswith("error: Open MPI started 4 ranks on several nodes")) == (
        (1, True) if printed else (0, False)
    )
