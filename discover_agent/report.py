"""`discover report`: one self-contained HTML page of a run folder or a bench folder, for people to look at.

A run's page: the env, agent, config and budget; the best score against rollouts and every per-step column of
metrics.csv; the best state drawn by its problem (`Problem.draw`, the picture behind `render_mode="rgb_array"`)
with its program, if any; the lineage of the best state from its root, each ancestor with its score and step;
the top states of the buffer. A bench's page: the leaderboard tables and plots (`write_leaderboards`) and each
agent's best state side by side. Pictures are inlined PNGs and there is no script: the file opens anywhere,
offline, and can be mailed. The page shows what the run folder recorded; it scores nothing and runs no code
(ancestors missing from the buffer are rebuilt from their ```json replies only, and kept only when their
content id matches the one the run logged).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from discover_agent.storage import atomic_write_bytes, read_json, read_jsonl
from discover_envs.drawing import figure_png, new_figure, state_png
from discover_envs.problem import ConstructionProblem, InvalidSolution, extract_block, parse_json
from discover_envs.state import content_id

__all__ = ["ReportError", "write_report"]

#: Ancestors of the best state drawn (the root, the best and evenly spaced ones between); all are listed.
MAX_LINEAGE_DRAWN = 6
#: States of the buffer shown, best first.
TOP_STATES = 6
#: Thumbnails are this fraction of a problem's full drawing size.
THUMBNAIL = 0.7
#: Characters of a construction shown as text under its drawing.
MAX_CONSTRUCTION_CHARS = 3000

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0}th{background:#f4f4f4}img{max-width:100%}
td,th{border:1px solid #ddd;padding:.2em .6em;text-align:left;font-size:.9em}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.8em;max-height:30em;white-space:pre-wrap}
.row{display:flex;flex-wrap:wrap;gap:1em}.card{border:1px solid #ddd;padding:.5em;flex:0 1 auto;max-width:560px}
.card p{margin:.2em 0;font-size:.85em}.note{color:#666;font-size:.9em}
"""


class ReportError(ValueError):
    """A folder that holds neither a run nor a bench, or a file in it that cannot be read."""


