"""Check discover/TriMul-v0 on a GPU in one command: GPUMode's reference and submissions through the env on GPUMode's
official shapes (its eighteen test shapes checked once, untimed, then its seven benchmark shapes timed), printing
each one's verdict and times.

    python scripts/trimul_gpu_check.py                      # the reference and GPUMode's template submission
    python scripts/trimul_gpu_check.py my_kernel.py --warmup 1 --reps 3
    python scripts/trimul_gpu_check.py --dry-run            # no GPU: the same steps on CPU with tiny shapes

Exit status: 0 when every candidate is valid, 1 when one is not, 2 when there is no GPU (without --dry-run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch

import discover_envs  # noqa: F401 - registers the ids
from discover_envs.problem import InvalidSolution
from discover_envs.problems.trimul import BASELINE_CODE, CPU_SHAPES, TriMul

TEMPLATE = Path(__file__).resolve().parent.parent / "tests" / "data" / "trimul" / "gpumode_template.py"
#: The dry run's stand-ins for GPUMode's test shapes: tiny, one masked with normal inputs, one unmasked Cauchy.
DRY_RUN_TEST_SHAPES = [
    {"seqlen": 16, "bs": 1, "dim": 32, "hidden_dim": 16, "nomask": False, "distribution": "normal"},
    {"seqlen": 8, "bs": 2, "dim": 16, "hidden_dim": 16, "nomask": True, "distribution": "cauchy"},
]


def make_problem(args: argparse.Namespace) -> TriMul:
    """The registered env's problem: on CUDA with its defaults (the official shapes), or the dry run's on CPU."""
    kwargs: dict[str, Any] = {"warmup": args.warmup, "reps": args.reps, "timeout_s": args.timeout_s}
    if args.dry_run:
        kwargs.update(device="cpu", shapes=[CPU_SHAPES[0]], test_shapes=DRY_RUN_TEST_SHAPES)
    else:
        kwargs.update(device="cuda", gpu=args.gpu)
    return gym.make("discover/TriMul-v0", **kwargs).unwrapped.problem


def check(problem: TriMul, label: str, code: str) -> bool:
    """Evaluate one candidate as `env.step` does; print its verdict, times and errors; True when valid."""
    try:
        evaluation = problem.evaluate(f"```python\n{code}\n```", {})
    except InvalidSolution as exc:
        print(f"{label}: INVALID: {exc}")
        return False
    d = evaluation.details
    print(
        f"{label}: valid; {evaluation.score:.1f} us (geometric mean of per-shape medians), reference "
        f"{d['reference_us']:.1f} us, speedup {d['speedup']:.3f}; max |out - ref| {d['max_error']:.3g} timed, "
        f"{d['test_max_error']:.3g} on the test shapes"
    )
    for spec, us in zip(problem.shapes, d["shape_us"], strict=True):
        print(f"  bs={spec['bs']} seqlen={spec['seqlen']} dim={spec['dim']} {spec['distribution']}: {us:.1f} us")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("submissions", nargs="*", type=Path, help=f"submission files (default: {TEMPLATE.name})")
    parser.add_argument("--dry-run", action="store_true", help="run on CPU with tiny shapes (no GPU needed)")
    parser.add_argument("--gpu", type=int, default=0, help="index of the GPU to use (default 0)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per timed shape (default 2)")
    parser.add_argument("--reps", type=int, default=10, help="timed calls per shape (default 10)")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="wall clock per candidate (default 900)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA GPU is visible here; --dry-run checks the same steps on CPU", file=sys.stderr)
        return 2
    problem = make_problem(args)
    where = "CPU (dry run)" if args.dry_run else f"cuda:{args.gpu} ({torch.cuda.get_device_name(args.gpu)})"
    print(
        f"TriMul on {where}: {len(problem.test_shapes)} test shapes (untimed, first), {len(problem.shapes)} timed "
        f"shapes, warmup {problem.warmup}, reps {problem.reps}"
    )
    candidates = [("reference (GPUMode)", BASELINE_CODE)]
    candidates += [(f"submission {path}", path.read_text()) for path in args.submissions or [TEMPLATE]]
    verdicts = [check(problem, label, code) for label, code in candidates]
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
