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
    # more forms: constraints on length and format, personas, critique, planning, teaching
    "In exactly three sentences, tell me why {} is worth learning about.",
    "Write a short FAQ about {} with four questions and their answers.",
    "You are a cautious doctor, lawyer or engineer, whichever fits best. What risks does {} "
    "carry, and how can people reduce them?",
    "Explain {} as a sequence of steps, numbering each one, and say where beginners usually "
    "go wrong.",
    "Write a letter to your future self about what you hope {} will look like in ten years.",
    "Give me a glossary of six terms someone must know to talk about {}, one line each.",
    "Critique this claim and say whether it is fair: '{} is overrated and mostly hype.'",
    "Write a job advertisement for a role that works with {} every day.",
    "Summarise the main debate around {} for a busy executive, in under 100 words.",
    "What would a beginner's first week of studying {} look like? Plan it day by day.",
    "Write a radio advertisement, about thirty seconds long, for a festival celebrating {}.",
    "Explain {} to me, then check my understanding with two short questions.",
    "Describe {} from the point of view of an alien visiting Earth for the first time.",
    "Write four lines of rhyming verse for a greeting card about {}.",
    "What are the three most important numbers or dates related to {}? Explain each.",
    "Write a short bedtime story for a five-year-old that teaches something about {}.",
    "Give me a step-by-step checklist for a school trip on the theme of {}.",
    "Describe the best and worst things that could happen if everyone suddenly cared about {}.",
    "Write an acrostic poem using the letters of the word LEARN, about {}.",
    "Explain why {} might matter to a farmer, a teacher and a programmer, one paragraph each.",
    "Imagine a debate between an optimist and a pessimist about {}. Give each two turns.",
    "Write a short memo to the staff of a small company about how {} affects their work.",
    "Turn {} into a riddle, then give the answer and explain the clues.",
    "I keep confusing {} with something else. Help me tell them apart with a simple rule.",
    "Write the introduction to a podcast episode about {}, with the host's first lines.",
    "What did people get wrong about {} in the past, and how was the mistake corrected?",
    "Write a formal paragraph for an encyclopedia entry on {}, then rewrite it casually.",
    "List the pros, cons and open questions about {} in a Markdown table.",
    "Give a short, practical answer: how can an ordinary person help with or enjoy {}?",
    "Write a sonnet-like poem of eight lines about {}, and give it a title.",
    "Describe how you would explain {} using only a whiteboard and three drawings.",
    "Write the script for a one-minute explainer video about {}, with what appears on screen.",
    "Suggest five titles for a documentary about {} and say which one you like best and why.",
    "Outline a 500-word essay on {}: thesis, three body paragraphs and a conclusion.",
    "Pretend you are a tour guide in the year 2200 showing visitors a museum piece about {}.",
    "Answer in the voice of a pirate: what is {} and why should sailors care?",
    "Explain {} to a grandparent who has never used a computer, kindly and without jargon.",
    "Write a two-line summary of {}, then a longer paragraph that adds the details.",
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
    # more reasoning, arithmetic, code and text tasks
    "{n1} reads {a} pages a day. How many days does a book of {c} pages take? Explain.",
    "A recipe needs {b} eggs for 4 people. How many eggs for {a} people? Show the proportion.",
    "What is the average of {a}, {b} and {c}? Show the calculation.",
    "Which is larger, {a}/{b} or {b}/{a}? Explain without a calculator.",
    "A bag holds {a} red and {b} blue marbles. What is the chance of drawing a blue one?",
    "Round {c}.{a} to the nearest ten and explain the rule.",
    "Write {c} in binary and explain the method.",
    "A car uses {b} litres of fuel per 100 km. How much fuel for {c} km? Explain.",
    "{n1} is twice as old as {n2}. In {b} years their ages will add up to {c}. How old are "
    "they now? Solve step by step.",
    "If all cats are animals and {n1}'s pet is a cat, what can we conclude? Explain the logic.",
    "Three boxes are labelled wrongly: apples, oranges, mixed. You may take one fruit from one "
    "box. How do you fix all the labels? Explain.",
    "Write a Python function that returns the largest of {b} numbers in a list, without max().",
    "Write a Python function that counts how often each word appears in a text.",
    "Write a Python function that checks whether a number is prime, and explain its speed.",
    "Write a C function that swaps two integers using pointers, and explain how it works.",
    "Write a regular expression that matches an email address, and explain each part.",
    "Explain what a binary search does, then write it in Python.",
    "Explain the difference between a process and a thread in simple terms.",
    "What does this code print, and why? `x = [1, 2, 3]; y = x; y.append({b}); print(x)`",
    "Write an HTML page with a heading, a paragraph about {n1} and a button.",
    "Write a Python script that reads a CSV file of names and ages and prints the oldest person.",
    "Explain recursion with a small example, then show the same thing with a loop.",
    "Extract every date from this text as a list: '{n1} arrived on 3 May, left on {b} June "
    "and came back on 1 August.'",
    "Turn this sentence into a JSON object with keys name, city and hobby: '{n1} lives in "
    "Lisbon and loves surfing.'",
    "Rewrite this in plain English: 'The aforementioned party shall remit payment forthwith.'",
    "Make this sentence shorter without losing meaning: 'Due to the fact that {n1} was late, "
    "the meeting that had been planned for the morning was moved to the afternoon.'",
    "Write a polite reply declining {n1}'s invitation to a party on Saturday.",
    "Give {n1} feedback on this opening line of a story: 'It was a dark and stormy night.'",
    "Role-play: you are a librarian helping {n1} find a book for a {a}-year-old. Write the "
    "conversation.",
    "Act as a personal trainer and make {n1} a {b}-week plan to run five kilometres.",
    "Write a short cover letter for {n1}, who is applying for a job at a bakery.",
    "{n1} says 'the sun goes around the Earth'. Correct this kindly and explain.",
    "Write three interview questions for a software engineer and say what a good answer shows.",
    "Explain the rules of tic-tac-toe, then describe a strategy that never loses.",
    "What are the first {b} square numbers? List them and describe the pattern.",
    "A clock shows 3:15. What is the angle between the hands? Explain.",
    "Sort these numbers and give the median: {a}, {c}, {b}, 7, 42.",
    "Write a haiku about {n1}'s first day at a new school.",
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
    "the Industrial Revolution",
    "coral reefs",
    "the violin",
    "quantum computing",
    "rivers",
    "the Vikings",
    "chocolate",
    "electricity",
    "hurricanes",
    "the human brain",
    "board games",
    "penguins",
    "the Amazon river",
    "3D printing",
    "yoga",
    "the stock of fish in the oceans",
    "ancient Greece",
    "robots",
    "mushrooms",
    "the printing of banknotes",
    "volunteering",
    "the theory of evolution",
    "comets",
    "minimalism",
    "wind turbines",
    "the Mona Lisa",
    "time zones",
    "cheese making",
    "the postal service",
    "bees and pollination",
    "cybersecurity",
    "the Sahara",
    "classical music",
    "carbon capture",
    "sign language",
    "the Aztecs",
    "kites",
    "plastic pollution",
    "the speed of light",
    "football",
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
