"""The system-prompt canary of the leak rail: a secret marker at the start of every system
prompt (`Guard.mark_system_prompt`); an answer that repeats it is leaking the prompt.

It is part of every prompt the model reads, so its length is prefill paid on every turn:
a hex marker ("enc-3f9a1c07d2") is 14 tokens for a BPE tokeniser, one per character, which
on the CPU default took 5 % of the time to first token. "enc" and three common words are
6 tokens (each word is one token after a space in SmolLM2's vocabulary, as common English
words are in most BPE vocabularies) and still ~24 random bits per process: enough that an
earlier leak does not teach the next one.
"""

from __future__ import annotations

import re
import secrets

# One token each after a space in SmolLM2's vocabulary (tests/server/test_canary.py).
_WORD_LIST = """
    almond amber anchor apple arch arrow atlas attic autumn avocado badge bakery balcony
    bamboo banana banner barley barn barrel basil basin basket beacon beaver bell berry
    birch bison blanket blossom boat bottle bracket branch brass bread breeze brick bridge
    broom bubble bucket buffalo butter button cabin cactus camel camera candle canoe canvas
    canyon carbon cargo carpet carrot castle cedar cement cherry chestnut chimney cider
    circle citrus clay cliff clock cloud clover cobalt coconut coffee comet compass copper
    coral cotton cradle crane crater cricket crystal curtain cushion cypress delta desert
    diamond dolphin donkey dragon drum eagle engine fabric falcon feather fern ferry field
    fig flame flint forest fossil fountain fox frost galaxy garden garlic gate ginger
    glacier globe granite grape gravel guitar hammer harbor harp hazel helmet hill honey
    horizon iris island ivory jacket jade jelly jungle kettle kiwi ladder lagoon lake
    lantern lava lemon lichen lily lime linen lobster lotus lumber magnet mango maple marble
    meadow meteor mint mirror moss mountain mushroom needle nectar nest nickel oak oasis
    ocean olive onion orange orbit orchard orchid owl oyster paddle palm panda paper parrot
    peach peanut pearl pepper piano pillow pine planet plum pond poppy potato prism pumpkin
    quartz rabbit reef ribbon river rocket rose saddle saffron salmon sand shell silver
    sketch sled slate sparrow spider spruce squirrel stone straw stream summit sunset tablet
    thunder tiger timber toast tower trumpet tunnel turtle umbrella valley velvet violet
    volcano walnut willow window winter wolf zebra zinc
"""
WORDS = tuple(_WORD_LIST.split())


def new_canary() -> str:
    return " ".join(["enc", *(secrets.choice(WORDS) for _ in range(3))])


_SPACE = re.compile(r"\s+")


def contains(text: str, canary: str) -> bool:
    """Whether `text` repeats the canary, whatever its case or spacing (a model copying
    the prompt may break a line inside it)."""
    return _SPACE.sub(" ", canary.lower()) in _SPACE.sub(" ", text.lower())
