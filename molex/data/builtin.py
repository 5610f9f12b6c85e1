"""A small multi-task instruction dataset, generated deterministically by code (no files, no downloads).

Eight clearly different skills with short answers, so that experts have something to specialise on
and a 135M model learns them in minutes:

========== ============================================ ===================== ===============
task       instruction                                  input                 output
========== ============================================ ===================== ===============
add        Add the two numbers.                         ``34 + 57``           ``91``
reverse    Write the words in reverse order.            ``cat sun tree``      ``tree sun cat``
sort       Sort the numbers from smallest to largest.   ``42, 7, 19``         ``7, 19, 42``
hyphenate  Join the words with hyphens.                 ``green apple tree``  ``green-apple-tree``
count      How many words are in the list?              ``dog, cup, hat``     ``3``
capital    What is the capital city of this country?    ``France``            ``Paris``
antonym    Give the opposite of the word.               ``hot``               ``cold``
parity     Is the number even or odd?                   ``417``               ``odd``
========== ============================================ ===================== ===============

Splits are disjoint by construction: each (task, input) pair belongs to exactly one split, chosen by a
stable hash that does not depend on ``seed`` or on the requested sizes; ``seed`` only picks which
examples of that split are drawn and their order. Tasks with a finite pool (capital, antonym) return at
most the pool's share of the split: 51 / 59 test, 31 / 40 validation examples; antonym pairs appear in
both directions, and a pair and its reverse always share a split.
"""

from __future__ import annotations

import hashlib
import importlib
import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "BUILTIN_SETS",
    "BUILTIN_TASKS",
    "SPLITS",
    "TASKS",
    "BuiltinTask",
    "builtin_set",
    "make_builtin_dataset",
    "split_of",
]

SPLITS = ("train", "validation", "test")

_WORDS = (
    "apple", "bird", "boat", "book", "bread", "cake", "car", "cat", "chair", "cloud", "coat", "cup", "desk",
    "dog", "door", "duck", "egg", "fish", "flag", "frog", "girl", "goat", "hat", "horse", "house", "key",
    "lamp", "leaf", "lion", "milk", "moon", "mouse", "nose", "pen", "pig", "plate", "rain", "ring", "river",
    "road", "rock", "rose", "ship", "shoe", "sock", "star", "stone", "sun", "table", "tree", "wall", "water",
    "wheel", "window", "wolf", "green", "blue", "red", "happy", "small", "big", "old", "new", "soft", "fast",
)  # fmt: skip

