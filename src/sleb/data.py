"""Text sources and calibration windows.

A *spec* names a text source: a registered name (`wikitext2`, `c4`, `gensim-wiki`, `gensim-lee`)
or a path to a local `.txt`, `.jsonl` (a `text` field per line) or `.parquet` file (a `text`
column). Every registered source has a `train` part (calibration) and a `test` part (evaluation)
that never share text. A local file is used whole for either purpose.

The offline gensim corpora are split by document, in the order they are stored: every fourth
document (index % 4 == 3) is test, the rest train.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import json
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import BadInput, SlebError, SlebWarning, missing_path

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
SPLITS = ("train", "test")


@dataclass(frozen=True)
class TextSource:
    """A registered text source: `load(split)` returns the split's documents, in a fixed order."""

    name: str
    description: str
    load: Callable[[str], list[str]]
    # How documents are joined into one stream, as the paper's data loaders do.
    joiner: str = "\n\n"
    # What the test part is, in words (recorded with every perplexity).
    test_text: str = ""
    # Evaluation windows used when the caller does not say (the paper cuts C4 to 256 windows).
    eval_max_windows: int | None = None


SOURCES: dict[str, TextSource] = {}


def register(source: TextSource) -> TextSource:
    SOURCES[source.name] = source
    return source


def _hub_dataset(*args, **kwargs):
    try:
        from datasets import load_dataset

        return load_dataset(*args, **kwargs)
    except Exception as err:  # datasets raises many types when the hub cannot be reached
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SlebError(f"cannot load dataset {args[0]!r} from the Hugging Face hub: {first}") from err


def _wikitext2(split: str) -> list[str]:
    rows = _hub_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    # WikiText-2 rows are lines; the paper joins them with blank lines into one stream.
    return list(rows["text"])


def _c4(split: str) -> list[str]:
    shard = {
        "train": ("train", "en/c4-train.00000-of-01024.json.gz"),
        "test": ("validation", "en/c4-validation.00000-of-00008.json.gz"),
    }[split]
    rows = _hub_dataset("allenai/c4", data_files={shard[0]: shard[1]}, split=shard[0])
    texts = list(rows["text"])
    # The paper evaluates on the first 1,100 validation documents only.
    return texts[:1100] if split == "test" else texts


def _gensim_data_dir() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise SlebError("the offline text sources need gensim: pip install gensim")
    return Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"


def _split_documents(docs: list[str], split: str) -> list[str]:
    return [d for i, d in enumerate(docs) if (i % 4 == 3) == (split == "test")]


def _clean_wikitext(markup: str) -> str:
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(markup).replace("'''", "").replace("''", "")
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _gensim_wiki(split: str) -> list[str]:
    from gensim.corpora.wikicorpus import extract_pages

    path = _gensim_data_dir() / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    docs = []
    with bz2.open(path) as f:
        for _title, markup, _pageid in extract_pages(f):
            if markup.lstrip().lower().startswith("#redirect"):
                continue
            text = _clean_wikitext(markup)
            if text:
                docs.append(text)
    return _split_documents(docs, split)


def _gensim_lee(split: str) -> list[str]:
    path = _gensim_data_dir() / "lee_background.cor"
    docs = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return _split_documents(docs, split)


register(TextSource(
    "wikitext2", "WikiText-2-raw (hub): train / test splits", _wikitext2,
    test_text="WikiText-2-raw-v1 test split, rows joined with blank lines",
))
register(TextSource(
    "c4", "C4 en (hub): train shard 0 / first 1,100 validation documents", _c4, joiner=" ",
    test_text="C4 en validation shard 0 (c4-validation.00000-of-00008), first 1,100 documents joined with spaces",
    eval_max_windows=256,
))
register(TextSource(
    "gensim-wiki", "English Wikipedia excerpt shipped in gensim (offline), split by article", _gensim_wiki,
    test_text="gensim's English Wikipedia excerpt, every fourth article (index % 4 == 3), joined with blank lines",
))
register(TextSource(
    "gensim-lee", "Lee news corpus shipped in gensim (offline), split by document", _gensim_lee, joiner=" ",
    test_text="gensim's Lee news corpus, every fourth document (index % 4 == 3), joined with spaces",
))


def describe_test_text(spec: str) -> str:
    """A spec's evaluation text, in words."""
    if spec in SOURCES:
        return SOURCES[spec].test_text
    return f"local file {spec} (whole file; .jsonl/.parquet documents joined with blank lines)"


def default_eval_windows(spec: str) -> int | None:
    """How many evaluation windows a spec uses when none is asked for (None: all of them)."""
    return SOURCES[spec].eval_max_windows if spec in SOURCES else None


