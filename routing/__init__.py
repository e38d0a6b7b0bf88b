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

from .baselines import KnnBaseline, TaskTableBaseline
from .benchmark import AnswerRecord, Complete, ModelStats, SuiteRun, run_suite, write_suite_table
from .evaluate import CvResult, EvalError, EvalResult, cross_validate, evaluate_router
from .router import Decision, Policy, Router, RouterConfig, RoutingError, fit_router, load_router
from .suite import SuiteError, SuiteRow, builtin_suite_path, load_suite, score_answer
from .tables import ModelPrice, ScoreRow, TableError, load_prices, load_table, messages_text, write_table

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
