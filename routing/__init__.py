"""Task-level routing for the mesh: learn which model should answer a prompt.

Pure learning and evaluation code: nothing here imports the node, entry, protocol or CLI
packages, so the entry can load a fitted router at start-up and call :meth:`Router.route`
per request, and benchmarks can run anywhere. Overview:

* :mod:`routing.tables` -- score tables (prompt -> each model's quality) and price files;
* :mod:`routing.router` -- the learned router, its :class:`Policy` and :class:`Decision`;
* :mod:`routing.evaluate` -- cost/quality curves, cost_at_95, APGR, cross-validation;
* :mod:`routing.baselines` -- per-task table and kNN baselines for benchmarks;
* :mod:`routing.suite` / :mod:`routing.benchmark` -- a shipped prompt suite, answer
  scorers, and an async runner that turns model answers into a score table;
* :mod:`routing.cli` -- ``mesh route eval|fit|explain``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .baselines import KnnBaseline, TaskTableBaseline
    from .benchmark import AnswerRecord, Complete, ModelStats, SuiteRun, run_suite, write_suite_table
    from .evaluate import CvResult, EvalError, EvalResult, cross_validate, evaluate_router
    from .router import Decision, Policy, Router, RouterConfig, RoutingError, fit_router, load_router
    from .suite import SuiteError, SuiteRow, builtin_suite_path, load_suite, score_answer
    from .tables import ModelPrice, ScoreRow, TableError, load_prices, load_table, messages_text, write_table

# Names are loaded on first use: the submodules pull in scikit-learn (~1-5 s to import), which
# every `mesh` command would otherwise pay because the CLI reaches routing.tables and the
# demo's table path.
_WHERE = {
    "AnswerRecord": "benchmark",
    "Complete": "benchmark",
    "CvResult": "evaluate",
    "Decision": "router",
    "EvalError": "evaluate",
    "EvalResult": "evaluate",
    "KnnBaseline": "baselines",
    "ModelPrice": "tables",
    "ModelStats": "benchmark",
    "Policy": "router",
    "Router": "router",
    "RouterConfig": "router",
    "RoutingError": "router",
    "ScoreRow": "tables",
    "SuiteError": "suite",
    "SuiteRow": "suite",
    "SuiteRun": "benchmark",
    "TableError": "tables",
    "TaskTableBaseline": "baselines",
    "builtin_suite_path": "suite",
    "cross_validate": "evaluate",
    "evaluate_router": "evaluate",
    "fit_router": "router",
    "load_prices": "tables",
    "load_router": "router",
    "load_suite": "suite",
    "load_table": "tables",
    "messages_text": "tables",
    "run_suite": "benchmark",
    "score_answer": "suite",
    "write_suite_table": "benchmark",
    "write_table": "tables",
}


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'routing' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "AnswerRecord",
    "Complete",
    "CvResult",
    "Decision",
    "EvalError",
    "EvalResult",
    "KnnBaseline",
    "ModelPrice",
    "ModelStats",
    "Policy",
    "Router",
    "RouterConfig",
    "RoutingError",
    "ScoreRow",
    "SuiteError",
    "SuiteRow",
    "SuiteRun",
    "TableError",
    "TaskTableBaseline",
    "builtin_suite_path",
    "cross_validate",
    "evaluate_router",
    "fit_router",
    "load_prices",
    "load_router",
    "load_suite",
    "load_table",
    "messages_text",
    "run_suite",
    "score_answer",
    "write_suite_table",
    "write_table",
]
