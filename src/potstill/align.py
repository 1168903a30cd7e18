r"""Logit targets across tokenizers: a teacher's top-k over its own tokens -> top-k over the student's.

A teacher whose tokenizer differs from the student's (an API teacher returning, for each generated
token, its bytes, its logprob and up to 20 alternatives as (bytes, logprob), no ids) gives no
distribution over the student's vocabulary. This module makes one, for every student token of the
teacher's completion text, in the shape of potstill's same-tokenizer cache: ids (S, k) int32 in the
student's vocabulary, logprobs (S, k) float32 descending, tail = 1 - sum exp; so the sparse KD
losses (``losses._buckets.sparse_logprobs``: every family, the chunked path) apply unchanged. It runs
once per ledger row, not per step. Everything here works on bytes (UTF-8 of the text; the
tokenizers' own bytes per token), never on decoded strings, so a token that cuts a multi-byte
character is kept exact.

The teacher's text is the concatenation of its chosen tokens c_1..c_T; token t spans bytes
[u_t, v_t). Student token s spans [b_s, e_s) of the same bytes and is x_s; its target is the
teacher's distribution of the student's next token given the text's bytes [0, b_s):

    t  = the teacher token with u_t <= b_s < v_t,   d = b_s - u_t   (bytes of c_t already seen)

    events at t:  (a[d:], p_t(a))  for every alternative a != c_t at t with |a| > d, a[:d] = c_t[:d]
    the path:     m = p_t(c_t), r = c_t[d:]; while |r| < e_s - b_s and t + 1 <= T:
                      events (r + a, m * p_{t+1}(a)) for every alternative a != c_{t+1} at t + 1;
                      m *= p_{t+1}(c_{t+1}); r += c_{t+1}; t += 1

    P(x_s)  += m / Z                  (the path is the text: its mass goes to the student's own token)
    P(w(y)) += p / Z                  for every event (y, p), w(y) = the longest student token that
                                      is a prefix of y (none: the event is "unmappable", its mass
                                      falls to the tail and counts["unmappable"] counts it)
    Z = 1 if d = 0, else p_t(c_t) + sum of p_t(a) over the alternatives consistent with the prefix
        (|a| > d, a[:d] = c_t[:d])    (the probability of the prefix c_t[:d] among what is known)

    P(EOS) += p_t(EOS_teacher)        if d = 0 and the teacher's stop logprob at t is known (the
                                      teacher ending its answer before c_t: the student ends before
                                      x_s; its special tokens have no bytes, so this is the one way an
                                      end of answer reaches the student)

p_t(a) = exp(logprob); p_t(c_t) comes from the chosen token's own logprob, whether or not c_t is
among the alternatives (an alternative with c_t's bytes is c_t). Masses landing on the same student
id add up; the k largest are kept, descending, and the rest and the unknown mass are the tail. A
total over 1 (API logprobs rounded) is scaled down to 1. A row with fewer than k distinct ids is
padded with its first id at logprob -inf, which ``sparse_logprobs`` reads as no bucket. A student
token of zero bytes (a SentencePiece dummy-space piece "▁" alone) is certain: logprob 0 on itself.

What is exact and what is approximate:

- exact: where the two tokenizations cut at b_s and e_s and one teacher token covers exactly the
  student token (d = 0, v_t = e_s) and each alternative is itself one student token, the target is
  the teacher's top-k exactly (same tokenizer: same ids, same logprobs; counts["exact"] counts the
  positions whose cuts coincide).
- approximate: an alternative spanning several student tokens gives its mass to its first (longest
  prefix) student token, as if the student's tokenizer would cut it there: the right first token
  for most merges, not for all; alternatives consistent with the prefix but outside the teacher's
  top-k are missing from Z (Z is too small, the target too sure); only the chosen path is expanded
  across teacher positions (an alternative at t shorter than the student token would need the
  teacher's distribution after it, which was never asked for: its mass goes to its longest prefix).
  An alternative that ends exactly at b_s (|a| = d) continues with something unknown: left out of
  the events and of Z.

The byte alignment follows GOLD (TRL's GOLDTrainer: Patiño et al. 2025, "Unlocking On-Policy
Distillation for Any Model Family", https://huggingface.co/spaces/HuggingFaceH4/general-on-policy-logit-distillation)
and ULD (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit
Distillation Loss for LLMs", arXiv:2402.12030): ``align_groups`` gives exactly TRL 1.16's
``ULDLoss._align_by_byte_offsets``. ULD and GOLD compare sorted full distributions of a local
teacher (``losses.uld``); the rule above instead maps a top-k of an API teacher onto the student's
ids, so every loss family of potstill can use it.

Pieces: ``token_bytes`` (every id's bytes, from the tokenizer's backend: byte-level BPE, SentencePiece
/ Metaspace with byte fallback, or plain pieces), ``encode_with_offsets`` (the student's ids and byte
spans for a text), ``align_groups``, ``ByteTrie`` / ``byte_trie`` (longest student token that is a
prefix of some bytes), ``student_targets`` (the rule).
"""

