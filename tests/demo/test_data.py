"""Tests of the demo data builder on small sizes.

Math answers and knowledge facts are checked independently of the generator: the text is parsed
back by the wording alone and recomputed here, or looked up in pycountry.
"""

import itertools
import json
import re
import sysconfig
from pathlib import Path

import pycountry
import pytest
import yaml

from mergeme.demo.data import (
    DOMAINS,
    SPLITS,
    DemoDataParams,
    build_demo_data,
    load_params,
    main,
)

SMALL = {"seed": 7, "train_size": 30, "calibration_size": 10, "eval_size": 10, "max_chars": 320}
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "data"
    build_demo_data(DemoDataParams(**SMALL), out)
    return out


def read_texts(out: Path, domain: str, split: str) -> list[str]:
    lines = (out / domain / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines]


def all_texts(out: Path, domain: str) -> list[str]:
    return [text for split in SPLITS for text in read_texts(out, domain, split)]


def test_two_builds_are_byte_identical(built: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    build_demo_data(DemoDataParams(**SMALL), again)

    files = sorted(path.relative_to(built) for path in built.rglob("*") if path.is_file())
    assert files == sorted(path.relative_to(again) for path in again.rglob("*") if path.is_file())
    assert len(files) == len(DOMAINS) * len(SPLITS) + 1
    for file in files:
        assert (built / file).read_bytes() == (again / file).read_bytes(), file


def test_another_seed_gives_other_splits(built: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    build_demo_data(DemoDataParams(**{**SMALL, "seed": 8}), other)
    for domain in DOMAINS:
        assert read_texts(built, domain, "eval") != read_texts(other, domain, "eval")


def test_counts_records_and_manifest(built: Path) -> None:
    manifest = json.loads((built / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["params"] == SMALL
    assert manifest["python_version"].startswith("3.11.")
    wanted = {"train": 30, "calibration": 10, "eval": 10}
    assert manifest["counts"] == {domain: wanted for domain in DOMAINS}

    for domain, split in itertools.product(DOMAINS, SPLITS):
        raw = (built / domain / f"{split}.jsonl").read_bytes()
        assert raw.endswith(b"\n") and b"\r" not in raw
        records = [json.loads(line) for line in raw.decode("utf-8").splitlines()]
        assert len(records) == wanted[split]
        assert all(record.keys() == {"domain", "text"} for record in records)
        assert all(record["domain"] == domain for record in records)


def test_splits_do_not_overlap_and_respect_max_chars(built: Path) -> None:
    for domain in DOMAINS:
        splits = {split: read_texts(built, domain, split) for split in SPLITS}
        for texts in splits.values():
            assert len(set(texts)) == len(texts)
            assert all(0 < len(text) <= SMALL["max_chars"] for text in texts)
        for first, second in itertools.combinations(SPLITS, 2):
            assert not set(splits[first]) & set(splits[second]), (domain, first, second)


# math: each step clause maps to one operation; the numbers come from the captured groups
MATH_STEPS = [
    (r"finds (\d+) more", "add"),
    (r"gets (\d+) more from [A-Z][a-z]+", "add"),
    (r"buys (\d+) bags of (\d+) [a-z]+", "add_product"),
    (r"gives away (\d+)", "subtract"),
    (r"gives (\d+) to [A-Z][a-z]+", "subtract"),
    (r"loses (\d+)", "subtract"),
    (r"splits them into (\d+) equal piles, keeping one pile", "divide"),
    (r"earns (\d+) dollars", "add"),
    (r"works (\d+) days for (\d+) dollars a day", "add_product"),
    (r"spends (\d+) dollars", "subtract"),
    (r"pays (\d+) dollars for a book", "subtract"),
    (r"splits the money into (\d+) equal parts, keeping one part", "divide"),
    (r"receives (\d+) more", "add"),
    (r"receives (\d+) crates of (\d+) [a-z]+", "add_product"),
    (r"sells (\d+)", "subtract"),
    (r"returns (\d+) to the supplier", "subtract"),
    (r"(\d+) passengers get on", "add"),
    (r"(\d+) groups of (\d+) passengers get on", "add_product"),
    (r"(\d+) passengers get off", "subtract"),
]
MATH_OPENING = re.compile(r"(?:[A-Z][a-z]+ has|A shop has|A bus leaves the depot with) (\d+) .+\.")


def solve_word_problem(problem: str) -> int:
    """Recompute a problem's answer from its wording alone."""
    opening, *steps, question = re.split(r"(?<=[.?]) ", problem)
    assert question.startswith("How many ") and question.endswith(" now?"), problem
    assert 1 <= len(steps) <= 4, problem
    value = int(MATH_OPENING.fullmatch(opening).group(1))

    clauses = []
    for sentence in steps:
        assert sentence.endswith("."), problem
        clauses += sentence.removeprefix("Then ").removesuffix(".").split(" and ")
    assert 2 <= len(clauses) <= 4, problem

    for clause in clauses:
        clause = re.sub(r"^(?:[Ss]he|[Hh]e|[Ii]t) ", "", clause)
        kinds = [
            (kind, match)
            for pattern, kind in MATH_STEPS
            if (match := re.fullmatch(pattern, clause))
        ]
        assert len(kinds) == 1, (clause, problem)
        kind, match = kinds[0]
        numbers = [int(group) for group in match.groups()]
        if kind == "add":
            value += numbers[0]
        elif kind == "add_product":
            value += numbers[0] * numbers[1]
        elif kind == "subtract":
            value -= numbers[0]
        else:
            assert value % numbers[0] == 0, (clause, problem)
            value //= numbers[0]
        assert value >= 0, problem
    return value


def test_every_math_answer_is_correct(built: Path) -> None:
    texts = all_texts(built, "math")
    for text in texts:
        problem, answer = text.split(" Answer: ")
        assert int(answer) == solve_word_problem(problem), text

    # every story frame shows up, and some problems run to four steps
    openings = {re.sub(r"\d+ ", "", text.split(". ")[0]).split()[-1] for text in texts}
    assert {"dollars", "stock", "passengers"} < openings
    assert any(text.count(" Then ") >= 2 for text in texts)


# knowledge: each wording names its own pycountry check
COUNTRIES = {country.name: country for country in pycountry.countries}
CURRENCIES = {currency.alpha_3: currency for currency in pycountry.currencies}


def currency_named(name: str, numeric: str) -> bool:
    return any(c.name == name and c.numeric == numeric for c in pycountry.currencies)


def subdivision_count(alpha_2: str) -> int:
    return len(pycountry.subdivisions.get(country_code=alpha_2) or [])


KNOWLEDGE_FACTS = [
    (r"The alpha-2 code of (.+) is (\w\w)\.", lambda n, c: COUNTRIES[n].alpha_2 == c),
    (r"The alpha-3 code of (.+) is (\w{3})\.", lambda n, c: COUNTRIES[n].alpha_3 == c),
    (r"The ISO 3166-1 numeric code of (.+) is (\d{3})\.", lambda n, c: COUNTRIES[n].numeric == c),
    (r"Q: What is the alpha-2 code of (.+)\? A: (\w\w)", lambda n, c: COUNTRIES[n].alpha_2 == c),
    (
        r"Q: Which country has the alpha-3 code (\w{3})\? A: (.+)",
        lambda c, n: pycountry.countries.get(alpha_3=c).name == n,
    ),
    (
        r"Q: Which country has the numeric code (\d{3})\? A: (.+)",
        lambda c, n: pycountry.countries.get(numeric=c).name == n,
    ),
    (r"The official name of (.+) is (.+)\.", lambda n, o: COUNTRIES[n].official_name == o),
    (
        r"Q: What is the official name of (.+)\? A: (.+)",
        lambda n, o: COUNTRIES[n].official_name == o,
    ),
    (
        r"ISO 3166-2 lists (\d+) subdivisions? of (.+)\.",
        lambda k, n: subdivision_count(COUNTRIES[n].alpha_2) == int(k),
    ),
    (
        r"The currency of (.+) is the (.+) \((\w{3})\)\.",
        lambda n, name, code: (
            CURRENCIES[code].name == name and CURRENCIES[code].numeric == COUNTRIES[n].numeric
        ),
    ),
    (
        r"Q: What is the currency of (.+)\? A: (.+)",
        lambda n, name: currency_named(name, COUNTRIES[n].numeric),
    ),
    (r"The ISO 4217 code of the (.+) is (\w{3})\.", lambda name, c: CURRENCIES[c].name == name),
    (
        r"Q: Which currency has the ISO 4217 code (\w{3})\? A: (.+)",
        lambda c, name: CURRENCIES[c].name == name,
    ),
    (
        r"The ISO 639-1 code of (.+) is (\w\w)\.",
        lambda name, c: pycountry.languages.get(alpha_2=c).name == name,
    ),
    (
        r"The ISO 639-3 code of (.+) is (\w{3})\.",
        lambda name, c: pycountry.languages.get(alpha_3=c).name == name,
    ),
    (
        r"Q: Which language has the ISO 639-3 code (\w{3})\? A: (.+)",
        lambda c, name: pycountry.languages.get(alpha_3=c).name == name,
    ),
]


def test_every_knowledge_fact_is_true(built: Path) -> None:
    for text in all_texts(built, "knowledge"):
        checks = [
            (check, match)
            for pattern, check in KNOWLEDGE_FACTS
            if (match := re.fullmatch(pattern, text))
        ]
        assert len(checks) == 1, text
        check, match = checks[0]
        assert check(*match.groups()), text


def test_code_texts_are_whole_lines_of_stdlib_files(built: Path) -> None:
    manifest = json.loads((built / "manifest.json").read_text(encoding="utf-8"))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = []
    for module in manifest["stdlib_modules"]:
        source = (stdlib / module).read_text(encoding="utf-8")
        lines = [line.rstrip() for line in source.split("\n")]
        sources.append("\n" + "\n".join(lines) + "\n")

    for text in all_texts(built, "code"):
        assert any(f"\n{text}\n" in source for source in sources), text


def test_datasets_reads_the_files(built: Path, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    files = {split: str(built / "code" / f"{split}.jsonl") for split in SPLITS}
    loaded = datasets.load_dataset("json", data_files=files, cache_dir=str(tmp_path / "cache"))

    assert {split: loaded[split].num_rows for split in SPLITS} == {
        "train": 30,
        "calibration": 10,
        "eval": 10,
    }
    assert sorted(loaded["train"].column_names) == ["domain", "text"]
    assert loaded["eval"]["text"] == read_texts(built, "code", "eval")


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"train_size": 0}, "train_size"),
        ({"calibration_size": -1}, "calibration_size"),
        ({"eval_size": "many"}, "eval_size"),
        ({"max_chars": 32}, "max_chars"),
        ({"shuffle": True}, "shuffle"),
    ],
)
def test_bad_params_are_rejected_naming_the_key(change: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        DemoDataParams(**{**SMALL, **change})


def test_missing_key_is_named() -> None:
    params = {name: value for name, value in SMALL.items() if name != "seed"}
    with pytest.raises(ValueError, match="seed"):
        DemoDataParams(**params)


@pytest.mark.parametrize(
    ("change", "domain"),
    [({"train_size": 5_000}, "code|knowledge"), ({"max_chars": 64}, "math")],
)
def test_short_domain_fails_naming_the_keys_and_writes_nothing(
    change: dict, domain: str, tmp_path: Path
) -> None:
    out = tmp_path / "data"
    with pytest.raises(ValueError, match=rf"domain '({domain})'.*train_size") as raised:
        build_demo_data(DemoDataParams(**{**SMALL, **change}), out)
    assert "max_chars" in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_replaced_whole(tmp_path: Path) -> None:
    out = tmp_path / "data"
    (out / "math").mkdir(parents=True)
    (out / "math" / "stale.jsonl").write_text("old\n")
    build_demo_data(DemoDataParams(**SMALL), out)

    assert not (out / "math" / "stale.jsonl").exists()
    assert (out / "math" / "train.jsonl").exists()
    assert [path.name for path in tmp_path.iterdir()] == ["data"]


def test_command_line_reads_the_data_section(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": SMALL, "train": {"steps": 10}}))
    out = tmp_path / "out"
    main(["--params", str(params), "--out", str(out)])

    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["params"] == SMALL


def test_params_file_without_data_section_is_rejected(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"steps": 10}}))
    with pytest.raises(ValueError, match="data"):
        load_params(params)


def test_shipped_params_file_loads() -> None:
    params = load_params(REPO_ROOT / "params.yaml")
    assert params.max_chars >= 64
