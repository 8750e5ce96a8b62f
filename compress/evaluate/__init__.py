"""Evaluation of a model in memory: WikiText-2 perplexity (:mod:`.perplexity`) and lm-eval zero-shot
accuracy over the task definitions shipped in ``tasks/`` (:mod:`.harness`)."""

from compress.evaluate.harness import (
    ASSETS_PLACEHOLDER,
    HEADLINE_METRIC,
    HUB_PREFIX,
    LOCAL_TASKS,
    ZERO_SHOT_TASKS,
    answer_balance,
    evaluate_model,
    lm_eval_tasks,
    materialized_tasks_dir,
    resolve_tasks,
    tasks_dir,
)
from compress.evaluate.perplexity import PPL_DATASETS, perplexity, ppl_text, wikitext2_text

__all__ = [
    "ASSETS_PLACEHOLDER",
    "HEADLINE_METRIC",
    "HUB_PREFIX",
    "LOCAL_TASKS",
    "PPL_DATASETS",
    "ZERO_SHOT_TASKS",
    "answer_balance",
    "evaluate_model",
    "lm_eval_tasks",
    "materialized_tasks_dir",
    "perplexity",
    "ppl_text",
    "resolve_tasks",
    "tasks_dir",
    "wikitext2_text",
]