from __future__ import annotations

import bisect
import json
import math
import re
from collections.abc import Iterator, Sequence

import numpy as np

from potstill.errors import PotstillError

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


# ---------------------------------------------------------------------------------------------------
# the student's tokens as bytes


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte -> printable character table, inverted: character -> byte. Printable Latin-1
    bytes stand for themselves; the other 68 take the code points 256.. in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    table = {chr(b): b for b in kept}
    table.update({chr(256 + i): b for i, b in enumerate(moved)})
    return table


_BYTE_LEVEL = _byte_level_alphabet()


def _parts(node) -> Iterator[dict]:
    """Every component of a backend's pre_tokenizer / decoder / normalizer JSON, Sequences flattened."""
    if isinstance(node, dict):
        yield node
        for key in ("pretokenizers", "decoders", "normalizers"):
            for child in node.get(key) or ():
                yield from _parts(child)


def _style(spec: dict) -> tuple[str, str | None]:
    """("byte_level", None), ("metaspace", replacement) or ("plain", None), from the backend's JSON."""
    pieces = [*_parts(spec.get("pre_tokenizer")), *_parts(spec.get("decoder"))]
    if any(p.get("type") == "ByteLevel" for p in pieces):
        return "byte_level", None
    for p in pieces:
        if p.get("type") == "Metaspace":
            return "metaspace", p.get("replacement", "▁")
    # Llama-2 style: no pre-tokenizer, the decoder replaces "▁" by " " (the normalizer did the reverse)
    for p in _parts(spec.get("decoder")):
        if p.get("type") == "Replace" and p.get("content") == " " and "String" in (p.get("pattern") or {}):
            return "metaspace", p["pattern"]["String"]
    return "plain", None


def _piece_bytes(piece: str, style: str, replacement: str | None, model: dict) -> bytes | None:
    """One vocabulary piece -> the bytes of text it stands for (None: not text)."""
    if model.get("byte_fallback") and (m := _BYTE_PIECE.fullmatch(piece)):
        return bytes([int(m.group(1), 16)])
    if style == "byte_level":
        if any(ch not in _BYTE_LEVEL for ch in piece):
            return None
        return bytes(_BYTE_LEVEL[ch] for ch in piece)
    if style == "metaspace":
        return piece.replace(replacement, " ").encode()
    prefix, suffix = model.get("continuing_subword_prefix"), model.get("end_of_word_suffix")
    if prefix:  # WordPiece "##ing", CLIP-style "word</w>": the affixes are no text
        piece = piece.removeprefix(prefix)
    if suffix:
        piece = piece.removesuffix(suffix)
    return piece.encode()


def _vocabulary(tokenizer) -> tuple[list[bytes | None], set[int]]:
    """Every id's bytes and the byte-fallback ids (``<0xNN>``), which give way to a regular piece of
    the same bytes in ``ByteTrie`` (the tokenizer itself uses them only where no piece fits)."""
    backend = tokenizer.backend_tokenizer
    spec = json.loads(backend.to_str())
    style, replacement = _style(spec)
    model = spec.get("model") or {}
    added = tokenizer.added_tokens_decoder
    unk = {model["unk_token"]} if isinstance(model.get("unk_token"), str) else set()
    size = max(len(tokenizer), backend.get_vocab_size(with_added_tokens=True))
    out: list[bytes | None] = [None] * size
    fallback = set()
    for i in range(size):
        if i in added:
            token = added[i]
            out[i] = None if token.special else token.content.encode()
            continue
        piece = backend.id_to_token(i)
        if piece is None or piece in unk or (model.get("type") == "Unigram" and i == model.get("unk_id")):
            continue
        out[i] = _piece_bytes(piece, style, replacement, model)
        if model.get("byte_fallback") and _BYTE_PIECE.fullmatch(piece):
            fallback.add(i)
    return out, fallback


