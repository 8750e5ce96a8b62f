"""Calibration text sources and seeded token blocks.

:class:`CalibrationSource` turns a text corpus (local file, directory, built-in alias or a Hugging
Face dataset name) into a token stream and draws seeded blocks from it: random windows for
calibration (:meth:`CalibrationSource.batches`, as GPTQ / SliceGPT sample them) and consecutive
blocks for recovery training (:meth:`CalibrationSource.sequential_blocks`). A method never draws
from a source directly: it asks its :class:`compress.PruneContext` (``ctx.draw``), which records
exactly what was drawn for the run's ``calibration_hash``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from compress.assets import data_text, display_path, wikitext_join
from compress.errors import CalibrationError, UsageError

#: Built-in aliases: name -> (data file, reader kind); see compress.assets.data_text for where it is read.
ALIASES: dict[str, tuple[str, str]] = {
    "wikitext2": ("wikitext-2-raw/wiki.valid.raw", "wikitext"),  # shipped with the package too
    "wikitext2-test": ("wikitext-2-raw/wiki.test.raw", "wikitext"),  # shipped with the package too
    "tinystories": ("tinystories/tinystories_val.txt", "text"),  # $COMPRESS_ASSETS only
}


TEXT_SUFFIXES = (".txt", ".raw")


JSON_SUFFIXES = (".jsonl", ".json")


# Texts up to this many characters are tokenised in one call, which gives exactly the token
# stream of the pruning-paper protocol (e.g. WikiText-2 test, 1.29M chars). Longer texts are cut
# at line boundaries into pieces of about _CHUNK_CHARS and tokenised as a batch; the token stream
# may then differ from a one-shot tokenisation at the piece boundaries (a tokenizer that prepends
# a word-start marker adds one per piece), which does not matter for calibration statistics.
_ONE_SHOT_CHARS = 4_000_000


_CHUNK_CHARS = 1_000_000


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:200]}" if msg else type(e).__name__


class CalibrationSource:
    """A text corpus turned into seeded token blocks.

    The text is tokenised lazily, once, with ``add_special_tokens=False``: the corpus is one
    continuous stream and blocks are windows cut from it, so a BOS token in front of the corpus
    would only appear in the few windows that start at offset 0 (the pruning-paper protocol for
    Llama-family PPL also tokenises the joined text as one string).
    """

    def __init__(
        self,
        text: str,
        tokenizer: Any,
        *,
        seed: int = 0,
        spec: str = "<text>",
        path: str | None = None,
    ):
        self.text = text
        self.tokenizer = tokenizer
        self.seed = int(seed)
        self.spec = spec
        self.path = path
        self._tokens: torch.Tensor | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_text(cls, text: str, tokenizer: Any, *, seed: int = 0, name: str = "<text>") -> CalibrationSource:
        """A source over an in-memory string (tests, programmatic use)."""
        if not text.strip():
            raise CalibrationError(f"calibration text {name!r} is empty; pass a non-empty corpus")
        return cls(text, tokenizer, seed=seed, spec=name)

    @classmethod
    def from_spec(
        cls,
        spec: str,
        tokenizer: Any,
        *,
        seed: int = 0,
        max_chars: int | None = None,
    ) -> CalibrationSource:
        """Resolve ``spec`` to a corpus.

        ``spec`` is one of: a ``.txt``/``.raw`` file; a ``.jsonl``/``.json`` file (field ``text``,
        or ``path.jsonl:field``); a directory (its ``.txt``/``.raw``/``.jsonl``/``.json`` files in
        sorted order, joined by blank lines); an alias from :data:`ALIASES`; or
        ``hf:NAME[:CONFIG[:SPLIT]]`` for :func:`datasets.load_dataset` (split ``train`` by
        default, field ``text``). ``max_chars`` truncates the text (quick runs).
        """
        if not isinstance(spec, str) or not spec.strip():
            raise CalibrationError("empty calibration spec; give a file, a directory, an alias or hf:NAME")
        spec = spec.strip()
        if max_chars is not None and max_chars <= 0:
            raise CalibrationError(f"max_chars must be positive, got {max_chars}")
        if spec.startswith("hf:"):
            text, path = _load_hf(spec, max_chars)
        elif spec in ALIASES:
            text, path = _load_alias(spec)
        else:
            text, path = _load_path(spec)
        if max_chars is not None:
            text = text[:max_chars]
        if not text.strip():
            raise CalibrationError(f"calibration corpus {spec!r} is empty; point it at a file with text")
        return cls(text, tokenizer, seed=seed, spec=spec, path=path)

    def with_tokenizer(self, tokenizer: Any) -> CalibrationSource:
        """The same corpus for ``tokenizer`` (a source read before the model was loaded)."""
        return CalibrationSource(self.text, tokenizer, seed=self.seed, spec=self.spec, path=self.path)

    def with_seed(self, seed: int) -> CalibrationSource:
        """The same corpus (and token cache) with another seed, e.g. for held-out blocks."""
        other = CalibrationSource(self.text, self.tokenizer, seed=seed, spec=self.spec, path=self.path)
        other._tokens = self._tokens
        return other

    # ------------------------------------------------------------------ tokens
    @property
    def tokens(self) -> torch.Tensor:
        """The whole corpus as a 1-D LongTensor (tokenised on first access)."""
        if self._tokens is None:
            self._tokens = self._tokenize()
        return self._tokens

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())

    def _tokenize(self) -> torch.Tensor:
        tok = self.tokenizer
        kw: dict[str, Any] = dict(add_special_tokens=False, return_attention_mask=False, verbose=False)
        try:
            if len(self.text) <= _ONE_SHOT_CHARS:
                ids: list[int] = list(tok(self.text, **kw)["input_ids"])
            else:
                ids = []
                for piece in tok(_line_chunks(self.text, _CHUNK_CHARS), **kw)["input_ids"]:
                    ids.extend(piece)
        except Exception as e:  # tokenizers raise assorted types
            raise CalibrationError(f"cannot tokenise calibration corpus {self.spec!r}: {_one_line(e)}") from e
        if not ids:
            raise CalibrationError(
                f"calibration corpus {self.spec!r} gives no tokens; check the file and the tokenizer"
            )
        return torch.tensor(ids, dtype=torch.long)

    def _check_len(self, seq_len: int) -> int:
        if seq_len <= 0:
            raise CalibrationError(f"seq_len must be positive, got {seq_len}")
        n_tok = self.num_tokens
        if n_tok < seq_len:
            raise CalibrationError(
                f"calibration corpus {self.spec!r} has {n_tok} tokens, fewer than one block of "
                f"seq_len={seq_len}; use a larger corpus or a smaller seq_len"
            )
        return n_tok

    # ------------------------------------------------------------------ blocks
    def batches(self, n: int, seq_len: int) -> torch.Tensor:
        """``n`` random windows of ``seq_len`` tokens, shape ``[n, seq_len]``.

        Start offsets are drawn uniformly (with replacement) from a ``torch.Generator`` seeded with
        :attr:`seed`, so the same seed and corpus always give the same tensor.
        """
        starts = self._starts(n, seq_len)
        idx = starts[:, None] + torch.arange(seq_len)[None, :]
        return self.tokens[idx]

    def _starts(self, n: int, seq_len: int) -> torch.Tensor:
        """Start offsets of :meth:`batches` ``(n, seq_len)``."""
        if n <= 0:
            raise CalibrationError(f"number of calibration blocks must be positive, got {n}")
        n_tok = self._check_len(seq_len)
        g = torch.Generator().manual_seed(self.seed)
        return torch.randint(0, n_tok - seq_len + 1, (n,), generator=g)

    def held_out(self, n: int, seq_len: int, avoid: list[tuple[int, int]]) -> torch.Tensor:
        """``n`` windows of ``seq_len`` tokens that share no token position with the blocks of
        :meth:`batches` for each ``(n, seq_len)`` in ``avoid`` (what a method calibrated on), so a
        choice scored on them is scored on text it did not calibrate on. Seeded like :meth:`batches`
        (with a generator of its own); a one-line :class:`CalibrationError` when the corpus has too
        little text left outside the calibration blocks."""
        if n <= 0:
            raise CalibrationError(f"number of held-out blocks must be positive, got {n}")
        n_tok = self._check_len(seq_len)
        covered = torch.zeros(n_tok + 1, dtype=torch.int32)  # +1 at each block start, -1 after its end
        for m, length in avoid:
            for st in self._starts(m, length).tolist():
                covered[st] += 1
                covered[min(n_tok, st + length)] -= 1
        used = torch.cumsum(covered, 0)[:n_tok] > 0
        # a start is free when its window [st, st + seq_len) has no covered position
        bad = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(used.long(), 0)])
        free = ((bad[seq_len:] - bad[: n_tok - seq_len + 1]) == 0).nonzero().flatten()
        g = torch.Generator().manual_seed(self.seed + 0x5EED)
        order = free[torch.randperm(free.numel(), generator=g)].tolist()
        chosen: list[int] = []
        taken = torch.zeros(n_tok, dtype=torch.bool)
        for st in order:  # disjoint from each other too, so no token is scored twice
            if not taken[st:st + seq_len].any():
                chosen.append(st)
                taken[st:st + seq_len] = True
                if len(chosen) == n:
                    break
        if len(chosen) < n:
            raise CalibrationError(
                f"calibration corpus {self.spec!r} ({n_tok} tokens) has room for only {len(chosen)} held-out "
                f"blocks of {seq_len} tokens outside the calibration blocks, {n} needed; use a larger corpus "
                "or fewer/shorter blocks"
            )
        idx = torch.tensor(chosen)[:, None] + torch.arange(seq_len)[None, :]
        return self.tokens[idx]

    def sequential_blocks(self, n: int, seq_len: int, skip_tokens: int = 0) -> torch.Tensor:
        """``n`` consecutive non-overlapping blocks, shape ``[n, seq_len]`` (training data).

        The stream starts at a seeded offset (plus ``skip_tokens`` already consumed by earlier
        training, so successive calls continue the stream) and wraps around to the start of the
        corpus when it runs out (then blocks repeat, i.e. more than one epoch).
        """
        if skip_tokens < 0:
            raise CalibrationError(f"skip_tokens must be >= 0, got {skip_tokens}")
        if n <= 0:
            raise CalibrationError(f"number of blocks must be positive, got {n}")
        n_tok = self._check_len(seq_len)
        g = torch.Generator().manual_seed(self.seed)
        offset = int(torch.randint(0, n_tok, (1,), generator=g)) + skip_tokens
        idx = (offset + torch.arange(n * seq_len)) % n_tok
        return self.tokens[idx].view(n, seq_len)

    def token_budget_blocks(self, tokens: int, seq_len: int) -> torch.Tensor:
        """Enough :meth:`sequential_blocks` to cover ``tokens`` (rounded up to whole blocks)."""
        if tokens <= 0:
            raise CalibrationError(f"token budget must be positive, got {tokens}")
        return self.sequential_blocks(-(-tokens // seq_len), seq_len)

    def fingerprint(self, n: int, seq_len: int) -> str:
        """sha256 of the blocks :meth:`batches` returns (:func:`blocks_sha256`)."""
        return blocks_sha256(self.batches(n, seq_len))

    def describe(self) -> dict[str, Any]:
        """What the record says about the text: no absolute path (records travel with model folders)."""
        return {
            "spec": display_path(self.spec),
            "path": display_path(self.path),
            "chars": len(self.text),
            "tokens": self.num_tokens,
            "seed": self.seed,
        }

    def __repr__(self) -> str:
        return f"CalibrationSource(spec={self.spec!r}, seed={self.seed}, chars={len(self.text)})"


def blocks_sha256(blocks: torch.Tensor) -> str:
    """sha256 of ``"{N}x{T}:"`` followed by the int64 tokens of ``blocks [N, T]``: what a run records
    as its ``calibration_hash``."""
    h = hashlib.sha256(f"{blocks.shape[0]}x{blocks.shape[1]}:".encode())
    h.update(blocks.contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------- readers
def _line_chunks(text: str, size: int) -> list[str]:
    """Cut ``text`` into pieces of about ``size`` chars, only after a newline when possible."""
    out: list[str] = []
    i = 0
    while i < len(text):
        j = min(len(text), i + size)
        if j < len(text):
            k = text.rfind("\n", i, j)
            if k > i:
                j = k + 1
        out.append(text[i:j])
        i = j
    return out


def _read_text(path: Path, budget: list[int] | None = None) -> str:
    """The UTF-8 text of the regular file ``path``, bounded (:func:`compress.io.safe_io.read_text`):
    FIFOs, devices (``/dev/zero``) and sockets are refused before a byte is read, and at most
    :func:`compress.io.limits.max_calib_bytes` bytes are read — in all, across the files of a folder when
    ``budget`` (``[bytes left]``) is shared between the calls."""
    from compress.io.limits import human_bytes, max_calib_bytes
    from compress.io.safe_io import read_text

    cap = max_calib_bytes()
    left = budget[0] if budget is not None else cap
    try:
        text = read_text(path, left, "calibration file", CalibrationError)
    except CalibrationError as e:
        if getattr(e, "too_large", False):
            raise CalibrationError(
                f"calibration text {path} is above the {human_bytes(cap)} limit"
                + (" (all files of the folder together)" if budget is not None else "")
                + "; use a smaller file, or raise COMPRESS_MAX_CALIB_BYTES") from None
        raise
    if budget is not None:
        budget[0] -= len(text.encode("utf-8"))
    return text


def _json_loads(text: str, where: str):
    try:
        return json.loads(text)
    except RecursionError:
        raise CalibrationError(f"{where} is nested too deeply to read; flatten it to text records") from None


def _record_text(rec: Any, field: str, where: str) -> str:
    if isinstance(rec, str):
        return rec
    if isinstance(rec, Mapping):
        if field not in rec:
            keys = ", ".join(sorted(map(str, rec)))[:120]
            raise CalibrationError(
                f"{where} has no field {field!r} (fields: {keys}); choose one with 'path.jsonl:FIELD'"
            )
        val = rec[field]
        if not isinstance(val, str):
            raise CalibrationError(f"{where} field {field!r} is {type(val).__name__}, not text; choose a text field")
        return val
    raise CalibrationError(f"{where} is a {type(rec).__name__}, not an object or a string")


def _read_json(path: Path, field: str, budget: list[int] | None = None) -> str:
    raw = _read_text(path, budget)
    records: list[Any]
    if path.suffix == ".json":
        try:
            data = _json_loads(raw, str(path))
        except json.JSONDecodeError:
            data = None  # maybe JSON lines with a .json name
        if data is not None:
            if isinstance(data, Mapping) and isinstance(data.get("data"), list):
                data = data["data"]
            records = data if isinstance(data, list) else [data]
            return "\n\n".join(_record_text(r, field, f"{path} item {i}") for i, r in enumerate(records))
    texts = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = _json_loads(line, f"{path}:{lineno}")
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{path}:{lineno} is not valid JSON ({e.msg}); fix the line or the file") from e
        texts.append(_record_text(rec, field, f"{path}:{lineno}"))
    return "\n\n".join(texts)


def _read_file(path: Path, field: str, budget: list[int] | None = None) -> str:
    if path.suffix in JSON_SUFFIXES:
        return _read_json(path, field, budget)
    return _read_text(path, budget)


def _load_path(spec: str) -> tuple[str, str]:
    field = "text"
    path = Path(spec).expanduser()
    if not path.exists() and ":" in spec:
        head, _, tail = spec.rpartition(":")
        hp = Path(head).expanduser()
        if hp.suffix in JSON_SUFFIXES and tail:
            path, field = hp, tail
    if not path.exists():
        looks_like_path = os.sep in spec or "/" in spec or Path(spec).suffix != ""
        if looks_like_path:
            raise CalibrationError(f"calibration file {str(path)!r} does not exist; check the path")
        names = ", ".join(sorted(ALIASES))
        raise CalibrationError(
            f"unknown calibration source {spec!r}; use a file or directory path, hf:NAME[:CONFIG[:SPLIT]] "
            f"or one of the aliases: {names}"
        )
    if path.is_dir():
        files = sorted(
            p for p in path.iterdir() if p.is_file() and p.suffix in TEXT_SUFFIXES + JSON_SUFFIXES
        )
        if not files:
            raise CalibrationError(f"directory {str(path)!r} holds no .txt/.raw/.jsonl/.json files; add some text")
        from compress.io.limits import max_calib_bytes

        budget = [max_calib_bytes()]  # one cap for the whole folder
        return "\n\n".join(_read_file(p, field, budget) for p in files), str(path.resolve())
    return _read_file(path, field), str(path.resolve())


def _load_alias(name: str) -> tuple[str, str]:
    rel, kind = ALIASES[name]
    try:
        text, where = data_text(rel)
    except UsageError as e:
        raise CalibrationError(f"calibration alias {name!r}: {e}") from None
    if kind == "wikitext":
        text = wikitext_join(text)
    return text, where


def _load_hf(spec: str, max_chars: int | None) -> tuple[str, str]:
    parts = spec[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise CalibrationError(f"bad dataset spec {spec!r}; use hf:NAME[:CONFIG[:SPLIT]]")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    hint = "it is not available here (offline or not cached); use a local .txt/.jsonl file instead"
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise CalibrationError(f"{spec!r} needs the 'datasets' package; pip install datasets or use a local file") from e
    # With a character budget, stream so that a huge split (C4, RedPajama) is not downloaded whole.
    streaming = max_chars is not None
    # Never more than the calibration text cap: a dataset split can be far larger than memory.
    from compress.io.limits import max_calib_bytes

    budget = min(max_chars, max_calib_bytes()) if max_chars is not None else max_calib_bytes()
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=streaming)
        texts: list[str] = []
        total = 0
        for i, row in enumerate(ds):
            t = _record_text(row, "text", f"{spec} row {i}")
            texts.append(t)
            total += len(t) + 2
            if total >= budget:
                break
    except CalibrationError:
        raise
    except Exception as e:
        raise CalibrationError(f"cannot load dataset {spec!r} ({_one_line(e)}); {hint}") from e
    return "\n\n".join(texts), f"hf:{name}:{config or ''}:{split}"
