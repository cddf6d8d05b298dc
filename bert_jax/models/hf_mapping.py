"""The one table between our parameter tree and Hugging Face (transformers, PyTorch) tensor names: the
models' contract with the outside world, kept beside them (`bert_jax.hf_export` and `bert_jax.hf_import`
apply it to checkpoints; tests/test_convert checks it against transformers numerically).

Each row says: our path (slash-separated, into the nested params dict), the HF tensor name, and the
transform between the two layouts. Rows whose HF name holds `{i}` address one layer of our *stacked*
layer arrays (leading axis = layer). `{base}` is the encoder's prefix in the HF model (`bert` for
BertForMaskedLM, `roberta` for RobertaForMaskedLM, `electra` for the ELECTRA models). Only numpy is used here, so exporting needs neither
torch nor transformers.

Layouts: our dense kernels are [in, out] (x @ kernel), PyTorch Linear weights are [out, in]; our q/k/v
kernels are [hidden, heads, head_dim] and the attention output kernel is [heads, head_dim, hidden], where
HF flattens (heads, head_dim) heads-major into one axis. All transforms are transposes and reshapes, so a
round trip is bitwise exact.

ELECTRA: the discriminator (`ElectraForPreTraining`) and the generator (`ElectraForMaskedLM`) are exported
one at a time, each from the shared `embeddings/*` plus its own tower (`discriminator/*`, `generator/*`);
`electra.embeddings_project.*` rows apply exactly where the tower's hidden size differs from the
embedding width.

What an imported folder holds beyond these rows (BERT's pooler and NSP head, task heads, buffers) is not ours to
train: `extra_names` lists it, `bert_jax.hf_extras` keeps it in the workdir, and an export writes it back under
the config.json `architectures` that `export_architectures` picks.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from bert_jax.models.config import EncoderConfig


@dataclasses.dataclass(frozen=True)
class Transform:
    """A pair of exact inverses between our array (one layer's slice) and the HF tensor."""

    to_hf: Callable[[np.ndarray, object], np.ndarray]
    from_hf: Callable[[np.ndarray, object], np.ndarray]


def _heads(cfg):
    return cfg.num_heads, cfg.head_dim


IDENTITY = Transform(lambda x, cfg: x, lambda x, cfg: x)
# Dense kernel [in, out] <-> Linear weight [out, in].
LINEAR = Transform(lambda x, cfg: x.T, lambda x, cfg: x.T)
# q/k/v kernel [H, heads, head_dim] <-> Linear weight [heads*head_dim, H].
HEADS_IN = Transform(lambda x, cfg: x.reshape(x.shape[0], -1).T,
                     lambda x, cfg: x.T.reshape(x.shape[1], *_heads(cfg)))
# q/k/v bias [heads, head_dim] <-> [heads*head_dim].
HEADS_BIAS = Transform(lambda x, cfg: x.reshape(-1), lambda x, cfg: x.reshape(*_heads(cfg)))
# attention output kernel [heads, head_dim, H] <-> Linear weight [H, heads*head_dim].
HEADS_OUT = Transform(lambda x, cfg: x.reshape(-1, x.shape[-1]).T,
                      lambda x, cfg: x.T.reshape(*_heads(cfg), x.shape[0]))


@dataclasses.dataclass(frozen=True)
class Row:
    ours: str  # path into our params dict
    hf: str  # HF tensor name; may contain {base} and {i}
    transform: Transform = IDENTITY
    # Whether the row exists for a config (DeBERTa's optional position and token-type embeddings); None: always.
    when: Callable[[EncoderConfig], bool] | None = None

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


def _layer_norm(ours: str, hf: str) -> tuple[Row, Row]:
    return Row(f"{ours}/scale", f"{hf}.weight"), Row(f"{ours}/bias", f"{hf}.bias")


def _dense(ours: str, hf: str, kernel: Transform = LINEAR, bias: Transform = IDENTITY) -> tuple[Row, Row]:
    return Row(f"{ours}/kernel", f"{hf}.weight", kernel), Row(f"{ours}/bias", f"{hf}.bias", bias)


_HF_L = "{base}.encoder.layer.{i}"


def _encoder_rows(embeddings: str, tower: str) -> tuple[Row, ...]:
    """The embedding block at `embeddings` and the stacked layers at `tower`/layers."""
    layers = f"{tower}/layers"
    return (
        Row(f"{embeddings}/word", "{base}.embeddings.word_embeddings.weight"),
        Row(f"{embeddings}/position", "{base}.embeddings.position_embeddings.weight"),
        Row(f"{embeddings}/token_type", "{base}.embeddings.token_type_embeddings.weight"),
        *_layer_norm(f"{embeddings}/norm", "{base}.embeddings.LayerNorm"),
        *_dense(f"{layers}/attention/query", f"{_HF_L}.attention.self.query", HEADS_IN, HEADS_BIAS),
        *_dense(f"{layers}/attention/key", f"{_HF_L}.attention.self.key", HEADS_IN, HEADS_BIAS),
        *_dense(f"{layers}/attention/value", f"{_HF_L}.attention.self.value", HEADS_IN, HEADS_BIAS),
        *_dense(f"{layers}/attention/output", f"{_HF_L}.attention.output.dense", HEADS_OUT),
        *_layer_norm(f"{layers}/attention_norm", f"{_HF_L}.attention.output.LayerNorm"),
        *_dense(f"{layers}/intermediate", f"{_HF_L}.intermediate.dense"),
        *_dense(f"{layers}/output", f"{_HF_L}.output.dense"),
        *_layer_norm(f"{layers}/output_norm", f"{_HF_L}.output.LayerNorm"),
    )


ENCODER_ROWS = _encoder_rows("encoder/embeddings", "encoder")

MLM_HEAD_ROWS: tuple[Row, ...] = (
    *_dense("mlm_head/transform", "cls.predictions.transform.dense"),
    *_layer_norm("mlm_head/norm", "cls.predictions.transform.LayerNorm"),
    Row("mlm_head/bias", "cls.predictions.bias"),
)

# RobertaForMaskedLM's head: BERT's, under other names (its GELU is always the exact one, see `hf_config`).
ROBERTA_HEAD_ROWS: tuple[Row, ...] = (
    *_dense("mlm_head/transform", "lm_head.dense"),
    *_layer_norm("mlm_head/norm", "lm_head.layer_norm"),
    Row("mlm_head/bias", "lm_head.bias"),
)


DISCRIMINATOR_HEAD_ROWS: tuple[Row, ...] = (
    *_dense("discriminator/head/dense", "discriminator_predictions.dense"),
    *_dense("discriminator/head/prediction", "discriminator_predictions.dense_prediction"),
)

GENERATOR_HEAD_ROWS: tuple[Row, ...] = (
    *_dense("generator/mlm_head/transform", "generator_predictions.dense"),
    *_layer_norm("generator/mlm_head/norm", "generator_predictions.LayerNorm"),
    Row("generator/mlm_head/bias", "generator_lm_head.bias"),
)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One exportable model: HF architecture, encoder prefix, its rows, and HF tensors that carry no
    information of ours (tied copies, buffers, heads we do not have): not imported into our tree (an import
    keeps all but the tied copies aside, see `extra_names`)."""

    architecture: str
    base: str
    model_type: str
    # The bare encoder's class (BertModel, ElectraModel): what a sentence-transformers folder holds.
    base_architecture: str
    encoder_rows: tuple[Row, ...]
    head_rows: tuple[Row, ...]
    # Rows of the embedding projection: used only where the embedding width differs from the hidden size.
    project_rows: tuple[Row, ...] = ()
    # HF name -> our path it must equal (tied weights stored anyway by some writers).
    tied: dict = dataclasses.field(default_factory=dict)
    ignored_prefixes: tuple[str, ...] = ()

    def rows(self, cfg) -> tuple[Row, ...]:
        project = self.project_rows if cfg.embed_dim != cfg.hidden_size else ()
        rows = self.encoder_rows + project + self.head_rows
        return tuple(row for row in rows if row.when is None or row.when(cfg))


def _electra_spec(tower: str, architecture: str, head_rows: tuple[Row, ...], tied: dict) -> ModelSpec:
    return ModelSpec(
        architecture=architecture, base="electra", model_type="electra", base_architecture="ElectraModel",
        encoder_rows=_encoder_rows("embeddings", tower), head_rows=head_rows,
        project_rows=_dense(f"{tower}/embeddings_project", "{base}.embeddings_project"), tied=tied,
        # Buffers that older writers saved.
        ignored_prefixes=("electra.embeddings.position_ids", "electra.embeddings.token_type_ids"))


def _deberta_rows(encoder: str) -> tuple[Row, ...]:
    """Hugging Face's DebertaV2Model under {base}: the embeddings (absolute positions only where
    position_biased_input, token types only where type_vocab_size > 0), the layers (query_proj, key_proj,
    value_proj in place of BERT's query/key/value) and the relative embeddings with their LayerNorm, which
    our encoder at `encoder` holds beside its stacked layers."""
    emb, layers, hf_l = f"{encoder}/embeddings", f"{encoder}/layers", _HF_L
    position = lambda cfg: cfg.position_biased_input  # noqa: E731
    types = lambda cfg: cfg.type_vocab_size > 0  # noqa: E731
    rel_norm = lambda cfg: cfg.relative_attention and cfg.norm_rel_ebd == "layer_norm"  # noqa: E731
    return (
        Row(f"{emb}/word", "{base}.embeddings.word_embeddings.weight"),
        Row(f"{emb}/position", "{base}.embeddings.position_embeddings.weight", when=position),
        Row(f"{emb}/token_type", "{base}.embeddings.token_type_embeddings.weight", when=types),
        *_layer_norm(f"{emb}/norm", "{base}.embeddings.LayerNorm"),
        *_dense(f"{layers}/attention/query", f"{hf_l}.attention.self.query_proj", HEADS_IN, HEADS_BIAS),
        *_dense(f"{layers}/attention/key", f"{hf_l}.attention.self.key_proj", HEADS_IN, HEADS_BIAS),
        *_dense(f"{layers}/attention/value", f"{hf_l}.attention.self.value_proj", HEADS_IN, HEADS_BIAS),
        *_dense(f"{layers}/attention/output", f"{hf_l}.attention.output.dense", HEADS_OUT),
        *_layer_norm(f"{layers}/attention_norm", f"{hf_l}.attention.output.LayerNorm"),
        *_dense(f"{layers}/intermediate", f"{hf_l}.intermediate.dense"),
        *_dense(f"{layers}/output", f"{hf_l}.output.dense"),
        *_layer_norm(f"{layers}/output_norm", f"{hf_l}.output.LayerNorm"),
        Row(f"{encoder}/rel_embeddings", "{base}.encoder.rel_embeddings.weight",
            when=lambda cfg: cfg.relative_attention),
        Row(f"{encoder}/rel_norm/scale", "{base}.encoder.LayerNorm.weight", when=rel_norm),
        Row(f"{encoder}/rel_norm/bias", "{base}.encoder.LayerNorm.bias", when=rel_norm),
    )


def _deberta_spec(architecture: str, encoder: str, head: str | None) -> ModelSpec:
    """DeBERTa-v2/v3: DebertaV2ForMaskedLM (legacy head: BERT's `cls.predictions.*`) with the MLM head at
    `head`, or (head None) the bare DebertaV2Model, as the released v3 discriminators are."""
    head_rows = ()
    tied = {}
    if head is not None:
        head_rows = (*_dense(f"{head}/transform", "cls.predictions.transform.dense"),
                     *_layer_norm(f"{head}/norm", "cls.predictions.transform.LayerNorm"),
                     Row(f"{head}/bias", "cls.predictions.bias"))
        tied = {"cls.predictions.decoder.weight": f"{encoder}/embeddings/word",
                "cls.predictions.decoder.bias": f"{head}/bias"}
    return ModelSpec(architecture=architecture, base="deberta", model_type="deberta-v2",
                     base_architecture="DebertaV2Model", encoder_rows=_deberta_rows(encoder), head_rows=head_rows,
                     tied=tied,
                     # position_ids: a buffer older writers saved; mask_predictions: the RTD head of Microsoft's
                     # released v3 checkpoints, which transformers ignores too; lm_predictions: the non-legacy head.
                     ignored_prefixes=("deberta.embeddings.position_ids", "mask_predictions.", "lm_predictions."))


# --model name -> spec.
MODELS: dict[str, ModelSpec] = {
    "mlm": ModelSpec(
        architecture="BertForMaskedLM", base="bert", model_type="bert", base_architecture="BertModel",
        encoder_rows=ENCODER_ROWS,
        head_rows=MLM_HEAD_ROWS,
        tied={"cls.predictions.decoder.weight": "encoder/embeddings/word",
              "cls.predictions.decoder.bias": "mlm_head/bias"},
        # position_ids / token_type_ids: buffers older writers saved; pooler: BertModel's, BertForMaskedLM has
        # none; seq_relationship: the NSP head of BertForPreTraining.
        ignored_prefixes=("bert.embeddings.position_ids", "bert.embeddings.token_type_ids", "bert.pooler.",
                          "cls.seq_relationship."),
    ),
    # RoBERTa: BERT's encoder and MLM head (one model of ours) whose positions start at position_offset = its
    # padding id + 1 (EncoderConfig), so the position table is the same tensor on both sides.
    "roberta_mlm": ModelSpec(
        architecture="RobertaForMaskedLM", base="roberta", model_type="roberta", base_architecture="RobertaModel",
        encoder_rows=ENCODER_ROWS,
        head_rows=ROBERTA_HEAD_ROWS,
        tied={"lm_head.decoder.weight": "encoder/embeddings/word", "lm_head.decoder.bias": "mlm_head/bias"},
        ignored_prefixes=("roberta.embeddings.position_ids", "roberta.embeddings.token_type_ids",
                          "roberta.pooler."),
    ),
    "discriminator": _electra_spec("discriminator", "ElectraForPreTraining", DISCRIMINATOR_HEAD_ROWS, {}),
    "generator": _electra_spec("generator", "ElectraForMaskedLM", GENERATOR_HEAD_ROWS,
                               {"generator_lm_head.weight": "embeddings/word"}),
    # DeBERTa: an MLM run (BertForMaskedLM's tree on a relative-attention encoder), and the two towers of
    # DeBERTa-v3's RTD (models/deberta.py): the generator with its MLM head, the discriminator as a backbone
    # whose word embeddings are the generator's plus the learned difference, folded on export.
    "deberta_mlm": _deberta_spec("DebertaV2ForMaskedLM", "encoder", "mlm_head"),
    "deberta_generator": _deberta_spec("DebertaV2ForMaskedLM", "generator/encoder", "generator/mlm_head"),
    "deberta_discriminator": _deberta_spec("DebertaV2Model", "discriminator/encoder", None),
}


def _get(tree: dict, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _has(tree: dict, path: str) -> bool:
    try:
        _get(tree, path)
        return True
    except (KeyError, TypeError):
        return False


def _set(tree: dict, path: str, value):
    *parents, leaf = path.split("/")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def hf_names(row: Row, spec: ModelSpec, num_layers: int) -> list[str]:
    """The HF tensor names of one row: one per layer for stacked rows, else one."""
    name = row.hf.replace("{base}", spec.base)
    return [name.format(i=i) for i in range(num_layers)] if row.per_layer else [name]


def head_present(tensors: dict, cfg: EncoderConfig, model: str = "mlm") -> bool:
    """Whether `tensors` (names as `normalize_names` gives them) hold any of the model's head."""
    spec = MODELS[model]
    return any(n in tensors for row in spec.head_rows for n in hf_names(row, spec, cfg.num_layers))


def to_hf(params: dict, cfg: EncoderConfig, model: str = "mlm") -> dict[str, np.ndarray]:
    """Our params (nested dict; arrays of any array type) -> {HF name: C-contiguous float32 array}.

    The tied decoder weight is not written (transformers re-ties it from the word embeddings)."""
    spec = MODELS[model]
    out = {}
    for row in spec.rows(cfg):
        value = np.asarray(_get(params, row.ours), np.float32)
        names = hf_names(row, spec, cfg.num_layers)
        slices = list(value) if row.per_layer else [value]
        if len(slices) != len(names):
            raise ValueError(f"{row.ours}: {len(slices)} stacked layers, config says {cfg.num_layers}")
        for name, x in zip(names, slices):
            out[name] = np.ascontiguousarray(row.transform.to_hf(x, cfg))
    return out


def normalize_names(tensors: dict, model: str = "mlm") -> dict:
    """Adds the encoder prefix to bare encoder names (`embeddings.*`, `embeddings_project.*`, `encoder.*`,
    `pooler.*`, as a BertModel or ElectraModel writes them) and renames TF-era LayerNorm `gamma`/`beta`
    to `weight`/`bias`."""
    base = MODELS[model].base
    out = {}
    for name, value in tensors.items():
        if name.split(".", 1)[0] in ("embeddings", "embeddings_project", "encoder", "pooler"):
            name = f"{base}.{name}"
        if name.endswith(".gamma") or name.endswith(".beta"):
            name = name.rsplit(".", 1)[0] + (".weight" if name.endswith(".gamma") else ".bias")
        out[name] = value
    return out


def from_hf(tensors: dict, cfg: EncoderConfig, model: str = "mlm", fallback: dict | None = None) -> dict:
    """{HF name: array} -> our params (nested dict of float32 numpy arrays); the exact inverse of `to_hf`.

    Names must carry the `{base}.` prefix (see `normalize_names`). Rows whose tensors are all absent take
    their value from `fallback` (a partial params dict, e.g. a freshly initialised head) when it has the
    path, else raise.
    Tied copies must equal what they are tied to; encoder tensors (`{base}.*`) the table does not know raise
    (our encoder would compute something else without them), except the ignored ones of the spec; tensors
    outside the encoder that are not our head's (another head) are skipped (see `unused_names`)."""
    spec = MODELS[model]
    params: dict = {}
    known = set()
    for row in spec.rows(cfg):
        names = hf_names(row, spec, cfg.num_layers)
        known.update(names)
        present = [n for n in names if n in tensors]
        if not present and fallback is not None and _has(fallback, row.ours):
            _set(params, row.ours, np.array(_get(fallback, row.ours), np.float32))
            continue
        if len(present) != len(names):
            missing = [n for n in names if n not in tensors]
            raise KeyError(f"missing HF tensors: {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        slices = [row.transform.from_hf(np.asarray(tensors[n], np.float32), cfg) for n in names]
        _set(params, row.ours, np.stack(slices) if row.per_layer else slices[0])
    for name, ours in spec.tied.items():
        if name in tensors and not np.array_equal(np.asarray(tensors[name], np.float32), _get(params, ours)):
            raise ValueError(f"{name} differs from the tensor it must be tied to ({ours}): untied weights "
                             "cannot be represented")
    unknown = [n for n in tensors if n not in known and n not in spec.tied and not _ignored(n, spec)
               and n.startswith(f"{spec.base}.")]
    if unknown:
        raise ValueError(f"HF tensors with no place in our {model} model: {unknown[:4]}"
                         f"{' ...' if len(unknown) > 4 else ''}")
    return params


def _ignored(name: str, spec: ModelSpec) -> bool:
    return any(name.startswith(p) for p in spec.ignored_prefixes)


def head_names(model: str = "mlm") -> set[str]:
    """The HF names of the model's head (our trained head, outside the encoder)."""
    spec = MODELS[model]
    return {row.hf.replace("{base}", spec.base) for row in spec.head_rows}


def unused_names(tensors: dict, model: str = "mlm") -> list[str]:
    """HF tensors that `from_hf` skips: buffers, pooler, NSP and other heads, tied copies."""
    spec = MODELS[model]
    ours = head_names(model)
    return sorted(n for n in tensors if _ignored(n, spec) or n in spec.tied
                  or (not n.startswith(f"{spec.base}.") and n not in ours))


def extra_names(tensors: dict, model: str = "mlm") -> list[str]:
    """The tensors `from_hf` skips that carry information of their own (all but the tied copies): what an
    import keeps for the export (bert_jax.hf_extras)."""
    return [n for n in unused_names(tensors, model) if n not in MODELS[model].tied]


# An architecture that holds every tensor of another and more: BertForPreTraining is BertForMaskedLM plus the
# pooler and the NSP head.
_HOLDS = {"BertForPreTraining": "BertForMaskedLM"}


def export_architectures(model: str, original: list[str], extras: list[str]) -> list[str]:
    """config.json's `architectures` for an export of `model` that also writes `extras` (tensors kept from an
    imported folder whose config.json declared `original`): ours alone when there is nothing else to hold or
    the folder was ours; the folder's when its class holds ours (BertForPreTraining); else ours, then the
    folder's (e.g. BertForMaskedLM for the MLM head, then BertModel for the pooler), so that each class loads
    the tensors it has a place for."""
    ours = MODELS[model].architecture
    if not extras or not original or original == [ours]:
        return [ours]
    if any(_HOLDS.get(a) == ours for a in original):
        return list(original)
    return [ours] + [a for a in original if a != ours]


# Our model.hidden_act -> transformers' name (gelu_pytorch_tanh: the tanh approximation, torch's fast kernel),
# and the transformers names we import (gelu_new computes the same tanh approximation).
HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
FROM_HF_ACTIVATION = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def hf_config(cfg: EncoderConfig, pad_token_id: int, model: str = "mlm") -> dict:
    """A transformers BertConfig or ElectraConfig (as a config.json dict) for our EncoderConfig of the
    exported model (for ELECTRA: that tower's)."""
    spec = MODELS[model]
    if spec.model_type == "deberta-v2":
        return deberta_hf_config(cfg, pad_token_id, spec.architecture)
    sizes = {"embedding_size": cfg.embed_dim} if spec.model_type == "electra" else {}
    if spec.model_type == "roberta":
        check_roberta(cfg, pad_token_id)
    return {"architectures": [spec.architecture], "model_type": spec.model_type, **_shared_hf_config(cfg, pad_token_id),
            **sizes, "position_embedding_type": "absolute", "tie_word_embeddings": True, "dtype": "float32"}


def _shared_hf_config(cfg: EncoderConfig, pad_token_id: int) -> dict:
    """The config.json fields BertConfig, ElectraConfig, RobertaConfig and DebertaV2Config name alike."""
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": HF_ACTIVATION[cfg.hidden_act],
        "hidden_dropout_prob": cfg.hidden_dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
        "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": cfg.initializer_range,
        "layer_norm_eps": cfg.layer_norm_eps,
        "pad_token_id": int(pad_token_id),
    }


def check_roberta(cfg: EncoderConfig, pad_token_id: int) -> None:
    """Raises ValueError (one line) where Hugging Face's RoBERTa would compute something else than our model:
    its positions start at padding_idx + 1 = pad_token_id + 1, and its MLM head's GELU is the exact one."""
    if cfg.position_offset != pad_token_id + 1:
        raise ValueError(f"RobertaForMaskedLM reads positions from row pad_token_id + 1 = {pad_token_id + 1}, the "
                         f"model's position_offset is {cfg.position_offset}")
    if cfg.hidden_act != "gelu":
        raise ValueError(f"RobertaForMaskedLM's MLM head computes the exact GELU, the model's hidden_act is "
                         f"{cfg.hidden_act!r} (train RoBERTa with model.hidden_act='gelu')")


def encoder_config_kwargs(hf_config: dict, model_types: tuple[str, ...] = ("bert",)) -> dict:
    """EncoderConfig keyword arguments from a BERT config.json dict (or, where `model_types` admits
    "electra", an ELECTRA tower's, with its `embedding_size`); raises ValueError (one line) for an
    architecture our encoder cannot represent."""
    def refuse(why):
        raise ValueError(f"cannot import this model: {why}")

    model_type = hf_config.get("model_type", "bert")
    if model_type not in model_types:
        refuse(f"model_type={hf_config.get('model_type')!r} (only {' or '.join(map(repr, model_types))})")
    if hf_config.get("position_embedding_type", "absolute") != "absolute":
        refuse(f"position_embedding_type={hf_config['position_embedding_type']!r} (only 'absolute')")
    hidden_act = FROM_HF_ACTIVATION.get(hf_config.get("hidden_act", "gelu"))
    if hidden_act is None:
        refuse(f"hidden_act={hf_config['hidden_act']!r} (only the exact 'gelu' or its tanh approximation "
               f"{' / '.join(map(repr, list(FROM_HF_ACTIVATION)[1:]))})")
    for flag in ("is_decoder", "add_cross_attention"):
        if hf_config.get(flag):
            refuse(f"{flag}=true (only bidirectional encoders)")
    if not hf_config.get("tie_word_embeddings", True):
        refuse("tie_word_embeddings=false (our MLM decoder is tied to the word embeddings)")
    if model_type == "roberta":
        return roberta_config_kwargs(hf_config, refuse)
    # BERT has no embedding projection; ELECTRA's towers do (embeddings_project), so only there may the
    # embedding width differ from the hidden size.
    sizes = {}
    if model_type == "electra":
        sizes = {"embedding_size": int(hf_config.get("embedding_size", hf_config.get("hidden_size", 0)))}
    elif "embedding_size" in hf_config and hf_config["embedding_size"] != hf_config["hidden_size"]:
        refuse("embedding_size differs from hidden_size")
    try:
        return {
            **sizes,
            "vocab_size": int(hf_config["vocab_size"]),
            "hidden_size": int(hf_config["hidden_size"]),
            "num_layers": int(hf_config["num_hidden_layers"]),
            "num_heads": int(hf_config["num_attention_heads"]),
            "intermediate_size": int(hf_config["intermediate_size"]),
            "max_position_embeddings": int(hf_config.get("max_position_embeddings", 512)),
            "type_vocab_size": int(hf_config.get("type_vocab_size", 2)),
            "hidden_dropout": float(hf_config.get("hidden_dropout_prob", 0.1)),
            "attention_dropout": float(hf_config.get("attention_probs_dropout_prob", 0.1)),
            "layer_norm_eps": float(hf_config.get("layer_norm_eps", 1e-12)),
            "initializer_range": float(hf_config.get("initializer_range", 0.02)),
            "hidden_act": hidden_act,
        }
    except KeyError as e:
        refuse(f"config.json lacks {e.args[0]!r}")


def roberta_config_kwargs(hf_config: dict, refuse: Callable[[str], None]) -> dict:
    """EncoderConfig keyword arguments of a RoBERTa config.json: BERT's, with the positions starting after the
    padding id (position_offset = pad_token_id + 1) and the exact GELU that its MLM head always computes."""
    if hf_config.get("hidden_act", "gelu") != "gelu":
        refuse(f"hidden_act={hf_config['hidden_act']!r} (RoBERTa's MLM head computes the exact 'gelu'; the layers "
               "must too)")
    kwargs = encoder_config_kwargs({**hf_config, "model_type": "bert"}, ("bert",))
    kwargs["type_vocab_size"] = int(hf_config.get("type_vocab_size", 1))
    kwargs["layer_norm_eps"] = float(hf_config.get("layer_norm_eps", 1e-5))
    kwargs["position_offset"] = int(hf_config.get("pad_token_id", 1)) + 1
    return kwargs


def deberta_hf_config(cfg: EncoderConfig, pad_token_id: int, architecture: str) -> dict:
    """A transformers DebertaV2Config (config.json dict) for our relative-attention EncoderConfig."""
    return {
        "architectures": [architecture],
        "model_type": "deberta-v2",
        **_shared_hf_config(cfg, pad_token_id),
        "relative_attention": cfg.relative_attention,
        "position_buckets": cfg.position_buckets,
        "max_relative_positions": cfg.max_relative_positions,
        "pos_att_type": [t for t in cfg.pos_att_types] or None,
        "share_att_key": cfg.share_att_key,
        "norm_rel_ebd": cfg.norm_rel_ebd,
        "position_biased_input": cfg.position_biased_input,
        "pooler_hidden_size": cfg.hidden_size,
        "pooler_dropout": 0,
        "pooler_hidden_act": "gelu",
        "legacy": True,
        "tie_word_embeddings": True,
        "dtype": "float32",
    }


def deberta_config_kwargs(hf_config: dict) -> dict:
    """EncoderConfig keyword arguments from a DebertaV2Config dict; ValueError (one line) for what our encoder
    does not compute (a convolution layer, separate position projections, an embedding projection,
    attention_head_size other than hidden/heads)."""
    def refuse(why):
        raise ValueError(f"cannot import this model: {why}")

    if hf_config.get("conv_kernel_size", 0) > 0:
        refuse(f"conv_kernel_size={hf_config['conv_kernel_size']} (DeBERTa-v2-xlarge's convolution layer)")
    if hf_config.get("relative_attention") and not hf_config.get("share_att_key", False):
        refuse("share_att_key=false (separate position projections)")
    if hf_config.get("embedding_size", hf_config["hidden_size"]) != hf_config["hidden_size"]:
        refuse("embedding_size differs from hidden_size")
    if hf_config.get("attention_head_size", hf_config["hidden_size"] // hf_config["num_attention_heads"]) \
            != hf_config["hidden_size"] // hf_config["num_attention_heads"]:
        refuse("attention_head_size differs from hidden_size / num_attention_heads")
    if not hf_config.get("legacy", True):
        refuse("legacy=false (the lm_predictions MLM head; ours is the legacy cls.predictions one)")
    hidden_act = FROM_HF_ACTIVATION.get(hf_config.get("hidden_act", "gelu"))
    if hidden_act is None:
        refuse(f"hidden_act={hf_config['hidden_act']!r} (only gelu or its tanh approximation)")
    pos_att = hf_config.get("pos_att_type") or []
    if isinstance(pos_att, str):
        pos_att = pos_att.lower().split("|")
    if pos_att and not hf_config.get("relative_attention"):
        # transformers then scales the scores by the terms it does not compute; we scale by those we compute.
        refuse(f"pos_att_type={pos_att} without relative_attention")
    return {
        "vocab_size": int(hf_config["vocab_size"]),
        "hidden_size": int(hf_config["hidden_size"]),
        "num_layers": int(hf_config["num_hidden_layers"]),
        "num_heads": int(hf_config["num_attention_heads"]),
        "intermediate_size": int(hf_config["intermediate_size"]),
        "max_position_embeddings": int(hf_config.get("max_position_embeddings", 512)),
        "type_vocab_size": int(hf_config.get("type_vocab_size", 0)),
        "hidden_dropout": float(hf_config.get("hidden_dropout_prob", 0.1)),
        "attention_dropout": float(hf_config.get("attention_probs_dropout_prob", 0.1)),
        "layer_norm_eps": float(hf_config.get("layer_norm_eps", 1e-7)),
        "initializer_range": float(hf_config.get("initializer_range", 0.02)),
        "hidden_act": hidden_act,
        "relative_attention": bool(hf_config.get("relative_attention", False)),
        "position_buckets": int(hf_config.get("position_buckets", -1)),
        "max_relative_positions": int(hf_config.get("max_relative_positions", -1)),
        "pos_att_type": "|".join(t.strip() for t in pos_att if t.strip()),
        "share_att_key": bool(hf_config.get("share_att_key", False)) or not hf_config.get("relative_attention"),
        "norm_rel_ebd": str(hf_config.get("norm_rel_ebd", "none")).lower(),
        "position_biased_input": bool(hf_config.get("position_biased_input", True)),
    }
