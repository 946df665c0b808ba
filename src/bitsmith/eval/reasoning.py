"""A generated multi-step reasoning probe: does a quantized model still follow a chain of steps?

No reasoning benchmark ships offline, so the tasks are generated: seeded, programmatic questions
with exact answers, in five families and three levels of difficulty (more steps, longer lists):

- ``arithmetic``: a running value changed by a chain of add / subtract / multiply steps;
- ``comparison``: which of several small expressions is largest (answer: its letter);
- ``counting``: how often a letter occurs in a word or sentence, or a word in a list;
- ``sorting``: sort small integers or words (answer: comma-separated);
- ``substitution``: a chain of variable definitions (x = 3, y = x + 4, ...) and the last value;
  level 3 adds a distractor definition that the answer does not depend on.

The model is any ``complete(prompt, max_new_tokens, stop) -> str`` callable (greedy). Each task is
asked few-shot in a ``Q:`` / ``A:`` format with other generated tasks of the same family and level
as examples, and scored by exact match of the first line of the reply after normalisation (case,
whitespace, spacing around commas, a trailing full stop). Everything is deterministic for a seed:
the random source is :class:`random.Random` seeded with a string, which does not depend on
``PYTHONHASHSEED``.
"""
from __future__ import annotations

import logging
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Iterable, Sequence

log = logging.getLogger(__name__)

Complete = Callable[[str, int, list[str]], str]

LEVELS: tuple[int, ...] = (1, 2, 3)
INSTRUCTION = "Answer each question with only the final answer, on one line.\n\n"
STOP: tuple[str, ...] = ("\nQ:", "\n\n")


class Family(str, Enum):
    """A kind of reasoning task; the value is the name used in reports."""

    ARITHMETIC = "arithmetic"
    COMPARISON = "comparison"
    COUNTING = "counting"
    SORTING = "sorting"
    SUBSTITUTION = "substitution"


@dataclass(frozen=True)
class Task:
    """One question with its exact answer (already in normalised form)."""

    family: Family
    level: int
    question: str
    answer: str


@dataclass(frozen=True)
class ProbeRecord:
    """One task of a probe run: what the model replied and whether it was right."""

    task: Task
    reply: str
    correct: bool


@dataclass(frozen=True)
class ProbeResult:
    """Accuracy overall, per family (keyed by the family's name) and per level."""

    n: int
    correct: int
    accuracy: float
    by_family: dict[str, float]
    by_level: dict[int, float]
    records: tuple[ProbeRecord, ...]


_WORDS = (
    "apple", "banana", "cherry", "garden", "river", "mountain", "pencil", "window", "rabbit",
    "letter", "summer", "winter", "coffee", "butter", "dinner", "yellow", "purple", "orange",
    "bottle", "kitten", "puppy", "mirror", "pepper", "balloon", "cookie", "paddle", "tomato",
    "banner", "carrot", "desert", "forest", "island", "jungle", "ladder", "marble", "needle",
    "office", "parrot", "rocket", "silver", "tunnel", "violin", "wallet", "zipper", "hammer",
    "pillow", "sunset", "meadow", "cattle", "bubble", "puzzle", "tennis", "lemon", "melon",
)
_SHORT_WORDS = ("cat", "dog", "sun", "box", "hat", "pen", "cup", "map", "egg", "owl", "bee", "fox")
_OPERATIONS = {"+": "add {n}", "-": "subtract {n}", "*": "multiply by {n}"}


def _arithmetic(rng: random.Random, level: int) -> tuple[str, str]:
    steps = (2, 3, 5)[level - 1]
    value = rng.randint(1, 9)
    phrases = []
    start = value
    for _ in range(steps):
        op = rng.choice("+-*")
        n = rng.randint(2, 3) if op == "*" else rng.randint(1, 9)
        value = value + n if op == "+" else value - n if op == "-" else value * n
        phrases.append(_OPERATIONS[op].format(n=n))
    chain = ", then ".join(phrases)
    return f"Start with {start}. {chain[0].upper()}{chain[1:]}. What is the result?", str(value)


def _expression(rng: random.Random, terms: int) -> tuple[str, int]:
    text = str(rng.randint(1, 9))
    for _ in range(terms - 1):
        text += f" {rng.choice('+-*')} {rng.randint(1, 9)}"
    return text, _evaluate(text)


