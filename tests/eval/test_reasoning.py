"""The generated reasoning probe: deterministic tasks, answers checked by an independent solver."""
from __future__ import annotations

import re

import pytest

from bitsmith.eval.reasoning import (
    LEVELS,
    Family,
    Task,
    few_shot_prompt,
    make_tasks,
    normalise,
    run_probe,
    score,
)


def solve(question: str) -> str:
    """An independent solver: parse the question text and compute with plain Python."""
    if m := re.fullmatch(r"Start with (\d+)\. (.*)\. What is the result\?", question):
        expr = m.group(1)
        for step in m.group(2).split(", then "):
            op, n = re.fullmatch(r"(add|subtract|multiply by) (\d+)", step.lower()).groups()
            symbol = {"add": "+", "subtract": "-", "multiply by": "*"}[op]
            expr = f"({expr}) {symbol} {n}"
        return str(eval(expr))
    if m := re.fullmatch(r"Which is largest: (.*)\? Answer with the letter\.", question):
        values = {k: eval(v) for k, v in (pair.split(" = ") for pair in m.group(1).split(", "))}
        return max(values, key=values.__getitem__)
    counting = r'How many times does the (letter|word) "(\w+)" appear in (?:this list: )?(.*)\?'
    if m := re.fullmatch(counting, question):
        kind, target, where = m.groups()
        if kind == "letter":
            return str(where.strip('"').count(target))
        return str(where.split(", ").count(target))
    if m := re.fullmatch(r"Sort these (numbers|words) (.*): (.*)\.", question):
        kind, order, items = m.groups()
        values = items.split(", ")
        if kind == "numbers":
            ordered = sorted(map(int, values), reverse=order == "from largest to smallest")
            return ", ".join(map(str, ordered))
        return ", ".join(sorted(values))
    if m := re.fullmatch(r"Let (.*)\. What is (\w)\?", question):
        namespace: dict[str, int] = {}
        for assignment in m.group(1).split(", "):
            exec(assignment, {}, namespace)
        return str(namespace[m.group(2)])
    raise AssertionError(f"unrecognised question: {question}")


@pytest.fixture(scope="module")
def tasks() -> list[Task]:
    return make_tasks(20, seed=0)


def test_shape_and_ordering(tasks: list[Task]) -> None:
    assert len(tasks) == 20 * len(Family) * len(LEVELS)
    keys = [(t.family, t.level) for t in tasks]
    assert keys == sorted(keys, key=lambda k: (list(Family).index(k[0]), k[1]))
    for family in Family:
        for level in LEVELS:
            questions = [t.question for t in tasks if t.family == family and t.level == level]
            assert len(questions) == len(set(questions)) == 20


def test_deterministic_for_a_seed_and_different_across_seeds(tasks: list[Task]) -> None:
    assert make_tasks(20, seed=0) == tasks
    other = make_tasks(20, seed=1)
    assert other != tasks
    for family in Family:  # every family changes with the seed, not just some
        assert [t for t in other if t.family == family] != [t for t in tasks if t.family == family]
    # Each (family, level) has its own stream: asking for fewer levels gives a subset.
    assert make_tasks(20, levels=(2,), seed=0) == [t for t in tasks if t.level == 2]


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_answers_match_an_independent_solver(seed: int) -> None:
    for task in make_tasks(30, seed=seed):
        assert solve(task.question) == task.answer, task


def test_levels_get_harder(tasks: list[Task]) -> None:
    def mean_length(level: int) -> float:
        qs = [len(t.question) for t in tasks if t.level == level]
        return sum(qs) / len(qs)

    assert mean_length(1) < mean_length(2) < mean_length(3)
    arithmetic_steps = {t.level: t.question.count(", then") + 1
                        for t in tasks if t.family == Family.ARITHMETIC}
    assert arithmetic_steps == {1: 2, 2: 3, 3: 5}


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="levels"):
        make_tasks(1, levels=(4,))
    with pytest.raises(ValueError, match="n_per_family"):
        make_tasks(0)
    with pytest.raises(ValueError, match="fewer"):
        make_tasks(5000, levels=(1,), families=(Family.COUNTING,))  # ~250 exist


