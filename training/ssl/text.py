"""The text side of image-report pretraining (Mammo-CLIP): a tokenizer trained on the report corpus and
a small transformer that embeds a report.

The tokenizer is a WordPiece vocabulary built here from the reports and run by Hugging Face
``tokenizers`` (nothing is downloaded): reports are short and their vocabulary narrow (a few hundred
words), so their words plus every character cover them, and an unseen word still splits into pieces
instead of one unknown token. It travels as its JSON text in the checkpoint's metadata (:func:`tokenizer_to_json`), so a
checkpoint is the whole model. The encoder is a pre-norm transformer over the pieces whose ``[CLS]``
state, projected, is the report's embedding (CLIP's text tower, much smaller).
"""

from __future__ import annotations

import string
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from torch import Tensor, nn

from training.errors import MammoInputError

PAD, UNK, CLS, SEP = "[PAD]", "[UNK]", "[CLS]", "[SEP]"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000) -> Tokenizer:
    """A lower-casing WordPiece tokenizer for ``texts`` that wraps each text in [CLS] ... [SEP].

    Its vocabulary is the special tokens, every character seen plus the ASCII letters, digits and
    punctuation (alone and as ``##`` continuations, so an unseen word still splits into pieces), then
    the most frequent whole words (ties alphabetical) up to ``vocab_size``. ``tokenizers``' own
    WordPiece trainer breaks ties between merges in hash-map order, which changes from run to run;
    counting words gives the same ids for the same reports, so a resumed or repeated run is exact.
    Normalising, splitting and encoding are the library's."""
    tokenizer = Tokenizer(models.WordPiece({PAD: 0, UNK: 1, CLS: 2, SEP: 3}, unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(),
                                                 normalizers.StripAccents()])
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    counts: Counter[str] = Counter()
    for text in texts:
        if text.strip():
            normal = tokenizer.normalizer.normalize_str(text)
            counts.update(word for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(normal))
    if not counts:
        raise MammoInputError("no report text to learn a tokenizer from")
    characters = sorted({c for word in counts for c in word} | set(string.ascii_lowercase + string.digits + string.punctuation))
    pieces = [PAD, UNK, CLS, SEP] + characters + [f"##{c}" for c in characters]
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    pieces += words[:max(0, vocab_size - len(pieces))]
    tokenizer.model = models.WordPiece({piece: i for i, piece in enumerate(pieces)}, unk_token=UNK)
    tokenizer.add_special_tokens([PAD, UNK, CLS, SEP])  # never split, and dropped by decode
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}", special_tokens=[(CLS, tokenizer.token_to_id(CLS)), (SEP, tokenizer.token_to_id(SEP))])
    return tokenizer


def tokenizer_to_json(tokenizer: Tokenizer) -> str:
    """The tokenizer as JSON text, for a checkpoint's metadata."""
    return tokenizer.to_str()


def tokenizer_from_json(text: str) -> Tokenizer:
    """The tokenizer a checkpoint carries (one line when the text is not a tokenizer)."""
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises its own Exception subclass for any malformed JSON
        raise MammoInputError(f"the checkpoint's tokenizer cannot be read ({str(exc).splitlines()[0]})") from None
    if tokenizer.token_to_id(PAD) is None or tokenizer.token_to_id(CLS) is None:
        raise MammoInputError("the checkpoint's tokenizer lacks the [PAD]/[CLS] tokens this text encoder needs")
    return tokenizer


def tokenize(tokenizer: Tokenizer, texts: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
    """Token ids (B, L) and a padding mask (B, L, True where padded) of ``texts``, cut at ``max_length``
    pieces ([CLS] first). An empty text is a user mistake (an empty prompt): one line."""
    for text in texts:
        if not text or not text.strip():
            raise MammoInputError("an empty text: give a sentence, e.g. 'spiculated mass'")
    pad = tokenizer.token_to_id(PAD)
    encodings = tokenizer.encode_batch(list(texts))
    ids = [e.ids[:max_length - 1] + [e.ids[-1]] if len(e.ids) > max_length else e.ids for e in encodings]
    length = max(len(i) for i in ids)
    batch = torch.full((len(ids), length), pad, dtype=torch.long)
    for row, pieces in enumerate(ids):
        batch[row, :len(pieces)] = torch.tensor(pieces, dtype=torch.long)
    return batch, batch == pad


@dataclass
class TextConfig:
    """The text encoder's shape: ``vocab_size`` pieces, ``width`` x ``depth`` pre-norm blocks with
    ``heads`` heads, at most ``max_length`` pieces, embeddings of ``embed_dim``."""

    vocab_size: int = 2000
    width: int = 256
    depth: int = 4
    heads: int = 4
    max_length: int = 64
    embed_dim: int = 256


class TextEncoder(nn.Module):
    """Token and position embeddings, a transformer encoder that ignores padding, and the [CLS] state
    (layer-normed, projected) as the text's embedding."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.tokens = nn.Embedding(config.vocab_size, config.width)
        self.positions = nn.Parameter(torch.zeros(config.max_length, config.width))
        nn.init.normal_(self.positions, std=0.02)
        block = nn.TransformerEncoderLayer(config.width, config.heads, 4 * config.width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, config.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.width)
        self.project = nn.Linear(config.width, config.embed_dim, bias=False)

    def forward(self, ids: Tensor, padding: Tensor) -> Tensor:
        """(B, embed_dim) embeddings of token ids (B, L) with their padding mask (B, L)."""
        if ids.shape[1] > self.config.max_length:
            raise ValueError(f"{ids.shape[1]} tokens, more than max_length {self.config.max_length}")
        x = self.tokens(ids) + self.positions[:ids.shape[1]]
        x = self.blocks(x, src_key_padding_mask=padding)
        return self.project(self.norm(x[:, 0]))
