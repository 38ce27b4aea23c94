"""The built-in fine-tuning task set: word puzzles with one right answer each, generated offline.

    from gptcore.sft_tasks import generate_tasks
    records = generate_tasks(100, seed=0)    # Alpaca-layout {"instruction", "input", "output"} records

gptcore.sft_data's ``prepare_sft("tasks")`` draws its records from here (TASKS lists the puzzles).
Tests: python -m pytest -q tests/test_finetune.py
"""
from __future__ import annotations

import random
from typing import Sequence

# Words that are one GPT-2 token each with a leading space, so answers are short and exact.
WORDS = ("apple", "river", "stone", "cloud", "green", "tiger", "music", "paper", "light", "water",
         "bread", "horse", "chair", "dream", "ocean", "smile", "table", "night", "grass", "plant")
TASKS = ("reverse", "sort", "first", "last", "count")
_TASK_TEXT = {
    "reverse": "Reverse the order of the words.",
    "sort": "Sort the words alphabetically.",
    "first": "Repeat the first word.",
    "last": "Repeat the last word.",
    "count": "How many words are there?",
}
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def generate_tasks(n: int, seed: int = 0, tasks: Sequence[str] = TASKS, min_words: int = 2,
                   max_words: int = 5) -> list[dict]:
    """n Alpaca-layout records of word puzzles with one right answer each (deterministic in seed)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        task = rng.choice(list(tasks))
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        if task == "reverse":
            ans = " ".join(reversed(words))
        elif task == "sort":
            ans = " ".join(sorted(words))
        elif task == "first":
            ans = words[0]
        elif task == "last":
            ans = words[-1]
        else:
            ans = _NUMBERS[len(words)]
        # "Words:" / "Answer:" put a space before every word, so each word is the same single
        # token in the input and in the answer: the task is copying, not respelling
        out.append({"instruction": _TASK_TEXT[task], "input": "Words: " + " ".join(words), "output": "Answer: " + ans})
    return out
