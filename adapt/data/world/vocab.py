"""The world's vocabulary: every attribute a scene can have, with its caption words.

Everything here is plain data. Names double as caption words and as downstream class names, so a
name must be one lower-case word (or a few) that the CLIP tokenizer handles; order is stable —
labels are list indices.
"""
from __future__ import annotations

# 12 shape kinds; the renderer knows how to draw each of these names.
SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "heart",
    "ring", "crescent", "diamond", "hexagon", "pentagon", "arrow",
)

# 12 object colours (RGB, 0..255), chromatic only so no colour can vanish into a neutral
# background. Neighbours (red/orange, green/lime, cyan/teal, pink/magenta) make the colour task
# fine-grained enough that a domain shift confuses them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 130, 20),
    "yellow": (240, 220, 30),
    "lime": (160, 230, 40),
    "green": (30, 150, 50),
    "teal": (20, 128, 128),
    "cyan": (40, 215, 230),
    "blue": (30, 70, 220),
    "purple": (120, 40, 170),
    "magenta": (220, 40, 200),
    "pink": (250, 150, 190),
    "brown": (130, 75, 35),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

# Fill patterns. ``solid`` is the plain shape; the others are drawn by ``render.fill_pattern``.
FILLS: tuple[str, ...] = ("solid", "striped", "dotted", "checkered", "hollow")

# Sizes: name -> (min, max) side of the shape's bounding box in pixels at 32 px resolution.
SIZES: dict[str, tuple[int, int]] = {
    "small": (11, 14),
    "large": (19, 23),
}
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)

# Neutral / muted backgrounds, named so that no background word is also an object colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "light grey": (200, 200, 200),
    "grey": (128, 128, 128),
    "dark grey": (70, 70, 70),
    "black": (15, 15, 15),
    "beige": (225, 210, 180),
    "navy": (20, 25, 60),
    "olive": (95, 100, 50),
}
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)

# Generic nouns a caption may use instead of the shape word.
GENERIC_NOUNS: tuple[str, ...] = ("shape", "object", "figure")

# Caption frames. Slots: {size} {colour} {fill} {shape} {bg}; a lower-case slot may be left
# empty (the caption builder drops it and fixes articles), an upper-case slot is always filled.
FRAMES: tuple[str, ...] = (
    "a {size} {colour} {fill} {shape} on a {BG} background",
    "a {colour} {fill} {shape} on a {BG} background",
    "a {colour} {shape}",
    "a {fill} {colour} {shape}",
    "a {colour} {fill} {shape}",
    "a photo of a {colour} {fill} {shape}",
    "a picture of a {size} {colour} {shape}",
    "a drawing of a {fill} {shape}",
    "a {SHAPE} coloured {COLOUR}",
    "a {colour} {shape} on {BG}",
    "a {BG} background with a {colour} {fill} {shape}",
    "an image of a {size} {fill} {colour} {shape}",
    "there is a {size} {colour} {shape} in the picture",
    "this {SHAPE} is {COLOUR} and {FILL}",
    "a {fill} {SHAPE} drawn in {COLOUR}",
)
