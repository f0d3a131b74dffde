"""Where evaluations run. One seam, two back ends: a local thread pool (default, what CI uses) and Ray.

An evaluation is `env.reset(options={"state": parent})` then `env.step(reply)` on an env made by `gym.make`
(wrappers included, so `discover bench` can count steps). The heavy part already runs in a sandboxed child
process, so threads overlap well; Ray runs the same function as tasks on a cluster.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import gymnasium as gym

import discover_envs  # noqa: F401 - registers the env ids
from discover_agent.types import Outcome

_local = threading.local()


def evaluate(env_id: str, env_kwargs: dict[str, Any], parent: dict[str, Any], reply: str) -> Outcome:
    """Score one reply made from `parent`; each thread or worker keeps its own env instance."""
    cache = getattr(_local, "envs", None)
    if cache is None:
        cache = _local.envs = {}
    key = (env_id, repr(sorted(env_kwargs.items())))
    if key not in cache:
        cache[key] = gym.make(env_id, **env_kwargs)
    env = cache[key]
    env.reset(options={"state": parent})
    _, reward, _, _, info = env.step(reply)
    return Outcome(float(reward), info)


class Executor(ABC):
    def __init__(self, env_id: str, env_kwargs: dict[str, Any]) -> None:
        self.env_id, self.env_kwargs = env_id, dict(env_kwargs)

    @abstractmethod
    def submit(self, parent: dict[str, Any], reply: str) -> Future[Outcome]: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release workers."""


class LocalExecutor(Executor):
    def __init__(self, env_id: str, env_kwargs: dict[str, Any], workers: int = 2) -> None:
        super().__init__(env_id, env_kwargs)
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="discover-eval")

    def submit(self, parent: dict[str, Any], reply: str) -> Future[Outcome]:
        return self._pool.submit(evaluate, self.env_id, self.env_kwargs, parent, reply)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class RayExecutor(Executor):
    """Runs `evaluate` as Ray tasks with a CPU annotation (`pip install discover[ray]`): on the cluster at
    `address`, or on a local Ray it starts, whose servers then listen on the loopback only."""

    def __init__(
        self, env_id: str, env_kwargs: dict[str, Any], address: str | None = None, num_cpus: float = 1.0
    ) -> None:
        super().__init__(env_id, env_kwargs)
        try:
            import ray
        except ImportError:
            raise ImportError("the Ray executor needs Ray: pip install 'discover[ray]'") from None
        self._ray = ray
        if not ray.is_initialized():
            if address is None:
                _start_local_ray(ray)
            else:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
        self._task = ray.remote(num_cpus=num_cpus)(evaluate)

    def submit(self, parent: dict[str, Any], reply: str) -> Future[Outcome]:
        return self._task.remote(self.env_id, self.env_kwargs, parent, reply).future()


def _start_local_ray(ray: Any) -> None:
    """A local Ray whose servers listen on 127.0.0.1 only. Ray binds every interface unless its node address
    is the loopback, and swaps a loopback address for the machine's own while it thinks multi-node clusters
    are supported here (`ray_constants.ENABLE_RAY_CLUSTER`), so that flag is off while it starts."""
    constants = ray._private.ray_constants
    saved = getattr(constants, "ENABLE_RAY_CLUSTER", True)
    constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    finally:
        constants.ENABLE_RAY_CLUSTER = saved


def make_executor(kind: str, env_id: str, env_kwargs: dict[str, Any], workers: int, address: str | None) -> Executor:
    if kind == "local":
        return LocalExecutor(env_id, env_kwargs, workers)
    if kind == "ray":
        return RayExecutor(env_id, env_kwargs, address=address)
    raise ValueError(f"unknown executor {kind!r}; choose 'local' or 'ray'")
