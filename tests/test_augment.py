"""peftkit.augment: reproducible operations, BIO tags kept aligned, embedding neighbours."""

from __future__ import annotations

import random
from collections import Counter, namedtuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import Dataset

from peftkit import augment
from peftkit.augment import Augmenter, Delete, Insert, Replace, Swap

WORDS = ["the", "film", "is", "a", "gripping", "and", "funny", "ride", "from", "start", "to", "end"]


def _near(token: object) -> tuple[str, ...]:
    return (f"{token}~",) if isinstance(token, str) else ()


def _all_ops() -> list[augment.Swap | Delete | Insert | Replace]:
    return [Swap(0.3), Delete(0.3), Insert(0.3), Replace(0.3)]


# -- determinism -------------------------------------------------------------------------------------
def test_the_same_seed_and_index_give_the_same_variant_and_the_global_rngs_are_untouched() -> None:
    aug = Augmenter(_all_ops(), neighbours=_near, seed=7)
    py_state, torch_state = random.getstate(), torch.get_rng_state()
    first = [aug.text(" ".join(WORDS), index=i) for i in range(20)]
    again = [
        Augmenter(_all_ops(), neighbours=_near, seed=7).text(" ".join(WORDS), index=i)
        for i in range(20)
    ]
    assert first == again
    assert random.getstate() == py_state and torch.equal(torch.get_rng_state(), torch_state)
    assert len(set(first)) > 10  # indices draw different variants
    other_seed = [
        Augmenter(_all_ops(), neighbours=_near, seed=8).text(" ".join(WORDS), index=i)
        for i in range(20)
    ]
    assert other_seed != first


def test_an_epoch_draws_new_variants_of_the_same_item() -> None:
    aug = Augmenter([Swap(0.3)], seed=0)
    text = " ".join(WORDS)
    assert aug.text(text, index=3, epoch=0) == aug.text(text, index=3, epoch=0)
    assert len({aug.text(text, index=3, epoch=e) for e in range(10)}) > 5


# -- the operations --------------------------------------------------------------------------------
def _run(op: object, tokens: list[object], seed: int = 0, **kw: object) -> list[object]:
    aug = Augmenter([op], neighbours=_near, seed=seed, **kw)  # type: ignore[list-item, arg-type]
    out, _ = aug(tokens, rng=random.Random(seed))
    return out


def test_swap_keeps_the_tokens_and_moves_some() -> None:
    outs = [_run(Swap(0.2), WORDS, seed) for seed in range(10)]
    assert all(Counter(o) == Counter(WORDS) for o in outs)
    assert any(o != WORDS for o in outs)


def test_delete_keeps_the_order_of_what_is_left_and_never_empties_a_sequence() -> None:
    for seed in range(20):
        out = _run(Delete(0.3), WORDS, seed)
        it = iter(WORDS)
        assert all(any(t == w for w in it) for t in out)  # a subsequence
    assert all(len(_run(Delete(1.0), WORDS, seed)) == 1 for seed in range(5))
    assert any(len(_run(Delete(0.3), WORDS, seed)) < len(WORDS) for seed in range(5))


def test_insert_adds_neighbours_of_the_sequences_own_tokens() -> None:
    out = _run(Insert(0.2), WORDS, 0)
    added = Counter(out) - Counter(WORDS)
    assert sum(added.values()) == round(0.2 * len(WORDS))
    assert all(t.endswith("~") and t[:-1] in WORDS for t in added)  # type: ignore[union-attr]


def test_insert_without_neighbours_copies_a_token() -> None:
    aug = Augmenter([Insert(0.1)], seed=0)
    out, _ = aug(WORDS, rng=random.Random(0))
    assert len(out) == len(WORDS) + 1 and set(out) == set(WORDS)


def test_replace_swaps_tokens_for_neighbours_in_place() -> None:
    out = _run(Replace(0.25), WORDS, 0)
    changed = [(a, b) for a, b in zip(WORDS, out, strict=False) if a != b]
    assert len(out) == len(WORDS) and len(changed) == 3
    assert all(b == f"{a}~" for a, b in changed)


