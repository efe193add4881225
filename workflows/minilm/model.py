"""The MiniLM classifier: pretrained encoder, masked mean pooling, dropout, linear head.

Owns the network (:class:`MiniLMClassifier`) and how it is built and loaded with the
pretrained weights (:func:`build_model`).
"""

from __future__ import annotations

from safetensors.torch import load_file
from torch import Tensor, nn

from workflows.minilm.config import TrainConfig
from workflows.minilm.data import N_CLASSES
from workflows.minilm.pretrained import model_path, transformers_offline

__all__ = ["ATTN_IMPLEMENTATION", "MiniLMClassifier", "build_model"]

#: Attention kernel of the encoder, pinned so that runs do not depend on a library
#: default.
ATTN_IMPLEMENTATION = "sdpa"


class MiniLMClassifier(nn.Module):
    """Transformer encoder, masked mean pooling, dropout and a linear head.

    Parameters
    ----------
    encoder : transformers.BertModel
        The encoder (without pooling layer); its ``last_hidden_state`` is averaged
        over the tokens where ``attention_mask`` is 1.
    n_classes : int
        Number of output logits.
    dropout : float, default 0.1
        Dropout probability applied to the pooled embedding during training.
    """

    def __init__(self, encoder: nn.Module, n_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        hidden = int(encoder.config.hidden_size)  # type: ignore[union-attr, arg-type]
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Return the ``(batch, n_classes)`` logits for ``(batch, length)`` token ids."""
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state  # (b, length, hidden)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.head(self.dropout(pooled))


def build_model(config: TrainConfig, *, pretrained: bool = True) -> MiniLMClassifier:
    """Build the classifier described by ``config``.

    Parameters
    ----------
    config : TrainConfig
        Run configuration; ``dropout`` is used.
    pretrained : bool, default True
        Load the pretrained MiniLM weights into the encoder. Without it the encoder is
        randomly initialised (enough when a full ``state_dict`` is loaded afterwards).

    Returns
    -------
    MiniLMClassifier
        The head (and, without ``pretrained``, the encoder) is freshly initialised from
        torch's global RNG; seed it (or use :func:`train_and_record`, which does) for
        reproducible weights.
    """
    transformers = transformers_offline()
    path = model_path()
    bert_config = transformers.BertConfig.from_pretrained(
        str(path), local_files_only=True, attn_implementation=ATTN_IMPLEMENTATION
    )
    encoder = transformers.BertModel(bert_config, add_pooling_layer=False)
    if pretrained:
        # The file also holds the unused pooler and, depending on the transformers
        # version that wrote it, the ``position_ids`` buffer; strict=True still checks
        # that every tensor of the encoder is present.
        expected = encoder.state_dict().keys()
        weights = load_file(str(path / "model.safetensors"))
        encoder.load_state_dict({k: weights[k] for k in expected if k in weights}, strict=True)
    return MiniLMClassifier(encoder, N_CLASSES, dropout=config.dropout)