def test_few_shot_prompt_format_and_no_leak(tasks: list[Task]) -> None:
    for task in tasks:
        prompt = few_shot_prompt(task, shots=3, seed=0)
        assert prompt.endswith(f"Q: {task.question}\nA:")
        assert prompt.count(task.question) == 1  # only as the final question
        examples = re.findall(r"Q: (.*)\nA: (.*)\n", prompt)
        assert len(examples) == 3
        for question, answer in examples:
            assert question != task.question
            assert solve(question) == answer  # examples are correct


def test_few_shot_excludes_the_task_even_when_the_stream_would_pick_it() -> None:
    # Take the first example the shot stream would draw and ask about exactly that question.
    base = make_tasks(1, levels=(1,), families=(Family.SUBSTITUTION,))[0]
    first = re.findall(r"Q: (.*)\nA: (.*)\n", few_shot_prompt(base, shots=3))[0]
    clash = Task(Family.SUBSTITUTION, 1, first[0], first[1])
    prompt = few_shot_prompt(clash, shots=3)
    assert prompt.count(clash.question) == 1
    assert len(re.findall(r"Q: ", prompt)) == 4


def test_few_shot_depends_on_seed_and_shots(tasks: list[Task]) -> None:
    task = tasks[0]
    assert few_shot_prompt(task, seed=0) == few_shot_prompt(task, seed=0)
    assert few_shot_prompt(task, seed=0) != few_shot_prompt(task, seed=1)
    assert few_shot_prompt(task, shots=0).count("Q: ") == 1


@pytest.mark.parametrize(
    ("reply", "answer", "ok"),
    [
        (" 42\nQ: next", "42", True),
        ("\n  42  \n", "42", True),
        ("42.", "42", True),
        ("1,2 ,  3", "1, 2, 3", True),
        ("Apple, Banana", "apple, banana", True),
        ("b", "B", True),
        ("The answer is 42", "42", False),
        ("4 2", "42", False),
        ("", "42", False),
        ("421", "42", False),
    ],
)
def test_score(reply: str, answer: str, ok: bool) -> None:
    assert score(Task(Family.ARITHMETIC, 1, "q", answer), reply) is ok


def test_normalise() -> None:
    assert normalise("  Foo   BAR.\nsecond line") == "foo bar"


def _asked(prompt: str) -> str:
    return re.findall(r"Q: (.*)\nA:", prompt)[-1]


def test_oracle_scores_one_and_constant_scores_zero(tasks: list[Task]) -> None:
    answers = {t.question: t.answer for t in tasks}
    stops: set[tuple[str, ...]] = set()

    def oracle(prompt: str, max_new_tokens: int, stop: list[str]) -> str:
        stops.add(tuple(stop))
        return f" {answers[_asked(prompt)]}\n\nQ: something else"

    seen: list[tuple[int, int]] = []
    result = run_probe(oracle, tasks, progress=lambda d, t: seen.append((d, t)))
    assert (result.n, result.correct, result.accuracy) == (len(tasks), len(tasks), 1.0)
    assert result.by_family == {f.value: 1.0 for f in Family}
    assert result.by_level == {1: 1.0, 2: 1.0, 3: 1.0}
    assert seen[-1] == (len(tasks), len(tasks)) and len(seen) == len(tasks)
    assert stops == {("\nQ:", "\n\n")}

    result = run_probe(lambda p, n, s: " -12345", tasks)
    assert (result.correct, result.accuracy) == (0, 0.0)
    assert set(result.by_family.values()) == {0.0}


def test_per_family_and_level_breakdown(tasks: list[Task]) -> None:
    answers = {t.question: t.answer for t in tasks}
    right = {t.question for t in tasks if t.family == Family.SORTING or t.level == 1}

    def partial(prompt: str, max_new_tokens: int, stop: list[str]) -> str:
        question = _asked(prompt)
        return answers[question] if question in right else "wrong"

    result = run_probe(partial, tasks)
    assert result.by_family["sorting"] == 1.0
    assert result.by_family["arithmetic"] == pytest.approx(1 / 3)
    assert result.by_level[1] == 1.0
    assert result.by_level[2] == pytest.approx(1 / 5)
    assert result.accuracy == pytest.approx(len(right) / len(tasks))
    assert all(r.correct == (r.task.question in right) for r in result.records)


def test_run_probe_refuses_no_tasks() -> None:
    with pytest.raises(ValueError, match="make_tasks"):
        run_probe(lambda p, n, s: "", [])
