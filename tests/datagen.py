"""Generated import files for tests and benches: no large fixtures in the repository.

`catalog_pairs` imitates a product catalog: every row carries the same shop boilerplate
plus its own product text, so unrelated rows still have word 3-gram Jaccard ~0.5 (the
case that makes near-threshold LSH candidates explode). `varied_pairs` is ordinary,
unrelated data. Both plant a known number of exact and near duplicates (`planted`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from agent.spec import ExamplePair

_SYL = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "po", "qu", "fa", "de", "bo",
        "xi", "an", "el", "or", "um", "ti"]
BOILERPLATE = (
    "Free shipping on every order over fifty dollars and easy returns within thirty days. "
    "Our care team answers seven days a week by chat, phone or email. Every product has a "
    "two year warranty. Prices include taxes and may change without notice."
)


@dataclass
class Planted:
    exact: int = 0
    near: int = 0


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYL) for _ in range(rng.randint(2, 4)))


def _words(rng: random.Random, n: int) -> str:
    return " ".join(_word(rng) for _ in range(n))


def _near_copy(rng: random.Random, p: ExamplePair, *, field: str) -> ExamplePair:
    """One word of `field` changed (Jaccard stays well above 0.7 on long rows)."""
    text = getattr(p, field).split(" ")
    i = rng.randrange(len(text) // 2, len(text))
    text[i] = _word(rng) + "q"
    return p.model_copy(update={field: " ".join(text)})


def _exact_copy(p: ExamplePair) -> ExamplePair:
    return ExamplePair(prompt="  " + p.prompt.upper(), response=p.response + "\n")


def _with_dupes(rng: random.Random, base: list[ExamplePair], n: int, *, field: str,
                exact_frac: float, near_frac: float) -> tuple[list[ExamplePair], Planted]:
    out: list[ExamplePair] = []
    planted = Planted()
    originals: list[ExamplePair] = []
    it = iter(base)
    while len(out) < n:
        r = rng.random()
        if originals and r < exact_frac:
            out.append(_exact_copy(rng.choice(originals)))
            planted.exact += 1
        elif originals and r < exact_frac + near_frac:
            out.append(_near_copy(rng, rng.choice(originals), field=field))
            planted.near += 1
        else:
            p = next(it)
            originals.append(p)
            out.append(p)
    return out, planted


def catalog_pairs(n: int, *, seed: int = 0, exact_frac: float = 0.05,
                  near_frac: float = 0.1) -> tuple[list[ExamplePair], Planted]:
    rng = random.Random(f"catalog:{seed}")

    def row(i: int) -> ExamplePair:
        name = f"{_word(rng).title()} {_word(rng).title()} model {i}"
        prompt = f"Write the product page for: {name}, colour {_word(rng)}, size {rng.randint(1, 60)}"
        response = f"{name}. {_words(rng, 11)}. {BOILERPLATE}"
        return ExamplePair(prompt=prompt, response=response)

    return _with_dupes(rng, (row(i) for i in range(n)), n, field="response",  # type: ignore[arg-type]
                       exact_frac=exact_frac, near_frac=near_frac)


def varied_pairs(n: int, *, seed: int = 0, exact_frac: float = 0.05,
                 near_frac: float = 0.1) -> tuple[list[ExamplePair], Planted]:
    rng = random.Random(f"varied:{seed}")

    def row(i: int) -> ExamplePair:
        return ExamplePair(prompt=f"Ticket {i}: {_words(rng, rng.randint(20, 40))}",
                           response=_words(rng, rng.randint(6, 20)))

    return _with_dupes(rng, (row(i) for i in range(n)), n, field="prompt",  # type: ignore[arg-type]
                       exact_frac=exact_frac, near_frac=near_frac)


def to_jsonl(pairs: list[ExamplePair]) -> bytes:
    return "".join(json.dumps({"prompt": p.prompt, "response": p.response}, ensure_ascii=False)
                   + "\n" for p in pairs).encode("utf-8")
