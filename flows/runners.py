"""Where the preprocess flow's batch tasks run: the flow's own thread pool ("local"), a pool of worker
processes on this machine ("processes"), or a Ray cluster ("ray").

Threads are enough while the work is in ffmpeg and torch (they release the GIL), but the crop step's face
tracking is Python + dlib, so two batches in threads of one process share one interpreter lock. The process
pool (Prefect's ProcessPoolTaskRunner) gives each batch its own interpreter: use it on a many-core machine
without a cluster; workers start once per run (imports take a few seconds each).

Ray: every batch of clips becomes one Ray task (prefect-ray's RayTaskRunner) that asks for `cpus_per_batch`
CPUs, and for the GPU steps (motion, audio_features, vae_latents) also `gpus_per_batch` GPUs when the cluster
has any. Shard groups are CPU tasks.

One Prefect API for driver and workers: a Ray worker is a separate process, and with no API configured each
one would start its own temporary Prefect server (its task runs then land in separate databases). So the
driver hands the API it reports to, whatever it is (PREFECT_API_URL, or the temporary server a local run
starts), to every worker through the Ray job's runtime_env. That is enough on one machine. On a multi-node
cluster the workers must reach that API over the network: run `prefect server start --host 0.0.0.0` (or use
Prefect Cloud) and export PREFECT_API_URL before the run; a loopback API with more than one Ray node is
refused before any work starts.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional
from urllib.parse import urlparse

RUNNERS = ("local", "processes", "ray")
GPU_STEPS = frozenset({"motion", "audio_features", "vae_latents"})
# Settings a worker needs to report where the driver does (credentials only when the driver has them).
_FORWARDED_ENV = ("PREFECT_API_KEY", "PREFECT_LOGGING_LEVEL", "PREFECT_SERVER_ANALYTICS_ENABLED", "DUALFORCE_CACHE")


@dataclass(frozen=True)
class RayConfig:
    address: Optional[str] = None  # "auto", "ray://head:10001", or None: start a local instance
    num_cpus: Optional[int] = None  # CPUs of a local instance (ignored when connecting to a cluster)
    cpus_per_batch: float = 1.0
    gpus_per_batch: float = 1.0
    include_dashboard: bool = False
    runtime_env: dict = field(default_factory=dict)  # e.g. {"working_dir": "."} when nodes lack the code
    max_retries: int = 3  # Ray re-runs a batch whose worker died; step outputs make the re-run cheap


def driver_api_url() -> str:
    """The Prefect API this process reports to: PREFECT_API_URL, or the temporary server it runs."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url)


def batch_resources(step: str, cluster_gpus: float, cfg: RayConfig) -> dict[str, float]:
    """Ray resource request of one batch task of `step`."""
    request: dict[str, float] = {"num_cpus": cfg.cpus_per_batch}
    if step in GPU_STEPS and cluster_gpus > 0 and cfg.gpus_per_batch > 0:
        request["num_gpus"] = cfg.gpus_per_batch
    return request


def ray_task_runner(cfg: RayConfig, api_url: str):
    from prefect_ray.task_runners import RayTaskRunner

    env = {"PREFECT_API_URL": api_url, **{k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}}
    runtime_env = dict(cfg.runtime_env)
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env}
    init_kwargs: dict[str, Any] = {"include_dashboard": cfg.include_dashboard, "runtime_env": runtime_env}
    if cfg.address is None and cfg.num_cpus is not None:
        init_kwargs["num_cpus"] = cfg.num_cpus
    return RayTaskRunner(address=cfg.address, init_kwargs=init_kwargs)


def check_api_reachable(api_url: str, alive_nodes: int) -> None:
    host = urlparse(api_url).hostname or ""
    if alive_nodes > 1 and (host in ("localhost", "::1") or host.startswith("127.")):
        raise RuntimeError(
            f"the Prefect API {api_url} is local to this machine but the Ray cluster has {alive_nodes} nodes: "
            "run `prefect server start --host 0.0.0.0` and export PREFECT_API_URL=http://<this host>:4200/api")


class BatchSubmitter:
    """Submits batch tasks to the flow's task runner (local) or to Ray with per-step resource requests."""

    def __init__(self, runner: str, ray_cfg: RayConfig, ray_runner=None, pool=None):
        self.runner, self.ray_cfg, self._ray, self._pool = runner, ray_cfg, ray_runner, pool
        self.cluster_gpus = 0.0
        if ray_runner is not None:
            import ray

            self.cluster_gpus = float(ray.cluster_resources().get("GPU", 0.0))

    def submit(self, task, step_name: str, /, **parameters):
        """`task.submit(**parameters)`, as a Ray task with `step_name`'s resource request when on Ray."""
        if self._pool is not None:
            return self._pool.submit(task, parameters=parameters)
        if self._ray is None:
            return task.submit(**parameters)
        from prefect_ray.context import remote_options

        request = batch_resources(step_name, self.cluster_gpus, self.ray_cfg)
        with remote_options(max_retries=self.ray_cfg.max_retries, **request):
            return self._ray.submit(task, parameters=parameters)


@contextmanager
def batch_submitter(runner: str, ray_cfg: Optional[RayConfig] = None,
                    processes: Optional[int] = None) -> Iterator[BatchSubmitter]:
    """Inside a flow run: a submitter for the chosen runner; a Ray instance or process pool lives as long as
    the block (`processes`: pool size, default this machine's CPUs)."""
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {RUNNERS}, got {runner!r}")
    cfg = ray_cfg or RayConfig()
    if runner == "local":
        yield BatchSubmitter("local", cfg)
        return
    if runner == "processes":
        from prefect.task_runners import ProcessPoolTaskRunner

        with ProcessPoolTaskRunner(max_workers=max(1, processes or os.cpu_count() or 1)) as pool:
            yield BatchSubmitter("processes", cfg, pool=pool)
        return
    import ray

    api_url = driver_api_url()
    # An already-initialised Ray is reused and left running (its job's runtime_env is then the caller's).
    with ray_task_runner(cfg, api_url) as started:
        check_api_reachable(api_url, sum(1 for n in ray.nodes() if n.get("alive")))
        yield BatchSubmitter("ray", cfg, started)
