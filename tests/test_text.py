"""The text side of image-report pretraining: the tokenizer learnt from reports travels as JSON and gives
the same pieces back, the text encoder ignores padding, and the CLIP loss is lowest at aligned pairs and
treats the views of one breast as positives."""

from __future__ import annotations

import itertools

import pytest
import torch

from training.errors import MammoInputError
from training.ssl.losses import clip_loss, symmetric_infonce
from training.ssl.text import TextConfig, TextEncoder, tokenize, tokenizer_from_json, tokenizer_to_json, train_tokenizer

REPORTS = [
    "Heterogeneously dense breast tissue. A spiculated mass in the upper outer quadrant of the left breast.",
    "Scattered fibroglandular densities. No suspicious calcifications. No mass is seen.",
    "Extremely dense breasts. Grouped amorphous calcifications in the right breast, middle third.",
    "Almost entirely fatty breasts. A circumscribed oval mass in the lower inner quadrant, posterior third.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(REPORTS * 5, vocab_size=300)


def test_tokenizer_round_trip_through_checkpoint_json(tokenizer):
    text = "A spiculated mass in the upper outer quadrant."
    restored = tokenizer_from_json(tokenizer_to_json(tokenizer))
    assert restored.encode(text).ids == tokenizer.encode(text).ids
    assert restored.decode(restored.encode(text).ids) == "a spiculated mass in the upper outer quadrant."
    ids, padding = tokenize(restored, [text, "no mass"], max_length=64)
    assert ids[0, 0] == restored.token_to_id("[CLS]") and ids.shape[0] == 2
    assert padding[1].sum() == ids.shape[1] - len(restored.encode("no mass").ids) and not padding[0].any()
    # an unseen word is split into known pieces, not lost
    assert "[UNK]" not in restored.encode("spiculations").tokens


def test_bad_text_and_bad_tokenizer_are_one_line_errors(tokenizer):
    with pytest.raises(MammoInputError, match="empty text"):
        tokenize(tokenizer, ["  "], max_length=16)
    with pytest.raises(MammoInputError, match="tokenizer cannot be read") as info:
        tokenizer_from_json('{"not": "a tokenizer"}')
    assert "\n" not in str(info.value)
    with pytest.raises(MammoInputError, match="no report text"):
        train_tokenizer(["", " "])


def test_text_encoder_ignores_padding_and_cuts_long_texts(tokenizer):
    torch.manual_seed(0)
    encoder = TextEncoder(TextConfig(vocab_size=tokenizer.get_vocab_size(), width=32, depth=2, heads=2,
                                     max_length=12, embed_dim=16)).eval()
    short = "no mass is seen"
    ids, padding = tokenize(tokenizer, [short, REPORTS[0]], max_length=12)
    assert ids.shape == (2, 12) and ids[1, -1] == tokenizer.token_to_id("[SEP]")  # cut, still closed
    alone = encoder(*tokenize(tokenizer, [short], max_length=12))
    batched = encoder(ids, padding)
    assert batched.shape == (2, 16)
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)  # padding changes nothing


def test_clip_loss_is_lowest_at_aligned_pairs():
    torch.manual_seed(0)
    images = torch.randn(4, 8)
    texts = images + 0.05 * torch.randn(4, 8)
    losses = {order: clip_loss(images, texts[list(order)], 0.1).item() for order in itertools.permutations(range(4))}
    assert min(losses, key=losses.get) == (0, 1, 2, 3)
    # one positive per row: the project's symmetric InfoNCE, the same number
    torch.testing.assert_close(clip_loss(images, texts, 0.1), symmetric_infonce(images, texts, 0.1))


def test_views_of_one_breast_are_positives_of_each_others_report():
    torch.manual_seed(1)
    images = torch.randn(4, 8)
    texts = torch.randn(4, 8)
    breasts = torch.tensor([0, 0, 1, 1])  # CC and MLO of two breasts
    swapped = texts[[1, 0, 3, 2]]  # each view given its other view's report
    torch.testing.assert_close(clip_loss(images, texts, 0.1, breasts), clip_loss(images, swapped, 0.1, breasts))
    assert not torch.isclose(clip_loss(images, texts, 0.1), clip_loss(images, swapped, 0.1))
    images.requires_grad_(True)
    clip_loss(images, texts, torch.tensor(0.1), breasts).backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_the_same_reports_always_give_the_same_ids_and_unseen_words_still_split():
    """tokenizers' own WordPiece trainer numbered pieces differently from run to run (hash-map order),
    so a resumed CLIP run saw other ids; the vocabulary is now counted words plus characters."""
    first, second = (train_tokenizer(REPORTS * 3, vocab_size=300) for _ in range(2))
    assert first.get_vocab() == second.get_vocab()
    pieces = first.encode("Spiculated microcalcifications!").tokens
    assert pieces[0] == "[CLS]" and pieces[1] == "spiculated" and "[UNK]" not in pieces
    assert "".join(p.removeprefix("##") for p in pieces[2:-2]) == "microcalcifications"
    small = train_tokenizer(REPORTS, vocab_size=10)  # the limit keeps the characters, drops words
    assert small.encode("mass").tokens[1:-1] == ["m", "##a", "##s", "##s"]