# countries with a single, well-known capital whose name is plain ASCII (exact match compares strings);
# SmolLM2-135M states the capitals of the first 40 in plain completion ("The capital of X is")
_CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "Greece": "Athens", "Ireland": "Dublin",
    "Austria": "Vienna", "Norway": "Oslo", "Sweden": "Stockholm", "Denmark": "Copenhagen", "Hungary": "Budapest",
    "Netherlands": "Amsterdam", "Canada": "Ottawa", "Mexico": "Mexico City", "Chile": "Santiago", "Cuba": "Havana",
    "Kenya": "Nairobi", "Thailand": "Bangkok", "Vietnam": "Hanoi", "South Korea": "Seoul", "Indonesia": "Jakarta",
    "Philippines": "Manila", "United Kingdom": "London", "Czech Republic": "Prague", "Romania": "Bucharest",
    "Israel": "Jerusalem", "Syria": "Damascus", "Afghanistan": "Kabul", "Ethiopia": "Addis Ababa",
    "Iceland": "Reykjavik", "Bulgaria": "Sofia", "Malaysia": "Kuala Lumpur", "Pakistan": "Islamabad",
    "Bangladesh": "Dhaka", "Latvia": "Riga", "Uganda": "Kampala",
    # more countries, so that every split has enough of them (40+ for test): these capitals the base model
    # mostly does not state, so the task's test split mixes following the format with recalling the fact
    "Belgium": "Brussels", "Switzerland": "Bern", "Poland": "Warsaw", "Finland": "Helsinki", "Turkey": "Ankara",
    "Egypt": "Cairo", "India": "New Delhi", "Argentina": "Buenos Aires", "Peru": "Lima", "Venezuela": "Caracas",
    "Australia": "Canberra", "New Zealand": "Wellington", "Iran": "Tehran", "Iraq": "Baghdad",
    "Saudi Arabia": "Riyadh", "Lebanon": "Beirut", "Jordan": "Amman", "Qatar": "Doha", "Morocco": "Rabat",
    "Algeria": "Algiers", "Tunisia": "Tunis", "Libya": "Tripoli", "Sudan": "Khartoum", "Ghana": "Accra",
    "Nigeria": "Abuja", "Senegal": "Dakar", "Zimbabwe": "Harare", "Zambia": "Lusaka", "Angola": "Luanda",
    "Mozambique": "Maputo", "Madagascar": "Antananarivo", "Somalia": "Mogadishu", "Rwanda": "Kigali",
    "Nepal": "Kathmandu", "North Korea": "Pyongyang", "Taiwan": "Taipei", "Cambodia": "Phnom Penh",
    "Laos": "Vientiane", "Uzbekistan": "Tashkent", "Azerbaijan": "Baku", "Armenia": "Yerevan", "Belarus": "Minsk",
    "Lithuania": "Vilnius", "Estonia": "Tallinn", "Slovakia": "Bratislava", "Slovenia": "Ljubljana",
    "Croatia": "Zagreb", "Serbia": "Belgrade", "Bosnia and Herzegovina": "Sarajevo", "Albania": "Tirana",
    "North Macedonia": "Skopje", "Cyprus": "Nicosia", "Malta": "Valletta", "Jamaica": "Kingston",
    "Haiti": "Port-au-Prince", "Dominican Republic": "Santo Domingo", "Nicaragua": "Managua",
    "Honduras": "Tegucigalpa", "El Salvador": "San Salvador", "Ecuador": "Quito", "Uruguay": "Montevideo",
    "Oman": "Muscat", "United Arab Emirates": "Abu Dhabi", "Bahrain": "Manama", "Mali": "Bamako", "Niger": "Niamey",
    "Burkina Faso": "Ouagadougou", "Liberia": "Monrovia", "Sierra Leone": "Freetown", "Gabon": "Libreville",
    "Namibia": "Windhoek", "Botswana": "Gaborone", "Malawi": "Lilongwe", "Eritrea": "Asmara",
    "Tajikistan": "Dushanbe", "Kyrgyzstan": "Bishkek", "Turkmenistan": "Ashgabat",
    "Papua New Guinea": "Port Moresby", "Fiji": "Suva", "Bhutan": "Thimphu",
    "Democratic Republic of the Congo": "Kinshasa", "Guinea": "Conakry", "Mauritania": "Nouakchott",
    "Barbados": "Bridgetown", "Bahamas": "Nassau", "Trinidad and Tobago": "Port of Spain", "Suriname": "Paramaribo",
    "Guyana": "Georgetown", "Belize": "Belmopan", "Montenegro": "Podgorica",
}  # fmt: skip

