"""Evaluation: perplexity with the pruning papers' WikiText-2 protocol, and the lm-eval bridge.

Perplexity follows GPTQ / SparseGPT / SliceGPT / LLM-Pruner: the whole split is joined with
``"\\n\\n"``, tokenised once without special tokens, cut into non-overlapping windows of ``seq_len``
tokens (the tail is dropped), and every window predicts its tokens 1..L-1 from its own prefix.
``ppl = exp(mean NLL over all predicted tokens)``.

Zero-shot accuracy runs ``lm_eval.simple_evaluate`` on the in-memory model (no save/reload), over
the local task YAMLs in ``benchmarks/tasks/`` that read ``$COMPRESS_ASSETS/data``. Those YAMLs
name their data as ``${COMPRESS_ASSETS}/...``; lm-eval does not expand variables, so
:func:`materialized_tasks_dir` writes resolved copies into a temporary folder that is passed to
``TaskManager(include_path=...)``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from compress.errors import UsageError

__all__ = [
    "ASSETS_PLACEHOLDER",
    "HEADLINE_METRIC",
    "LOCAL_TASKS",
    "PPL_DATASETS",
    "ZERO_SHOT_TASKS",
    "assets_root",
    "evaluate_model",
    "lm_eval_tasks",
    "materialized_tasks_dir",
    "perplexity",
    "ppl_text",
    "resolve_tasks",
    "tasks_dir",
    "wikitext2_text",
]

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

#: Short name -> local lm-eval task (``benchmarks/tasks/<task>.yaml``) over ``$COMPRESS_ASSETS/data``.
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

#: Text sources :func:`ppl_text` knows, relative to ``$COMPRESS_ASSETS``.
PPL_DATASETS: tuple[str, ...] = ("wikitext2", "wikitext2-valid", "tinystories")

#: Placeholder in the task YAMLs, replaced by the resolved assets folder.
ASSETS_PLACEHOLDER = "${COMPRESS_ASSETS}"

HUB_PREFIX = "hub:"
_GROUP_ALIASES = {"zeroshot": ZERO_SHOT_TASKS}


# --------------------------------------------------------------------------------------- assets


def assets_root(required: bool = True) -> Path | None:
    """``$COMPRESS_ASSETS`` as a folder; a one-line :class:`UsageError` when required and absent."""
    value = os.environ.get("COMPRESS_ASSETS")
    if value and Path(value).is_dir():
        return Path(value)
    if not required:
        return None
    if not value:
        raise UsageError(
            "COMPRESS_ASSETS is not set; point it at the assets folder (it holds data/ and models/)"
        )
    raise UsageError(f"COMPRESS_ASSETS={value} is not a folder; point it at the assets folder")


def _asset_file(*parts: str) -> Path:
    root = assets_root()
    assert root is not None
    path = root.joinpath(*parts)
    if not path.is_file():
        raise UsageError(f"missing asset {path}; is COMPRESS_ASSETS={root} the complete assets folder?")
    return path


def wikitext2_text(split: Literal["test", "valid"] = "test") -> str:
    """WikiText-2 (raw) ``split`` joined the way the pruning papers join the HF dataset rows.

    The raw file holds one HF row per line, empty rows written as " "; rows are restored as
    ``line + "\\n"`` (empty rows as ``""``) and joined with ``"\\n\\n"``, which is
    ``"\\n\\n".join(load_dataset("wikitext", "wikitext-2-raw-v1", split=...)["text"])``.
    """
    if split not in ("test", "valid"):
        raise UsageError(f"unknown WikiText-2 split {split!r}; use 'test' or 'valid'")
    text = _asset_file("data", "wikitext-2-raw", f"wiki.{split}.raw").read_text(encoding="utf-8")
    rows = [line + "\n" if line.strip() else "" for line in text.split("\n")[:-1]]
    return "\n\n".join(rows)


def ppl_text(source: str) -> str:
    """Text for a perplexity source: one of :data:`PPL_DATASETS` or a path to a UTF-8 text file."""
    if source == "wikitext2":
        return wikitext2_text("test")
    if source == "wikitext2-valid":
        return wikitext2_text("valid")
    if source == "tinystories":
        return _asset_file("data", "tinystories", "tinystories_val.txt").read_text(encoding="utf-8")
    path = Path(source).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise UsageError(
        f"unknown perplexity source {source!r}; use one of {', '.join(PPL_DATASETS)} or a text file path"
    )


# ------------------------------------------------------------------------------------ perplexity


def _model_device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence "sequence longer than the model maximum" while tokenising a whole corpus at once."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _progress(enabled: bool, description: str, total: int):
    """A rich progress bar (or a no-op) yielding an ``advance(n)`` callable."""

    @contextlib.contextmanager
    def bar() -> Iterator[Any]:
        if not enabled:
            yield lambda n=1: None
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        # on stderr: stdout carries results (``compress eval`` prints JSON there)
        with Progress(*columns, transient=True, console=Console(stderr=True)) as progress:
            task = progress.add_task(description, total=total)
            yield lambda n=1: progress.advance(task, n)

    return bar()


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    text: str,
    *,
    seq_len: int = 2048,
    batch_size: int = 1,
    max_windows: int | None = None,
    add_bos: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of ``model`` on ``text`` over non-overlapping windows of ``seq_len`` tokens.

    ``text`` is tokenised once with ``add_special_tokens=False``; the tail shorter than a window is
    dropped. Each window predicts its tokens 1..L-1 from its own prefix (no context carried over),
    and ``ppl = exp(mean NLL)`` over all predicted tokens of all windows, accumulated in fp32/fp64.

    With ``add_bos=True`` every window is ``[BOS] + seq_len - 1`` text tokens and all its text tokens
    are predicted (the input stays ``seq_len`` long). ``max_windows`` evaluates only the first N
    windows (a quick, partial figure: the result then has ``"partial": True``).

    Returns ``{"ppl", "nll", "seq_len", "windows", "tokens", "predicted", "total_windows",
    "partial", "add_bos"}`` where ``tokens`` counts the whole text and ``predicted`` the tokens scored.
    """
    if seq_len < 2:
        raise UsageError(f"seq_len must be at least 2, got {seq_len}")
    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, got {batch_size}")
    if max_windows is not None and max_windows < 1:
        raise UsageError(f"max_windows must be at least 1 (or None for all), got {max_windows}")
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(max_pos, int) and seq_len > max_pos:
        raise UsageError(
            f"seq_len={seq_len} exceeds the model's max_position_embeddings={max_pos}; use a shorter seq_len"
        )

    with _quiet_transformers():
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    n_tokens = int(ids.numel())

    prefix: list[int] = []
    if add_bos:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise UsageError("add_bos=True but the tokenizer has no bos_token_id")
        prefix = [int(bos)]
    body = seq_len - len(prefix)
    total_windows = n_tokens // body
    if total_windows == 0:
        raise UsageError(
            f"the text has {n_tokens} tokens, fewer than one window of seq_len={seq_len}; "
            "use a shorter seq_len or a longer text"
        )
    windows = total_windows if max_windows is None else min(max_windows, total_windows)
    blocks = ids[: windows * body].view(windows, body)
    if prefix:
        blocks = torch.cat([torch.full((windows, 1), prefix[0], dtype=torch.long), blocks], dim=1)

    device = _model_device(model)
    nll_sum = 0.0
    predicted = 0
    with (
        _eval_mode(model),
        torch.no_grad(),
        _progress(progress, f"perplexity @{seq_len}", windows) as advance,
    ):
        for start in range(0, windows, batch_size):
            batch = blocks[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            # fp32 log-softmax even for bf16/fp16 models; sum per batch, accumulate in fp64.
            shift = logits[:, :-1, :].float()
            target = batch[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                shift.reshape(-1, shift.size(-1)), target.reshape(-1), reduction="sum"
            )
            nll_sum += float(loss.double())
            predicted += int(target.numel())
            del logits, shift, loss
            advance(batch.size(0))

    nll = nll_sum / predicted
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "seq_len": seq_len,
        "windows": windows,
        "total_windows": total_windows,
        "partial": windows < total_windows,
        "tokens": n_tokens,
        "predicted": predicted,
        "add_bos": add_bos,
    }


# ------------------------------------------------------------------------------------- lm-eval


def tasks_dir() -> Path:
    """Folder of the task YAMLs: ``$COMPRESS_TASKS_DIR`` or ``benchmarks/tasks`` of this checkout."""
    override = os.environ.get("COMPRESS_TASKS_DIR")
    path = Path(override) if override else Path(__file__).resolve().parents[1] / "benchmarks" / "tasks"
    if not path.is_dir():
        raise UsageError(
            f"task folder {path} not found; set COMPRESS_TASKS_DIR to the benchmarks/tasks folder"
        )
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
    "task"}, ..., "average": mean of the "score"s}``, where ``metric`` is the headline metric of
    :data:`HEADLINE_METRIC` (acc_norm, else acc, for hub tasks not listed) and ``score`` its value.
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
        stack.enter_context(_eval_mode(model))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        try:
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=[name for _, name in pairs],
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=manager,
                bootstrap_iters=0,
                log_samples=False,
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
        results[key] = {**metrics, "n": n, "metric": metric, "score": metrics[metric], "task": name}
        scores.append(metrics[metric])
    results["average"] = sum(scores) / len(scores)
    return results


# ------------------------------------------------------------------------------------- combined


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
