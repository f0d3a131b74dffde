"""Single-cell RNA-seq denoising scored by molecular cross-validation, as in the OpenProblems benchmark."""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse

from discover_envs.problem import Evaluation, InvalidSolution, InvalidState, Problem, extract_block
from discover_envs.sandbox import run_function
from discover_envs.state import make_state

#: Each cell is scaled to this many counts before log1p in the MSE metric (OpenProblems' `target_sum`).
TARGET_SUM = 1e4
#: Added to the Poisson rate inside the log, as in molecular-cross-validation's `poisson_nll_loss`.
POISSON_EPS = 1e-6
#: Largest count matrix (cells x genes) accepted; it is held dense, in the parent and in the sandbox.
MAX_ENTRIES = 20_000_000
MIN_CELLS = 10
MIN_GENES = 10
#: Largest rounding error tolerated when recovering pbmc68k_reduced's counts: its log values are stored
#: to 3 decimals, which moves the largest counts (~260) by up to ~0.11; a real non-integer would be ~0.5 off.
PBMC_ROUNDING_TOL = 0.25

IDENTITY_CODE = """\
import numpy as np


def denoise(counts: np.ndarray, **kwargs) -> np.ndarray:
    \"\"\"No denoising: the observed counts are the estimate (the score's zero point).\"\"\"
    return counts
"""

MAGIC_CODE = """\
import numpy as np
import scipy.sparse


def denoise(counts: np.ndarray, **kwargs) -> np.ndarray:
    \"\"\"MAGIC-style diffusion: average sqrt-normalised expression over a kNN graph's random walk.\"\"\"
    import anndata
    import scanpy as sc

    n_neighbors, n_steps = 5, 3
    library = counts.sum(axis=1, keepdims=True)
    library[library == 0] = 1.0
    expression = np.sqrt(counts / library)

    adata = anndata.AnnData(expression.astype(np.float32))
    sc.pp.pca(adata, n_comps=min(50, min(counts.shape) - 1), random_state=0)
    sc.pp.neighbors(adata, n_neighbors=n_neighbors, method="gauss", random_state=0)
    affinity = adata.obsp["connectivities"] + scipy.sparse.identity(counts.shape[0], format="csr")
    markov = scipy.sparse.diags(1.0 / np.asarray(affinity.sum(axis=1)).ravel()) @ affinity

    for _ in range(n_steps):
        expression = markov @ expression
    return np.square(expression) * library
"""


def check_counts(matrix: Any, source: str) -> np.ndarray:
    """Validate a cells x genes count matrix (dense or sparse) and return it as a dense int64 array."""
    shape = getattr(matrix, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"{source}: expected a 2-D cells x genes matrix, got {type(matrix).__name__}")
    n_cells, n_genes = int(shape[0]), int(shape[1])
    if n_cells == 0 or n_genes == 0:
        raise ValueError(f"{source}: the count matrix is empty ({n_cells} cells x {n_genes} genes)")
    if n_cells < MIN_CELLS or n_genes < MIN_GENES:
        raise ValueError(
            f"{source}: {n_cells} cells x {n_genes} genes is too small; need at least "
            f"{MIN_CELLS} cells and {MIN_GENES} genes"
        )
    if n_cells * n_genes > MAX_ENTRIES:
        raise ValueError(
            f"{source}: {n_cells} cells x {n_genes} genes is too large ({n_cells * n_genes:,} entries > "
            f"{MAX_ENTRIES:,}); subsample cells or genes first"
        )
    dense = matrix.toarray() if scipy.sparse.issparse(matrix) else np.asarray(matrix)
    if dense.dtype.kind not in "iuf":
        raise ValueError(f"{source}: counts must be numbers, got dtype {dense.dtype}")
    values = dense.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"{source}: the counts contain NaN or infinite values")
    if (values < 0).any():
        cell, gene = (int(i) for i in np.argwhere(values < 0)[0])
        raise ValueError(f"{source}: negative count {float(values[cell, gene])} at cell {cell}, gene {gene}")
    fractional = np.abs(values - np.round(values)) > 1e-6
    if fractional.any():
        cell, gene = (int(i) for i in np.argwhere(fractional)[0])
        raise ValueError(
            f"{source}: not raw counts: value {float(values[cell, gene])!r} at cell {cell}, gene {gene} is not an "
            "integer (is the matrix normalised or log-transformed? pass the raw-count layer with `layer=`)"
        )
    if not values.any():
        raise ValueError(f"{source}: every count is zero")
    return np.round(values).astype(np.int64)


