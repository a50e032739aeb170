"""CLIP byte-pair tokenizers on disk: the real CLIP vocabulary from its merge list, or a small trained one.

Both write the files that ``transformers.CLIPTokenizer.from_pretrained(dir)`` reads (``vocab.json``,
``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``), in CLIP's format: byte-level
symbols, a ``</w>`` end-of-word suffix, lowercased text, and ``<|startoftext|>`` / ``<|endoftext|>`` as the
last two ids. ``<|endoftext|>`` is also the padding and unknown token (Stable Diffusion 1.x's setting).

- Real vocabulary (``bpe_path`` = CLIP's ``bpe_simple_vocab_16e6.txt.gz``): built in the order of
  open_clip's ``SimpleTokenizer``, 49,408 ids; "a photo of a cat" -> [49406, 320, 1125, 539, 320, 2368, 49407].
- Small vocabulary (no ``bpe_path``; the offline demo on a fresh machine): byte-pair merges learnt from
  the given captions plus ``resources/common_words.txt``, at most a few thousand ids, in tens of
  milliseconds. The text is split by the ``tokenizers`` library exactly as CLIPTokenizer splits it; the
  merges are learnt here, with deterministic tie-breaking, because the ``tokenizers`` BPE trainer breaks
  ties in hash-map order and gives a different vocabulary in every process. All 512 byte symbols are in
  it, so any text tokenises (unknown words fall back to byte pieces).
"""

from __future__ import annotations

import gzip
import heapq
import json
import os
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from ..io.errors import MissingPathError, UserError

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
CLIP_BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408
# CLIP's pre-tokenisation: special tokens, English contractions, letter runs, single digits, other symbols.
CLIP_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_WORDS_FILE = Path(__file__).resolve().parent / "resources" / "common_words.txt"
_REPO_SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"  # ../shared/data beside the repo


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode symbol table (256 entries, CLIP's order)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    """Inverse of :func:`bytes_to_unicode`."""
    return {v: k for k, v in bytes_to_unicode().items()}


def symbols_to_text(symbols: str) -> str:
    """Byte-level symbols (``</w>`` already removed) -> text, undecodable bytes replaced."""
    table = unicode_to_bytes()
    return bytes(table[c] for c in symbols if c in table).decode("utf-8", errors="replace")


def clip_vocab_from_bpe(bpe_path: str | Path) -> tuple[list[str], list[tuple[str, str]]]:
    """CLIP's vocabulary and merges from ``bpe_simple_vocab_16e6.txt.gz``, exactly as open_clip builds them."""
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise UserError(f"{bpe_path}: not a CLIP BPE merge list (bad line {' '.join(bad[0])!r})")
    base = list(bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges] + [BOS, EOS]
    return vocab, merges  # type: ignore[return-value]


def common_words() -> list[str]:
    """The bundled list of common caption words (``resources/common_words.txt``)."""
    words: list[str] = []
    for line in _WORDS_FILE.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            words.extend(line.split())
    return words


def _pretokenized_words(texts: Iterable[str]) -> Counter[tuple[str, ...]]:
    """Word counts of ``texts`` split exactly as CLIPTokenizer splits them (``tokenizers`` normaliser and
    pre-tokeniser), each word as byte-level symbols with ``</w>`` on the last one."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    norm = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    counts: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        for piece, _ in pre.pre_tokenize_str(norm.normalize_str(str(text))):
            if piece and piece not in (BOS, EOS):
                counts[tuple(piece[:-1]) + (piece[-1] + "</w>",)] += 1
    return counts


def _learn_merges(counts: Counter[tuple[str, ...]], max_merges: int) -> list[tuple[str, str]]:
    """Byte-pair merges, most frequent pair first; ties go to the lexicographically smallest pair, so the
    result depends on the input only (the ``tokenizers`` trainer breaks ties in hash-map order)."""
    words = [list(w) for w in sorted(counts)]
    freqs = [counts[tuple(w)] for w in words]
    pair_counts: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap and len(merges) < max_merges:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg or -neg <= 0:
            continue  # stale entry: the pair's current count was pushed when it changed
        merges.append(pair)
        merged = pair[0] + pair[1]
        changed: set[tuple[str, str]] = set()
        for i in sorted(where.pop(pair)):
            w, f = words[i], freqs[i]
            for p in zip(w, w[1:]):
                pair_counts[p] -= f
                changed.add(p)
            out, k = [], 0
            while k < len(w):
                if k + 1 < len(w) and (w[k], w[k + 1]) == pair:
                    out.append(merged)
                    k += 2
                else:
                    out.append(w[k])
                    k += 1
            words[i] = out
            for p in zip(out, out[1:]):
                pair_counts[p] += f
                where[p].add(i)
                changed.add(p)
        pair_counts.pop(pair, None)
        for p in sorted(changed - {pair}):
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
    return merges


def train_small_bpe(
    corpus: Iterable[str] | None = None, vocab_size: int = 2048
) -> tuple[list[str], list[tuple[str, str]]]:
    """A small CLIP-format BPE (vocabulary, merges) learnt from ``corpus`` + the common word list.

    Deterministic. ``vocab_size`` caps the whole vocabulary (512 byte symbols + merges + 2 special tokens);
    learning stops earlier once every word is a single token.
    """
    if vocab_size < 514:
        raise ValueError(f"vocab_size {vocab_size} < 514 (the 512 byte symbols and 2 special tokens)")
    counts = _pretokenized_words([" ".join(common_words()), *(corpus or [])])
    base = list(bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base]
    merges = _learn_merges(counts, vocab_size - len(vocab) - 2)
    return vocab + [a + b for a, b in merges] + [BOS, EOS], merges


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_clip_tokenizer(
    out_dir: str | Path,
    bpe_path: str | Path | None = None,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 2048,
) -> Path:
    """Write a CLIP tokenizer folder: the real vocabulary from ``bpe_path``, else a small trained one.

    ``corpus`` (captions) only matters for the trained vocabulary. Returns ``out_dir``.
    """
    out = Path(out_dir)
    if bpe_path is not None:
        if not Path(bpe_path).is_file():
            raise MissingPathError(f"{bpe_path}: CLIP BPE merge list not found (expected {CLIP_BPE_FILENAME})")
        vocab, merges = clip_vocab_from_bpe(bpe_path)
    else:
        vocab, merges = train_small_bpe(corpus, vocab_size=vocab_size)
    if len(set(vocab)) != len(vocab):
        raise ValueError("CLIP vocabulary has duplicate entries")
    out.mkdir(parents=True, exist_ok=True)
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        **specials,
    }
    _write_atomic(out / "vocab.json", json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    _write_atomic(out / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    _write_atomic(out / "special_tokens_map.json", json.dumps(specials, indent=2))
    _write_atomic(out / "tokenizer_config.json", json.dumps(config, indent=2))
    return out


def find_clip_bpe() -> Path | None:
    """The real CLIP merge list if this machine has it: ``$TCOMPOSE_TEST_DATA/clip-bpe/``, then
    ``../shared/data/clip-bpe/`` next to the repository; None when absent."""
    roots = []
    if os.environ.get("TCOMPOSE_TEST_DATA"):
        roots.append(Path(os.environ["TCOMPOSE_TEST_DATA"]))
    roots.append(_REPO_SHARED_DATA)
    for root in roots:
        path = root / "clip-bpe" / CLIP_BPE_FILENAME
        if path.is_file():
            return path
    return None
