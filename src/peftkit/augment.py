"""Data augmentation for small labelled sets: random swap, deletion and insertion of tokens, and
replacement by nearest neighbours in a model's own input-embedding space (no external resources).

    from peftkit import augment
    neighbours = augment.WordNeighbours.from_model(model, tokenizer)   # or EmbeddingNeighbours
    aug = augment.Augmenter(
        [augment.Swap(0.1), augment.Delete(0.1), augment.Insert(0.1), augment.Replace(0.1)],
        neighbours=neighbours, seed=0,
    )
    aug.text("a gripping , funny film", index=3)     # one variant; the same (seed, index) -> same text
    train = augment.AugmentedDataset(train, aug, field="sentence")   # a Dataset wrapper
    loader = DataLoader(examples, collate_fn=augment.collate(aug, my_collate, field="sentence"))

Each example is augmented by one operation drawn at random (the operations of Wei & Zou, 2019), with
probability ``chance``. A sequence is a string (split on whitespace; the words are the tokens) or a
list of tokens (words or token ids). For token classification, pass the BIO tags (``tags_field``):
an operation then keeps every tag with its token, moves, deletes or inserts only outside entities
(tag ``O``), gives an inserted token ``O``, and may replace an entity's token by a neighbour, which
keeps its tag; a valid BIO sequence stays valid.

Randomness comes from a generator seeded with (seed, epoch, index) for a dataset item, or (seed,
batch number) for the collate function, never from the global RNG.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

__all__ = [
    "AugmentedDataset",
    "Augmenter",
    "Delete",
    "EmbeddingNeighbours",
    "Insert",
    "Replace",
    "Swap",
    "WordNeighbours",
    "collate",
]

Tag = Any  # a tag name ("B-PER") or an index into the augmenter's ``tag_names``


class Neighbours(Protocol):
    """Tokens close to ``token`` (best first); empty when it has none."""

    def __call__(self, token: Any) -> Sequence[Any]: ...


@dataclass
class _Sequence:
    """What an operation works on: the tokens, their tags (or None) and the tag names' roles."""

    tokens: list[Any]
    tags: list[Tag] | None
    names: Sequence[str] | None
    protected: frozenset[Hashable]

    def name(self, i: int) -> str:
        assert self.tags is not None
        tag = self.tags[i]
        return tag if self.names is None else self.names[tag]

    def movable(self, i: int) -> bool:
        """Whether token i may be swapped or deleted: not protected, and outside every entity."""
        return self.tokens[i] not in self.protected and (self.tags is None or self.name(i) == "O")

    def gap_allowed(self, i: int) -> bool:
        """Whether a token may be inserted before position i (i == len: at the end) without
        splitting an entity: the token after the gap does not continue one."""
        return self.tags is None or i == len(self.tokens) or not self.name(i).startswith("I-")

    def outside(self) -> Tag:
        if self.names is None:
            return "O"
        return list(self.names).index("O")


def _count(p: float, n: int) -> int:
    return max(1, round(p * n))


@dataclass(frozen=True)
class Swap:
    """Swap two movable tokens, ``max(1, round(p * n))`` times."""

    p: float = 0.1

    def __call__(self, seq: _Sequence, rng: random.Random, near: Neighbours | None) -> None:
        slots = [i for i in range(len(seq.tokens)) if seq.movable(i)]
        if len(slots) < 2:
            return
        for _ in range(_count(self.p, len(seq.tokens))):
            i, j = rng.sample(slots, 2)
            seq.tokens[i], seq.tokens[j] = seq.tokens[j], seq.tokens[i]


@dataclass(frozen=True)
class Delete:
    """Delete each movable token with probability ``p``; at least one token is always kept."""

    p: float = 0.1

    def __call__(self, seq: _Sequence, rng: random.Random, near: Neighbours | None) -> None:
        drop = {i for i in range(len(seq.tokens)) if seq.movable(i) and rng.random() < self.p}
        if len(drop) == len(seq.tokens):
            drop.discard(rng.randrange(len(seq.tokens)))
        seq.tokens[:] = [t for i, t in enumerate(seq.tokens) if i not in drop]
        if seq.tags is not None:
            seq.tags[:] = [t for i, t in enumerate(seq.tags) if i not in drop]