def test_protected_tokens_are_never_moved_deleted_or_replaced() -> None:
    ids = [101, 7, 8, 9, 10, 11, 12, 102]
    near = augment.EmbeddingNeighbours(
        torch.randn(200, 8, generator=torch.Generator().manual_seed(0)), k=3
    )
    aug = Augmenter(_all_ops(), neighbours=near, seed=0, protected=[101, 102])
    for i in range(50):
        out, _ = aug(ids, rng=aug.rng(i))
        assert out[0] == 101 and out[-1] == 102
        assert out.count(101) == 1 and out.count(102) == 1


def test_chance_zero_keeps_every_example() -> None:
    aug = Augmenter(_all_ops(), neighbours=_near, chance=0.0)
    assert all(aug.text(" ".join(WORDS), index=i) == " ".join(WORDS) for i in range(10))


# -- BIO tags ----------------------------------------------------------------------------------------
def _valid_bio(tags: list[str]) -> bool:
    return all(
        not t.startswith("I-") or (i > 0 and tags[i - 1] in (f"B-{t[2:]}", t))
        for i, t in enumerate(tags)
    )


def _mentions(tokens: list[object], tags: list[str]) -> list[tuple[str, tuple[object, ...]]]:
    spans: list[tuple[str, list[object]]] = []
    for tok, tag in zip(tokens, tags, strict=False):
        if tag.startswith("B-"):
            spans.append((tag[2:], [tok]))
        elif tag.startswith("I-"):
            spans[-1][1].append(tok)
    return [(kind, tuple(toks)) for kind, toks in spans]


@st.composite
def tagged(draw: st.DrawFn) -> tuple[list[str], list[str]]:
    n = draw(st.integers(1, 14))
    tags: list[str] = []
    for _ in range(n):
        prev = tags[-1] if tags else "O"
        options = ["O", "B-PER", "B-LOC"] + ([f"I-{prev[2:]}"] if prev != "O" else [])
        tags.append(draw(st.sampled_from(options)))
    return [f"w{i}" for i in range(n)], tags


@settings(max_examples=150, deadline=None)
@given(tagged(), st.integers(0, 10_000), st.sampled_from(["swap", "delete", "insert"]))
def test_moving_operations_keep_every_entity_whole_and_the_tags_valid(
    example: tuple[list[str], list[str]], seed: int, name: str
) -> None:
    tokens, tags = example
    op = {"swap": Swap(0.4), "delete": Delete(0.4), "insert": Insert(0.4)}[name]
    out, out_tags = Augmenter([op], neighbours=_near, seed=seed)(
        tokens, tags, rng=random.Random(seed)
    )
    assert out_tags is not None and len(out) == len(out_tags)
    assert _valid_bio(out_tags)
    assert _mentions(out, out_tags) == _mentions(tokens, tags)  # same entities, same order
    pairs = Counter(zip(tokens, tags, strict=False))
    new = Counter(zip(out, out_tags, strict=False)) - pairs
    assert all(tag == "O" for _, tag in new)  # only insertions are new, and they are outside


@settings(max_examples=100, deadline=None)
@given(tagged(), st.integers(0, 10_000))
def test_replacement_keeps_each_tag_on_its_position(
    example: tuple[list[str], list[str]], seed: int
) -> None:
    tokens, tags = example
    out, out_tags = Augmenter([Replace(0.5)], neighbours=_near, seed=seed)(
        tokens, tags, rng=random.Random(seed)
    )
    assert out_tags == tags
    assert all(a == b or b == f"{a}~" for a, b in zip(tokens, out, strict=False))


def test_integer_tags_are_read_through_tag_names() -> None:
    names = ["O", "B-PER", "I-PER"]
    tokens, tags = ["Ada", "Lovelace", "wrote", "the", "first", "program"], [1, 2, 0, 0, 0, 0]
    aug = Augmenter([Swap(0.5), Delete(0.5), Insert(0.5)], seed=0, tag_names=names)
    for i in range(30):
        out, out_tags = aug(tokens, tags, rng=aug.rng(i))
        assert out_tags is not None
        assert _mentions(out, [names[t] for t in out_tags]) == [("PER", ("Ada", "Lovelace"))]


