"""Models genprobe did not write for itself, shared by every engine and probe test.

Each is the kind of thing a user brings: nested containers, residual additions, BatchNorm, a
module used twice, a transformer block, and a model ``torch.fx`` cannot trace. ``FOREIGN``
maps a name to ``(factory, input_shape, num_classes)``; factories take a seed.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

import genprobe as gp
from genprobe.inputs import call
from genprobe.logits import logits_of


def _declare_torchvision_operators() -> torch.library.Library | None:
    """The package index holds only a CUDA build of the torchvision made for this torch: its
    compiled operators (detection's nms, roi_align, ...) cannot load against the CPU torch, and
    ``import torchvision`` (which transformers and timm do) then fails registering nms's fake
    kernel. The classifiers tested here call none of those operators; declaring the two schemas
    the import registers lets it complete, and any use of them still fails loudly (no kernel).
    Nothing is done where the compiled operators load."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        return None
    from pathlib import Path

    compiled = next(Path(spec.origin).parent.glob("_C*.so"), None)
    try:
        if compiled is not None:
            torch.ops.load_library(str(compiled))
            return None
    except OSError:
        pass
    library = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return library


_TORCHVISION_OPERATORS = _declare_torchvision_operators()


class Nested(nn.Module):
    """Containers inside containers: Sequential in ModuleDict in ModuleList."""

    def __init__(self, d=6, k=3):
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleDict({"ff": nn.Sequential(nn.Linear(d, 8), nn.Tanh()),
                                                    "out": nn.Linear(8, d)}) for _ in range(2)])
        self.head = nn.Sequential(nn.Sequential(nn.Linear(d, k)))

    def forward(self, x):
        for b in self.blocks:
            x = b["out"](b["ff"](x))
        return self.head(x)


class Residual(nn.Module):
    """Residual additions and BatchNorm on a small conv net."""

    def __init__(self, c=4, k=3):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, k)

    def forward(self, x):
        h = torch.relu(self.bn1(self.stem(x)))
        h = torch.relu(h + self.bn2(self.conv(h)))
        return self.fc(h.mean(dim=(2, 3)))


class Shared(nn.Module):
    """One Linear applied twice (weight sharing), a parameter owned by the root module."""

    def __init__(self, d=5, k=3):
        super().__init__()
        self.inp = nn.Linear(d, 7)
        self.mid = nn.Linear(7, 7)
        self.out = nn.Linear(7, k)
        self.scale = nn.Parameter(torch.ones(7))

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.mid(h)) * self.scale
        h = torch.tanh(self.mid(h))
        return self.out(h)


class TransformerClassifier(nn.Module):
    """A PyTorch TransformerEncoderLayer over a sequence of rows (B, T, D), mean-pooled."""

    def __init__(self, t=4, d=8, k=3):
        super().__init__()
        self.embed = nn.Linear(d, 16)
        self.pos = nn.Parameter(torch.randn(t, 16) * 0.1)
        self.block = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=24, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, k)

    def forward(self, x):
        h = self.embed(x) + self.pos
        return self.head(self.block(h).mean(dim=1))


class Untraceable(nn.Module):
    """Data-dependent Python control flow: ``torch.fx`` symbolic tracing fails on it."""

    def __init__(self, d=5, k=3):
        super().__init__()
        self.a = nn.Linear(d, 6)
        self.b = nn.Linear(6, k)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:  # fx cannot trace a branch on a tensor value
            h = torch.relu(h)
        else:
            h = torch.tanh(h)
        return self.b(h)


class TokenClassifier(nn.Module):
    """A text classifier over integer token ids (B, T): nn.Embedding, mean over tokens, MLP head."""

    def __init__(self, vocab=20, d=8, k=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, 12)
        self.head = nn.Linear(12, k)

    def forward(self, ids):
        return self.head(torch.tanh(self.fc(self.embed(ids).mean(dim=1))))