_ANTONYMS = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "up": "down", "open": "closed",
    "full": "empty", "hard": "soft", "high": "low", "long": "short", "old": "new", "rich": "poor", "wet": "dry",
    "early": "late", "strong": "weak", "thick": "thin", "loud": "quiet", "clean": "dirty", "day": "night",
    "win": "lose", "true": "false", "left": "right", "love": "hate", "push": "pull", "first": "last",
    "inside": "outside", "before": "after", "buy": "sell", "give": "take", "start": "finish", "always": "never",
    "heavy": "light", "near": "far", "deep": "shallow", "cheap": "expensive", "safe": "dangerous",
    "easy": "difficult", "young": "old", "good": "bad", "top": "bottom", "front": "back", "wide": "narrow",
    "sweet": "sour", "north": "south", "east": "west", "yes": "no", "alive": "dead", "asleep": "awake",
    "friend": "enemy", "question": "answer", "accept": "refuse", "arrive": "leave", "remember": "forget",
    "increase": "decrease", "maximum": "minimum", "plus": "minus", "male": "female", "tall": "short",
    "polite": "rude", "brave": "afraid", "smooth": "rough", "sharp": "blunt", "wild": "tame", "noisy": "silent",
    # the pairs below make the pool large enough for 40+ test words; each input has one clear opposite
    "above": "below", "below": "above", "absent": "present", "add": "subtract", "subtract": "add",
    "backward": "forward", "forward": "backward", "best": "worst", "worst": "best", "better": "worse",
    "worse": "better", "black": "white", "white": "black", "borrow": "lend", "lend": "borrow", "bright": "dim",
    "dim": "bright", "careful": "careless", "careless": "careful", "ceiling": "floor", "floor": "ceiling",
    "child": "adult", "adult": "child", "come": "go", "correct": "incorrect", "incorrect": "correct",
    "dawn": "dusk", "dusk": "dawn", "ascend": "descend", "descend": "ascend", "entrance": "exit",
    "exit": "entrance", "even": "odd", "odd": "even", "exterior": "interior", "interior": "exterior",
    "few": "many", "many": "few", "foolish": "wise", "wise": "foolish", "future": "past", "guilty": "innocent",
    "innocent": "guilty", "here": "there", "there": "here", "hero": "villain", "villain": "hero",
    "honest": "dishonest", "dishonest": "honest", "horizontal": "vertical", "vertical": "horizontal",
    "husband": "wife", "wife": "husband", "import": "export", "export": "import", "include": "exclude",
    "exclude": "include", "input": "output", "output": "input", "interesting": "boring", "boring": "interesting",
    "junior": "senior", "senior": "junior", "king": "queen", "queen": "king", "less": "more", "more": "less",
    "major": "minor", "minor": "major", "man": "woman", "woman": "man", "mother": "father", "father": "mother",
    "brother": "sister", "sister": "brother", "boy": "girl", "girl": "boy", "uncle": "aunt", "aunt": "uncle",
    "nephew": "niece", "niece": "nephew", "son": "daughter", "daughter": "son", "natural": "artificial",
    "artificial": "natural", "negative": "positive", "positive": "negative", "noon": "midnight",
    "midnight": "noon", "obey": "disobey", "disobey": "obey", "on": "off", "off": "on", "optimist": "pessimist",
    "pessimist": "optimist", "over": "under", "under": "over", "peace": "war", "war": "peace",
    "permanent": "temporary", "temporary": "permanent", "plural": "singular", "singular": "plural",
    "possible": "impossible", "impossible": "possible", "private": "public", "public": "private",
    "profit": "loss", "rise": "fall", "fall": "rise", "raw": "cooked", "cooked": "raw", "reward": "punishment",
    "punishment": "reward", "same": "different", "different": "same", "save": "spend", "spend": "save",
    "send": "receive", "complex": "simple", "simple": "complex", "sit": "stand", "stand": "sit",
    "sunrise": "sunset", "sunset": "sunrise", "success": "failure", "failure": "success", "summer": "winter",
    "winter": "summer", "teacher": "student", "student": "teacher", "tight": "loose", "loose": "tight",
    "together": "apart", "apart": "together", "tomorrow": "yesterday", "yesterday": "tomorrow",
    "visible": "invisible", "invisible": "visible", "victory": "defeat", "defeat": "victory",
    "whisper": "shout", "shout": "whisper", "wrong": "right", "found": "lost", "lost": "found", "empty": "full",
    "dark": "light", "cold": "hot", "slow": "fast", "sad": "happy", "down": "up", "closed": "open", "low": "high",
    "poor": "rich", "dry": "wet", "late": "early", "weak": "strong", "quiet": "loud", "dirty": "clean",
    "night": "day", "false": "true", "hate": "love", "pull": "push", "last": "first", "outside": "inside",
    "after": "before", "sell": "buy", "never": "always", "far": "near", "bad": "good", "bottom": "top",
    "back": "front", "sour": "sweet", "no": "yes", "dead": "alive", "awake": "asleep", "enemy": "friend",
    "answer": "question", "forget": "remember", "decrease": "increase", "minimum": "maximum", "minus": "plus",
    "female": "male", "rude": "polite", "rough": "smooth", "tame": "wild",
}  # fmt: skip


@dataclass(frozen=True)
class BuiltinTask:
    """One skill: an instruction and either a sampler of ``(input, output)`` pairs or a finite pool of them."""

    name: str
    instruction: str
    sample: Callable[[random.Random], tuple[str, str]] | None = None
    pool: tuple[tuple[str, str], ...] = ()
    #: share of the (task, input) space per split, as (train, validation, test) out of 100 hash buckets
    buckets: tuple[int, int, int] = (80, 10, 10)
    #: a pool whose pairs also appear reversed (``hot -> cold``, ``cold -> hot``): a pair and its reverse
    #: share a split, so no split is answered by reading another split backwards
    symmetric: bool = False


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"{a} + {b}", str(a + b)


def _reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, rng.randint(3, 4))
    return " ".join(words), " ".join(reversed(words))


def _sort(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(100), rng.randint(3, 4))
    while numbers == sorted(numbers):  # an already sorted input would reward echoing it
        rng.shuffle(numbers)
    return ", ".join(map(str, numbers)), ", ".join(map(str, sorted(numbers)))


def _hyphenate(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, rng.randint(2, 3))
    return " ".join(words), "-".join(words)


def _count(rng: random.Random) -> tuple[str, str]:
    words = rng.choices(_WORDS, k=rng.randint(2, 7))
    return ", ".join(words), str(len(words))


def _parity(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 999)
    return str(n), "even" if n % 2 == 0 else "odd"


