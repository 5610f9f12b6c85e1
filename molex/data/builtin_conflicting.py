"""A built-in set of 16 conflicting tasks: the same word lists, mapped to different outputs by the instruction.

Every task draws its input from one generator (3 to 5 words of a fixed vocabulary, half of the lists with
one word repeated), so an input alone never tells which output is wanted. One set of weights has to keep
16 different maps of the same inputs apart, which is where experts that each carry a few of them should
pay (the ``multitask`` set's tasks mostly take inputs of different kinds: numbers, countries, word lists).
Exact match compares case-insensitively, so no task changes case. For the input ``moon cat tree dog cat``:

============ ============================================================== ==========================
task         instruction                                                    output
============ ============================================================== ==========================
sort         Sort the words alphabetically.                                 ``cat cat dog moon tree``
sort_desc    Sort the words in reverse alphabetical order.                  ``tree moon dog cat cat``
reverse      Write the words in reverse order.                              ``cat dog tree cat moon``
count        How many words are in the list?                                ``5``
dedupe       Remove the repeated words, keeping the first of each.          ``moon cat tree dog``
first        What is the first word?                                        ``moon``
last         What is the last word?                                         ``cat``
hyphenate    Join the words with hyphens.                                   ``moon-cat-tree-dog-cat``
longest      Which word is the longest? Give the first one if several are.  ``moon``
initials     Write the first letter of each word, joined together.          ``mctdc``
lengths      Write the number of letters of each word.                      ``4 3 4 3 3``
by_length    Sort the words by length, shortest first, ties in order.       ``cat dog cat moon tree``
rotate       Move the first word to the end.                                ``cat tree dog cat moon``
swap_ends    Swap the first and the last word.                              ``cat cat tree dog moon``
every_other  Keep the first, third and fifth words.                         ``moon tree cat``
backwards    Spell every word backwards.                                    ``noom tac eert god tac``
============ ============================================================== ==========================

Splits are disjoint per task as in :mod:`molex.data.builtin` (a stable hash of the task and the input);
every split holds at least 10% of each task's input space.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from molex.data.builtin import BuiltinTask

__all__ = ["SET_TASKS"]

_VOCAB = (
    "ant", "apple", "bird", "boat", "book", "bread", "cake", "car", "cat", "chair", "cloud", "coat", "cup", "desk",
    "dog", "door", "duck", "egg", "fish", "flag", "frog", "goat", "hat", "horse", "house", "key", "lamp", "leaf",
    "lion", "milk", "moon", "mouse", "nose", "pen", "pig", "plate", "rain", "ring", "river", "road", "rock",
    "rose", "ship", "shoe", "sock", "star", "stone", "sun", "table", "tree", "wall", "water", "wheel", "window",
)  # fmt: skip


def _words(rng: random.Random) -> list[str]:
    """The shared input generator: 3-5 words; half the lists repeat one word at a later position."""
    words = rng.sample(_VOCAB, rng.randint(3, 4))
    if rng.random() < 0.5:
        words.insert(rng.randint(1, len(words)), rng.choice(words))
    return words


def _dedupe(words: list[str]) -> list[str]:
    return list(dict.fromkeys(words))


_MAPS: dict[str, tuple[str, Callable[[list[str]], str]]] = {
    "sort": ("Sort the words alphabetically.", lambda w: " ".join(sorted(w))),
    "sort_desc": ("Sort the words in reverse alphabetical order.", lambda w: " ".join(sorted(w, reverse=True))),
    "reverse": ("Write the words in reverse order.", lambda w: " ".join(reversed(w))),
    "count": ("How many words are in the list?", lambda w: str(len(w))),
    "dedupe": ("Remove the repeated words, keeping the first of each.", lambda w: " ".join(_dedupe(w))),
    "first": ("What is the first word?", lambda w: w[0]),
    "last": ("What is the last word?", lambda w: w[-1]),
    "hyphenate": ("Join the words with hyphens.", lambda w: "-".join(w)),
    "longest": ("Which word is the longest? Give the first one if several are.", lambda w: max(w, key=len)),
    "initials": ("Write the first letter of each word, joined together.", lambda w: "".join(x[0] for x in w)),
    "lengths": ("Write the number of letters of each word.", lambda w: " ".join(str(len(x)) for x in w)),
    "by_length": (
        "Sort the words by length, shortest first, ties in order.",
        lambda w: " ".join(sorted(w, key=len)),
    ),
    "rotate": ("Move the first word to the end.", lambda w: " ".join(w[1:] + w[:1])),
    "swap_ends": ("Swap the first and the last word.", lambda w: " ".join([w[-1], *w[1:-1], w[0]])),
    "every_other": ("Keep the first, third and fifth words.", lambda w: " ".join(w[::2])),
    "backwards": ("Spell every word backwards.", lambda w: " ".join(x[::-1] for x in w)),
}


def _sampler(mapping: Callable[[list[str]], str]) -> Callable[[random.Random], tuple[str, str]]:
    def sample(rng: random.Random) -> tuple[str, str]:
        words = _words(rng)
        return " ".join(words), mapping(words)

    return sample


#: the set's tasks, in the order that defines their integer ids
SET_TASKS: tuple[BuiltinTask, ...] = tuple(
    BuiltinTask(name, instruction, sample=_sampler(mapping)) for name, (instruction, mapping) in _MAPS.items()
)