class Positions(nn.Module):
    """Learned position embeddings indexed by a non-persistent buffer of position ids, as Hugging
    Face encoders hold them (``state_dict()`` leaves it out), and a LayerNorm."""

    def __init__(self, t=4, d=6, k=3):
        super().__init__()
        self.register_buffer("position_ids", torch.arange(t), persistent=False)
        self.embed = nn.Linear(d, 10)
        self.pos = nn.Embedding(t, 10)
        self.norm = nn.LayerNorm(10)
        self.head = nn.Linear(10, k)

    def forward(self, x):
        h = self.norm(self.embed(x) + self.pos(self.position_ids))
        return self.head(torch.relu(h).mean(dim=1))


class Returned:
    """What a Hugging Face model returns, in miniature: an object with ``logits`` and more."""

    def __init__(self, logits, hidden):
        self.logits, self.hidden = logits, hidden


class ReturnsObject(nn.Module):
    """Returns an object holding ``logits`` and a hidden state (read without ``output=``)."""

    def __init__(self, d=5, k=3):
        super().__init__()
        self.fc = nn.Linear(d, 8)
        self.head = nn.Linear(8, k)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        return Returned(self.head(h), h)


class ReturnsScores(nn.Module):
    """Returns a dict without ``logits``: needs ``Subject(..., output=OUTPUT)``."""

    OUTPUT = staticmethod(lambda out: out["scores"])

    def __init__(self, d=5, k=3):
        super().__init__()
        self.fc = nn.Linear(d, 8)
        self.head = nn.Linear(8, k)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return {"features": h, "scores": self.head(h)}


TOKENS = {"tokens": (TokenClassifier, ("ids", 5, 20), 3)}
"""Models taking integer token ids: input shape ("ids", T, vocab)."""


class MaskedTokens(nn.Module):
    """Padded token ids and their attention mask as two arguments, ``model(ids, mask)``: the mean
    of the embeddings over the unmasked tokens, a ReLU MLP. torch.fx traces it."""

    def __init__(self, vocab=20, d=8, k=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, 12)
        self.act = nn.ReLU()
        self.head = nn.Linear(12, k)

    def forward(self, ids, mask):
        m = mask.unsqueeze(-1).to(self.embed.weight.dtype)
        pooled = (self.embed(ids) * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.head(self.act(self.fc(pooled)))


class MaskedTokensByName(MaskedTokens):
    """The same network called with keyword arguments, ``model(**{"ids": ..., "mask": ...})``,
    as a tokenizer's output is passed."""


STRUCTURED = {"masked_tuple": (MaskedTokens, ("tuple", 6, 20), 3),
              "masked_dict": (MaskedTokensByName, ("dict", 6, 20), 3)}
"""Models taking a structured input: padded token ids and an attention mask, as a tuple
``(ids, mask)`` or a mapping ``{"ids", "mask"}``: input shape (kind, T, vocab)."""


def padded_tokens(n: int, t: int, vocab: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) (n, t) int64: each example 2..t real tokens (ids ≥ 1), then padding (id 0, mask 0)."""
    lengths = torch.randint(2, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, vocab, (n, t), generator=g) * mask
    return ids, mask

def hf_bert(vocab=50, k=3):
    """A Hugging Face BERT encoder for sequence classification, built from a tiny config (nothing
    downloaded): token ids in, a SequenceClassifierOutput out, a non-persistent position-ids
    buffer, GELU MLPs, LayerNorm, a tanh pooler."""
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(
        vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=16, num_labels=k))


def hf_gpt2(vocab=50, k=3):
    """A Hugging Face GPT-2 decoder with a sequence-classification head (the last token's
    logits), from a tiny config."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    return GPT2ForSequenceClassification(GPT2Config(
        vocab_size=vocab, n_positions=16, n_embd=16, n_layer=2, n_head=2, num_labels=k,
        pad_token_id=0, bos_token_id=1, eos_token_id=1))


LIBRARIES = {"hf_bert": (hf_bert, ("ids", 8, 50), 3), "hf_gpt2": (hf_gpt2, ("ids", 8, 50), 3),
             "hf_bert_masked": (hf_bert, ("bert", 8, 50), 3)} \
    if importlib.util.find_spec("transformers") else {}
"""Models of the libraries users bring (a test-only dependency), where installed. ``hf_bert_masked``
takes what a tokenizer gives, ``{input_ids, attention_mask, token_type_ids}``, padded."""

