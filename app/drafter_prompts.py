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
    # longer requests with constraints, roles and follow-up structure, as people write in chats
    "I am preparing a presentation on {} for my team. Suggest a structure with five slides, "
    "a title for each, and one sentence on what each slide should say.",
    "Write a blog post of about 200 words on {}, with a catchy title, an introduction, two "
    "short sections with subheadings and a conclusion.",
    "You are a university professor. Answer a student who asks why {} is important, in a "
    "warm but precise tone, and end with a question for the student to think about.",
    "Draft a polite email to a local council asking them to support a community event about "
    "{}. Mention the date, the expected audience and what you need from them. Keep it brief.",
    "Explain {} in three levels of detail: one sentence for a child, one paragraph for an "
    "adult, and a technical note for an expert.",
    "Give a balanced argument about {}: two points in favour, two points against, and your "
    "own conclusion in one sentence.",
    "Write a short scene for a play set in a small town, in which two neighbours discover "
    "something surprising about {}. Include stage directions.",
    "Summarise what a beginner should read or watch to learn about {}, as a list of five "
    "resources with one line on why each is useful. The resources may be imaginary.",
    "Create a lesson plan for a 45-minute class on {}, with learning goals, an activity and "
    "a short assessment.",
    "Pretend you are a famous scientist from history seeing {} for the first time. Describe "
    "your reaction in the first person.",
    "What questions should I ask an expert on {} if I only had five minutes? Give five "
    "questions and explain why each matters.",
    "Write a news article headline and a three-paragraph article about a recent imaginary "
    "discovery related to {}.",
    "Describe a typical day in the life of someone whose job involves {}. Use vivid detail.",
    "Compare how {} was understood a hundred years ago with how it is understood today.",
    "Write a motivational speech for students who think {} is boring. Keep it under 150 words.",
    "Design a board game about {}: its goal, the rules in five bullet points, and what "
    "players learn from it.",
    "Rewrite the following idea in the style of a fairy tale: 'Scientists are still learning "
    "new things about {}.'",
    "Act as a careful editor. Here is my draft sentence: 'There is many reasons why {} are "
    "important for peoples.' Correct it and explain each change.",
    "Write a customer-support reply to someone who is confused about {}. Be patient, clear "
    "and friendly, and offer a next step.",
    "Make a table in Markdown with three columns (aspect, description, example) that describes {}.",
    "Tell me a surprising story, true or invented, that involves {}, and then say which "
    "parts are true.",
    "Propose three research questions about {} for a high-school science fair, and say how "
    "a student could test one of them.",
    "Explain the difference between facts and opinions using {} as the example, with two of each.",
    "Write a diary entry from the point of view of an object connected to {}.",
    "I have one hour this evening to learn about {}. Make me a plan, minute by minute.",
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
    "{n1} wants to save {a} dollars in {b} weeks. How much is that per week? Give a plan.",
    "A rectangle is {a} cm long and {b} cm wide. Find its area and perimeter, step by step.",
    "Write a Python class for a bank account with deposit and withdraw methods, and explain "
    "how {n1} would use it.",
    "Explain the difference between a list and a dictionary in Python with one example each.",
    "Write a function in any language that reverses the words in a sentence, and show it "
    "working on '{n1} likes green tea'.",
    "{n1}, {n2} and {n3} share a pizza with {b} slices equally. How many slices does each "
    "get, and how many are left over?",
    "If today is Monday, what day of the week will it be in {a} days? Explain your reasoning.",
    "Summarise this message in one sentence: '{n1} cannot come to the meeting on Friday "
    "because of a doctor's appointment, but {n2} will present the results instead.'",
    "Turn these notes into a friendly paragraph: '{n1} - new job - moving in {b} weeks - "
    "party on Saturday'.",
    "Role-play: you are a shop assistant and {n1} wants to return a broken kettle. Write the "
    "conversation.",
    "Write a short motivational message for {n1}, who is running a race of {b} kilometres "
    "tomorrow.",
    "What is {a} percent of {c}? Explain how to calculate it in your head.",
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
    "public transport",
    "the history of money",
    "space telescopes",
    "urban gardening",
    "social media",
    "dinosaurs",
    "the Olympic Games",
    "artificial sweeteners",
    "remote work",
    "mountain climbing",
    "the Silk Road",
    "solar panels",
    "language learning",
    "birds' migration",
    "photography",
    "nuclear power",
    "the microscope",
    "friendship",
    "personal budgeting",
    "architecture",
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
