"""Baseline modes: how an image's baseline is used (one vocabulary for agent, collector, tools)."""

from __future__ import annotations

import enum


class Mode(enum.StrEnum):
    """``learn``: behaviour is added to the baseline, nothing alerts as novel; ``monitor``:
    novelty, drift and anomalies alert; ``protect``: as monitor, and policy may act on alerts."""

    LEARN = "learn"
    MONITOR = "monitor"
    PROTECT = "protect"
