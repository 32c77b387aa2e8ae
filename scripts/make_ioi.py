"""Write prompt_set/ioi.json: indirect-object prompts in the style of Wang et al. 2022, written
for this repository (ten templates, names that are one token for both embedded tokenizers).

Each pair: ``base`` ("When Mary and John went to the store, John gave a drink to", answer the
indirect object " Mary", distractor the subject " John") and ``source``, the same sentence with
all three names replaced by three other names (Wang et al.'s ABC corruption). Replacement
names have the same length in characters, so the pair also aligns under a byte tokenizer.
Run: python scripts/make_ioi.py (seeded; the committed file is its output).
"""

import json
import random
from pathlib import Path

TEMPLATES = [
    "When {A} and {B} went to the store, {C} gave a drink to",
    "After {A} and {B} arrived at the party, {C} handed a gift to",
    "While {A} and {B} were at the park, {C} threw the ball to",
    "Then, {A} and {B} had lunch at the cafe. {C} passed the salt to",
    "When {A} and {B} got to the office, {C} sent an email to",
    # a name never opens the sentence: " Paul" (with its space) must be a token of the prompt
    "Later, {A} and {B} went to the beach. {C} gave a towel to",
    "Yesterday {A} and {B} visited the museum, and {C} showed a painting to",
    "At the school, {A} and {B} sat together. {C} lent a pencil to",
    "After the game, {A} and {B} walked home, and {C} told a story to",
    "In the kitchen, {A} and {B} cooked dinner. {C} gave the spoon to",
]
NAMES = ["Adam", "Alice", "Amy", "Anna", "Ben", "Bob", "Chris", "Dan", "David", "Emma", "Eric",
         "Grace", "Jack", "James", "Jane", "Joe", "John", "Kate", "Kevin", "Laura", "Leo",
         "Lisa", "Lucy", "Mark", "Mary", "Max", "Mike", "Paul", "Peter", "Rose", "Ruth",
         "Ryan", "Sam", "Sarah", "Tim", "Tom"]
PER_TEMPLATE = 6


def main():
    rng = random.Random(0)
    by_len = {}
    for n in NAMES:
        by_len.setdefault(len(n), []).append(n)
    pairs = []
    for t, template in enumerate(TEMPLATES):
        for i in range(PER_TEMPLATE):
            while True:
                io, s = rng.sample(NAMES, 2)
                pool_io = [n for n in by_len[len(io)] if n not in (io, s)]
                pool_s = [n for n in by_len[len(s)] if n not in (io, s)]
                if len(pool_io) >= 1 and len(set(pool_s) - set(pool_io[:1])) >= 2:
                    break
            a2 = rng.choice(pool_io)
            b2, c2 = rng.sample([n for n in pool_s if n != a2], 2)
            order = "ABBA" if i % 2 == 0 else "BABA"
            first, second = (io, s) if order == "ABBA" else (s, io)
            f2, s2 = (a2, b2) if order == "ABBA" else (b2, a2)
            pairs.append({
                "template": t, "order": order,
                "base": template.format(A=first, B=second, C=s),
                "source": template.format(A=f2, B=s2, C=c2),
                "io": io, "s": s, "source_names": [a2, b2, c2],
            })
    out = Path(__file__).resolve().parents[1] / "prompt_set" / "ioi.json"
    out.write_text(json.dumps(pairs, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(pairs)} pairs to {out}")


if __name__ == "__main__":
    main()