@dataclass(frozen=True)
class Insert:
    """Insert ``max(1, round(p * n))`` tokens, each a neighbour of a random token of the sequence
    (a copy of one without neighbours), at a random place that splits no entity."""

    p: float = 0.1

    def __call__(self, seq: _Sequence, rng: random.Random, near: Neighbours | None) -> None:
        sources = [t for t in seq.tokens if t not in seq.protected]
        for _ in range(_count(self.p, len(seq.tokens)) if sources else 0):
            token = rng.choice(sources)
            options = list(near(token)) if near is not None else []
            new = rng.choice(options) if options else token
            gaps = [i for i in range(len(seq.tokens) + 1) if seq.gap_allowed(i)]
            gaps = [i for i in gaps if not _between_protected_edges(seq, i)] or gaps
            at = rng.choice(gaps)
            seq.tokens.insert(at, new)
            if seq.tags is not None:
                seq.tags.insert(at, seq.outside())


def _between_protected_edges(seq: _Sequence, i: int) -> bool:
    """A gap before a leading protected token or after a trailing one ([CLS] ... [SEP])."""
    first = i == 0 and bool(seq.tokens) and seq.tokens[0] in seq.protected
    last = i == len(seq.tokens) and bool(seq.tokens) and seq.tokens[-1] in seq.protected
    return first or last


@dataclass(frozen=True)
class Replace:
    """Replace ``max(1, round(p * n))`` tokens that have neighbours by one of them (the tag stays)."""

    p: float = 0.1

    def __call__(self, seq: _Sequence, rng: random.Random, near: Neighbours | None) -> None:
        if near is None:
            raise ValueError("Replace needs neighbours: pass Augmenter(..., neighbours=...)")
        slots = [i for i, t in enumerate(seq.tokens) if t not in seq.protected]
        rng.shuffle(slots)
        left = _count(self.p, len(seq.tokens))
        for i in slots:
            if left == 0:
                break
            options = list(near(seq.tokens[i]))
            if options:
                seq.tokens[i] = rng.choice(options)
                left -= 1


Operation = Callable[[_Sequence, random.Random, "Neighbours | None"], None]


class Augmenter:
    """Draws one of ``operations`` per example (with probability ``chance``; else it is kept).

    ``protected``: tokens never moved, deleted or replaced (e.g. a tokenizer's special ids).
    ``tag_names``: for integer BIO tags, the name of each tag index ("O", "B-PER", "I-PER", ...).
    """

    def __init__(
        self,
        operations: Sequence[Operation],
        *,
        neighbours: Neighbours | None = None,
        seed: int = 0,
        chance: float = 1.0,
        protected: Sequence[Hashable] = (),
        tag_names: Sequence[str] | None = None,
    ) -> None:
        if not operations:
            raise ValueError(
                "Augmenter needs at least one operation, e.g. [Swap(0.1), Delete(0.1)]"
            )
        for op in operations:
            p = getattr(op, "p", 0.0)
            if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
                raise ValueError(f"{op!r}: p must be a fraction in [0, 1]")
        if not 0.0 <= chance <= 1.0:
            raise ValueError(f"chance must be in [0, 1], got {chance!r}")
        if any(isinstance(op, Replace) for op in operations) and neighbours is None:
            raise ValueError("Replace needs neighbours: pass neighbours=WordNeighbours(...)")
        if tag_names is not None and "O" not in tag_names:
            raise ValueError(f"tag_names must include the outside tag 'O', got {list(tag_names)}")
        self.operations = list(operations)
        self.neighbours, self.seed, self.chance = neighbours, seed, chance
        self.protected = frozenset(protected)
        self.tag_names = tag_names

    def rng(self, *key: int) -> random.Random:
        """The generator for one draw: seeded by (seed, *key), independent of every other draw."""
        return random.Random(":".join(str(k) for k in (self.seed, *key)))

    def __call__(
        self, tokens: Sequence[Any], tags: Sequence[Tag] | None = None, *, rng: random.Random
    ) -> tuple[list[Any], list[Tag] | None]:
        """One variant of ``tokens`` (and its tags, kept aligned); the inputs are not changed."""
        if tags is not None and len(tags) != len(tokens):
            raise ValueError(f"{len(tokens)} tokens but {len(tags)} tags: they must align")
        seq = _Sequence(
            list(tokens), None if tags is None else list(tags), self.tag_names, self.protected
        )
        if tags is not None:
            _check_tags(seq)
        if seq.tokens and rng.random() < self.chance:
            rng.choice(self.operations)(seq, rng, self.neighbours)
        return seq.tokens, seq.tags

    def text(self, text: str, *, index: int = 0, epoch: int = 0) -> str:
        """One variant of a whitespace-tokenised text, seeded by (seed, epoch, index)."""
        words, _ = self(text.split(), rng=self.rng(epoch, index))
        return " ".join(words)

    def example(self, example: Any, field: Any, tags_field: Any, rng: random.Random) -> Any:
        """``example`` (a dict, tuple or list) with ``example[field]`` (and its tags) augmented."""
        value = example[field]
        tags = None if tags_field is None else example[tags_field]
        if isinstance(value, str):
            tokens = value.split()
        else:
            tokens = value.tolist() if isinstance(value, torch.Tensor) else list(value)
        if isinstance(tags, torch.Tensor):
            tags = tags.tolist()
        new_tokens, new_tags = self(tokens, tags, rng=rng)
        out: Any = dict(example) if isinstance(example, Mapping) else list(example)
        out[field] = " ".join(new_tokens) if isinstance(value, str) else _like(value, new_tokens)
        if tags_field is not None:
            out[tags_field] = _like(example[tags_field], new_tags)
        if isinstance(example, (Mapping, list)):
            return out
        return type(example)(*out) if hasattr(example, "_fields") else type(example)(out)