def tv_resnet18(k=10):
    """torchvision's ResNet-18 for 10 classes (11.2 M parameters) on 32 × 32 images, randomly
    initialized: BatchNorm, residual additions, in-place ReLUs (one module used twice per block)."""
    from torchvision.models import resnet18

    return resnet18(num_classes=k)


def timm_vit(k=3):
    """A timm Vision Transformer from a small config: 16 × 16 images in 4 × 4 patches, 2 blocks of
    width 16, a class token, GELU MLPs, LayerNorm."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2,
                             mlp_ratio=2.0, num_classes=k)


def timm_convnext(k=3):
    """A timm ConvNeXt from a small config on 32 × 32 images: four stages of one block, depthwise
    7 × 7 convolutions, LayerNorm over channels, GELU MLPs, layer scale."""
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(depths=(1, 1, 1, 1), dims=(12, 16, 24, 32), num_classes=k)


VISION = ({"tv_resnet18": (tv_resnet18, (3, 32, 32), 10)}
          if importlib.util.find_spec("torchvision") else {}) | (
          {"timm_vit": (timm_vit, (3, 16, 16), 3), "timm_convnext": (timm_convnext, (3, 32, 32), 3)}
          if importlib.util.find_spec("timm") else {})
"""Image classifiers of torchvision and timm (test-only dependencies), where installed."""

FOREIGN = {
    "nested": (Nested, (6,), 3),
    "positions": (Positions, (4, 6), 3),
    "returns_object": (ReturnsObject, (5,), 3),
    "returns_scores": (ReturnsScores, (5,), 3),
    "residual_bn": (Residual, (1, 6, 6), 3),
    "shared": (Shared, (5,), 3),
    "transformer": (TransformerClassifier, (4, 8), 3),
    "untraceable": (Untraceable, (5,), 3),
}


MODELS = FOREIGN | TOKENS | STRUCTURED | LIBRARIES | VISION
"""Every model above by name."""


def model_inputs(shape: tuple, n: int, g: torch.Generator, dtype: torch.dtype = torch.float32):
    """`n` random inputs of a model's input `shape`: ("ids", T, vocab) token ids, ("tuple" |
    "dict" | "bert", T, vocab) padded ids with their mask, else floating (n, *shape)."""
    if shape[0] == "ids":
        return torch.randint(0, shape[2], (n, shape[1]), generator=g)
    if shape[0] in ("tuple", "dict", "bert"):
        ids, mask = padded_tokens(n, shape[1], shape[2], g)
        return {"tuple": (ids, mask), "dict": {"ids": ids, "mask": mask},
                "bert": {"input_ids": ids, "attention_mask": mask,
                         "token_type_ids": torch.zeros_like(ids)}}[shape[0]]
    return torch.randn(n, *shape, generator=g, dtype=dtype)


def make_subject(name: str, *, n_train: int = 32, n_test: int = 24, seed: int = 0, steps: int = 3,
                 dtype: torch.dtype = torch.float32, checkpoints: int = 1) -> gp.Subject:
    """A Subject of foreign model `name` (of MODELS): θ⁰, a few SGD steps to θ^F (a checkpoint after each of
    `checkpoints` "epochs"), random data. BatchNorm statistics are updated by the steps."""
    factory, shape, k = MODELS[name]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = factory().to(dtype)
    x_train = model_inputs(shape, n_train, g, dtype)
    if k * 4 >= n_train:  # too few examples for random labels to hold every class (stiffness needs each)
        y_train = (torch.arange(n_train) % k)[torch.randperm(n_train, generator=g)]
    else:
        y_train = torch.randint(0, k, (n_train,), generator=g)
    x_test = model_inputs(shape, n_test, g, dtype)
    y_test = torch.randint(0, k, (n_test,), generator=g)
    init = {k_: v.clone() for k_, v in model.state_dict().items()}
    output = getattr(factory, "OUTPUT", None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    recorded = {}
    for epoch in range(1, checkpoints + 1):
        model.train()
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(logits_of(call(model, x_train), output), y_train).backward()
            opt.step()
        recorded[epoch] = {k_: v.clone() for k_, v in model.state_dict().items()}
    model.eval()
    return gp.Subject(model, init=init, checkpoints=recorded, train=(x_train, y_train),
                      test=(x_test, y_test), num_classes=k, output=output)
