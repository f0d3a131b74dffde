"""Cost of one Denoising-v0 evaluation: the MAGIC-style baseline run in the sandbox, then scored (with a fixed
Poisson bar, so that the default bar's own MAGIC run, once per instance, is not in the first round).

Target: a few seconds on 2 CPU cores (most of it is the sandboxed child importing scanpy). Run for real with
`pytest tests/benchmarks/test_bench_denoising.py --benchmark-enable`.
"""

from __future__ import annotations

from discover_envs.problems.denoising import IDENTITY_CODE, MAGIC_CODE, Denoising
from discover_envs.state import make_state


def test_bench_magic_evaluation(benchmark):
    problem = Denoising(split_seed=0, min_poisson_score=0.5)
    state = make_state(score=0.0, reward=1.0, code=IDENTITY_CODE)
    reply = f"```python\n{MAGIC_CODE}```"
    result = benchmark.pedantic(problem.evaluate, args=(reply, state), rounds=3, iterations=1)
    assert result.score == result.details["mse_score"] > 0.05
    assert result.details["mse_score"] > 0 and result.details["poisson_score"] > 0