def token_bytes(tokenizer) -> list[bytes | None]:
    """The raw bytes of every id of a Hugging Face fast tokenizer; None for special tokens, the
    unknown token and pieces that are not text.

    The style is read from the backend (pre-tokenizer, decoder, model), not from names: byte-level
    BPE (GPT-2 / Llama-3 / Qwen: each character of a piece is one byte through GPT-2's table),
    SentencePiece / Metaspace (the replacement character, "▁", is a space; ``<0xNN>`` pieces are
    single bytes when the model has byte fallback), or plain pieces (UTF-8 of the piece).
    Non-special added tokens are their text."""
    return _vocabulary(tokenizer)[0]


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _dummy_space(data: bytes, cursor: int, seg: bytes, after: bytes | None) -> int | None:
    """How many bytes of a segment's pieces ``seg`` are not in the text at ``cursor``: 0, or 1 for a
    dummy leading space; None if neither fits. The segment must end where the next added token's
    bytes ``after`` start, or at the text's end."""
    for drop in (0, 1):
        if drop and seg[:1] != b" ":
            break
        end = cursor + len(seg) - drop
        fits_after = data.startswith(after, end) if after is not None else end == len(data)
        if fits_after and data.startswith(seg[drop:], cursor):
            return drop
    return None


def encode_with_offsets(tokenizer, text: str, pieces: Sequence[bytes | None] | None = None
                        ) -> tuple[list[int], list[tuple[int, int]]]:
    """The student's ids for ``text`` (no special tokens added) and each token's UTF-8 byte span
    (start, end) in ``text.encode()``, from the tokens' own bytes (``pieces``: ``token_bytes``, passed
    to reuse it across texts), so that the spans tile the text exactly.

    A SentencePiece-style tokenizer may add a dummy space before the text and after each added
    token: the first piece of such a segment then holds one space the text does not; its span
    leaves it out (a lone "▁" piece spans zero bytes). Raises PotstillError, naming the tokenizer,
    when the pieces cannot be made to equal the text (a normalizer that changes the text, an unknown
    token): offsets are never guessed."""
    pieces = token_bytes(tokenizer) if pieces is None else pieces
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    added = tokenizer.added_tokens_decoder
    data = text.encode()
    unk = getattr(tokenizer, "unk_token_id", None)
    own = [pieces[i] if i < len(pieces) and pieces[i] is not None else
           (added[i].content.encode() if i in added and i != unk else None) for i in ids]
    if None in own:
        i = ids[own.index(None)]
        raise PotstillError(f"tokenizer {_name(tokenizer)!r} encodes part of the text as id {i}, which stands for no "
                            "bytes (an unknown token?): byte offsets for cross-tokenizer targets need every byte")
    offsets: list[tuple[int, int]] = []
    cursor, i = 0, 0
    while i < len(ids):  # one added token, or a run of pieces up to the next one (a segment)
        if ids[i] in added:
            j, drop = i + 1, 0 if data.startswith(own[i], cursor) else None
        else:
            j = next((n for n in range(i, len(ids)) if ids[n] in added), len(ids))
            drop = _dummy_space(data, cursor, b"".join(own[i:j]), own[j] if j < len(ids) else None)
        if drop is None:
            raise PotstillError(f"tokenizer {_name(tokenizer)!r}: its tokens' bytes do not spell the text at byte "
                                f"{cursor} ({data[cursor:cursor + 16]!r} vs {b''.join(own[i:j])[:16]!r}); a "
                                "normalizer that changes the text cannot give byte offsets for cross-tokenizer targets")
        for piece in own[i:j]:
            offsets.append((cursor, cursor + len(piece) - drop))
            cursor, drop = cursor + len(piece) - drop, 0
        i = j
    if cursor != len(data):
        raise PotstillError(f"tokenizer {_name(tokenizer)!r}: its tokens spell {cursor} of the text's "
                            f"{len(data)} bytes")
    return ids, offsets