def _like(original: Any, values: list[Any] | None) -> Any:
    """``values`` in the container type of ``original`` (list, tuple or 1-d tensor)."""
    if isinstance(original, torch.Tensor):
        return torch.tensor(values, dtype=original.dtype)
    return tuple(values or ()) if isinstance(original, tuple) else values


def _check_tags(seq: _Sequence) -> None:
    assert seq.tags is not None
    for i, tag in enumerate(seq.tags):
        if seq.names is None and not isinstance(tag, str):
            raise TypeError(f"tag {tag!r} is not a name: pass tag_names=[...] for integer tags")
        if seq.names is not None and not (isinstance(tag, int) and 0 <= tag < len(seq.names)):
            raise ValueError(f"tag {tag!r} at {i} is not an index into tag_names")
        name = seq.name(i)
        if name != "O" and not name.startswith(("B-", "I-")):
            raise ValueError(f"tag {name!r} at {i} is not BIO ('O', 'B-X' or 'I-X')")


class AugmentedDataset(Dataset[Any]):
    """``dataset`` whose item ``i`` is augmented with a generator seeded by (seed, epoch, i).

    ``field``: the key (or tuple index) of the text or token list; ``tags_field``: that of its BIO
    tags, for token classification. Call ``set_epoch(e)`` for new variants each epoch (peftkit's
    Trainer does, as torch's DistributedSampler expects).
    """

    def __init__(
        self, dataset: Any, augmenter: Augmenter, *, field: Any, tags_field: Any = None
    ) -> None:
        self.dataset, self.augmenter = dataset, augmenter
        self.field, self.tags_field = field, tags_field
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        rng = self.augmenter.rng(self.epoch, index)
        return self.augmenter.example(self.dataset[index], self.field, self.tags_field, rng)


def collate(
    augmenter: Augmenter,
    collate_fn: Callable[[list[Any]], Any],
    *,
    field: Any,
    tags_field: Any = None,
) -> Callable[[list[Any]], Any]:
    """A DataLoader ``collate_fn`` that augments each example, then calls ``collate_fn``.

    Its n-th call draws from a generator seeded by (seed, n): reproducible in one process. With
    ``num_workers > 0`` each worker counts its own calls; use ``AugmentedDataset`` there.
    """
    calls = [0]

    def augment_then_collate(examples: list[Any]) -> Any:
        rng = augmenter.rng(calls[0])
        calls[0] += 1
        return collate_fn([augmenter.example(e, field, tags_field, rng) for e in examples])

    return augment_then_collate