# -- wrappers ----------------------------------------------------------------------------------------
class _Recorder(Dataset[tuple[str, int]]):
    def __init__(self) -> None:
        self.epochs: list[int] = []

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[str, int]:
        return " ".join(WORDS), i % 2


def test_the_dataset_wrapper_keeps_the_example_shape_and_is_reproducible() -> None:
    Pair = namedtuple("Pair", "text label")
    items = [
        {"sentence": " ".join(WORDS), "label": 1},
        (" ".join(WORDS), 0),
        Pair(" ".join(WORDS), 1),
        {"input_ids": torch.tensor([101, 5, 6, 7, 8, 102]), "label": 0},
    ]
    aug = Augmenter([Swap(0.5), Delete(0.3)], seed=1, protected=[101, 102])
    for item, field in zip(items, ["sentence", 0, 0, "input_ids"], strict=False):
        data = augment.AugmentedDataset([item] * 4, aug, field=field)
        got = [data[i] for i in range(4)]
        assert type(got[0]) is type(item)
        again = augment.AugmentedDataset([item] * 4, aug, field=field)
        assert [str(x) for x in got] == [str(again[i]) for i in range(4)]
    ids = augment.AugmentedDataset([items[3]], aug, field="input_ids")[0]["input_ids"]
    assert ids.dtype == torch.long and ids[0] == 101 and ids[-1] == 102
    tagged_item = {"tokens": ("Ada", "wrote", "it"), "tags": ("B-PER", "O", "O")}
    out = augment.AugmentedDataset([tagged_item], aug, field="tokens", tags_field="tags")[0]
    assert isinstance(out["tokens"], tuple) and len(out["tokens"]) == len(out["tags"])


def test_set_epoch_changes_the_variants_and_the_trainer_calls_it() -> None:
    aug = Augmenter([Swap(0.5)], seed=0)
    data = augment.AugmentedDataset([(" ".join(WORDS), 0)] * 4, aug, field=0)
    before = [data[i] for i in range(4)]
    data.set_epoch(1)
    assert [data[i] for i in range(4)] != before

    import peftkit
    from peftkit.training import data as D

    seen: list[int] = []

    class Seen(_Recorder):
        def set_epoch(self, epoch: int) -> None:
            seen.append(epoch)

    D.announce_epoch(Seen(), 3)
    assert seen == [3]
    seen.clear()
    model = torch.nn.Sequential(torch.nn.EmbeddingBag(200, 4), torch.nn.Linear(4, 2))
    peftkit.apply_lora(model, r=2, targets=["1"])
    vectors = [(torch.tensor([1, 2, 3]), torch.tensor(i % 2)) for i in range(4)]

    class Vectors(Seen):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
            return vectors[i]

    peftkit.Trainer(model, peftkit.TrainConfig(epochs=2, batch_size=2, progress=False)).fit(
        Vectors()
    )
    assert seen == [0, 1]


def test_the_collate_function_augments_then_collates_reproducibly() -> None:
    aug = Augmenter([Swap(0.5), Insert(0.2)], neighbours=_near, seed=3)
    batch = [{"sentence": " ".join(WORDS), "label": 1}] * 3

    def texts(examples: list[dict[str, object]]) -> list[object]:
        return [e["sentence"] for e in examples]

    first, second = (
        augment.collate(aug, texts, field="sentence"),
        augment.collate(aug, texts, field="sentence"),
    )
    a = [first(batch) for _ in range(4)]
    assert a == [second(batch) for _ in range(4)]
    assert a[0] != a[1] and batch[0]["sentence"] == " ".join(WORDS)  # inputs untouched


