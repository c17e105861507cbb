"""Checks of single config fields, shared by the components that own the fields (the trainer,
the objectives, the jobs): each raises one ClmimError line naming the field and what was
expected."""
from __future__ import annotations

import re

from clmim.errors import ClmimError


def check_int(config, field: str, minimum: int, multiple_of: int = 1, why: str = "") -> int:
  """config.<field> (dotted) as an int >= minimum and a multiple of `multiple_of`."""
  value = config
  for part in field.split("."):
    value = value[part]
  if isinstance(value, bool) or not isinstance(value, int):
    raise ClmimError(f"config.{field}={value!r}: expected an integer.")
  if value < minimum:
    raise ClmimError(f"config.{field}={value}: expected an integer >= {minimum}"
                     f"{' (' + why + ')' if why else ''}.")
  if multiple_of > 1 and value % multiple_of:
    raise ClmimError(f"config.{field}={value}: expected a multiple of the {multiple_of} devices "
                     f"(each device gets the same share), e.g. {_multiples(value, multiple_of)}.")
  return value


def _multiples(value: int, of: int) -> str:
  below = max(of, value // of * of)
  return f"{below} or {below + of}" if below != value else str(value)


def path_pattern(config, field: str):
  """config.<field> compiled as a regular expression over parameter paths ("" = None), or one
  error line naming the field."""
  text = str(config.get(field, "") or "")
  if not text:
    return None
  try:
    return re.compile(text)
  except re.error as e:
    raise ClmimError(f"config.{field}={text!r} is not a regular expression ({e}).") from None