def available_specs() -> str:
    return ", ".join(SOURCES) + ", or a path to a " + "/".join(LOCAL_SUFFIXES) + " file"


def _read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadInput(
            f"{path} is not UTF-8 text: byte 0x{raw[err.start]:02x} at offset {err.start} cannot be decoded; "
            f"re-encode it, e.g. iconv -f latin1 -t utf-8 {path} > {path.stem}-utf8{path.suffix}"
        ) from err


def _suffix(path: Path) -> str:
    """A local text file's kind, by its extension in any case (`.TXT` is a text file too)."""
    return path.suffix.lower()


def check_spec(spec: str) -> None:
    """Fail early, before any model is loaded, for a spec that cannot name a source or a readable file.

    A path that exists but is no regular file (a folder, a FIFO, a device such as /dev/zero) is
    refused as what it is, from its `stat` alone: it is never opened, so a FIFO cannot block.
    """
    if spec in SOURCES:
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        raise BadInput(f"{spec} is a folder, not a text file; give a {'/'.join(LOCAL_SUFFIXES)} file")
    if path.exists() and not path.is_file():
        raise BadInput(f"{spec} is not a regular file (a FIFO, device or socket); give a "
                       f"{'/'.join(LOCAL_SUFFIXES)} file")
    if _suffix(path) in LOCAL_SUFFIXES:
        if not path.is_file():
            raise missing_path(path, "text file")
        if _suffix(path) == ".parquet":
            _parquet_table(path, metadata_only=True)
        else:
            _read_utf8(path)
        return
    raise BadInput(f"unknown text spec {spec!r}; available: {available_specs()}")


def check_no_overlap(calib_spec: str, eval_specs: list[str]) -> None:
    """Evaluation uses a spec's test part and calibration its train part; a local file is one part."""
    for spec in eval_specs:
        check_spec(spec)
        if spec not in SOURCES and Path(spec).expanduser().resolve() == Path(calib_spec).expanduser().resolve():
            raise BadInput(f"evaluation text {spec} is the calibration file; a local file has no separate test part")


def local_paths(specs) -> list[Path]:
    """The local files among text specs (None and registered names skipped)."""
    return [Path(s).expanduser() for s in specs if s is not None and s not in SOURCES]


def _parquet_table(path: Path, metadata_only: bool = False):
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(path) if metadata_only else pq.read_table(path)
    except Exception as err:  # pyarrow raises ArrowInvalid/OSError on corrupt files
        first = " ".join(str(err).split()) or type(err).__name__
        raise BadInput(f"{path} is not a readable parquet file ({first})") from err