def _input_embeddings(model: nn.Module) -> nn.Embedding:
    """A transformers model's ``get_input_embeddings()``, checked to be an ``nn.Embedding``."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if not isinstance(embeddings, nn.Embedding):
        raise TypeError(
            f"{type(model).__name__} has no nn.Embedding from get_input_embeddings(); build the "
            "neighbours from the embedding matrix itself: EmbeddingNeighbours(weight)"
        )
    return embeddings


class EmbeddingNeighbours:
    """The ``k`` token ids nearest to a token id by cosine similarity of the rows of an embedding
    matrix (a model's input embeddings), among ``candidates`` (default: every id). Each id's
    neighbours are computed on first use (one matrix-vector product) and cached."""

    def __init__(
        self, weight: torch.Tensor, *, k: int = 5, candidates: Sequence[int] | None = None
    ) -> None:
        if weight.ndim != 2:
            raise ValueError(
                f"weight must be a (vocab, dim) matrix, got shape {tuple(weight.shape)}"
            )
        if k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        with torch.no_grad():
            rows = weight.detach().float()
            self._unit = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self._allowed = torch.zeros(len(rows), dtype=torch.bool)
        self._allowed[list(candidates) if candidates is not None else slice(None)] = True
        self.k = k
        self._cache: dict[int, tuple[int, ...]] = {}

    @classmethod
    def from_model(
        cls, model: nn.Module, *, k: int = 5, exclude: Sequence[int] = ()
    ) -> EmbeddingNeighbours:
        """From ``model.get_input_embeddings()`` (a transformers model), never proposing ``exclude``
        (e.g. ``tokenizer.all_special_ids``)."""
        embeddings = _input_embeddings(model)
        vocab = embeddings.weight.shape[0]
        skip = set(exclude)
        return cls(embeddings.weight, k=k, candidates=[i for i in range(vocab) if i not in skip])

    def __call__(self, token: Any) -> tuple[int, ...]:
        if not isinstance(token, int) or not 0 <= token < len(self._unit):
            return ()
        if token not in self._cache:
            self.prefetch([token])
        return self._cache[token]

    def prefetch(self, tokens: Sequence[int], chunk: int = 512) -> None:
        """Compute the neighbours of many ids at once (a matrix product per ``chunk`` ids, far
        cheaper per id than one at a time); e.g. for every id of a training set before training."""
        todo = sorted({t for t in tokens if 0 <= t < len(self._unit) and t not in self._cache})
        take = min(self.k + 1, int(self._allowed.sum()))
        with torch.no_grad():
            for start in range(0, len(todo), chunk):
                ids = torch.tensor(todo[start : start + chunk])
                sims = self._unit[ids] @ self._unit.T
                sims[:, ~self._allowed] = -torch.inf
                sims[torch.arange(len(ids)), ids] = -torch.inf  # never itself
                values, best = sims.topk(take, dim=1)
                for row, token in enumerate(ids.tolist()):
                    found = best[row][torch.isfinite(values[row])][: self.k]
                    self._cache[token] = tuple(found.tolist())


class WordNeighbours:
    """Whole-word neighbours: a word that is one entry of ``vocab`` (word -> id) maps to the ``k``
    nearest entries (by the embedding rows) that are words too; others have none. A capitalised
    word gets capitalised neighbours."""

    def __init__(self, vocab: Mapping[str, int], weight: torch.Tensor, *, k: int = 5) -> None:
        self._ids: dict[str, int] = {}
        for word, i in sorted(vocab.items(), key=lambda kv: kv[1]):
            if word.isalpha() and len(word) > 1:
                self._ids.setdefault(word.lower(), i)  # "The" and "the": the lower id
        self._words = {i: w for w, i in self._ids.items()}
        self._near = EmbeddingNeighbours(weight, k=k, candidates=sorted(self._words))

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer: Any, *, k: int = 5) -> WordNeighbours:
        """From a transformers model's input embeddings and its tokenizer's vocabulary (each entry
        as the text it decodes to, so WordPiece and byte-level BPE vocabularies both work)."""
        embeddings = _input_embeddings(model)
        special = set(getattr(tokenizer, "all_special_ids", ()))
        vocab: dict[str, int] = {}
        for piece, i in tokenizer.get_vocab().items():
            if i not in special:
                vocab.setdefault(tokenizer.convert_tokens_to_string([piece]).strip(), i)
        return cls(vocab, embeddings.weight, k=k)

    def prefetch(self, words: Iterable[str]) -> None:
        """Compute the neighbours of many words at once, e.g. every word of a training set."""
        self._near.prefetch([self._ids[w.lower()] for w in words if w.lower() in self._ids])

    def __call__(self, token: Any) -> tuple[str, ...]:
        if not isinstance(token, str) or token.lower() not in self._ids:
            return ()
        found = [self._words[i] for i in self._near(self._ids[token.lower()])]
        found = [w for w in found if w != token.lower()]
        return tuple(w.capitalize() for w in found) if token[:1].isupper() else tuple(found)
