"""Prompts for training a drafter when the user brings none: chat-style requests of many kinds
(writing, explaining, advice, role-play, reasoning, arithmetic, code, extraction and rewriting)
about many subjects. The drafter learns how the model answers, so variety of form matters more
than the subjects themselves: a drafter trained on a few forms accepts far fewer tokens on
others. (MT-Bench is kept out: it is what drafters are measured on.)"""

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
    "Pretend you are a museum curator. Describe an exhibition about {}.",
    "Imagine you are a journalist interviewing an expert on {}. Write three questions and answers.",
    "Write a haiku about {}, then explain the imagery you used.",
    "Create a short quiz with four multiple-choice questions about {}.",
    "Write a persuasive paragraph arguing that schools should teach more about {}.",
    "What would the world look like in 50 years if {} changed dramatically? Speculate.",
    "Explain the main scientific ideas behind {} as a numbered list.",
    "Write a dialogue between two friends who disagree about {}.",
    "Describe {} using only simple words, as if writing for a children's encyclopedia.",
    "Write a tweet announcing a new documentary about {}.",
    "Give me an outline for a blog post about {}.",
    "Write a limerick about {}.",
    "What ethical questions does {} raise? Discuss briefly.",
    "Suggest a weekend project or activity related to {}, with a plan.",
    "Rewrite this sentence to sound more formal: 'honestly, {} is pretty cool stuff'.",
    "Summarise, in three bullet points, why {} matters today.",
    "Write the opening paragraph of a mystery novel that involves {}.",
    "Explain how {} works to someone who only speaks in analogies to cooking.",
    "Act as a tutor. Ask me one question about {}, then explain the answer.",
    "Write a short review of an imaginary restaurant themed around {}.",
]

ONE_OFF = [  # forms that need no subject: reasoning, arithmetic, code, extraction
    "What is {a} times {b}? Show your working.",
    "A shop sells pens at {a} cents each. How much do {b} pens cost in dollars? Explain.",
    "If a train travels {a} km in {b} hours, what is its average speed? Explain step by step.",
    "Solve for x: {a}x + {b} = {c}. Show each step.",
    "Is {c} a prime number? Explain how you checked.",
    "What is the sum of the integers from 1 to {a}? Explain the trick.",
    "{n1} is older than {n2}, and {n2} is older than {n3}. Who is the youngest? Explain.",
    "{n1} has {a} apples and gives {b} to {n2}. How many are left? Answer in one sentence.",
    "Write a Python function that returns the {a}th Fibonacci number, with a short explanation.",
    "Write a Python function that checks whether a string is a palindrome, and test it on '{n1}'.",
    "Write a SQL query that finds the {b} customers with the highest total order value.",
    "Write a JavaScript function that counts the vowels in a string.",
    "Explain what this code does: `print(sum(x * x for x in range({a})))`.",
    "Write a bash command that counts the lines in every .txt file in a folder.",
    "Find the bug: `def mean(xs): return sum(xs) / len(xs) + 1`. Explain and fix it.",
    "Extract the names and ages as JSON: '{n1} is {a} years old and {n2} is {b}.'",
    "List the verbs in this sentence: '{n1} quickly wrote a letter and mailed it to {n2}.'",
    "Translate into French: 'My friend {n1} lives near the river and likes to read.'",
    "Correct the grammar: '{n1} and me goes to the market every days.'",
    "Classify the sentiment of this review as positive or negative: 'The food was cold and the "
    "service slow, but {n1} at the desk was kind.'",
    "Convert {a} degrees Fahrenheit to Celsius and explain the formula.",
    "Write a short thank-you note from {n1} to {n2} for help with moving house.",
    "Plan a {b}-day trip for {n1} who loves hiking and museums.",
    "Give {n1} advice on how to prepare for a job interview next week.",
]

NAMES = ["Alice", "Bob", "Carlos", "Dana", "Emeka", "Fatima", "George", "Hana", "Ivan", "Julia"]

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
    """n distinct prompts, shuffled with `seed`: every template x subject pair, then the
    subject-free forms with random numbers and names."""
    rng = random.Random(seed)
    pairs = [t.format(s) for t, s in itertools.product(TEMPLATES, SUBJECTS)]
    filled: set[str] = set()
    for _ in range(len(ONE_OFF) * 60):
        a, b = rng.randint(2, 99), rng.randint(2, 20)
        people = rng.sample(NAMES, 3)
        values = dict(a=a, b=b, c=rng.randint(10, 400), n1=people[0], n2=people[1], n3=people[2])
        filled.add(rng.choice(ONE_OFF).format(**values))
    prompts = pairs + sorted(filled)
    rng.shuffle(prompts)
    return prompts[:n]
