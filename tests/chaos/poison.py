"""Fault injection: an image modality whose decoder kills its own process on marked samples.

A sample with a `kill` member is a poison pill: decoding it SIGKILLs the process, as a decoder
segfault or the OOM killer would. `PoisonSpec` is a FeedSpec pickled by reference to this
module, so every worker that unpickles it (a ShardStream actor, a spawned local worker)
imports this module, which registers the `poison-image` modality before the worker builds it.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Mapping

from selfsup.pipeline.batch import FeedSpec
from selfsup.pipeline.modalities import MODALITIES
from selfsup.pipeline.modalities.image import EncodedImage, ImageModality

NAME = "poison-image"


@MODALITIES.register(NAME)
class PoisonImage(ImageModality):
    """The image modality, except that a sample with a `kill` member kills the process decoding it."""

    def decode(self, members: Mapping[str, bytes]) -> EncodedImage:
        if "kill" in members:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().decode(members)


@dataclass(frozen=True, eq=False)
class PoisonSpec(FeedSpec):
    """A FeedSpec whose unpickling registers `poison-image` in the worker."""

    __hash__ = FeedSpec.__hash__