def _local_documents(path: Path) -> list[str]:
    if _suffix(path) == ".txt":
        return [_read_utf8(path)]
    if _suffix(path) == ".jsonl":
        docs = []
        for number, line in enumerate(_read_utf8(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError) as err:
                raise BadInput(f"{path}:{number}: expected a JSON object with a 'text' field") from err
            if not isinstance(text, str):
                raise BadInput(f"{path}:{number}: the 'text' field is not a string")
            docs.append(text)
        return docs
    table = _parquet_table(path)
    if "text" not in table.column_names:
        raise BadInput(f"{path} has no 'text' column (columns: {', '.join(table.column_names)})")
    return [t for t in table.column("text").to_pylist() if t]


def documents(spec: str, split: str) -> tuple[list[str], str]:
    """The documents of a spec's split and the joiner that makes them one stream."""
    check_spec(spec)
    if split not in SPLITS:
        raise SlebError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if spec in SOURCES:
        source = SOURCES[spec]
        return source.load(split), source.joiner
    return _local_documents(Path(spec).expanduser()), "\n\n"


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer itself puts BOS in front of encoded text (its setting, not a model rule)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(without) and with_special[0] == bos


# A fast tokenizer keeps per-token structures (offsets, token strings, alignments) for a whole call:
# about 130 bytes per character of text, so a 37 MB text peaked at 4.8 GB tokenized in one call.
# Longer texts are tokenized in overlapping pieces of PIECE_CHARS characters, joined where both
# pieces agree (`_tokenize_in_pieces`), which bounds that to one piece's worth.
PIECE_CHARS = 1 << 20
PIECE_OVERLAP = 4096  # characters two neighbouring pieces share
AGREE_TOKENS = 8  # tokens both pieces must give alike from the joining point on


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of a text stream, with no special tokens (windows get BOS separately).

    The same ids as one tokenizer call; texts over PIECE_CHARS (with a fast tokenizer) are tokenized
    in pieces to keep the tokenizer's memory bounded.
    """
    if len(text) > PIECE_CHARS and getattr(tokenizer, "is_fast", False):
        return _tokenize_in_pieces(tokenizer, text)
    return torch.tensor(_encode(tokenizer, text), dtype=torch.long)


def _encode_piece(tokenizer, text: str, begin: int) -> tuple[list[int], list[int]]:
    """Ids of text[begin : begin + PIECE_CHARS] and the character (in `text`) where each token starts."""
    enc = tokenizer(text[begin : begin + PIECE_CHARS], add_special_tokens=False, return_attention_mask=False,
                    return_offsets_mapping=True)
    return enc["input_ids"], [begin + start for start, _ in enc["offset_mapping"]]


def _join_point(a: tuple[list[int], list[int]], b: tuple[list[int], list[int]], lo: int, hi: int):
    """Indices (i, j): piece `a` up to token i, then piece `b` from token j, at the first character in
    [lo, hi) where a token starts in both and the next AGREE_TOKENS tokens are the same in both
    (ids and positions); None if there is no such point."""
    (a_ids, a_starts), (b_ids, b_starts) = a, b
    firsts = {}
    for j, start in enumerate(b_starts):
        if lo <= start < hi:
            firsts.setdefault(start, j)
    for i, start in enumerate(a_starts):
        if not lo <= start < hi or (i and a_starts[i - 1] == start) or start not in firsts:
            continue
        j = firsts[start]
        span = slice(i, i + AGREE_TOKENS), slice(j, j + AGREE_TOKENS)
        if (len(a_ids[span[0]]) == AGREE_TOKENS and a_ids[span[0]] == b_ids[span[1]]
                and a_starts[span[0]] == b_starts[span[1]]):
            return i, j
    return None


def _tokenize_in_pieces(tokenizer, text: str) -> torch.Tensor:
    """`tokenize` for a long text, piece by piece, with the ids of one call.

    Where a piece is cut, its last tokens can differ from the whole text's (a word cut in two), and
    the next piece's first ones too (a tokenizer marks the start of a text, e.g. SentencePiece's
    prefix space). So neighbouring pieces overlap by PIECE_OVERLAP characters and are joined at a
    token start inside the overlap, away from both cuts, where both pieces give the same tokens:
    there both agree with the whole text's tokenization, whose tokens depend only on nearby text.
    Were there no such point (kilobytes of text in one token), the rest is tokenized in one call.
    """
    parts, begin, keep = [], 0, 0
    piece = _encode_piece(tokenizer, text, begin)
    while begin + PIECE_CHARS < len(text):
        following = begin + PIECE_CHARS - PIECE_OVERLAP
        after = _encode_piece(tokenizer, text, following)
        join = _join_point(piece, after, following + PIECE_OVERLAP // 4, begin + PIECE_CHARS - PIECE_OVERLAP // 4)
        if join is None:
            piece = (_encode(tokenizer, text[begin:]), [])  # the same first tokens as the piece from `begin`
            break
        parts.append(torch.tensor(piece[0][keep : join[0]], dtype=torch.long))
        begin, keep, piece = following, join[1], after
    parts.append(torch.tensor(piece[0][keep:], dtype=torch.long))
    return torch.cat(parts)


def return_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim; nothing elsewhere).

    Tokenizing a whole text stream at once builds per-token structures in the fast tokenizer
    (offsets, token strings, alignments): ~360 MB at the peak for the 2.4 MB gensim-wiki train
    text, freed afterwards but kept by malloc inside the process, where ~150-300 MB of it stayed
    resident through the whole search (measured with /proc/self/status, SmolLM2's tokenizer).
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass


def _tokenize_joined(tokenizer, docs: list[str], joiner: str) -> torch.Tensor:
    """The documents as one token stream; the tokenizer's transient heap is handed back afterwards."""
    ids = tokenize(tokenizer, joiner.join(docs))
    return_freed_memory()
    return ids


def token_stream(tokenizer, spec: str, split: str) -> torch.Tensor:
    return _tokenize_joined(tokenizer, *documents(spec, split))


def _window(ids: torch.Tensor, start: int, seqlen: int, bos: int | None) -> torch.Tensor:
    if bos is None:
        return ids[start : start + seqlen]
    return torch.cat([torch.tensor([bos]), ids[start : start + seqlen - 1]])


