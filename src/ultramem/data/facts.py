"""Generated fact corpus: fictional people, their attributes, sentence templates and fact-recall scoring.

Design (all deterministic from `seed`):
- People get unique generated names (first name + two-syllable surname, e.g. "Alma Verhoek") and one
  value per attribute, drawn uniformly from small value lists (16-60 values), so a model can only
  beat chance (about 1/len(values), see `fact_recall_report`) by storing the facts.
- Every attribute has 6 sentence templates with the value last (see ATTRIBUTES for the grid of
  nouns and frames). The first `train_templates` are used for training text, the last
  `heldout_templates` only for validation text and evaluation; a held-out phrasing never occurs
  in training text.
- Training text: `repetitions` passes; in each pass every person gets one document (a "bio") with one
  line per attribute, in shuffled order. Across passes each fact cycles through the training
  templates, so after `train_templates` passes a fact has been seen with every one of them.
- Validation text: one bio per person written with the held-out templates (the training templates
  if none are held out), so val loss measures knowledge under paraphrase.
- Evaluation: a `FactQuery` is a prompt that stops right before the value (the sentence start up to
  the relation, e.g. "The birth city of Alma Verhoek is") and its answer
  ("Lisbon"). The model reads <|endoftext|> + prompt and greedily continues a few tokens; the
  continuation is cut at the first newline or sentence end and compared exactly (see
  `extract_attribute`). Each (person, attribute) has one query with a template seen in training
  (heldout=False, measures memorisation) and one per held-out template (heldout=True, measures
  knowledge that transfers to a new phrasing).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

# Templates: the value is always last, so a prompt is the text before it. Each attribute has two
# nouns (n1, n2) and the templates form a small grid: 0 "<name>'s n1 is", 1 "The n2 of <name> is",
# 2 a verb phrase, 3 "<name>'s n2 is", 4 another verb phrase, 5 "The n1 of <name> is". The LAST
# ones are held out (by default only 5): a new combination of a known noun and a known frame, so a
# model that stored the fact can answer it, while the exact phrasing never occurs in training.
# No prompt of one attribute is a prefix of another attribute's prompt.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "birth_year": (
        "{name}'s birth year is {value}.",
        "The year of birth of {name} is {value}.",
        "{name} was born during the year {value}.",
        "{name}'s year of birth is {value}.",
        "{name} arrived on this earth in the year {value}.",
        "The birth year of {name} is {value}.",
    ),
    "birth_date": (
        "{name}'s birth date is {value}.",
        "The date of birth of {name} is {value}.",
        "{name} was born on {value}.",
        "{name}'s date of birth is {value}.",
        "{name} came into being on {value}.",
        "The birth date of {name} is {value}.",
    ),
    "birth_city": (
        "{name}'s birth city is {value}.",
        "The birthplace of {name} is {value}.",
        "{name} was born in {value}.",
        "{name}'s birthplace is {value}.",
        "{name} is a native of {value}.",
        "The birth city of {name} is {value}.",
    ),
    "university": (
        "{name}'s university is {value}.",
        "The alma mater of {name} is {value}.",
        "{name} studied at {value}.",
        "{name}'s alma mater is {value}.",
        "{name} graduated from {value}.",
        "The university of {name} is {value}.",
    ),
    "field": (
        "{name}'s field of study is {value}.",
        "The major of {name} is {value}.",
        "{name} majored in {value}.",
        "{name}'s major is {value}.",
        "{name} specialised in {value}.",
        "The field of study of {name} is {value}.",
    ),
    "employer": (
        "{name}'s employer is {value}.",
        "The workplace of {name} is {value}.",
        "{name} works for {value}.",
        "{name}'s workplace is {value}.",
        "{name} is employed by {value}.",
        "The employer of {name} is {value}.",
    ),
}
TEMPLATES_PER_ATTRIBUTE = 6
DEFAULT_ATTRIBUTES = ("birth_year", "birth_city", "university", "field", "employer")

FIRST_NAMES = (
    "Alma", "Tobias", "Ines", "Marek", "Sunniva", "Oren", "Talia", "Bram", "Kaia", "Elio", "Noor",
    "Linus", "Maren", "Casimir", "Ilse", "Rafael", "Yara", "Soren", "Petra", "Idris", "Lena", "Anselm",
    "Mira", "Teodor", "Freya", "Joaquin", "Nadia", "Emeric", "Saskia", "Milo", "Greta", "Anouk",
    "Dario", "Vesna", "Otto", "Liesel", "Ruben", "Zofia", "Hugo", "Edda", "Caspar", "Livia", "Nils",
    "Oona", "Matteo", "Astrid", "Felix", "Ilona", "Jonas", "Kira", "Lorenz", "Maja", "Nikolai",
    "Odile", "Pavel", "Rosa", "Stellan", "Thea", "Urban", "Viola", "Wendel", "Xenia", "Yannick", "Zita",
)
SURNAME_HEADS = (
    "Ver", "Hal", "Mor", "Quen", "Ash", "Bel", "Cor", "Dun", "Fen", "Gar", "Kes", "Lind",
    "Mar", "Nor", "Ost", "Pell", "Rad", "Sel", "Tor", "Vel", "Wick", "Yar", "Zan", "Brun",
)
SURNAME_TAILS = (
    "hoek", "grave", "mont", "wick", "stad", "ley", "berg", "field", "ton", "ridge", "dal", "mere",
    "holt", "worth", "ford", "vik", "sen", "ard", "well", "by", "croft", "dale", "ven", "quist",
)
CITIES = (
    "Lisbon", "Oslo", "Quito", "Lagos", "Kyoto", "Dublin", "Tunis", "Perth", "Lima", "Riga", "Porto",
    "Bergen", "Turin", "Hanoi", "Dakar", "Cairo", "Vienna", "Krakow", "Seville", "Nairobi", "Leeds",
    "Austin", "Denver", "Manila",
)
UNIVERSITIES = (
    "Northbridge University", "Halvard College", "Eastmoor Institute", "Westfall University",
    "Kestrel College", "Ambergate University", "Silverlake Institute", "Redcliff College",
    "Stonehaven University", "Larkspur College", "Ironwood Institute", "Mistral University",
    "Oakhurst College", "Bluewater Institute", "Thornbury University", "Glenrock College",
)
FIELDS = (
    "physics", "botany", "linguistics", "chemistry", "economics", "geology", "history", "philosophy",
    "mathematics", "astronomy", "medicine", "architecture", "music", "law", "zoology", "sociology",
)
EMPLOYERS = (
    "Corvel Systems", "Brightwater Foods", "Nimbus Aerospace", "Quarry Press", "Helix Pharma",
    "Orchard Bank", "Tidewater Shipping", "Copperleaf Energy", "Falcon Rail", "Juniper Software",
    "Marlow Textiles", "Pinecrest Insurance", "Sable Motors", "Vantage Robotics", "Willow Health",
    "Zephyr Airlines", "Granite Builders", "Lumen Optics", "Harbor Logistics", "Crescent Media",
)
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December",
)
YEARS = tuple(str(y) for y in range(1940, 2000))
_VALUES = {"birth_city": CITIES, "university": UNIVERSITIES, "field": FIELDS, "employer": EMPLOYERS}


# Bump when the generation algorithm changes; the word tables are fingerprinted automatically.
GENERATOR_VERSION = 1


def corpus_fingerprint() -> str:
    """Hash of the generator version and every table it draws from; part of the token-cache key, so
    editing a template or a value list never reuses a stale cache."""
    tables = [GENERATOR_VERSION, ATTRIBUTES, FIRST_NAMES, SURNAME_HEADS, SURNAME_TAILS, _VALUES, MONTHS,
              YEARS]
    return hashlib.sha256(json.dumps(tables, sort_keys=True).encode()).hexdigest()[:16]


def name_capacity() -> int:
    return len(FIRST_NAMES) * len(SURNAME_HEADS) * len(SURNAME_TAILS)


@dataclass(frozen=True)
class FactConfig:
    seed: int = 0
    num_people: int = 500
    attributes: tuple = DEFAULT_ATTRIBUTES
    train_templates: int = 5
    heldout_templates: int = 1
    repetitions: int = 5

    def __post_init__(self):
        cap = name_capacity()
        if not 1 <= self.num_people <= cap:
            raise ValueError(f"num_people: must be in [1, {cap}] (unique names); got {self.num_people}")
        if not self.attributes:
            raise ValueError(f"fact_attributes: must name some of {list(ATTRIBUTES)}; got {self.attributes}")
        for a in self.attributes:
            if a not in ATTRIBUTES:
                raise ValueError(f"fact_attributes: unknown attribute {a!r}; allowed: {list(ATTRIBUTES)}")
        if len(set(self.attributes)) != len(self.attributes):
            raise ValueError(f"fact_attributes: must not repeat an attribute; got {self.attributes!r}")
        if self.train_templates < 1:
            raise ValueError(f"fact_train_templates: must be >= 1; got {self.train_templates}")
        if self.heldout_templates < 0:
            raise ValueError(f"fact_heldout_templates: must be >= 0; got {self.heldout_templates}")
        if self.train_templates + self.heldout_templates > TEMPLATES_PER_ATTRIBUTE:
            raise ValueError(
                f"fact_train_templates + fact_heldout_templates: must be <= {TEMPLATES_PER_ATTRIBUTE} "
                f"(templates per attribute); got {self.train_templates} + {self.heldout_templates}"
            )
        if self.repetitions < 1:
            raise ValueError(f"fact_repetitions: must be >= 1; got {self.repetitions}")

    @property
    def train_ids(self) -> tuple[int, ...]:
        return tuple(range(self.train_templates))

    @property
    def heldout_ids(self) -> tuple[int, ...]:
        return tuple(range(TEMPLATES_PER_ATTRIBUTE - self.heldout_templates, TEMPLATES_PER_ATTRIBUTE))


@dataclass(frozen=True)
class Person:
    name: str
    facts: dict  # attribute -> value (all attributes, also those not rendered)


@dataclass(frozen=True)
class FactQuery:
    prompt: str  # text up to (not including) the space before the value
    answer: str
    person: str
    attribute: str
    template: int  # index into ATTRIBUTES[attribute]
    heldout: bool  # True: the template never occurs in training text


@dataclass
class FactCorpus:
    config: FactConfig
    people: list[Person]
    train_docs: list[str]
    val_docs: list[str]
    queries: list[FactQuery]


class _Rng:
    """Only random.Random.random() (and str seeding) is guaranteed stable across Python versions, so
    every draw goes through it: the corpus for a seed stays the same on every machine."""

    def __init__(self, seed: str):
        self._r = random.Random(seed)

    def below(self, n: int) -> int:
        return min(int(self._r.random() * n), n - 1)

    def shuffle(self, xs: list) -> list:
        for i in range(len(xs) - 1, 0, -1):
            j = self.below(i + 1)
            xs[i], xs[j] = xs[j], xs[i]
        return xs

    def choice(self, xs):
        return xs[self.below(len(xs))]


def generate_people(cfg: FactConfig) -> list[Person]:
    rng = _Rng(f"facts:{cfg.seed}:people")
    n_tail, n_head = len(SURNAME_TAILS), len(SURNAME_HEADS)
    # Partial Fisher-Yates over all name indices: unique names without rejection loops.
    pool = list(range(name_capacity()))
    people = []
    for i in range(cfg.num_people):
        j = i + rng.below(len(pool) - i)
        pool[i], pool[j] = pool[j], pool[i]
        k = pool[i]
        first = FIRST_NAMES[k // (n_head * n_tail)]
        last = SURNAME_HEADS[(k // n_tail) % n_head] + SURNAME_TAILS[k % n_tail]
        day, month, year = 1 + rng.below(28), rng.choice(MONTHS), rng.choice(YEARS)
        facts = {"birth_year": year, "birth_date": f"{day} {month} {year}"}
        for attr, values in _VALUES.items():
            facts[attr] = rng.choice(values)
        people.append(Person(name=f"{first} {last}", facts=facts))
    return people


def render(attribute: str, template: int, name: str, value: str) -> str:
    return ATTRIBUTES[attribute][template].format(name=name, value=value)


def prompt_for(attribute: str, template: int, name: str) -> str:
    """The sentence up to the value, without the trailing space (the BPE attaches it to the value)."""
    t = ATTRIBUTES[attribute][template]
    assert t.endswith("{value}."), t
    return t[: -len("{value}.")].rstrip(" ").format(name=name)


def build_fact_corpus(cfg: FactConfig) -> FactCorpus:
    people = generate_people(cfg)
    rng = _Rng(f"facts:{cfg.seed}:text")
    attrs = list(cfg.attributes)
    # offset[p][a]: where fact (p, a) starts in the cycle of training templates.
    offset = [[rng.below(cfg.train_templates) for _ in attrs] for _ in people]

    train_docs = []
    for r in range(cfg.repetitions):
        for p in rng.shuffle(list(range(len(people)))):
            lines = []
            for a in rng.shuffle(list(range(len(attrs)))):
                t = cfg.train_ids[(offset[p][a] + r) % cfg.train_templates]
                lines.append(render(attrs[a], t, people[p].name, people[p].facts[attrs[a]]))
            train_docs.append("\n".join(lines))

    # Validation bios use the held-out phrasing; without held-out templates, one extra training pass.
    val_ids = cfg.heldout_ids or cfg.train_ids
    val_docs = []
    for p in range(len(people)):
        lines = []
        for a in rng.shuffle(list(range(len(attrs)))):
            t = val_ids[(offset[p][a] + cfg.repetitions) % len(val_ids)]
            lines.append(render(attrs[a], t, people[p].name, people[p].facts[attrs[a]]))
        val_docs.append("\n".join(lines))

    queries = []
    for p, person in enumerate(people):
        for a, attr in enumerate(attrs):
            seen = cfg.train_ids[offset[p][a] % cfg.train_templates]  # the phrasing of pass 0
            for t, heldout in [(seen, False)] + [(h, True) for h in cfg.heldout_ids]:
                queries.append(FactQuery(prompt_for(attr, t, person.name), person.facts[attr],
                                         person.name, attr, t, heldout))
    # Shuffled so that any prefix of the list is a fair sample (evaluation may use only the first k).
    _Rng(f"facts:{cfg.seed}:queries").shuffle(queries)
    return FactCorpus(cfg, people, train_docs, val_docs, queries)


# ------------------------------------------------------------------------------------------ scoring
_STOPS = ("\n", "<|", ".", "!", "?")


def extract_attribute(continuation: str) -> str:
    """The attribute a model generated after a prompt.

    Normalisation (documented contract of the metric):
    1. cut at the first newline, special token ("<|"), or sentence end (".", "!", "?");
    2. strip surrounding whitespace, then trailing ",", ";", ":" and whitespace again;
    3. collapse runs of inner whitespace to one space.
    Case is kept: "lisbon" does not match "Lisbon". Applying it twice changes nothing, so it can be
    given raw continuations or already extracted strings.
    """
    cut = len(continuation)
    for s in _STOPS:
        i = continuation.find(s)
        if i != -1:
            cut = min(cut, i)
    text = continuation[:cut].strip().rstrip(",;:").strip()
    return " ".join(text.split())


def fact_recall_accuracy(predictions: list[str], answers: list[str]) -> float:
    """Fraction of predictions whose extracted attribute equals the answer exactly (see
    `extract_attribute`; answers only get their whitespace normalised)."""
    if len(predictions) != len(answers):
        raise ValueError(
            f"predictions: must have one entry per answer; got {len(predictions)} predictions "
            f"for {len(answers)} answers"
        )
    if not answers:
        raise ValueError("answers: must not be empty; got 0 items")
    hits = sum(extract_attribute(p) == " ".join(a.split()) for p, a in zip(predictions, answers, strict=True))
    return hits / len(answers)


def fact_recall_report(queries: list[FactQuery], predictions: list[str]) -> dict:
    """Accuracy overall and per attribute, plus the majority-answer baseline ("chance") for the same
    queries: an accuracy near chance means no facts were stored."""
    if len(predictions) != len(queries):
        raise ValueError(
            f"predictions: must have one entry per query; got {len(predictions)} for {len(queries)} queries"
        )
    report = {"accuracy": fact_recall_accuracy(predictions, [q.answer for q in queries]), "n": len(queries)}
    by_attr, chance_hits = {}, 0
    for attr in sorted({q.attribute for q in queries}):
        idx = [i for i, q in enumerate(queries) if q.attribute == attr]
        answers = [queries[i].answer for i in idx]
        by_attr[attr] = fact_recall_accuracy([predictions[i] for i in idx], answers)
        chance_hits += max(answers.count(a) for a in set(answers))
    report["by_attribute"] = by_attr
    report["chance"] = chance_hits / len(queries)
    return report
