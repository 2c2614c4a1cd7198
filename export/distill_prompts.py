"""Prompts the target answers to make the distillation corpus for a derived draft.

A mix of what an on-device assistant is asked: code (functions, fixes, explanations of code) and
prose (explanations, advice, stories, emails). Deliberately none of HumanEval nor the benchmarks'
prose set, so the draft's measured agreement on those is not agreement on its own training text.
"""

from __future__ import annotations

CODE_TASKS = [
    "Write a Python function that counts the vowels in a string.",
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Write a Python function that flattens a nested list.",
    "Write a Python function that checks whether a string is a palindrome, ignoring case and spaces.",
    "Write a Python function that merges two dictionaries, summing values of shared keys.",
    "Write a Python function that returns the second largest number in a list.",
    "Write a Python function that converts a Roman numeral to an integer.",
    "Write a Python function that removes duplicates from a list while keeping the order.",
    "Write a Python function that computes the greatest common divisor of two numbers.",
    "Write a Python function that groups words by their first letter.",
    "Write a Python class for a simple stack with push, pop and peek.",
    "Write a Python function that reads a CSV file and returns the sum of one column.",
    "Write a Python function that finds all prime numbers below n with a sieve.",
    "Write a Python function that rotates a matrix by 90 degrees.",
    "Write a Python function that returns the longest common prefix of a list of strings.",
    "Write a Python function that validates an email address with a regular expression.",
    "Write a Python function that counts word frequencies in a text.",
    "Write a Python function that performs binary search on a sorted list.",
    "Write a Python function that transposes a list of lists.",
    "Write a Python function that returns the running average of a list of numbers.",
    "Write a JavaScript function that debounces another function.",
    "Write a SQL query that finds the ten customers with the highest total order value.",
    "Write a bash script that renames every .txt file in a folder to .md.",
    "Explain what a Python list comprehension is, with an example.",
    "Explain the difference between a tuple and a list in Python.",
    "What does the `yield` keyword do in Python? Give an example.",
    "Fix this code: def add(a, b) return a + b",
    "Write unit tests with pytest for a function that reverses a list.",
    "Write a Python function that parses a date string like 2024-03-15 into a tuple of integers.",
    "Write a Python function that chunks a list into pieces of size n.",
]

PROSE_TASKS = [
    "Explain how vaccines train the immune system.",
    "Write a short story about a robot learning to paint.",
    "Give me advice for my first job interview.",
    "Describe how a rainbow forms.",
    "Write a thank-you note to a teacher.",
    "What are the benefits of regular exercise?",
    "Explain the difference between a virus and a bacterium.",
    "Write a short poem about the sea at night.",
    "How do airplanes fly?",
    "Suggest a healthy breakfast for a busy morning.",
    "Explain what inflation is in simple terms.",
    "Write a product description for a reusable water bottle.",
    "What should I pack for a weekend camping trip?",
    "Summarize the causes of the French Revolution.",
    "Explain how photosynthesis works.",
    "Write a short dialogue between a cat and a dog.",
    "How can I improve my handwriting?",
    "Describe a typical day of a beekeeper.",
    "Explain why we have seasons on Earth.",
    "Write an apology email for missing a meeting.",
    "What is the best way to learn a new language?",
    "Explain how a refrigerator keeps food cold.",
    "Write a motivational message for someone starting a marathon.",
    "Tell me about the history of the printing press.",
    "Give three ideas for a rainy afternoon with children.",
    "Explain what a black hole is.",
    "Write a recipe for a simple tomato soup.",
    "Why do leaves change colour in autumn?",
    "Describe the rules of chess briefly.",
    "How does recycling plastic work?",
]


def distill_prompts() -> list[str]:
    """Code and prose prompts interleaved, so any prefix of the list is a mixed set."""
    mixed = []
    for code, prose in zip(CODE_TASKS, PROSE_TASKS, strict=True):
        mixed += [code, prose]
    return mixed