@cache
def pbmc68k_counts() -> np.ndarray:
    """UMI counts of scanpy's bundled pbmc68k_reduced (700 cells x 765 genes), recovered from `raw.X`.

    `raw.X` holds log1p(counts * s_c) for a per-cell scale s_c; expm1 undoes the log, and since every cell has
    a gene seen once, dividing by the cell's smallest non-zero value undoes s_c.
    """
    import scanpy as sc

    scaled = np.expm1(sc.datasets.pbmc68k_reduced().raw.X.toarray().astype(np.float64))
    smallest = np.where(scaled > 0, scaled, np.inf).min(axis=1, keepdims=True)
    counts = scaled / smallest
    error = float(np.abs(counts - np.round(counts)).max())
    if error > PBMC_ROUNDING_TOL:
        raise ValueError(f"pbmc68k_reduced: recovered counts are {error:.3f} away from integers")
    result = check_counts(np.round(counts), "pbmc68k_reduced")
    result.flags.writeable = False
    return result


def load_counts(path: str | Path, layer: str | None) -> np.ndarray:
    """Read raw counts from `X` (layer None) or `layers[layer]` of an `.h5ad` file and validate them."""
    import anndata

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"adata_path {str(path)!r} is not a file")
    try:
        adata = anndata.read_h5ad(path)
    except Exception as exc:  # h5py and anndata raise many types for a bad file
        raise ValueError(f"adata_path {str(path)!r} could not be read as .h5ad: {exc}") from None
    if layer is None:
        matrix, where = adata.X, f"{path.name} X"
    elif layer in adata.layers:
        matrix, where = adata.layers[layer], f"{path.name} layer {layer!r}"
    else:
        raise ValueError(f"{path.name} has no layer {layer!r}; its layers are {sorted(adata.layers)}")
    if matrix is None:
        raise ValueError(f"{where} is missing (the file stores no matrix there)")
    return check_counts(matrix, where)


def split_molecules(counts: np.ndarray, train_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Molecular cross-validation split: each molecule goes to train with probability `train_fraction`."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be strictly between 0 and 1, got {train_fraction!r}")
    train = np.random.default_rng(seed).binomial(counts, train_fraction)
    return train, counts - train


def log_normalise(counts: np.ndarray) -> np.ndarray:
    """Scale each cell to TARGET_SUM and take log1p; all-zero cells stay zero (as scanpy's normalize_total)."""
    totals = counts.sum(axis=1, keepdims=True)
    totals[totals == 0] = 1.0
    return np.log1p(counts / totals * TARGET_SUM)


def mse(denoised: np.ndarray, test: np.ndarray) -> float:
    """Mean squared error between the log-normalised denoised matrix and the log-normalised test half."""
    return float(np.mean((log_normalise(denoised) - log_normalise(test)) ** 2))


def poisson_loss(denoised: np.ndarray, test: np.ndarray, train_sum: float) -> float:
    """Poisson negative log-likelihood (without the log y! constant) of the test half under the rates of
    the denoised train half rescaled to the test half's depth."""
    rate = denoised * (test.sum() / train_sum)
    return float(np.mean(rate - test * np.log(rate + POISSON_EPS)))