def _evaluate(text: str) -> int:
    """Value of 'a op b op c' with the usual precedence (* before + and -), without eval."""
    tokens = text.split()
    terms: list[int] = [int(tokens[0])]
    signs: list[int] = [1]
    for op, number in zip(tokens[1::2], tokens[2::2]):
        if op == "*":
            terms[-1] *= int(number)
        else:
            terms.append(int(number))
            signs.append(1 if op == "+" else -1)
    return sum(s * t for s, t in zip(signs, terms))


def _comparison(rng: random.Random, level: int) -> tuple[str, str]:
    count, terms = ((2, 2), (3, 2), (4, 3))[level - 1]
    letters = "ABCD"[:count]
    while True:
        exprs = [_expression(rng, terms) for _ in letters]
        values = [v for _, v in exprs]
        if values.count(max(values)) == 1:  # a unique largest, so the answer is exact
            break
    listing = ", ".join(f"{letter} = {text}" for letter, (text, _) in zip(letters, exprs))
    question = f"Which is largest: {listing}? Answer with the letter."
    return question, letters[values.index(max(values))]


def _counting(rng: random.Random, level: int) -> tuple[str, str]:
    if level == 2:
        target = rng.choice(_SHORT_WORDS)
        items = [rng.choice(_SHORT_WORDS[:5]) if rng.random() < 0.5 else target for _ in range(8)]
        question = (f'How many times does the word "{target}" appear in this list: '
                    f'{", ".join(items)}?')
        return question, str(items.count(target))
    text = rng.choice(_WORDS) if level == 1 else " ".join(rng.sample(_WORDS, 5))
    letter = rng.choice(text.replace(" ", ""))  # frequent letters are asked about more often
    question = f'How many times does the letter "{letter}" appear in "{text}"?'
    return question, str(text.count(letter))


def _sorting(rng: random.Random, level: int) -> tuple[str, str]:
    if level == 2 and rng.random() < 0.5:
        words = rng.sample(_WORDS, 5)
        question = f"Sort these words alphabetically: {', '.join(words)}."
        return question, ", ".join(sorted(words))
    size = (4, 6, 8)[level - 1]
    numbers = [rng.randint(0, 99) for _ in range(size)]
    if level == 3 and rng.random() < 0.5:
        question = f"Sort these numbers from largest to smallest: {', '.join(map(str, numbers))}."
        return question, ", ".join(map(str, sorted(numbers, reverse=True)))
    question = f"Sort these numbers from smallest to largest: {', '.join(map(str, numbers))}."
    return question, ", ".join(map(str, sorted(numbers)))


def _substitution(rng: random.Random, level: int) -> tuple[str, str]:
    chain, distractors = ((2, 0), (3, 0), (4, 1))[level - 1]
    names = rng.sample("abcmnpqrstuvwxyz", chain + distractors)
    # The asked-for variable depends on every earlier one of the chain; a distractor (level 3)
    # is defined from some earlier variable but nothing depends on it.
    order = names[:chain]
    for extra in names[chain:]:
        order.insert(rng.randint(1, len(order) - 1), extra)
    values: dict[str, int] = {order[0]: rng.randint(1, 9)}
    lines = [f"{order[0]} = {values[order[0]]}"]
    previous = order[0]
    for name in order[1:]:
        in_chain = name in names[:chain]
        ref = previous if in_chain else rng.choice(list(values))
        op = rng.choice("+-*")
        n = rng.randint(2, 3) if op == "*" else rng.randint(1, 9)
        value = values[ref] + n if op == "+" else values[ref] - n if op == "-" else values[ref] * n
        values[name] = value
        lines.append(f"{name} = {ref} {op} {n}")
        previous = name if in_chain else previous
    question = f"Let {', '.join(lines)}. What is {order[-1]}?"
    return question, str(values[order[-1]])


_GENERATORS: dict[Family, Callable[[random.Random, int], tuple[str, str]]] = {
    Family.ARITHMETIC: _arithmetic,
    Family.COMPARISON: _comparison,
    Family.COUNTING: _counting,
    Family.SORTING: _sorting,
    Family.SUBSTITUTION: _substitution,
}


def _check_levels(levels: Iterable[int]) -> tuple[int, ...]:
    levels = tuple(levels)
    bad = [lv for lv in levels if lv not in LEVELS]
    if bad or not levels:
        raise ValueError(f"levels must be chosen from {LEVELS}, got {levels}")
    return levels


