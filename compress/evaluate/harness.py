"""Zero-shot accuracy through lm-eval, on the in-memory model (no save and reload).

The local task definitions ship with the package (``compress/evaluate/tasks/``) and read their data
from ``$COMPRESS_ASSETS/data``. They name it as ``${COMPRESS_ASSETS}/...``; lm-eval does not expand
variables, so :func:`materialized_tasks_dir` writes resolved copies into a temporary folder that is
passed to ``TaskManager(include_path=...)``. ``hub:<task>`` uses lm-eval's own task instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from compress.assets import assets_root
from compress.errors import UsageError
from compress.evaluate.perplexity import eval_mode, perplexity, ppl_text
from compress.io.limits import check_limit

#: The seven zero-shot tasks of the structured-pruning papers (LLM-Pruner, SliceGPT, LoRAP, ...).
ZERO_SHOT_TASKS: tuple[str, ...] = (
    "boolq",
    "piqa",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
)


#: Short name -> local lm-eval task (``compress/evaluate/tasks/<task>.yaml``, package data) over ``$COMPRESS_ASSETS/data``.
LOCAL_TASKS: dict[str, str] = {name: f"compress_{name}" for name in ZERO_SHOT_TASKS}


#: Short name -> the metric a results table reports for it. The papers mix acc and acc_norm; these
#: are LLM-Pruner's choices (its issue #25: the paper's numbers match lm-eval ``acc`` for BoolQ,
#: PIQA, WinoGrande and ARC-e, and ``acc_norm`` for HellaSwag, ARC-c and OBQA), which later papers
#: comparing with it (LoRAP, ...) copied. BoolQ and WinoGrande have no acc_norm in lm-eval.
HEADLINE_METRIC: dict[str, str] = {
    "boolq": "acc",
    "piqa": "acc",
    "hellaswag": "acc_norm",
    "winogrande": "acc",
    "arc_easy": "acc",
    "arc_challenge": "acc_norm",
    "openbookqa": "acc_norm",
}


#: Placeholder in the task YAMLs, replaced by the resolved assets folder.
ASSETS_PLACEHOLDER = "${COMPRESS_ASSETS}"


HUB_PREFIX = "hub:"


_GROUP_ALIASES = {"zeroshot": ZERO_SHOT_TASKS}


def tasks_dir() -> Path:
    """Folder of the task YAMLs: ``$COMPRESS_TASKS_DIR``, or the ones shipped inside the package."""
    override = os.environ.get("COMPRESS_TASKS_DIR")
    path = Path(override) if override else Path(__file__).resolve().parent / "tasks"
    if not path.is_dir():
        raise UsageError(f"task folder {path} not found; point COMPRESS_TASKS_DIR at a folder of lm-eval task YAMLs")
    return path


@contextlib.contextmanager
def materialized_tasks_dir(assets: Path | None = None) -> Iterator[Path]:
    """A temporary copy of :func:`tasks_dir` with ``${COMPRESS_ASSETS}`` replaced by ``assets``.

    The YAML files hold the placeholder inside double-quoted strings, so the path is inserted
    JSON-escaped (valid in a YAML double-quoted scalar). Helper ``.py`` files are copied as they are.
    """
    root = assets if assets is not None else assets_root()
    assert root is not None
    escaped = json.dumps(str(Path(root).resolve()))[1:-1]
    with tempfile.TemporaryDirectory(prefix="compress-tasks-") as tmp:
        out = Path(tmp)
        for src in sorted(tasks_dir().iterdir()):
            if src.suffix in (".yaml", ".yml"):
                (out / src.name).write_text(
                    src.read_text(encoding="utf-8").replace(ASSETS_PLACEHOLDER, escaped)
                )
            elif src.suffix == ".py":
                shutil.copyfile(src, out / src.name)
        yield out


def resolve_tasks(tasks: Sequence[str] | str) -> list[tuple[str, str]]:
    """Map user task names to ``(result key, lm-eval task name)`` pairs.

    Accepted names: a short name from :data:`ZERO_SHOT_TASKS` (or its ``compress_`` task name) →
    the local task; ``zeroshot`` → all seven local tasks; ``hub:<name>`` → lm-eval's own task
    ``<name>`` (downloads through the HF hub / datasets cache).
    """
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t.strip()]
    if not tasks:
        raise UsageError("no tasks given; use any of " + _valid_names())
    out: list[tuple[str, str]] = []
    for raw in tasks:
        name = raw.strip()
        if name in _GROUP_ALIASES:
            out.extend((short, LOCAL_TASKS[short]) for short in _GROUP_ALIASES[name])
        elif name in LOCAL_TASKS:
            out.append((name, LOCAL_TASKS[name]))
        elif name.startswith("compress_") and name[len("compress_") :] in LOCAL_TASKS:
            out.append((name[len("compress_") :], name))
        elif name.startswith(HUB_PREFIX) and len(name) > len(HUB_PREFIX):
            out.append((name, name[len(HUB_PREFIX) :]))
        else:
            raise UsageError(f"unknown task {name!r}; use any of {_valid_names()}")
    seen: set[str] = set()
    return [p for p in out if not (p[0] in seen or seen.add(p[0]))]


def _valid_names() -> str:
    return ", ".join([*ZERO_SHOT_TASKS, *_GROUP_ALIASES]) + f", or {HUB_PREFIX}<lm-eval task name>"


def _headline(key: str, metrics: Mapping[str, float]) -> str:
    short = key[len(HUB_PREFIX) :] if key.startswith(HUB_PREFIX) else key
    metric = HEADLINE_METRIC.get(short)
    if metric in metrics:
        return metric
    return "acc_norm" if "acc_norm" in metrics else "acc"


def accuracy_stderr(score: float | None, n: int | None) -> float | None:
    """Standard error of an accuracy over ``n`` examples: ``sqrt(p(1-p)/(n-1))``, the sample standard
    deviation of the 0/1 outcomes over ``sqrt(n)`` — lm-eval's ``mean_stderr`` for acc and acc_norm
    (computed here because lm-eval reports none with ``bootstrap_iters=0``). None below 2 examples."""
    if score is None or not isinstance(n, int) or n < 2:
        return None
    p = min(max(float(score), 0.0), 1.0)
    return (p * (1 - p) / (n - 1)) ** 0.5


def average_stderr(stderrs: Sequence[float | None]) -> float | None:
    """Standard error of the mean of k task accuracies, the tasks' examples being independent:
    ``sqrt(Σ se²) / k``; None if any task has none."""
    if not stderrs or any(se is None for se in stderrs):
        return None
    return sum(se * se for se in stderrs) ** 0.5 / len(stderrs)  # type: ignore[operator]


#: A model "leans" on a task when at least this share of its answers sit on one option position.
LEAN_THRESHOLD = 0.9


def answer_balance(samples: Sequence[Mapping[str, Any]], metric: str) -> dict[str, Any] | None:
    """How a multiple-choice task's answers spread over the option positions, from lm-eval's samples.

    ``chance``: the mean of 1 / number of options (the score of guessing); ``constant``: the best score
    of always picking the same position (BoolQ: the share of "yes" among the examples), with that
    position; ``lean``: the share of the model's own picks (by ``metric``: the highest log-likelihood,
    per character of the choice for ``acc_norm``, as lm-eval scores it) on its most picked position, with
    that position and ``constant_at_lean``, the score of always picking it. A ``lean`` of 1.0 means the
    model gave the same answer to every question: its score is then ``constant_at_lean``, whatever it
    understood.

    None when a sample has no single gold index (as the target, or as the doc's ``gold`` field for
    "multiple inputs" tasks), or when the picks rebuilt here disagree with lm-eval's own per-example
    score anywhere (nothing is reported that lm-eval did not measure)."""
    golds, picks, counts = [], [], []
    for sm in samples:
        gold, resps, args = sm.get("target"), sm.get("filtered_resps"), sm.get("arguments")
        if not isinstance(gold, int):  # a "multiple inputs" task (WinoGrande): the target is the shared
            gold = (sm.get("doc") or {}).get("gold")  # continuation, the gold index the doc's own field
        if not isinstance(gold, int) or not resps or not args or len(args) != len(resps):
            return None
        lls = [float(r[0]) for r in resps]
        if metric == "acc_norm":
            conts = [str(a[1]) for a in args]
            lens = [max(len(c) - (1 if c.startswith(" ") else 0), 1) for c in conts]
            lls = [ll / n for ll, n in zip(lls, lens, strict=True)]
        pick = max(range(len(lls)), key=lls.__getitem__)
        if metric not in sm or bool(sm[metric]) != (pick == gold):
            return None
        golds.append(gold)
        picks.append(pick)
        counts.append(len(lls))
    if not golds:
        return None
    n = len(golds)
    positions = range(max(counts))
    const_pos = max(positions, key=lambda c: sum(g == c for g in golds))
    lean_pos = max(positions, key=lambda c: sum(p == c for p in picks))
    return {"chance": sum(1 / k for k in counts) / n,
            "constant": sum(g == const_pos for g in golds) / n, "constant_choice": const_pos,
            "lean": sum(p == lean_pos for p in picks) / n, "lean_choice": lean_pos,
            "constant_at_lean": sum(g == lean_pos for g in golds) / n}


def lm_eval_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Sequence[str] | str,
    *,
    limit: int | float | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    num_fewshot: int = 0,
    device: str | None = None,
) -> dict[str, Any]:
    """Zero-shot (or few-shot) accuracy of the in-memory ``model`` with lm-eval.

    ``tasks`` uses the names of :func:`resolve_tasks`: ``piqa`` etc. run the local ``compress_*``
    tasks over ``$COMPRESS_ASSETS/data`` (prompts as lm-eval's own tasks build them; each YAML says
    how its data differ from the hub's), ``zeroshot`` runs all seven, and ``hub:<name>`` runs
    lm-eval's own task ``<name>`` (needs the hub or a filled HF datasets cache). ``limit`` is a
    count or a fraction of each task's items; ``device`` moves the model first (otherwise it stays
    where it is); ``max_length`` defaults to the model's ``max_position_embeddings``.

    Returns ``{key: {"acc", "acc_norm" (when the task reports it), "n", "metric", "score",
    "stderr", "task", "answers"}, ..., "average": mean of the "score"s}``, where ``metric`` is the
    headline metric of :data:`HEADLINE_METRIC` (acc_norm, else acc, for hub tasks not listed),
    ``score`` its value, ``stderr`` its standard error (:func:`accuracy_stderr`) and ``answers`` how
    the task's gold answers and the model's picks spread over the option positions
    (:func:`answer_balance`; None where it cannot be rebuilt).
    """
    pairs = resolve_tasks(tasks)
    needs_local = any(not key.startswith(HUB_PREFIX) for key, _ in pairs)
    needs_hub = any(key.startswith(HUB_PREFIX) for key, _ in pairs)
    if needs_local and assets_root(required=False) is None:
        raise UsageError(
            "the local tasks need COMPRESS_ASSETS (the assets folder with data/); "
            f"set it, or use {HUB_PREFIX}<task> for lm-eval's own tasks"
        )
    if num_fewshot < 0:
        raise UsageError(f"num_fewshot must be >= 0, got {num_fewshot}")
    try:  # lm-eval reads 0 as "no examples" and a negative value as a slice from the end
        limit = check_limit(limit)
    except ValueError as e:
        raise UsageError(str(e)) from None

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if device is not None:
        model.to(device)

    with contextlib.ExitStack() as stack:
        include = stack.enter_context(materialized_tasks_dir()) if needs_local else None
        manager = TaskManager(include_path=str(include) if include else None, include_defaults=needs_hub)
        known = set(manager.all_tasks)
        missing = [name for _, name in pairs if name not in known]
        if missing:
            raise UsageError(
                f"lm-eval does not know task(s) {', '.join(missing)}; use any of {_valid_names()}"
            )
        stack.enter_context(eval_mode(model))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        try:
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=[name for _, name in pairs],
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=manager,
                bootstrap_iters=0,
                log_samples=True,  # for answer_balance: each example's gold and per-choice log-likelihoods
            )
        except ConnectionError as e:
            if not needs_hub:
                raise
            raise UsageError(
                f"{e} - {HUB_PREFIX}<task> needs the HF hub or a filled datasets cache; offline, use the "
                f"local tasks ({', '.join(ZERO_SHOT_TASKS)})"
            ) from None

    if out is None:  # only on non-zero ranks of a distributed run
        return {}
    results: dict[str, Any] = {}
    scores: list[float] = []
    for key, name in pairs:
        raw = out["results"].get(name, {})
        metrics = {
            m: float(raw[f"{m},none"])
            for m in ("acc", "acc_norm")
            if isinstance(raw.get(f"{m},none"), (int, float))
        }
        if not metrics:
            raise UsageError(
                f"task {name!r} reported no acc/acc_norm (got {sorted(raw)}); only multiple-choice tasks are supported"
            )
        metric = _headline(key, metrics)
        n = out.get("n-samples", {}).get(name, {}).get("effective")
        results[key] = {**metrics, "n": n, "metric": metric, "score": metrics[metric], "task": name,
                        "stderr": accuracy_stderr(metrics[metric], n),
                        "answers": answer_balance(out.get("samples", {}).get(name) or [], metric)}
        scores.append(metrics[metric])
    results["average"] = sum(scores) / len(scores)
    return results


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    ppl: Mapping[str, Sequence[int]] | None = None,
    tasks: Sequence[str] | str | None = None,
    limit: int | float | None = None,
    max_windows: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexities and lm-eval accuracies in one call (for ``compress eval`` and the bench runner).

    ``ppl`` maps a source of :func:`ppl_text` to the window lengths to measure, e.g.
    ``{"wikitext2": [2048, 128]}``; ``tasks`` and ``limit`` go to :func:`lm_eval_tasks`;
    ``max_windows`` caps every perplexity run. Returns ``{"ppl": {source: {str(seq_len): result}},
    "tasks": <lm_eval_tasks result>}`` with only the parts that were asked for (string keys keep
    the record identical after a JSON round trip).
    """
    result: dict[str, Any] = {}
    if ppl:
        result["ppl"] = {}
        for source, lengths in ppl.items():
            text = ppl_text(source)
            result["ppl"][source] = {
                str(n): perplexity(
                    model, tokenizer, text, seq_len=int(n), max_windows=max_windows, progress=progress
                )
                for n in lengths
            }
    if tasks:
        result["tasks"] = lm_eval_tasks(model, tokenizer, tasks, limit=limit, batch_size=batch_size)
    return result