# ---------------------------------------------------------------------------------------------------
# where two tokenizations agree


def align_groups(s_offsets: Sequence[Sequence[int]], t_offsets: Sequence[Sequence[int]]
                 ) -> tuple[list[list[int]], list[list[int]]]:
    """The spans where both tokenizations cut at the same byte: (student groups, teacher groups),
    lists of positions. Both sides are walked together, the one whose token ends earlier advancing;
    a group closes when the two current tokens end at the same byte; whatever is left on either side
    when one runs out forms a last group (one of its sides may be empty). The same groups as TRL
    1.16's ``ULDLoss._align_by_byte_offsets``, for any input."""
    s_groups: list[list[int]] = []
    t_groups: list[list[int]] = []
    i = j = s_open = t_open = 0
    while i < len(s_offsets) and j < len(t_offsets):
        s_end, t_end = s_offsets[i][1], t_offsets[j][1]
        i += s_end <= t_end
        j += t_end <= s_end
        if s_end == t_end:
            s_groups.append(list(range(s_open, i)))
            t_groups.append(list(range(t_open, j)))
            s_open, t_open = i, j
    if i < len(s_offsets) or j < len(t_offsets):
        s_groups.append(list(range(s_open, len(s_offsets))))
        t_groups.append(list(range(t_open, len(t_offsets))))
    return s_groups, t_groups


# ---------------------------------------------------------------------------------------------------
# the longest student token at some bytes


class ByteTrie:
    """The student's tokens by their bytes: ``longest_prefix(y)`` is the id of the longest student
    token whose bytes are a prefix of ``y``, None if none is.

    It answers as a byte trie would, from one dict of the tokens' bytes probed from the longest
    possible prefix down (at most min(len(y), longest token) lookups): a node per byte for a 150k
    vocabulary would be about a million Python dicts. Where several ids have the same bytes, the
    lowest id wins, except that ids in ``fallback`` (byte-fallback ``<0xNN>`` pieces) give way to any
    other."""

    def __init__(self, pieces: Sequence[bytes | None], fallback: set[int] | frozenset[int] = frozenset()):
        self.ids: dict[bytes, int] = {}
        for first in (False, True):  # regular pieces first, then byte-fallback ones where no piece has the bytes
            for i, piece in enumerate(pieces):
                if piece and (i in fallback) == first:
                    self.ids.setdefault(piece, i)
        self.longest = max(map(len, self.ids), default=0)

    def longest_prefix(self, y: bytes) -> int | None:
        for n in range(min(len(y), self.longest), 0, -1):
            i = self.ids.get(y[:n])
            if i is not None:
                return i
        return None


def byte_trie(tokenizer) -> ByteTrie:
    """The ``ByteTrie`` of a Hugging Face fast tokenizer (its ``token_bytes``, byte fallback last)."""
    return ByteTrie(*_vocabulary(tokenizer))


# ---------------------------------------------------------------------------------------------------
# the rule


class _Teacher:
    """The teacher's completion: chosen tokens' bytes, spans and probabilities, and its alternatives
    as (bytes, probability) per position (those with the chosen token's bytes left out)."""

    def __init__(self, chosen, chosen_logprobs, alternatives, alt_logprobs):
        n = len(chosen)
        while n and not chosen[n - 1]:  # an EOS (or other empty token) at the end is no text
            n -= 1
        self.chosen = [bytes(c) for c in chosen[:n]]
        self.p = [math.exp(float(x)) for x in chosen_logprobs[:n]]
        self.alts = [[(bytes(a), math.exp(float(lp))) for a, lp in zip(alternatives[t] or (), alt_logprobs[t] or ())
                      if bytes(a) != self.chosen[t]] for t in range(n)]
        self.ends = np.cumsum([len(c) for c in self.chosen]).tolist()

    def at(self, b: int) -> int:
        """The token with u_t <= b < v_t (zero-width tokens never are)."""
        return bisect.bisect_right(self.ends, b)

    def start(self, t: int) -> int:
        return self.ends[t] - len(self.chosen[t])


