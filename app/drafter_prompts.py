"""Prompts for training a drafter when the user brings none: chat-style requests of many kinds
about many subjects. The drafter learns how the model answers, so variety of form matters more
than the subjects themselves. (MT-Bench is kept out: it is what drafters are measured on.)"""

from __future__ import annotations

import itertools
import random

TEMPLATES = [
    "Explain {} to a curious twelve-year-old.",
    "Write a short poem about {}.",
    "List five interesting facts about {}.",
    "What are the pros and cons of {}?",
    "Write a brief, friendly email inviting a colleague to a talk about {}.",
    "Summarise the history of {} in one paragraph.",
    "Give me three tips for getting started with {}.",
    "Write a two-paragraph story in which {} plays a key role.",
    "How would you teach {} to a beginner? Answer step by step.",
    "Compare {} with something similar and explain the differences.",
    "Write a product description for a book about {}.",
    "What common misconceptions do people have about {}?",
    "Draft a short speech opening a conference on {}.",
    "Write a Python function related to {}, with a docstring and an example.",
    "Answer as a travel guide: what should a visitor know about {}?",
    "Give a one-sentence definition of {}, then expand on it.",
]

SUBJECTS = [
    "photosynthesis",
    "the Roman Empire",
    "black holes",
    "machine learning",
    "coffee",
    "the water cycle",
    "chess",
    "volcanoes",
    "the printing press",
    "honeybees",
    "jazz",
    "climate change",
    "the stock market",
    "vaccines",
    "the Moon landing",
    "origami",
    "renewable energy",
    "the human heart",
    "ancient Egypt",
    "electric cars",
    "gardening",
    "the Internet",
    "octopuses",
    "the French Revolution",
    "sleep",
    "recycling",
    "tea",
    "the Great Wall of China",
    "prime numbers",
    "earthquakes",
    "Shakespeare",
    "bicycles",
    "the immune system",
    "deserts",
    "smartphones",
    "the Renaissance",
    "rainforests",
    "public libraries",
    "cryptography",
    "marathon running",
    "bread baking",
    "the ocean tides",
    "democracy",
    "the periodic table",
    "whales",
    "video games",
    "meditation",
    "glaciers",
]


def default_prompts(n: int, seed: int = 0) -> list[str]:
    """n distinct prompts (template x subject pairs), shuffled with `seed`."""
    pairs = list(itertools.product(TEMPLATES, SUBJECTS))
    random.Random(seed).shuffle(pairs)
    return [template.format(subject) for template, subject in pairs[:n]]