# -- neighbours ----------------------------------------------------------------------------------------
def test_embedding_neighbours_rank_by_cosine_among_candidates() -> None:
    weight = torch.tensor([[1.0, 0.0], [0.9, 0.1], [5.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    near = augment.EmbeddingNeighbours(weight, k=2)
    assert near(0) == (1, 2)  # cosine, not distance: row 2 is far but points the same way
    assert augment.EmbeddingNeighbours(weight, k=2, candidates=[2, 3, 4])(0) == (2, 3)
    assert near(99) == () and near("word") == ()


def test_word_neighbours_keep_whole_words_and_capitalisation() -> None:
    vocab = {"[CLS]": 0, "good": 1, "great": 2, "##ood": 3, "bad": 4, "Great": 5, "a": 6}
    weight = torch.tensor(
        [[1.0, 1.0], [1.0, 0.0], [0.95, 0.05], [1.0, 0.01], [0.0, 1.0], [0.9, 0.1], [1, 0.02]]
    )
    near = augment.WordNeighbours(vocab, weight, k=2)
    assert near("good") == ("great", "bad")  # not the piece "##ood", "[CLS]" or the one-letter "a"
    assert near("Good") == ("Great", "Bad")
    assert near("unknown") == () and near(3) == ()


def test_neighbours_from_a_real_model_and_tokenizer(tmp_path: object) -> None:
    from pathlib import Path

    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = ["good", "great", "fine", "bad", "awful", "film", "movie"]
    vocab = Path(str(tmp_path)) / "vocab.txt"
    vocab.write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, "##s"]) + "\n"
    )
    tokenizer = BertTokenizerFast(str(vocab))  # the first argument: vocab_file (4.x), vocab (5.x)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=13,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        model.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("great")] = (
            model.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("good")] * 1.01
        )
    word_near = augment.WordNeighbours.from_model(model, tokenizer, k=3)
    assert word_near("good")[0] == "great"
    assert all(w in words for w in word_near("good"))
    id_near = augment.EmbeddingNeighbours.from_model(model, k=3, exclude=tokenizer.all_special_ids)
    good = tokenizer.convert_tokens_to_ids("good")
    assert id_near(good)[0] == tokenizer.convert_tokens_to_ids("great")
    assert not set(id_near(good)) & set(tokenizer.all_special_ids)


# -- bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"operations": []}, "at least one operation"),
        ({"operations": [Swap(1.5)]}, "p must be a fraction"),
        ({"operations": [Swap()], "chance": 2.0}, "chance must be in"),
        ({"operations": [Replace()]}, "Replace needs neighbours"),
        ({"operations": [Swap()], "tag_names": ["B-PER", "I-PER"]}, "outside tag 'O'"),
    ],
)
def test_bad_settings_are_refused_with_the_fix(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Augmenter(**kwargs)  # type: ignore[arg-type]


def test_bad_tags_are_refused() -> None:
    aug = Augmenter([Swap()], seed=0)
    with pytest.raises(ValueError, match="3 tokens but 2 tags"):
        aug(["a", "b", "c"], ["O", "O"], rng=random.Random(0))
    with pytest.raises(ValueError, match="is not BIO"):
        aug(["a"], ["PER"], rng=random.Random(0))
    with pytest.raises(TypeError, match="pass tag_names"):
        aug(["a"], [0], rng=random.Random(0))
    with pytest.raises(ValueError, match="not an index into tag_names"):
        Augmenter([Swap()], tag_names=["O"])(["a"], [3], rng=random.Random(0))


def test_prefetching_gives_the_same_neighbours_as_one_at_a_time() -> None:
    weight = torch.randn(300, 16, generator=torch.Generator().manual_seed(1))
    one = augment.EmbeddingNeighbours(weight, k=4, candidates=range(0, 300, 2))
    many = augment.EmbeddingNeighbours(weight, k=4, candidates=range(0, 300, 2))
    many.prefetch(list(range(300)), chunk=7)
    assert all(one(i) == many(i) for i in range(300))
    assert all(i not in one(i) and all(n % 2 == 0 for n in one(i)) for i in range(300))


def test_the_documentation_examples_run_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "augment.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL)
    assert len(blocks) == 2
    for block in blocks:
        exec(compile(block, "docs/augment.md", "exec"), {})
    assert "'sentence'" in capsys.readouterr().out
