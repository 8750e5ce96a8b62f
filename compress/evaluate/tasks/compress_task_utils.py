"""Document processing for the local lm-eval tasks (loaded by lm-eval through ``!function``).

Kept free of ``compress`` imports: lm-eval imports this file by path from a temporary copy of
the package's ``compress/evaluate/tasks``.
"""

from __future__ import annotations

import re
from typing import Any


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag text cleaning (WikiHow bracket artifacts, double spaces)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_query(query: str) -> str:
    """Recover lm-eval's ``ctx_b.capitalize()`` on a query built from the raw ``ctx``.

    In the local file the query is ``activity_label + ": " + ctx_a + " " + ctx_b`` with ``ctx_b`` as
    released (lower-case for ActivityNet items). ``ctx_b`` is the fragment after the last ". ", and
    it is the only sentence start that is lower-case, so it is capitalised (``str.capitalize``, as
    lm-eval does) only in that case. The rest of the query was already cleaned upstream with
    lm-eval's rules and is left as it is.
    """
    head, sep, tail = query.rpartition(". ")
    if tail[:1].islower():
        tail = tail.capitalize()
    return head + sep + tail


def _hellaswag_doc(doc: dict[str, Any]) -> dict[str, Any]:
    return {
        "query": hellaswag_query(doc["query"]),
        "choices": [hellaswag_preprocess(c) for c in doc["choices"]],
        "gold": int(doc["gold"]),
    }


def hellaswag_process_docs(dataset: Any) -> Any:
    """``process_docs`` hook: a ``datasets.Dataset`` in, the same with lm-eval-style fields out."""
    return dataset.map(_hellaswag_doc)
