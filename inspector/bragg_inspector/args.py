"""Helpers for nanoBragg argument lines (pure Python, no Qt, no engine)."""

from __future__ import annotations

import shlex
from collections.abc import Sequence

__all__ = ["split_args", "join_args", "get_flag_value", "set_flag_value"]


def split_args(text: str | Sequence[str]) -> list[str]:
    """Split an argument line the way a POSIX shell would ("" keeps spaces).

    Parameters
    ----------
    text : str or sequence of str
        An argument line, or arguments already split (each converted to ``str``).

    Returns
    -------
    list of str
        The arguments.

    Raises
    ------
    ValueError
        The line has unbalanced quotes.
    """
    if isinstance(text, str):
        try:
            return shlex.split(text)
        except ValueError as exc:  # unbalanced quotes
            raise ValueError(f"cannot split the argument line: {exc}") from None
    return [str(a) for a in text]


def join_args(args: Sequence[str]) -> str:
    """One shell-quoted line of the arguments (the inverse of :func:`split_args`).

    Parameters
    ----------
    args : sequence of str
        The arguments (each converted to ``str``).

    Returns
    -------
    str
        The line, quoted with :func:`shlex.join`.
    """
    return shlex.join([str(a) for a in args])


def get_flag_value(args: Sequence[str], flag: str) -> str | None:
    """Value following the last occurrence of ``flag`` (exact match), or None.

    Parameters
    ----------
    args : sequence of str
        The arguments.
    flag : str
        The flag, e.g. ``"-hkl"``.

    Returns
    -------
    str or None
        The argument after the last ``flag``; None when the flag is absent or is the last argument.
    """
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
    return value


def set_flag_value(args: Sequence[str], flag: str, value: str | None) -> list[str]:
    """Replace every ``flag VALUE`` pair by a single one (appended where the
    first one stood, or at the end); ``value=None`` removes the flag.

    Parameters
    ----------
    args : sequence of str
        The arguments (not modified).
    flag : str
        The flag, e.g. ``"-hkl"``; each occurrence is dropped with the argument after it.
    value : str or None
        The new value (converted to ``str``), or None to remove the flag.

    Returns
    -------
    list of str
        A new list of arguments.
    """
    out: list[str] = []
    pos = None
    i = 0
    args = list(args)
    while i < len(args):
        if args[i] == flag:
            if pos is None:
                pos = len(out)
            i += 2  # drop flag and its value
            continue
        out.append(args[i])
        i += 1
    if value is not None:
        pair = [flag, str(value)]
        if pos is None:
            out.extend(pair)
        else:
            out[pos:pos] = pair
    return out
