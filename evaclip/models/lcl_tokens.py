"""The token ids LCL's causal language model adds to its text tokenizer's vocabulary (issue 19).

LCL (Latent Compression Learning, OpenGVLab) writes each image of an interleaved document into the token stream as
``<boi> <img> x n <eoi>``: the ``n`` placeholders are replaced by the image's latents, the hidden state at ``<boi>`` is
the document's text embedding for the contrastive term. The pad id is a token of its own, outside the BPE vocabulary
(LCL's code pads with 0, which is the BPE token "!", so a real "!" in a caption was dropped from the targets).

Both the data pipeline (``evaclip.data``, which writes token streams) and the model (``evaclip.models``, which reads
them) use these ids, so they live here, on the models layer, with no dependency of their own.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LCLTokens"]


@dataclass(frozen=True)
class LCLTokens:
    """Special ids of an LCL token stream: the tokenizer's own start / end of text, and four ids appended after its
    ``base_vocab`` ids (image placeholder, begin-of-image, end-of-image, pad). The LM's embedding and head have
    ``vocab_size`` rows."""

    base_vocab: int = 49408  # the CLIP BPE tokenizer's vocabulary (open_clip's SimpleTokenizer)
    sot: int = 49406  # <start_of_text>
    eot: int = 49407  # <end_of_text>

    @property
    def image(self) -> int:
        """The placeholder an image latent replaces."""
        return self.base_vocab

    @property
    def boi(self) -> int:
        """Begin of image: its hidden state is the text embedding of the contrastive term."""
        return self.base_vocab + 1

    @property
    def eoi(self) -> int:
        """End of image."""
        return self.base_vocab + 2

    @property
    def pad(self) -> int:
        """Padding: not a real token, never a generation target."""
        return self.base_vocab + 3

    @property
    def vocab_size(self) -> int:
        return self.base_vocab + 4