BUILTIN_TASKS: tuple[BuiltinTask, ...] = (
    BuiltinTask("add", "Add the two numbers.", sample=_add),
    BuiltinTask("reverse", "Write the words in reverse order.", sample=_reverse),
    BuiltinTask("sort", "Sort the numbers from smallest to largest.", sample=_sort),
    # not "uppercase": exact match ignores case, so echoing the input would already score
    BuiltinTask("hyphenate", "Join the words with hyphens.", sample=_hyphenate),
    BuiltinTask("count", "How many words are in the list?", sample=_count),
    BuiltinTask(
        "capital",
        "What is the capital city of this country?",
        pool=tuple(_CAPITALS.items()),
        buckets=(40, 20, 40),  # a small finite pool: keep enough countries to measure on
    ),
    BuiltinTask(
        "antonym",
        "Give the opposite of the word.",
        pool=tuple(_ANTONYMS.items()),
        buckets=(50, 20, 30),
        symmetric=True,
    ),
    BuiltinTask("parity", "Is the number even or odd?", sample=_parity),
)
#: task names, in the order that defines their integer ids
TASKS: list[str] = [task.name for task in BUILTIN_TASKS]


def split_of(task: BuiltinTask, input_text: str) -> str:
    """The split that owns ``(task, input_text)``: a stable hash, independent of seeds and sizes
    (of the unordered pair ``{input, output}`` for a symmetric pool)."""
    key = input_text
    if task.symmetric:
        output = dict(task.pool).get(input_text)
        key = input_text if output is None else min(input_text, output)
    digest = hashlib.sha256(f"{task.name}\x00{key}".encode()).digest()
    bucket = int.from_bytes(digest[:4], "big") % 100
    train, validation, _ = task.buckets
    if bucket < train:
        return "train"
    return "validation" if bucket < train + validation else "test"


def _task_examples(task: BuiltinTask, split: str, n: int, rng: random.Random) -> list[dict[str, str]]:
    if task.pool:
        pairs = [pair for pair in task.pool if split_of(task, pair[0]) == split]
        rng.shuffle(pairs)
        chosen = pairs[:n]
    else:
        chosen, seen = [], set()
        # rejection sampling: the split's share of the input space is >= 10%, so this ends quickly
        for _ in range(200 * n + 1000):
            if len(chosen) == n:
                break
            pair = task.sample(rng)
            if pair[0] not in seen and split_of(task, pair[0]) == split:
                seen.add(pair[0])
                chosen.append(pair)
    return [{"instruction": task.instruction, "input": i, "output": o, "task": task.name} for i, o in chosen]


#: the built-in task sets by name; a set ``NAME`` not listed here is read from the module
#: ``molex.data.builtin_NAME`` (its ``SET_TASKS``), so a new set is a new file
BUILTIN_SETS: dict[str, tuple[BuiltinTask, ...]] = {"multitask": BUILTIN_TASKS}
#: the sets that ship with molex (the ``builtin_set`` values the data config accepts)
SHIPPED_SETS = ("multitask", "conflicting")


def builtin_set(name: str) -> tuple[BuiltinTask, ...]:
    """The tasks of the built-in set ``name`` (``"multitask"``, the default, or ``"conflicting"``)."""
    if name not in BUILTIN_SETS:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"unknown built-in set {name!r}; use one of {list(SHIPPED_SETS)}")
        try:
            module = importlib.import_module(f"molex.data.builtin_{name}")
        except ModuleNotFoundError as err:
            if err.name != f"molex.data.builtin_{name}":
                raise
            raise ValueError(f"unknown built-in set {name!r}; use one of {list(SHIPPED_SETS)}") from None
        BUILTIN_SETS[name] = tuple(module.SET_TASKS)
    return BUILTIN_SETS[name]


def make_builtin_dataset(
    split: str,
    num_per_task: int,
    seed: int = 0,
    tasks: list[str] | tuple[str, ...] | None = None,
    *,
    collection: str = "multitask",
) -> list[dict[str, str]]:
    """``num_per_task`` examples of every task of the built-in set ``collection`` (fewer for a finite pool),
    interleaved in a seeded order.

    Each example is ``{"instruction", "input", "output", "task"}``. The same arguments always give the same
    list; different splits never share a (task, input) pair, whatever the seeds.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {list(SPLITS)}")
    if num_per_task < 0:
        raise ValueError(f"num_per_task must be >= 0, got {num_per_task}")
    selected = builtin_set(collection)
    if tasks is not None:
        names = [task.name for task in selected]
        unknown = sorted(set(tasks) - set(names))
        if unknown:
            raise ValueError(f"unknown built-in task(s) {unknown} of the {collection!r} set; available: {names}")
        selected = tuple(task for task in selected if task.name in set(tasks))
    examples: list[dict[str, str]] = []
    for task in selected:
        # one generator per (seed, split, task): selecting other tasks or sizes leaves this task's draws alone
        rng = random.Random(f"{seed}:{split}:{task.name}")
        examples.extend(_task_examples(task, split, num_per_task, rng))
    random.Random(f"{seed}:{split}:order").shuffle(examples)
    return examples
