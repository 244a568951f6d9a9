"""Lists of buffers (bytes or memoryviews): split and trimmed without copying."""

from __future__ import annotations


def before(parts: list, limit: int) -> list:
    """The first ``limit`` bytes of ``parts``."""
    kept = []
    for part in parts:
        if limit <= 0:
            break
        kept.append(part if len(part) <= limit else memoryview(part)[:limit])
        limit -= len(part)
    return kept


def after(parts: list, done: int) -> list:
    """What is left of ``parts`` once their first ``done`` bytes are gone."""
    for index, part in enumerate(parts):
        if done < len(part):
            return [memoryview(part)[done:], *parts[index + 1 :]]
        done -= len(part)
    return []


def pieces(parts: list, size: int, limit: int):
    """Split ``parts`` (``size`` bytes in all) into runs of at most ``limit`` bytes."""
    if size <= limit:
        yield parts, size
        return
    run, run_size = [], 0
    for part in parts:
        view = memoryview(part)
        while view:
            take = min(len(view), limit - run_size)
            run.append(view[:take])
            run_size += take
            view = view[take:]
            if run_size == limit:
                yield run, run_size
                run, run_size = [], 0
    if run:
        yield run, run_size