class Denoising(Problem):
    """Single-cell RNA-seq denoising: beat MAGIC on molecular cross-validation of UMI counts.

    ## Description
    Single-cell RNA-seq sees only a few of each cell's mRNA molecules, so counts are very noisy. A denoiser
    estimates every cell's true expression. Without ground truth, molecular cross-validation (Batson et al.
    2019) splits each observed count by binomial thinning into a train part (probability `train_fraction`)
    and a test part; a denoiser that sees only train is judged by how well it predicts test. The data is the
    UMI counts of scanpy's bundled `pbmc68k_reduced` (700 PBMCs x 765 genes; counts recovered exactly as
    round(expm1(raw.X) / smallest non-zero value of the cell)), or any `.h5ad` with raw counts. Genes with
    no train count are dropped (as OpenProblems does).

    ## Action
    The model's reply with a ```python block defining `denoise(counts: np.ndarray, **kwargs) -> np.ndarray`.
    `counts` is the float64 cells x genes train half (integer values), passed as `.npy`; no other keyword
    is passed in v0. It runs in the sandbox (one thread, `timeout_s`, `memory_mb`) with numpy, scipy,
    scikit-learn, anndata and scanpy installed and must return a finite, non-negative array of the same shape.
    The last ```python block counts.

    ## Verifier/metric (recomputed in the parent, from the returned matrix)
    As OpenProblems' denoising task (v2) defines them:
    - mse: mean over all entries of (log1p(1e4 * d / rowsum(d)) - log1p(1e4 * y / rowsum(y)))^2, d the
      denoised matrix, y the test half (all-zero cells stay zero);
    - poisson: mean of r - y * log(r + 1e-6), r = d * sum(y) / sum(train).
    Each is scaled between OpenProblems' control methods: no denoising (d = train) gives 0 and "perfect
    denoising" (d = the test counts themselves) gives 1: s = (m_none - m) / (m_none - m_perfect). The score
    is the mean of the two (higher is better). "Perfect" has MSE 0, which no denoiser nears (the test half
    has its own sampling noise), so scaled MSE stays small (~0.1); "perfect" Poisson is not the optimum (its
    rates are the test counts times sum(test) / sum(train), ~1/9 of them), so scaled Poisson can pass 1.
    `info` carries mse, poisson, mse_score and poisson_score.

    ## Reward and failure reward
    reward = max(score, -1): no denoising earns 0, anything worse than -1 is clipped there. An invalid
    attempt (no block, error, timeout, wrong shape, negative or non-finite values) gets `failure_reward` = -2,
    below every valid reward.

    ## Restart states
    A state is the code and its score (construction is None). `rescore` re-runs the code in the sandbox on
    the same split and recomputes the score (the env skips this for states it verified itself in this
    process), so only deterministic code (seeded randomness) restarts; the score must match to a relative
    `score_rtol` = 1e-6, room for BLAS differences between machines (one machine, one thread: exact).

    ## Published figures (OpenProblems PBMC; not this data, so not comparable one to one)
    TTT-Discover: 0.71; best human method (MAGIC): 0.64. On the default data here (train_fraction 0.9,
    split_seed 0): no denoising (IDENTITY_CODE) 0; the MAGIC-style start state (MAGIC_CODE) 0.4456
    (scaled mse 0.0901, scaled poisson 0.8012); returning the test counts 1.

    ## Arguments
    adata_path: an `.h5ad` file to use instead of pbmc68k_reduced; layer: its layer with raw counts (None:
    `X`). Errors name the problem: not integer counts, negative, NaN, empty, too small (< 10 cells or genes),
    too large (> 20M entries). train_fraction: share of molecules in the train half (0.9, as OpenProblems).
    split_seed: seed of the split (0). timeout_s, memory_mb: sandbox limits of one `denoise` run.

    ## Version history
    v0: first release.
    """

    title: ClassVar[str] = "Single-cell RNA-seq denoising (molecular cross-validation)"
    higher_is_better: ClassVar[bool] = True
    failure_reward: ClassVar[float] = -2.0
    score_rtol: ClassVar[float] = 1e-6
    #: Valid rewards are clipped here so that `failure_reward` stays below all of them.
    reward_floor: ClassVar[float] = -1.0

    def __init__(
        self,
        *,
        adata_path: str | Path | None = None,
        layer: str | None = None,
        train_fraction: float = 0.9,
        split_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if adata_path is None:
            if layer is not None:
                raise ValueError("layer names a layer of adata_path; give adata_path too")
            counts, self.source = pbmc68k_counts(), "scanpy's bundled pbmc68k_reduced (PBMCs, 10x Genomics)"
        else:
            counts, self.source = load_counts(adata_path, layer), Path(adata_path).name
        train, test = split_molecules(counts, train_fraction, split_seed)
        expressed = train.sum(axis=0) > 0
        self.train_fraction = float(train_fraction)
        self.train = train[:, expressed].astype(np.float64)
        self.test = test[:, expressed].astype(np.float64)
        self.train.flags.writeable = False
        self.train_sum = float(self.train.sum())
        self.none_metrics = self.metrics(self.train)
        self.perfect_metrics = self.metrics(self.test)
        if not all(n > p for n, p in zip(self.none_metrics, self.perfect_metrics, strict=True)):
            raise ValueError(
                f"{self.source}: the split leaves no room to improve (metrics without denoising "
                f"{self.none_metrics} vs perfect {self.perfect_metrics}); the data has too few counts"
            )
        self._initial: dict[str, Any] | None = None

    def metrics(self, denoised: np.ndarray) -> tuple[float, float]:
        """(mse, poisson) of a denoised train half against the test half."""
        return mse(denoised, self.test), poisson_loss(denoised, self.test, self.train_sum)

    def scaled(self, metrics: tuple[float, float]) -> tuple[float, float, float]:
        """(score, mse_score, poisson_score): each metric mapped to 0 = no denoising, 1 = perfect."""
        parts = [(n - m) / (n - p) for m, n, p in zip(metrics, self.none_metrics, self.perfect_metrics, strict=True)]
        return (parts[0] + parts[1]) / 2.0, parts[0], parts[1]

    def reward(self, score: float) -> float:
        return max(float(score), self.reward_floor)

    def statement(self) -> str:
        cells, genes = self.train.shape
        return (
            f"# {self.title}\n"
            f"Data: UMI counts of {cells} cells x {genes} genes from {self.source}.\n"
            "Molecular cross-validation split every count by binomial thinning: each molecule went to a train\n"
            f"half with probability {self.train_fraction:g}, otherwise to a hidden test half. Write a denoiser\n"
            "that, from the train half only, estimates each cell's expression so that it predicts the test\n"
            "half well.\n\n"
            "Scoring (OpenProblems' denoising metrics, recomputed by the verifier):\n"
            "- mse: mean squared error between log1p(1e4 * x / cell total) of your output and of the test half;\n"
            "- poisson: mean of r - y * log(r + 1e-6), y the test counts, r your output times\n"
            "  sum(test) / sum(train);\n"
            "each scaled so that returning the train counts unchanged gives 0 and returning the test counts\n"
            "gives 1. The score is the mean of the two scaled metrics; higher is better.\n\n"
            "## How to answer\n"
            "Write one ```python block defining `denoise(counts: np.ndarray, **kwargs) -> np.ndarray`.\n"
            f"`counts` is the train half as a float64 array of shape ({cells}, {genes}) (cells x genes, integer\n"
            "values). Return an array of the same shape, finite and non-negative, on the scale of the train\n"
            "counts. It runs on one CPU thread without network; numpy, scipy, scikit-learn, anndata and scanpy\n"
            "are installed. Seed any randomness so that the result is reproducible. The last such block counts."
        )

    def initial_state(self, rng: np.random.Generator) -> dict[str, Any]:
        """The MAGIC-style baseline; the split is fixed, so the state is computed once per instance."""
        if self._initial is None:
            try:
                score, _ = self.run_code(MAGIC_CODE)
            except InvalidSolution as exc:
                raise RuntimeError(f"the MAGIC start state failed on {self.source}: {exc}") from None
            self._initial = make_state(score=score, reward=self.reward(score), code=MAGIC_CODE)
        return dict(self._initial)

    def run_code(self, code: str) -> tuple[float, dict[str, Any]]:
        """Run `denoise` in the sandbox on the train half and score its output; raise `InvalidSolution`."""
        result = run_function(code, "denoise", {"counts": self.train}, self.limits)
        if not result.ok:
            raise InvalidSolution(result.error)
        denoised = self.check_output(result.value)
        metrics = self.metrics(denoised)
        score, mse_score, poisson_score = self.scaled(metrics)
        if not math.isfinite(score):
            raise InvalidSolution(f"the output gives a non-finite score ({score}); are its values too large?")
        details = {
            "mse": metrics[0],
            "poisson": metrics[1],
            "mse_score": mse_score,
            "poisson_score": poisson_score,
            "sandbox": result.mode,
            "runtime_s": result.wall_s,
        }
        return score, details

    def check_output(self, value: Any) -> np.ndarray:
        shape = self.train.shape
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "iuf":
            kind = f"array of dtype {value.dtype}" if isinstance(value, np.ndarray) else type(value).__name__
            raise InvalidSolution(f"`denoise` must return a numeric array of shape {shape}, got a {kind}")
        if value.shape != shape:
            raise InvalidSolution(f"`denoise` returned shape {value.shape}; expected {shape} (cells x genes)")
        denoised = value.astype(np.float64)
        bad = ~np.isfinite(denoised)
        if bad.any():
            cell, gene = (int(i) for i in np.argwhere(bad)[0])
            raise InvalidSolution(f"non-finite value {float(denoised[cell, gene])} at cell {cell}, gene {gene}")
        if (denoised < 0).any():
            cell, gene = (int(i) for i in np.argwhere(denoised < 0)[0])
            raise InvalidSolution(f"negative value {float(denoised[cell, gene])!r} at cell {cell}, gene {gene}")
        return denoised

    def evaluate(self, reply: str, state: dict[str, Any]) -> Evaluation:
        block = extract_block(reply, ("python", "py"))
        if block is None:
            raise InvalidSolution("the reply has no fenced ```python block defining `denoise`")
        code = block[1]
        score, details = self.run_code(code)
        return Evaluation(score=score, reward=self.reward(score), code=code, details=details)

    def rescore(self, state: dict[str, Any]) -> float:
        code = state.get("code")
        if state.get("construction") is not None:
            raise InvalidState("a denoising state has no construction (it must be None)")
        if not isinstance(code, str) or not code.strip():
            raise InvalidState("a denoising state needs the code of its `denoise` function")
        try:
            return self.run_code(code)[0]
        except InvalidSolution as exc:
            raise InvalidState(f"state code no longer gives a valid result: {exc}") from None

    def render_state(self, state: dict[str, Any]) -> str:
        return (
            f"## Start state\nScore: {state['score']:.6f} (0 = no denoising, 1 = returning the test counts)\n\n"
            f"Code that produced it:\n```python\n{state['code'].rstrip()}\n```"
        )
