"""Tests for ultramem.data.facts: determinism, held-out templates, prompts, and the recall metric."""

import re
from collections import Counter

import pytest

from ultramem.data.facts import (
    ATTRIBUTES,
    FactConfig,
    FactQuery,
    build_fact_corpus,
    extract_attribute,
    fact_recall_accuracy,
    fact_recall_report,
)
from ultramem.data.tokenizer import Tokenizer

ALL = tuple(ATTRIBUTES)


def _cfg(**kw):
    base = dict(seed=3, num_people=40, attributes=ALL, train_templates=4, heldout_templates=2, repetitions=4)
    base.update(kw)
    return FactConfig(**base)


def test_deterministic_for_a_seed_and_different_for_another():
    a, b = build_fact_corpus(_cfg()), build_fact_corpus(_cfg())
    assert a.train_docs == b.train_docs and a.val_docs == b.val_docs and a.queries == b.queries
    assert [p.facts for p in a.people] == [p.facts for p in b.people]
    c = build_fact_corpus(_cfg(seed=4))
    assert {p.name for p in a.people} != {p.name for p in c.people}
    assert a.train_docs != c.train_docs


def test_people_are_unique_and_complete():
    corpus = build_fact_corpus(_cfg(num_people=300))
    names = [p.name for p in corpus.people]
    assert len(set(names)) == 300
    for p in corpus.people:
        assert set(ATTRIBUTES) <= set(p.facts)
        year = p.facts["birth_year"]
        assert p.facts["birth_date"].endswith(" " + year)  # date and year agree
    # values are spread, not constant
    assert len({p.facts["birth_city"] for p in corpus.people}) > 10


@pytest.mark.parametrize("train,heldout", [(5, 1), (4, 2), (3, 3)])
def test_heldout_templates_never_appear_in_training_text(train, heldout):
    cfg = _cfg(train_templates=train, heldout_templates=heldout, repetitions=train)
    corpus = build_fact_corpus(cfg)
    text = "\n".join(corpus.train_docs)
    for attr, templates in ATTRIBUTES.items():
        for t in cfg.heldout_ids:
            # the template's phrasing, with any two-word name, never occurs in training text
            before, after = templates[t].replace(" {value}.", "").split("{name}")
            pattern = re.escape(before) + r"[A-Z][a-z]+ [A-Z][a-z]+" + re.escape(after)
            assert re.search(pattern, text) is None, (attr, t)
            assert re.search(pattern, "\n".join(corpus.val_docs)) is not None, (attr, t)
    held = [q for q in corpus.queries if q.heldout]
    assert len(held) == cfg.num_people * len(cfg.attributes) * heldout
    for q in held:
        assert q.template in cfg.heldout_ids and q.prompt not in text
    # validation bios are written with held-out phrasings only
    val_text = "\n".join(corpus.val_docs)
    for q in held:
        if f"{q.prompt} {q.answer}." in val_text:
            break
    else:
        pytest.fail("no held-out sentence found in validation text")


def test_no_prompt_of_one_attribute_is_a_prefix_of_another_attributes_prompt():
    prompts = [(a, t[: -len("{value}.")].rstrip()) for a, ts in ATTRIBUTES.items() for t in ts]
    for a, p in prompts:
        for b, q in prompts:
            if a != b:
                assert not q.startswith(p), (p, q)
    # and the value always follows "<prompt> " at the end of the sentence
    assert all(t.endswith(" {value}.") and t.count("{name}") == 1 for ts in ATTRIBUTES.values() for t in ts)


def test_every_fact_is_seen_with_every_training_template():
    cfg = _cfg(train_templates=3, heldout_templates=1, repetitions=3)
    corpus = build_fact_corpus(cfg)
    lines = Counter(line for doc in corpus.train_docs for line in doc.split("\n"))
    for p in corpus.people:
        for attr in cfg.attributes:
            for t in cfg.train_ids:
                sentence = ATTRIBUTES[attr][t].format(name=p.name, value=p.facts[attr])
                assert lines[sentence] == 1, sentence
    assert len(corpus.train_docs) == cfg.num_people * cfg.repetitions


