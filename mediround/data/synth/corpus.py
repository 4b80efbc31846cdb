"""Every sentence the synthetic generator can emit, for training a tokenizer offline."""

from __future__ import annotations

import string

from mediround.data.synth.anatomy import entity_names
from mediround.data.synth.generator import MAX_ROUNDS
from mediround.data.synth.scenarios import NAMED_QUERIES, NAMING_ANSWERS, OPENINGS, PLAIN_ANSWERS, RELATIONS

NOUNS = ("kidney", "lung")


def text_corpus() -> list[str]:
    """All templates with every possible filling, sorted and without duplicates (deterministic)."""
    fillings = {
        "name": entity_names(),
        "noun": list(NOUNS),
        "r": [str(r) for r in range(1, MAX_ROUNDS)],
    }
    templates = [*NAMED_QUERIES, *NAMING_ANSWERS, *PLAIN_ANSWERS]
    templates += [q for opening in OPENINGS for q in opening.queries]
    templates += [q for relation in RELATIONS for q in (*relation.recent, *relation.explicit)]
    sentences: set[str] = set()
    for template in templates:
        sentences.update(_fill(template, fillings))
    return sorted(sentences)


def _fill(template: str, fillings: dict[str, list[str]]) -> list[str]:
    fields = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    results = [template]
    for field in dict.fromkeys(fields):
        results = [r.replace("{" + field + "}", value) for r in results for value in fillings[field]]
    return results
