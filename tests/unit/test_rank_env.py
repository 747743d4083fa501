"""The one rank-env parser (torchrun's or SLURM's variables) and the collective-timeout setting."""

import pytest

from megafusion.config import ConfigError, load_config, validate_config
from megafusion.parallel.rank_env import RankEnv, export_rank_env, rank_env


def test_torchrun_variables():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert rank_env(env) == RankEnv(3, 4, 1, 2, "torchrun")


def test_srun_task_variables():
    env = {"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "2"}
    assert rank_env(env) == RankEnv(2, 4, 0, 2, "slurm")


def test_torchrun_inside_srun_wins():
    """One torchrun per node under srun: SLURM_PROCID is the node's index then, not the rank."""
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}
    assert rank_env(env).rank == 5 and rank_env(env).source == "torchrun"


def test_batch_shell_is_rank_zero_of_the_allocation():
    """`launcher.train --check` in the batch script validates against SLURM_NTASKS."""
    assert rank_env({"SLURM_NTASKS": "256"}) == RankEnv(0, 256, 0, 1, "slurm")


def test_single_process():
    assert rank_env({}) == RankEnv(0, 1, 0, 1, "single")


def test_export_writes_torchrun_names_and_a_rendezvous_port():
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "20007"}
    env["MASTER_ADDR"] = "node1"  # as cluster/train_common.sh exports it
    export_rank_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_PORT"]) == ("1", "2", "1", "20007")
    assert env["MASTER_ADDR"] == "node1"


def test_collective_timeout_is_validated():
    assert validate_config(load_config("tiny", [])).parallel.collective_timeout_s == 1800
    assert (
        validate_config(load_config("tiny", ["parallel.collective_timeout_s=15"])).parallel.collective_timeout_s == 15
    )
    with pytest.raises(ConfigError, match="collective_timeout_s=0.0 must be > 0"):
        validate_config(load_config("tiny", ["parallel.collective_timeout_s=0"]))