def test_seen_queries_are_training_prefixes_and_answers_are_values():
    corpus = build_fact_corpus(_cfg())
    text = "\n".join(corpus.train_docs)
    by_name = {p.name: p for p in corpus.people}
    for q in corpus.queries:
        assert q.answer == by_name[q.person].facts[q.attribute]
        assert q.prompt == q.prompt.rstrip() and q.person in q.prompt
        if not q.heldout:
            assert f"{q.prompt} {q.answer}." in text
    assert sum(not q.heldout for q in corpus.queries) == 40 * len(ALL)


def test_prompt_tokens_are_a_prefix_of_the_answered_sentence():
    corpus = build_fact_corpus(_cfg(num_people=60))
    tok = Tokenizer.train(corpus.train_docs, vocab_size=400)
    for q in corpus.queries[:200]:
        p = tok.encode(q.prompt)
        full = tok.encode(f"{q.prompt} {q.answer}.")
        assert full[: len(p)] == p and len(full) > len(p)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"num_people: .*got 0"):
        FactConfig(num_people=0)
    with pytest.raises(ValueError, match=r"fact_attributes: unknown attribute 'shoe_size'"):
        FactConfig(attributes=("birth_city", "shoe_size"))
    with pytest.raises(ValueError, match=r"fact_train_templates \+ fact_heldout_templates: must be <= 6"):
        FactConfig(train_templates=5, heldout_templates=2)
    with pytest.raises(ValueError, match=r"fact_repetitions: must be >= 1; got 0"):
        FactConfig(repetitions=0)


# ------------------------------------------------------------------------------------------ metric
def test_extract_attribute_cuts_and_normalises():
    assert extract_attribute(" Lisbon.\nAlma Verhoek studied at") == "Lisbon"
    assert extract_attribute(" Northbridge   University\nX") == "Northbridge University"
    assert extract_attribute(" Oslo<|endoftext|>Tobias") == "Oslo"
    assert extract_attribute("  Quito , ") == "Quito"
    assert extract_attribute(" 1961, and then") == "1961, and then"  # only sentence ends cut
    assert extract_attribute("") == ""
    once = extract_attribute(" Turin! yes")
    assert once == "Turin" and extract_attribute(once) == once


def test_accuracy_scores_hand_made_case():
    answers = ["Lisbon", "Lisbon", "Lisbon", "Lisbon", "Northbridge University", "Northbridge University",
               "1961", "Oslo", "Quito", "physics", "physics", "Corvel Systems"]
    predictions = [
        " Lisbon.\nAlma Verhoek works for",  # hit
        " Lisbon Heights.",  # near miss: extra word
        " lisbon.",  # near miss: case differs
        " Lisb",  # near miss: truncated
        " Northbridge University\n",  # hit
        " Northbridge.",  # near miss: partial value
        " 1961, probably.",  # near miss: not cut at the comma
        " Oslo<|endoftext|>",  # hit
        "  Quito  .",  # hit (whitespace)
        " physicsist.",  # near miss: prefix match only
        "",  # miss: nothing generated
        " Corvel Systems!",  # hit
    ]
    hits = 5
    assert fact_recall_accuracy(predictions, answers) == pytest.approx(hits / len(answers))
    assert fact_recall_accuracy(answers, answers) == 1.0
    with pytest.raises(ValueError, match="predictions: must have one entry per answer"):
        fact_recall_accuracy(predictions[:-1], answers)
    with pytest.raises(ValueError, match="answers: must not be empty"):
        fact_recall_accuracy([], [])


def test_report_per_attribute_and_chance():
    def q(attr, answer):
        return FactQuery(prompt="x", answer=answer, person="p", attribute=attr, template=0, heldout=True)

    queries = [q("birth_city", "Oslo"), q("birth_city", "Oslo"), q("birth_city", "Lima"), q("field", "law")]
    preds = [" Oslo.", " Lima.", " Lima.", " music."]
    r = fact_recall_report(queries, preds)
    assert r["n"] == 4
    assert r["accuracy"] == pytest.approx(2 / 4)
    assert r["by_attribute"] == {"birth_city": pytest.approx(2 / 3), "field": 0.0}
    # majority answer per attribute: "Oslo" (2 of 3) and "law" (1 of 1)
    assert r["chance"] == pytest.approx(3 / 4)


def test_eval_prompts_end_before_a_short_answer():
    corpus = build_fact_corpus(_cfg())
    for q in corpus.queries:
        assert not re.search(r"[.\n]", q.answer) and len(q.answer.split()) <= 3
