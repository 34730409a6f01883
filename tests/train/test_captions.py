"""Captions for text-conditioned training: measured attributes, the caption table, held-out phrasings."""

import torch

from mode_ray.train.captions import TEMPLATES, UNSEEN, CaptionTable, attributes, caption


def strokes() -> torch.Tensor:
    """Three 28x28 images in [-1, 1]: a thin "\\" stroke, a thick "|" and a thin "/"."""
    img = -torch.ones(3, 1, 28, 28)
    for i in range(20):
        img[0, 0, 4 + i, 4 + i] = 1  # top-left to bottom-right: leaning left
        img[2, 0, 4 + i, 23 - i] = 1  # bottom-left to top-right: leaning right
    img[1, 0, 4:24, 13:16] = 1
    return img


def test_attributes_measure_thickness_and_slant() -> None:
    thick, slant = attributes(strokes())
    assert thick.tolist() == [0, 2, 0]  # the three-pixel-wide stroke is the thick one
    assert slant.tolist() == [0, 1, 2]  # left, upright, right


def test_caption_table_indexes_every_caption_once() -> None:
    seen: list[str] = []

    def encode(texts: list[str]) -> torch.Tensor:  # a stand-in encoder: (K, 1 + 2, 4), row k filled with k
        seen.extend(texts)
        start = len(seen) - len(texts)
        return (
            torch.arange(start, len(seen), dtype=torch.float32)[:, None, None]
            .expand(len(texts), 3, 4)
            .clone()
        )

    table = CaptionTable.build(encode, labels=10)
    assert len(seen) == len(set(seen)) == len(table.captions)  # each distinct caption encoded once
    assert table.index.shape == (10, len(TEMPLATES), 3, 3)
    assert (
        table.captions[int(table.index[7, 3, 2, 0])]
        == caption(TEMPLATES[3], 7, 2, 0)
        == "a thick, left-slanted 7"
    )
    g = torch.Generator().manual_seed(0)
    labels, a, s = torch.tensor([7, 1]), torch.tensor([2, 0]), torch.tensor([0, 1])
    drawn = table.draw(labels, a, s, g)
    assert drawn.shape == (2, 3, 4)
    rows = [int(drawn[i, 0, 0]) for i in range(2)]
    assert table.captions[rows[0]].count("7") + table.captions[rows[0]].count("seven") == 1
    assert "one" in table.captions[rows[1]] or "1" in table.captions[rows[1]]
    assert not set(UNSEEN) & set(TEMPLATES)  # the paraphrase test asks with phrasings training never saw