def _unique_tasks(
    family: Family, level: int, rng: random.Random, count: int, exclude: set[str]
) -> list[Task]:
    """``count`` tasks with distinct questions, none of them in ``exclude``."""
    tasks: list[Task] = []
    seen = set(exclude)
    repeats = 0  # consecutive draws of an already-seen question: the family is nearly exhausted
    while len(tasks) < count:
        question, answer = _GENERATORS[family](rng, level)
        if question in seen:
            repeats += 1
            if repeats > 1000:
                raise ValueError(
                    f"could not generate {count} distinct {family.value} tasks at level {level} "
                    f"(only {len(tasks)} found); ask for fewer tasks per family"
                )
            continue
        repeats = 0
        seen.add(question)
        tasks.append(Task(family, level, question, answer))
    return tasks


def make_tasks(
    n_per_family: int,
    levels: Sequence[int] = LEVELS,
    seed: int = 0,
    families: Sequence[Family] = tuple(Family),
) -> list[Task]:
    """``n_per_family`` distinct tasks for every family and level, ordered by family then level.

    The same ``seed`` always gives the same tasks; each (family, level) has its own random stream,
    so asking for more levels or families does not change the tasks of the others.
    """
    if n_per_family < 1:
        raise ValueError(f"n_per_family must be at least 1, got {n_per_family}")
    levels = _check_levels(levels)
    tasks: list[Task] = []
    for family in families:
        for level in levels:
            rng = random.Random(f"bitsmith-probe:{seed}:{Family(family).value}:{level}")
            tasks += _unique_tasks(Family(family), level, rng, n_per_family, exclude=set())
    return tasks


def few_shot_prompt(task: Task, shots: int = 3, seed: int = 0) -> str:
    """The prompt for ``task``: an instruction, ``shots`` solved examples, then the question.

    The examples are other generated tasks of the same family and level, drawn from a stream
    separate from :func:`make_tasks` and never equal to the task's own question.
    """
    if shots < 0:
        raise ValueError(f"shots must be zero or more, got {shots}")
    rng = random.Random(f"bitsmith-shots:{seed}:{task.family.value}:{task.level}")
    examples = _unique_tasks(task.family, task.level, rng, shots, exclude={task.question})
    blocks = [f"Q: {ex.question}\nA: {ex.answer}\n\n" for ex in examples]
    return INSTRUCTION + "".join(blocks) + f"Q: {task.question}\nA:"


def normalise(text: str) -> str:
    """First non-empty line, lower case, single spaces, ', ' between items, no final full stop."""
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    line = re.sub(r"\s+", " ", line).strip().lower()
    line = re.sub(r"\s*,\s*", ", ", line)
    return line.rstrip(".").strip()


def score(task: Task, answer_text: str) -> bool:
    """Whether a reply is ``task``'s answer: exact match of the normalised first line."""
    return normalise(answer_text) == normalise(task.answer)


def _accuracy(records: Iterable[ProbeRecord]) -> float:
    records = list(records)
    return sum(r.correct for r in records) / len(records)


def run_probe(
    complete: Complete,
    tasks: Sequence[Task],
    progress: Callable[[int, int], None] | None = None,
    shots: int = 3,
    seed: int = 0,
    max_new_tokens: int = 48,
) -> ProbeResult:
    """Ask every task few-shot, greedily, and score the replies.

    ``progress(done, total)`` is called after each task (the CLI draws a bar with it).
    ``max_new_tokens`` must fit the longest answer (eight two-digit numbers with commas).
    """
    if not tasks:
        raise ValueError("run_probe needs at least one task; make them with make_tasks()")
    records: list[ProbeRecord] = []
    for index, task in enumerate(tasks):
        reply = complete(few_shot_prompt(task, shots, seed), max_new_tokens, list(STOP))
        records.append(ProbeRecord(task, reply, score(task, reply)))
        if progress is not None:
            progress(index + 1, len(tasks))
    families: dict[str, list[ProbeRecord]] = defaultdict(list)
    levels: dict[int, list[ProbeRecord]] = defaultdict(list)
    for record in records:
        families[record.task.family.value].append(record)
        levels[record.task.level].append(record)
    correct = sum(r.correct for r in records)
    log.info("reasoning probe: %d/%d correct", correct, len(records))
    return ProbeResult(
        n=len(records),
        correct=correct,
        accuracy=correct / len(records),
        by_family={name: _accuracy(recs) for name, recs in families.items()},
        by_level={level: _accuracy(recs) for level, recs in sorted(levels.items())},
        records=tuple(records),
    )
