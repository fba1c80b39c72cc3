"""The facts about the synthetic tasks that a config is checked against (task
names, the length-list syntax, the longest example of a length), kept here so
the config loader needs nothing from `recursive_lm.data`; the generator in
`recursive_lm.data.synthetic` reads them from here."""

from __future__ import annotations

TASKS = ("parity", "addition", "copy", "induction")


def parse_lengths(spec: str) -> tuple[int, ...]:
  """'1-8' or '1,2,5' or '1-4,9' -> sorted unique positive ints. Raises ValueError."""
  out = set()
  for item in filter(None, (s.strip() for s in str(spec).split(","))):
    if "-" in item:
      lo, hi = (int(x) for x in item.split("-", 1))
      if lo > hi:
        raise ValueError(f"length range {item!r} is empty")
      out.update(range(lo, hi + 1))
    else:
      out.add(int(item))
  if not out or min(out) < 1:
    raise ValueError(f"lengths {spec!r} must list positive ints (e.g. '1-8' or '3,5')")
  return tuple(sorted(out))


def max_example_len(task: str, n: int) -> int:
  """Bytes of the longest example of length n (question + answer)."""
  return {"parity": n + 2, "addition": 3 * n + 3, "copy": 2 * n + 1, "induction": n + 2}[task]
