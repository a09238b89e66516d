"""Text sources for the three demo domains: math, code and knowledge.

Each source returns candidate texts in a deterministic order. Deduplication, the length bound and
the split into train, calibration and eval happen in ``mergeme.demo.data``, the same way for all.
"""

import ast
import logging
import random
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pycountry
from pycountry.db import Country, Data

logger = logging.getLogger(__name__)

# standard-library files the code domain reads, relative to the stdlib folder; a fixed sorted
# list, so the output depends only on the Python version (recorded in the manifest)
STDLIB_MODULES = (
    "argparse.py",
    "ast.py",
    "base64.py",
    "bisect.py",
    "calendar.py",
    "colorsys.py",
    "configparser.py",
    "contextlib.py",
    "copy.py",
    "csv.py",
    "dataclasses.py",
    "difflib.py",
    "enum.py",
    "fnmatch.py",
    "fractions.py",
    "functools.py",
    "gettext.py",
    "glob.py",
    "heapq.py",
    "json/decoder.py",
    "json/encoder.py",
    "pathlib.py",
    "pprint.py",
    "queue.py",
    "random.py",
    "shlex.py",
    "shutil.py",
    "statistics.py",
    "string.py",
    "textwrap.py",
    "tokenize.py",
)

# a line window shorter than this is mostly closing brackets; it teaches nothing
MIN_CODE_CHARS = 40


# ---------------------------------------------------------------------------------------------
# math: multi-step arithmetic word problems


@dataclass(frozen=True)
class MathScenario:
    """One story frame: its opening, its question and the wording of each operation.

    Templates may use ``{name}``, ``{items}``, ``{friend}``, the numbers ``{n}`` (the opening
    count), ``{a}``, ``{b}`` and ``{k}``, and ``{s}``: ``pronoun``, or the person's own pronoun
    when that is None.
    """

    opening: str
    question: str
    gain: tuple[str, ...]
    gain_groups: tuple[str, ...]
    lose: tuple[str, ...]
    split: tuple[str, ...] = ()
    pronoun: str | None = None


MATH_SCENARIOS = (
    MathScenario(
        opening="{name} has {n} {items}.",
        question="How many {items} does {name} have now?",
        gain=("{s} finds {a} more", "{s} gets {a} more from {friend}"),
        gain_groups=("{s} buys {a} bags of {b} {items}",),
        lose=("{s} gives away {a}", "{s} gives {a} to {friend}", "{s} loses {a}"),
        split=("{s} splits them into {k} equal piles, keeping one pile",),
    ),
    MathScenario(
        opening="{name} has {n} dollars.",
        question="How many dollars does {name} have now?",
        gain=("{s} earns {a} dollars",),
        gain_groups=("{s} works {a} days for {b} dollars a day",),
        lose=("{s} spends {a} dollars", "{s} pays {a} dollars for a book"),
        split=("{s} splits the money into {k} equal parts, keeping one part",),
    ),
    MathScenario(
        opening="A shop has {n} {items} in stock.",
        question="How many {items} does the shop have in stock now?",
        gain=("{s} receives {a} more",),
        gain_groups=("{s} receives {a} crates of {b} {items}",),
        lose=("{s} sells {a}", "{s} returns {a} to the supplier"),
        pronoun="it",
    ),
    MathScenario(
        opening="A bus leaves the depot with {n} passengers.",
        question="How many passengers are on the bus now?",
        gain=("{a} passengers get on",),
        gain_groups=("{a} groups of {b} passengers get on",),
        lose=("{a} passengers get off",),
    ),
)

MATH_PEOPLE = (
    ("Mia", "she"),
    ("Leo", "he"),
    ("Ava", "she"),
    ("Noah", "he"),
    ("Zoe", "she"),
    ("Omar", "he"),
    ("Lena", "she"),
    ("Ravi", "he"),
    ("Sofia", "she"),
    ("Kenji", "he"),
    ("Amara", "she"),
    ("Tomas", "he"),
)
MATH_ITEMS = ("apples", "marbles", "stickers", "cards", "stamps", "shells", "pencils", "cookies")