def _events(teacher: _Teacher, b: int, e: int) -> tuple[float, list[tuple[bytes, float]], float, int]:
    """Student token [b, e): (path mass, events (y, mass), Z, teacher position holding b)."""
    t0 = t = teacher.at(b)
    if t >= len(teacher.chosen):
        size = teacher.ends[-1] if teacher.ends else 0
        raise PotstillError(f"student token at bytes [{b}, {e}) lies past the teacher's text ({size} bytes): the "
                            "student's offsets must be of the teacher's text, b''.join(chosen)")
    d = b - teacher.start(t)
    c = teacher.chosen[t]
    events = [(a[d:], p) for a, p in teacher.alts[t] if len(a) > d and a[:d] == c[:d]]
    z = teacher.p[t] + sum(p for _, p in events) if d else 1.0
    mass, r = teacher.p[t], c[d:]
    while len(r) < e - b and t + 1 < len(teacher.chosen):
        t += 1
        events += [(r + a, mass * p) for a, p in teacher.alts[t]]
        mass, r = mass * teacher.p[t], r + teacher.chosen[t]
    return mass, events, z, t0


def _row(masses: dict[int, float], k: int) -> tuple[list[int], list[float]]:
    """The k largest masses, descending (ties by id), as ids and float logprobs, padded to k with the
    first id at -inf."""
    top = sorted(masses.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    ids = [i for i, _ in top]
    lps = [math.log(m) if m > 0 else -math.inf for _, m in top]
    pad = k - len(ids)
    return ids + ids[:1] * pad, lps + [-math.inf] * pad


def student_targets(chosen: Sequence[bytes], chosen_logprobs: Sequence[float],
                    alternatives: Sequence[Sequence[bytes]], alt_logprobs: Sequence[Sequence[float]],
                    student_offsets: Sequence[Sequence[int]], student_ids: Sequence[int], trie: ByteTrie, k: int,
                    stops: Sequence[float] | None = None, stop_id: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """The teacher's top-k over its tokens -> a top-k over the student's ids at every student token
    of its text (the rule in the module's docstring).

    chosen (T,) bytes of each generated token, chosen_logprobs (T,); alternatives / alt_logprobs:
    per position, up to 20 (bytes, logprob) (the chosen token may be among them); student_offsets
    (S, 2) byte spans in b"".join(chosen) and student_ids (S,) (``encode_with_offsets`` of the text);
    trie the student's ``ByteTrie``; stops (T,) the teacher's logprob of ending its answer at each
    position (its EOS; -inf or None: unknown) and stop_id the student's EOS, together or not at all.
    Returns ids (S, k) int32, logprobs (S, k) float32 (descending,
    padded with the row's first id at -inf) and counts: positions, exact (cuts coincide and one
    teacher token is the student token), unmappable (events no student token starts; mass to the
    tail), empty (zero-byte student tokens)."""
    teacher = _Teacher(chosen, chosen_logprobs, alternatives, alt_logprobs)
    n = len(student_ids)
    ids = np.zeros((n, k), np.int32)
    lps = np.full((n, k), -np.inf, np.float32)
    counts = {"positions": n, "exact": 0, "unmappable": 0, "empty": 0}
    for s, ((b, e), x) in enumerate(zip(student_offsets, student_ids)):
        b, e, x = int(b), int(e), int(x)
        if e == b:  # a zero-byte piece (SentencePiece's lone dummy space): the tokenizer always emits it
            counts["empty"] += 1
            ids[s], lps[s] = _row({x: 1.0}, k)
            continue
        path, events, z, t = _events(teacher, b, e)
        counts["exact"] += teacher.start(t) == b and teacher.ends[t] == e
        masses = {x: path}
        if stops is not None and stop_id is not None and teacher.start(t) == b and math.isfinite(stops[t]):
            masses[stop_id] = math.exp(stops[t])  # the teacher stopping before c_t: the student before x_s
        for y, p in events:
            w = trie.longest_prefix(y)
            if w is None:
                counts["unmappable"] += 1
            else:
                masses[w] = masses.get(w, 0.0) + p
        total = max(z, sum(masses.values()))  # over 1 only through rounded API logprobs: scaled to 1
        ids[s], lps[s] = _row({i: m / total for i, m in masses.items()}, k)
    return ids, lps, counts