def _check_draws(spec: str, tokens: int, nsamples: int, seqlen: int, distinct: int) -> None:
    """Refuse more windows than the text has distinct ones; warn when the windows outnumber its tokens."""
    if nsamples > distinct:
        raise BadInput(
            f"--nsamples {nsamples} asks for more windows than the train text of {spec!r} has: {tokens:,} tokens give "
            f"{distinct:,} distinct windows of {seqlen} tokens, so windows would repeat; use fewer windows, a shorter "
            f"--seqlen or a longer text"
        )
    if nsamples * seqlen > tokens:
        warnings.warn(
            f"{nsamples} calibration windows of {seqlen} tokens ({nsamples * seqlen:,} tokens) are drawn from a text "
            f"of {tokens:,} tokens ({spec}): they overlap heavily; a longer text measures the blocks better",
            SlebWarning, stacklevel=3,
        )


def calibration(tokenizer, spec: str, nsamples: int = 128, seqlen: int = 2048, seed: int = 0) -> torch.Tensor:
    """Random calibration windows from a spec's train part, deterministic for a seed.

    As in the paper's loaders: each window starts at a uniformly drawn offset in the joined token
    stream (for `c4`, in a randomly drawn document longer than the window). A window begins with
    BOS exactly when the tokenizer's own settings add one.

    Windows are drawn with replacement, so a short text gives overlapping windows. When the windows
    hold more tokens than the text (nsamples x seqlen > its tokens) they overlap heavily and a
    `SlebWarning` says so; when `nsamples` exceeds the number of distinct windows the text has,
    repeats are certain and add nothing but time (1,000,000 windows of a 20k-token text), so
    BadInput. (`c4` draws each window from its own document and is not checked.)

    Returns:
        LongTensor of shape [nsamples, seqlen].
    """
    if nsamples < 1 or seqlen < 2:
        raise SlebError(f"need nsamples >= 1 and seqlen >= 2 (got nsamples={nsamples}, seqlen={seqlen})")
    rng = random.Random(seed)
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    body = seqlen - (bos is not None)
    docs, joiner = documents(spec, "train")
    windows = []
    if spec == "c4":
        # As the paper's loader: draw documents until one is longer than the window, then an offset.
        for _ in range(nsamples):
            for _attempt in range(10_000):
                ids = tokenize(tokenizer, docs[rng.randrange(len(docs))])
                if len(ids) > body:
                    break
            else:
                raise SlebError(f"found no {spec} document longer than {body} tokens; use a shorter --seqlen")
            windows.append(_window(ids, rng.randrange(len(ids) - body), seqlen, bos))
    else:
        ids = _tokenize_joined(tokenizer, docs, joiner)
        if len(ids) <= body:
            raise SlebError(
                f"the train text of {spec!r} has {len(ids)} tokens; a window of {seqlen} tokens needs more "
                f"(use a shorter --seqlen or a longer text)"
            )
        _check_draws(spec, len(ids), nsamples, seqlen, distinct=len(ids) - body)
        for _ in range(nsamples):
            windows.append(_window(ids, rng.randrange(len(ids) - body), seqlen, bos))
    return torch.stack(windows)


def eval_windows(tokenizer, spec: str, seqlen: int = 2048, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows over a spec's test part, the tail dropped (the paper's protocol).

    A window begins with BOS exactly when the tokenizer adds one (BOS then takes one of the
    `seqlen` positions). `max_windows` keeps the first windows only; when None, the source's
    default applies (256 for `c4`, as in the paper; all windows otherwise).

    Returns:
        LongTensor of shape [windows, seqlen].
    """
    if max_windows is not None and max_windows < 1:
        raise SlebError(f"need max_windows >= 1 (got {max_windows})")
    if max_windows is None:
        max_windows = default_eval_windows(spec)
    return consecutive_windows(tokenizer, spec, "test", seqlen, max_windows)


def consecutive_windows(tokenizer, spec: str, split: str, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows over a spec's `split` part, in text order, the tail dropped (at most
    `max_windows`); a window begins with BOS exactly when the tokenizer adds one."""
    if seqlen < 2:
        raise SlebError(f"need seqlen >= 2 (got {seqlen})")
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    body = seqlen - (bos is not None)
    ids = token_stream(tokenizer, spec, split)
    count = len(ids) // body
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise SlebError(f"the {split} text of {spec!r} has {len(ids)} tokens, fewer than one window of {seqlen}")
    return torch.stack([_window(ids, i * body, seqlen, bos) for i in range(count)])


def token_sha256(windows: torch.Tensor) -> str:
    """SHA-256 of token ids as little-endian int64 in row-major order (recorded in every report)."""
    array = windows.to(torch.int64).contiguous().cpu().numpy().astype("<i8", copy=False)
    return hashlib.sha256(array.tobytes()).hexdigest()
