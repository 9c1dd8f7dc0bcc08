"""The README's cluster recipes, as far as a machine without SLURM or PBS allows: the job scripts
dask-jobqueue writes from a ``cluster:`` setting, and one of them run by bash as SLURM would run it."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import yaml
from distributed import Client
from processes import same_outputs

from geoseg.cluster import jobqueue_cluster
from geoseg.config import BatchCluster, PredictConfig, load_config
from geoseg.pipeline import predict_raster

GPU_JOB = BatchCluster(kind="slurm", jobs=4, cores=8, memory="32GB", walltime="02:00:00", queue="gpu", account="rs",
                       gpus=1, directives=("--constraint=a100",), prologue=("source /opt/geoseg/bin/activate",))


def script_lines(spec: BatchCluster, threads: int = 1) -> list[str]:
    with jobqueue_cluster(spec, threads=threads) as cluster:
        return cluster.job_script().splitlines()


def test_slurm_job_script_asks_for_what_the_setting_says():
    lines = script_lines(GPU_JOB, threads=8)
    for directive in ("-J geoseg-worker", "-p gpu", "-A rs", "-n 1", "--cpus-per-task=8", "-t 02:00:00",
                      "--constraint=a100", "--gres=gpu:1"):
        assert f"#SBATCH {directive}" in lines
    assert any(line.startswith("#SBATCH --mem=") for line in lines)
    prologue = lines.index("export OMP_NUM_THREADS=8")
    assert lines[prologue + 1] == "source /opt/geoseg/bin/activate"
    worker = lines[-1].split()
    assert worker[1:3] == ["-m", "distributed.cli.dask_worker"] and worker[3].startswith("tcp://")
    # one task thread per worker (blocks one at a time, torch on the job's CPUs), the GPU resource offered
    assert worker[worker.index("--nthreads") + 1] == "1"
    assert worker[worker.index("--resources") + 1] == "GPU=1"


def test_pbs_job_script_asks_for_cpus_memory_and_gpus_in_one_select():
    spec = BatchCluster(kind="pbs", cores=16, memory="64GB", queue="workq", gpus=2)
    lines = script_lines(spec)
    assert "#PBS -l select=1:ncpus=16:mem=64GB:ngpus=2" in lines and "#PBS -q workq" in lines
    assert "#PBS -l walltime=01:00:00" in lines


def test_cluster_setting_loads_from_yaml_and_never_shapes_the_output(tmp_path):
    path = tmp_path / "slurm.yaml"
    path.write_text(yaml.safe_dump({"block_size": 1024, "cluster": GPU_JOB.model_dump(mode="json")}))
    cfg = load_config(path, PredictConfig)
    assert cfg.cluster == GPU_JOB
    assert cfg.output_settings() == PredictConfig(block_size=1024).output_settings()
    with pytest.raises(ValueError, match="kind"):
        BatchCluster(kind="lsf")


def test_the_slurm_job_script_run_by_bash_gives_a_worker_that_predicts(tiny_checkpoint, scene_x2, undisturbed,
                                                                        tmp_path):
    """What sbatch would run, run here: the worker it starts joins the run's scheduler and does the blocks."""
    spec = BatchCluster(kind="slurm", cores=1, memory="4GB", interface="lo")
    with jobqueue_cluster(spec) as cluster:
        script = tmp_path / "job.sh"
        script.write_text(cluster.job_script().replace("dummy-name", "job-0"))
        job = subprocess.Popen(["bash", str(script)], cwd=tmp_path, start_new_session=True,
                               env={**os.environ, "TMPDIR": str(tmp_path)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with Client(cluster) as client:
                client.wait_for_workers(1, timeout=90)
                result = predict_raster(scene_x2, tiny_checkpoint, tmp_path / "out", client=client,
                                        config=PredictConfig(block_size=256, workers=1))
        finally:
            os.killpg(job.pid, signal.SIGTERM)
            job.wait(timeout=30)
    assert result.blocks_computed == 20
    same_outputs(tmp_path / "out", undisturbed)