def math_texts(rng: random.Random, count: int, max_chars: int) -> list[str]:
    """Generate up to ``count`` distinct word problems of at most ``max_chars``.

    Each problem ends in ``Answer: <integer>``, computed here step by step. Generation stops after
    a bounded number of attempts, so a ``max_chars`` too small for any template gives a short list
    (which the caller reports) instead of an endless loop.
    """
    texts: dict[str, None] = {}
    for _ in range(20 * count + 1000):
        if len(texts) == count:
            break
        text = _math_problem(rng)
        if len(text) <= max_chars:
            texts[text] = None
    return list(texts)


def _math_problem(rng: random.Random) -> str:
    scenario = rng.choice(MATH_SCENARIOS)
    name, pronoun = rng.choice(MATH_PEOPLE)
    friend = rng.choice([other for other, _ in MATH_PEOPLE if other != name])
    items = rng.choice(MATH_ITEMS)
    subject = scenario.pronoun or pronoun
    start = total = rng.randint(10, 120)

    # each step keeps the count a whole, non-negative number
    clauses = []
    for _ in range(rng.randint(2, 4)):
        template, numbers, total = _math_step(rng, scenario, total)
        clauses.append(template.format(s=subject, items=items, friend=friend, **numbers))

    # pair some steps with "and"; the first sentence keeps the subject, later ones start "Then"
    sentences = [scenario.opening.format(name=name, n=start, items=items)]
    index = 0
    while index < len(clauses):
        take = 2 if index + 1 < len(clauses) and rng.random() < 0.5 else 1
        first, *rest = clauses[index : index + take]
        body = " and ".join([first, *(clause.removeprefix(f"{subject} ") for clause in rest)])
        sentences.append((body[0].upper() + body[1:] if index == 0 else f"Then {body}") + ".")
        index += take
    sentences.append(scenario.question.format(name=name, items=items))
    return " ".join(sentences) + f" Answer: {total}"