def write_report(folder: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of a run folder or a bench folder (default: FOLDER/report.html); returns its path."""
    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "rollouts.jsonl").exists():
        page = run_page(folder)
    elif folder.is_dir() and next(folder.rglob("result.json"), None) is not None:
        page = bench_page(folder)
    else:
        raise ReportError(
            f"{folder} holds neither a run (config.json and rollouts.jsonl, from `discover run --out`) nor a "
            "bench (result.json files, from `discover bench --out`)"
        )
    path = Path(out) if out is not None else folder / "report.html"
    atomic_write_bytes(path, page.encode("utf-8"))
    return path


# --- reading a run folder ---


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """metrics.csv as rows of floats where a value is a number (columns are read generically: agents add their
    own), else the checkpoint's copy; [] when neither exists."""
    path = run / "metrics.csv"
    if path.is_file():
        with path.open(newline="", encoding="utf-8") as fh:
            return [{key: _number(value) for key, value in row.items()} for row in csv.DictReader(fh)]
    checkpoint = run / "checkpoint.json"
    rows = read_json(checkpoint).get("metrics", []) if checkpoint.is_file() else []
    return [{key: _number(str(value)) if value is not None else None for key, value in row.items()} for row in rows]


def _number(text: str | None) -> Any:
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def collect_states(value: Any, found: dict[str, dict[str, Any]]) -> None:
    """Every state-shaped dict (id, score and construction or code) anywhere in a JSON value, by id; a buffer
    file of any sampler holds its states somewhere in it."""
    if isinstance(value, dict):
        if isinstance(value.get("id"), str) and "score" in value and ("construction" in value or "code" in value):
            found.setdefault(value["id"], value)
        else:
            for item in value.values():
                collect_states(item, found)
    elif isinstance(value, list):
        for item in value:
            collect_states(item, found)


class Drawer:
    """PNG pictures of a run's states: `Problem.draw` for this project's envs; for any other Gymnasium env
    that declares "rgb_array", `render()` after `reset(options={"state": s})`; None where neither works."""

    def __init__(self, env_id: str, env_kwargs: dict[str, Any]) -> None:
        self.env_id, self.env_kwargs = env_id, env_kwargs
        self.problem: Any = None
        self.env: Any = None
        self.note = ""
        self.higher_is_better = True
        self._drawn: dict[tuple[str, float], bytes | str] = {}
        try:
            from discover_agent.agents import open_env

            env = open_env(env_id, env_kwargs)
        except Exception as exc:  # the page is still worth writing without pictures
            self.note = f"States are not drawn: {env_id} could not be opened here ({type(exc).__name__}: {exc})."
            return
        self.problem = getattr(env.unwrapped, "problem", None)
        self.higher_is_better = env.metadata.get("higher_is_better", True)
        if self.problem is None and "rgb_array" in env.metadata.get("render_modes", []):
            env.close()
            self.env = open_env(env_id, {**env_kwargs, "render_mode": "rgb_array"})
        elif self.problem is None:
            self.note = f"States are not drawn: {env_id} declares no rgb_array render mode."
            env.close()

    def png(self, state: dict[str, Any], scale: float = 1.0) -> bytes | str:
        """The state's picture, or why it has none (drawn once per id and scale: the best state is also in the
        lineage and the buffer)."""
        key = (str(state.get("id")), scale)
        if key not in self._drawn:
            self._drawn[key] = self._png(state, scale)
        return self._drawn[key]

    def _png(self, state: dict[str, Any], scale: float) -> bytes | str:
        try:
            if self.problem is not None:
                return state_png(self.problem, state, scale)
            if self.env is not None:
                self.env.reset(options={"state": state})
                return _array_png(self.env.render())
        except Exception as exc:  # a hand-edited state must not cost the whole page
            return f"not drawn: {type(exc).__name__}: {exc}"
        return self.note

    def rebuild(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """The state a logged ```json reply made, without running anything, if its content id matches."""
        if not isinstance(self.problem, ConstructionProblem) or not isinstance(row.get("reply"), str):
            return None
        block = extract_block(row["reply"], ("json", "python", "py"))
        if block is None or block[0] != "json":
            return None
        try:
            construction = self.problem.validate(parse_json(block[1], "reply")).tolist()
        except InvalidSolution:
            return None
        if content_id(construction, None) != row.get("id"):
            return None
        return {"id": row["id"], "score": row["score"], "reward": row["reward"], "construction": construction,
                "code": None, "parent_id": row.get("parent_id")}  # fmt: skip

    def close(self) -> None:
        if self.env is not None:
            self.env.close()


def _array_png(image: Any) -> bytes:
    from matplotlib.image import imsave

    buffer = io.BytesIO()
    imsave(buffer, np.asarray(image), format="png")
    return buffer.getvalue()


# --- HTML pieces ---


def _e(value: Any) -> str:
    return html.escape(str(value))


def _img(png: bytes | str, alt: str) -> str:
    if isinstance(png, str):
        return f'<p class="note">{_e(png)}</p>'
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(rows: list[list[Any]], header: list[str] | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.10g}"
    return "-" if value is None else str(value)


def _page(title: str, sections: list[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{_e(title)}</h1>{''.join(sections)}</body></html>\n"
    )


def _state_card(drawer: Drawer, state: dict[str, Any], caption: list[str], scale: float) -> str:
    lines = "".join(f"<p>{_e(line)}</p>" for line in caption)
    return f'<div class="card">{_img(drawer.png(state, scale), state.get("id", "state"))}{lines}</div>'


def _note_card(note: str, caption: list[str]) -> str:
    lines = "".join(f"<p>{_e(line)}</p>" for line in caption)
    return f'<div class="card"><p class="note">{_e(note)}</p>{lines}</div>'


# --- a run ---


def run_page(run: Path) -> str:
    """The HTML report of one run folder."""
    config_file = read_json(run / "config.json")
    if not isinstance(config_file, dict) or not isinstance(config_file.get("config"), dict):
        raise ReportError(f"{run / 'config.json'} is not a run's config.json (it needs agent and config)")
    config = config_file["config"]
    checkpoint = read_json(run / "checkpoint.json") if (run / "checkpoint.json").is_file() else {}
    best_file = read_json(run / "best.json") if (run / "best.json").is_file() else {}
    rows = read_jsonl(run / "rollouts.jsonl")
    metrics = read_metrics(run)
    env_id = config.get("env", "?")
    drawer = Drawer(env_id, _env_kwargs(run, config))
    try:
        states: dict[str, dict[str, Any]] = {}
        collect_states(best_file.get("state"), states)
        collect_states(checkpoint.get("initial"), states)
        if checkpoint.get("dir") and (run / checkpoint["dir"] / "buffer.json").is_file():
            collect_states(read_json(run / checkpoint["dir"] / "buffer.json"), states)
        title = f"{config_file.get('agent', '?')} on {env_id}"
        sections = [
            _run_summary(config_file, checkpoint, best_file, rows, drawer),
            _progress_section(rows, metrics, checkpoint),
            _best_section(best_file, drawer),
            _lineage_section(best_file, states, rows, drawer),
            _top_section(states, checkpoint, drawer),
        ]
    finally:
        drawer.close()
    return _page(title, sections)


def _env_kwargs(run: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The env's arguments as the run resolved them (a CPU preset when none were given)."""
    from discover_agent.config import load_run_config

    try:
        return load_run_config(run / "config.json")[1].given_env_kwargs()
    except (ValueError, TypeError):  # another agent's config class: take what the file says
        return dict(config.get("env_kwargs") or {})


def _run_summary(
    config_file: dict[str, Any], checkpoint: dict[str, Any], best: dict[str, Any], rows: list[dict[str, Any]],
    drawer: Drawer,
) -> str:  # fmt: skip
    config = config_file["config"]
    valid = sum(bool(r.get("valid")) for r in rows)
    facts = [
        ["env", config.get("env")],
        ["env arguments", json.dumps(drawer.env_kwargs)],
        ["agent", config_file.get("agent")],
        ["model", config.get("endpoint") or config.get("model") or "embedded SmolLM2-135M-Instruct"],
        ["best score", _fmt((best.get("state") or {}).get("score"))],
        ["steps done / asked", f"{checkpoint.get('step', '-')} / {config.get('steps', '-')}"],
        ["rollouts (valid)", f"{len(rows)} ({valid}, {valid / len(rows):.1%})" if rows else "0"],
        ["generated tokens", checkpoint.get("tokens", "-")],
        ["wall time", f"{checkpoint['wall_s']:.1f} s" if "wall_s" in checkpoint else "-"],
    ]
    budget = {k: config.get(k) for k in ("groups", "group_size", "max_rollouts", "max_wall_s") if k in config}
    facts.append(["budget", ", ".join(f"{k} {v}" for k, v in budget.items())])
    sandbox = config_file.get("sandbox")
    if isinstance(sandbox, dict):
        facts.append(["sandbox", ", ".join(f"{k}: {v}" for k, v in sandbox.items() if not isinstance(v, dict))])
    config_rows = [[key, json.dumps(value)] for key, value in config.items()]
    note = f'<p class="note">{_e(drawer.note)}</p>' if drawer.note else ""
    return (
        f"<h2>Run</h2>{_table(facts)}{note}<details><summary>every config field (config.json)</summary>"
        f"{_table(config_rows, ['field', 'value'])}</details>"
    )


def _progress_section(rows: list[dict[str, Any]], metrics: list[dict[str, Any]], checkpoint: dict[str, Any]) -> str:
    parts = ["<h2>Progress</h2>"]
    if rows:
        parts.append(_img(_score_plot(rows, checkpoint.get("curve") or []), "best score against rollouts"))
    columns = [
        key for key in dict.fromkeys(k for row in metrics for k in row)
        if key != "step" and any(isinstance(row.get(key), float) for row in metrics)
    ]  # fmt: skip
    if columns:
        parts.append("<p>Per-step diagnostics, every numeric column of metrics.csv:</p>")
        parts.append(_img(_metrics_plot(metrics, columns), "per-step diagnostics"))
        summary = []
        for column in columns:
            values = [row[column] for row in metrics if isinstance(row.get(column), float)]
            finite = [v for v in values if math.isfinite(v)] or [math.nan]
            summary.append([column, _fmt(values[0]), _fmt(values[-1]), _fmt(min(finite)), _fmt(max(finite))])
        parts.append(_table(summary, ["column", "first step", "last step", "min", "max"]))
    return "".join(parts)


def _score_plot(rows: list[dict[str, Any]], curve: list[list[float]]) -> bytes:
    """Every valid reply's score by rollout (dots) and the best so far (line, from the checkpoint's curve)."""
    fig = new_figure((10.0, 3.8))
    ax = fig.add_subplot()
    x = np.array([i + 1 for i, r in enumerate(rows) if r.get("valid") and r.get("score") is not None])
    y = np.array([r["score"] for r in rows if r.get("valid") and r.get("score") is not None], dtype=np.float64)
    if y.size:
        ax.scatter(x, y, s=6, alpha=0.35, color="C0", label="valid reply", rasterized=True)
        low, high = np.percentile(y, [0, 99])
        pad = 0.05 * (high - low) or 0.05 * abs(high) or 1.0
        ax.set_ylim(low - pad, high + pad)
    if curve:
        points = np.asarray(curve, dtype=np.float64)
        ax.step(points[:, 0], points[:, 1], where="post", color="C3", label="best so far (end of step)")
    invalid = sum(not r.get("valid") for r in rows)
    ax.set(xlabel="rollout", ylabel="score", title=f"scores of {len(rows)} replies ({invalid} invalid, not shown)")
    ax.legend(loc="best")
    return figure_png(fig)


def _metrics_plot(metrics: list[dict[str, Any]], columns: list[str]) -> bytes:
    cols = 3
    nrows = math.ceil(len(columns) / cols)
    fig = new_figure((10.0, 2.2 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    steps = [row.get("step") if isinstance(row.get("step"), float) else i for i, row in enumerate(metrics)]
    for ax, column in zip(axes, columns, strict=False):
        values = [row.get(column) if isinstance(row.get(column), float) else np.nan for row in metrics]
        ax.plot(steps, values, marker="." if len(values) <= 50 else None, color="C0")
        ax.set_title(column, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes[len(columns) :]:
        ax.set_axis_off()
    return figure_png(fig)


def _best_section(best: dict[str, Any], drawer: Drawer) -> str:
    state = best.get("state")
    if not isinstance(state, dict):
        return "<h2>Best state</h2><p>No best.json yet: no step finished.</p>"
    parts = [f"<h2>Best state: score {_e(_fmt(state.get('score')))}</h2>", _img(drawer.png(state), "best state")]
    if state.get("code"):
        parts.append(f"<p>Its program:</p><pre>{_e(state['code'])}</pre>")
    if state.get("construction") is not None:
        text = json.dumps(state["construction"])
        more = (
            f" (first {MAX_CONSTRUCTION_CHARS} of {len(text)} characters)" if len(text) > MAX_CONSTRUCTION_CHARS else ""
        )
        parts.append(f"<p>Its construction{more}:</p><pre>{_e(text[:MAX_CONSTRUCTION_CHARS])}</pre>")
    return "".join(parts)


def _lineage_section(
    best: dict[str, Any], states: dict[str, dict[str, Any]], rows: list[dict[str, Any]], drawer: Drawer
) -> str:
    lineage = best.get("lineage")
    if not isinstance(lineage, list) or not lineage:
        return ""
    by_id = {r["id"]: r for r in rows if r.get("valid") and r.get("id")}
    table = []
    for depth, link in enumerate(lineage):
        state = states.get(link.get("id"))
        score = link.get("score") if link.get("score") is not None else (state or {}).get("score")
        table.append([depth, link.get("id"), "start" if link.get("step") is None else link["step"], _fmt(score)])
    picks = sorted(set(np.linspace(0, len(lineage) - 1, min(MAX_LINEAGE_DRAWN, len(lineage))).round().astype(int)))
    cards = []
    for depth in picks:
        link = lineage[depth]
        state = states.get(link["id"])
        if state is None and link["id"] in by_id:
            state = drawer.rebuild(by_id[link["id"]])
        caption = [f"depth {depth}, step {table[depth][2]}, score {table[depth][3]}", f"id {link['id']}"]
        if state is None:
            cards.append(_note_card("not in the buffer, and no ```json reply of this id: not drawn", caption))
        else:
            cards.append(_state_card(drawer, state, caption, THUMBNAIL))
    return (
        f"<h2>Lineage of the best state ({len(lineage)} states, root first)</h2>"
        f"{_table(table, ['depth', 'id', 'step found', 'score'])}"
        f"<p>Drawn: {len(picks)} of them (the root, the best and evenly spaced ones between).</p>"
        f'<div class="row">{"".join(cards)}</div>'
    )


def _top_section(states: dict[str, dict[str, Any]], checkpoint: dict[str, Any], drawer: Drawer) -> str:
    ranked = sorted(
        (s for s in states.values() if isinstance(s.get("reward"), (int, float))), key=lambda s: -s["reward"]
    )[:TOP_STATES]
    if not ranked:
        return ""
    found = checkpoint.get("lineage") or {}
    cards = []
    for rank, state in enumerate(ranked, start=1):
        step = found.get(state["id"], [None, None, "start"])[2]
        caption = [
            f"#{rank}: score {_fmt(state['score'])}, reward {_fmt(state['reward'])}",
            f"step {step}, id {state['id']}",
        ]
        cards.append(_state_card(drawer, state, caption, THUMBNAIL))
    return f'<h2>Top states of the buffer</h2><div class="row">{"".join(cards)}</div>'


# --- a bench ---


def bench_page(bench: Path) -> str:
    """The HTML report of a `discover bench --out` folder: per env, the leaderboard and each agent's best."""
    from discover_agent.leaderboard import write_leaderboards

    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        files = write_leaderboards(bench, Path(tmp))
        for md in [f for f in files if f.suffix == ".md" and f.name != "README.md"]:
            entries = json.loads(md.with_suffix(".json").read_text())
            sections.append(_markdown(md.read_text()) + _img(md.with_suffix(".png").read_bytes(), md.stem))
            sections.append(_bench_best(bench, entries))
    return _page(f"Bench: {bench}", sections)


def _bench_best(bench: Path, entries: list[dict[str, Any]]) -> str:
    """Each agent's best run (best score over its seeds), its best state drawn, side by side; entries name their
    best state's file relative to the bench folder (older ones by an absolute path)."""
    env_id = entries[0]["env"]
    drawer = Drawer(env_id, entries[0].get("env_kwargs") or {})
    try:
        pick = max if drawer.higher_is_better else min
        cards = []
        scored = [e for e in entries if e.get("best_score") is not None]
        best_runs: dict[str, dict[str, Any]] = {}
        for agent in {e["agent"] for e in scored}:
            best_runs[agent] = pick((e for e in scored if e["agent"] == agent), key=lambda e: e["best_score"])
        ranked = sorted(best_runs.values(), key=lambda e: e["best_score"], reverse=drawer.higher_is_better)
        for run in ranked:  # best first
            best_file = bench / run.get("best_state_file", "")
            state = read_json(best_file).get("state") if best_file.is_file() else None
            caption = [f"{run['agent']}, seed {run['seed']}: best {_fmt(run['best_score'])}"]
            caption.append(f"{run['rollouts']} rollouts")
            if isinstance(state, dict):
                cards.append(_state_card(drawer, state, caption, THUMBNAIL))
            else:
                cards.append(_note_card(f"{best_file} is missing", caption))
    finally:
        drawer.close()
    return f'<h3>Each agent\'s best state on {_e(env_id)}</h3>{_e(drawer.note)}<div class="row">{"".join(cards)}</div>'


def _markdown(text: str) -> str:
    """The leaderboard markdown `discover leaderboard` writes (headings, tables, bullets, paragraphs) as HTML."""
    out, table = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                table.append(cells)
            continue
        if table:
            out.append(_table(table[1:], table[0]))
            table = []
        if line.startswith("#"):
            out.append(f"<h2>{_code_spans(line.lstrip('#').strip())}</h2>")
        elif line.startswith("- "):
            out.append(f"<p>• {_code_spans(line[2:])}</p>")
        elif line.strip():
            out.append(f"<p>{_code_spans(line)}</p>")
    return "".join(out)


def _code_spans(text: str) -> str:
    parts = _e(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