def _math_step(
    rng: random.Random, scenario: MathScenario, total: int
) -> tuple[str, dict[str, int], int]:
    """Pick one operation that applies to ``total``; return its template, numbers and result."""
    divisors = [k for k in range(2, 6) if total % k == 0 and total // k >= 2]
    kinds = ["gain", "gain_groups"]
    if total >= 4:
        kinds.append("lose")
    if scenario.split and divisors:
        kinds.append("split")

    kind = rng.choice(kinds)
    template = rng.choice(getattr(scenario, kind))
    if kind == "gain":
        a = rng.randint(2, 40)
        return template, {"a": a}, total + a
    if kind == "gain_groups":
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        return template, {"a": a, "b": b}, total + a * b
    if kind == "lose":
        a = rng.randint(1, total - 2)
        return template, {"a": a}, total - a
    k = rng.choice(divisors)
    return template, {"k": k}, total // k


# ---------------------------------------------------------------------------------------------
# code: chunks of real standard-library source


def code_texts(max_chars: int) -> list[str]:
    """Cut the ``STDLIB_MODULES`` files into whole functions and classes of at most ``max_chars``.

    A definition that is too long is cut into windows of whole lines instead (a class into its
    methods first). Files that are missing or fail to decode as UTF-8 are skipped with a warning.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for module in STDLIB_MODULES:
        path = stdlib / module
        try:
            source = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as error:
            logger.warning("skipping %s in the code domain: %s", path, error)
            continue
        texts.extend(_code_chunks(source, max_chars))
    return texts


def stdlib_lines(source: str) -> list[str]:
    """Split source into lines the way the code domain does: only trailing whitespace removed."""
    return [line.rstrip() for line in source.split("\n")]


def _code_chunks(source: str, max_chars: int) -> Iterator[str]:
    lines = stdlib_lines(source)
    for text in _definition_chunks(ast.parse(source).body, lines, max_chars):
        if len(text) >= MIN_CODE_CHARS:
            yield text


def _definition_chunks(nodes: list[ast.stmt], lines: list[str], max_chars: int) -> Iterator[str]:
    for node in nodes:
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        # ast line numbers are 1-based and start at ``def``, below any decorators
        first = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)])
        block = lines[first - 1 : node.end_lineno]
        text = "\n".join(block).rstrip()
        if len(text) <= max_chars:
            yield text
        elif isinstance(node, ast.ClassDef):
            yield from _definition_chunks(node.body, lines, max_chars)
        else:
            yield from _line_windows(block, max_chars)


def _line_windows(block: list[str], max_chars: int) -> Iterator[str]:
    """Greedy windows of consecutive lines; a line longer than ``max_chars`` ends a window."""
    window: list[str] = []
    for line in block:
        if len(line) > max_chars:
            yield "\n".join(window).rstrip()
            window = []
            continue
        if window and len("\n".join([*window, line])) > max_chars:
            yield "\n".join(window).rstrip()
            window = []
        # a window never starts on a blank line: that would only pad it
        if window or line:
            window.append(line)
    yield "\n".join(window).rstrip()


# ---------------------------------------------------------------------------------------------
# knowledge: facts about countries, currencies and languages from pycountry


def knowledge_texts() -> list[str]:
    """State every fact the templates cover, as statements and as ``Q: ... A: ...`` pairs.

    Covers each country's codes, official name, ISO 3166-2 subdivision count and currency (the
    currency whose ISO 4217 numeric code equals the country's; countries without one are left
    out of currency facts), every currency's code, and the codes of languages with an ISO 639-1
    code. Facts run up to about 120 characters; the caller applies ``max_chars``.
    """
    currencies = {currency.numeric: currency for currency in pycountry.currencies}
    texts = []
    for country in pycountry.countries:
        texts.extend(_country_facts(country, currencies.get(country.numeric)))
    for currency in pycountry.currencies:
        texts.append(f"The ISO 4217 code of the {currency.name} is {currency.alpha_3}.")
        texts.append(
            f"Q: Which currency has the ISO 4217 code {currency.alpha_3}? A: {currency.name}"
        )
    for language in pycountry.languages:
        if not hasattr(language, "alpha_2"):
            continue
        texts.append(f"The ISO 639-1 code of {language.name} is {language.alpha_2}.")
        texts.append(f"The ISO 639-3 code of {language.name} is {language.alpha_3}.")
        texts.append(
            f"Q: Which language has the ISO 639-3 code {language.alpha_3}? A: {language.name}"
        )
    return texts


def _country_facts(country: Country, currency: Data | None) -> list[str]:
    name = country.name
    facts = [
        f"The alpha-2 code of {name} is {country.alpha_2}.",
        f"The alpha-3 code of {name} is {country.alpha_3}.",
        f"The ISO 3166-1 numeric code of {name} is {country.numeric}.",
        f"Q: What is the alpha-2 code of {name}? A: {country.alpha_2}",
        f"Q: Which country has the alpha-3 code {country.alpha_3}? A: {name}",
        f"Q: Which country has the numeric code {country.numeric}? A: {name}",
    ]
    if hasattr(country, "official_name"):
        facts.append(f"The official name of {name} is {country.official_name}.")
        facts.append(f"Q: What is the official name of {name}? A: {country.official_name}")
    subdivisions = len(pycountry.subdivisions.get(country_code=country.alpha_2) or [])
    if subdivisions:
        noun = "subdivision" if subdivisions == 1 else "subdivisions"
        facts.append(f"ISO 3166-2 lists {subdivisions} {noun} of {name}.")
    if currency is not None:
        facts.append(f"The currency of {name} is the {currency.name} ({currency.alpha_3}).")
        facts.append(f"Q: What is the currency of {name}? A: {currency.name}")
    return facts
