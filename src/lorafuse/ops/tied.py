"""Tied layers: the layers a model reads from another layer's weight, which its checkpoint stores once.

With `tie_word_embeddings` (config.json) transformers ties a model's output layer to its input
embedding (`_tied_weights_keys`: output key -> the key it reads), and a checkpoint stores only the
embedding. Which layer that is depends on the architecture (config.json's `architectures`):
`lm_head` in decoder-only models, `cls.predictions.decoder` in BERT's masked-LM head, `proj_out` in
Whisper, ... An adapter that changes one of the two and not the other (a LoRA on the embedding, on
the output layer, or each its own) needs them apart: apply writes the output layer's weight under
the output layer's own name and sets tie_word_embeddings=false (`untie`), which unties every pair
the model ties (BERT's decoder bias too, also written).

Where the output layer's name comes from, first that answers: TIED_OUTPUTS (transformers 5.25's
`_tied_weights_keys` of the architectures whose tied output is not `lm_head`); none for a head
without a tied output (...ForSequenceClassification, ...); `lm_head` for a ...ForCausalLM /
...LMHeadModel / ...ForConditionalGeneration of a model type whose outputs are all `lm_head`;
transformers' own `_tied_weights_keys` of the architecture, when transformers 5 is installed; none
for a bare ...Model. A config without `architectures` falls back on its model_type: `lm_head`
unless the type is one whose output layer is named otherwise. Where none of
them tells (an unknown masked-LM head, no model_type), an adapter that changes the embedding of a
tied model is refused: lorafuse would have to guess the output layer's name.

Encoder-decoder models (T5, BART, ...: SHARED_EMBEDDING_TYPES) read one `shared` embedding in
their encoder, their decoder and (most) their output layer: three layers on one weight. An adapter
that changes one of those layers apart from the others is refused (untying them is not one
weight's copy: T5 also reads tie_word_embeddings for its output scaling); one on `shared` itself is
merged into it, which every reader then sees (as PEFT's merge_and_unload does).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from lorafuse._terminal import plural
from lorafuse.errors import LorafuseError, UnsupportedError

FindKey = Callable[[str], "str | None"]

EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
# the leaf names of input embeddings (the layers a tied output layer reads)
INPUT_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "shared", "tok_embeddings",
                    "word_embedding", "tokens_embed", "embeddings")


def _mlm(base: str, head: str = "cls.predictions", bias: bool = True) -> dict[str, str]:
    """A BERT-style masked-LM head: its decoder reads the word embeddings, its decoder bias the head's bias."""
    out = {f"{head}.decoder.weight": f"{base}.embeddings.word_embeddings.weight"}
    if bias:
        out[f"{head}.decoder.bias"] = f"{head}.bias"
    return out


# architecture -> {tied layer: the layer it reads}, for the architectures whose tied output layer is not `lm_head`
# (transformers 5.25 `_tied_weights_keys`; the seq2seq `shared` ties are SHARED_EMBEDDING_TYPES')
TIED_OUTPUTS: dict[str, dict[str, str]] = {
    **dict.fromkeys(("BertForMaskedLM", "BertForPreTraining", "BertLMHeadModel", "BigBirdForCausalLM",
                     "BigBirdForMaskedLM", "BigBirdForPreTraining", "MegatronBertForCausalLM",
                     "MegatronBertForMaskedLM", "MegatronBertForPreTraining"), _mlm("bert")),
    **dict.fromkeys(("DebertaForMaskedLM", "DebertaV2ForMaskedLM"), _mlm("deberta")),
    **dict.fromkeys(("ErnieForCausalLM", "ErnieForMaskedLM", "ErnieForPreTraining"), _mlm("ernie")),
    **dict.fromkeys(("FNetForMaskedLM", "FNetForPreTraining"), _mlm("fnet")),
    **dict.fromkeys(("MobileBertForMaskedLM", "MobileBertForPreTraining"), _mlm("mobilebert")),
    **dict.fromkeys(("RoCBertForCausalLM", "RoCBertForMaskedLM", "RoCBertForPreTraining"), _mlm("roc_bert")),
    **dict.fromkeys(("RoFormerForCausalLM", "RoFormerForMaskedLM"), _mlm("roformer")),
    "LayoutLMForMaskedLM": _mlm("layoutlm"), "MraForMaskedLM": _mlm("mra"), "NomicBertForMaskedLM": _mlm("nomic_bert"),
    "NystromformerForMaskedLM": _mlm("nystromformer"), "SqueezeBertForMaskedLM": _mlm("transformer"),
    "TapasForMaskedLM": _mlm("tapas"), "VisualBertForPreTraining": _mlm("visual_bert"), "YosoForMaskedLM": _mlm("yoso"),
    "LxmertForPreTraining": _mlm("lxmert", bias=False),
    **dict.fromkeys(("BlipForConditionalGeneration", "BlipForQuestionAnswering"),
                    _mlm("text_decoder.bert", "text_decoder.cls.predictions")),
    **dict.fromkeys(("AlbertForMaskedLM", "AlbertForPreTraining"), _mlm("albert", "predictions")),
    **dict.fromkeys(("CamembertForCausalLM", "CamembertForMaskedLM", "JinaEmbeddingsV3ForMaskedLM",
                     "RobertaForCausalLM", "RobertaForMaskedLM", "XLMRobertaForCausalLM", "XLMRobertaForMaskedLM",
                     "XLMRobertaXLForCausalLM", "XLMRobertaXLForMaskedLM", "XmodForCausalLM", "XmodForMaskedLM"),
                    _mlm("roberta", "lm_head")),
    **dict.fromkeys(("Data2VecTextForCausalLM", "Data2VecTextForMaskedLM"), _mlm("data2vec_text", "lm_head")),
    **dict.fromkeys(("RobertaPreLayerNormForCausalLM", "RobertaPreLayerNormForMaskedLM"),
                    _mlm("roberta_prelayernorm", "lm_head")),
    "BertGenerationDecoder": _mlm("bert", "lm_head"), "LongformerForMaskedLM": _mlm("longformer", "lm_head"),
    "MPNetForMaskedLM": _mlm("mpnet", "lm_head"), "EsmForMaskedLM": _mlm("esm", "lm_head", bias=False),
    "GteForMaskedLM": _mlm("gte", "lm_head", bias=False),
    **dict.fromkeys(("WhisperForConditionalGeneration", "WhisperForCausalLM", "MoonshineForConditionalGeneration",
                     "MoonshineStreamingForConditionalGeneration", "CanaryForConditionalGeneration",
                     "CohereAsrForConditionalGeneration"), {"proj_out.weight": "model.decoder.embed_tokens.weight"}),
    "DistilBertForMaskedLM": {"vocab_projector.weight": "distilbert.embeddings.word_embeddings.weight"},
    **dict.fromkeys(("ElectraForCausalLM", "ElectraForMaskedLM"),
                    {"generator_lm_head.weight": "electra.embeddings.word_embeddings.weight"}),
    "ConvBertForMaskedLM": {"generator_lm_head.weight": "convbert.embeddings.word_embeddings.weight"},
    **dict.fromkeys(("ModernBertForMaskedLM", "ModernBertDecoderForCausalLM"),
                    {"decoder.weight": "model.embeddings.tok_embeddings.weight"}),
    "BioGptForCausalLM": {"output_projection.weight": "biogpt.embed_tokens.weight"},
    "TrOCRForCausalLM": {"output_projection.weight": "model.decoder.embed_tokens.weight"},
    **dict.fromkeys(("FlaubertWithLMHeadModel", "XLMWithLMHeadModel"),
                    {"pred_layer.proj.weight": "transformer.embeddings.weight"}),
    "GPTNeoXJapaneseForCausalLM": {"embed_out.weight": "gpt_neox_japanese.embed_in.weight"},
    "GitForCausalLM": {"output.weight": "git.embeddings.word_embeddings.weight"},
    "Kosmos2ForConditionalGeneration": {"text_model.lm_head.weight": "text_model.model.embed_tokens.weight"},
    "RwkvForCausalLM": {"head.weight": "rwkv.embeddings.weight"},
    "SpeechT5ForSpeechToText": {"text_decoder_postnet.lm_head.weight": "speecht5.decoder.prenet.embed_tokens.weight"},
    "T5GemmaForConditionalGeneration": {"lm_head.out_proj.weight": "model.decoder.embed_tokens.weight"},
    "UltrabertForMaskedLM": {"head.decoder.weight": "model.embed_tokens.weight"},
    "XLNetLMHeadModel": {"lm_loss.weight": "transformer.word_embedding.weight"},
}
# model types whose encoder, decoder and output layer read one `<prefix>shared.weight`
SHARED_EMBEDDING_TYPES = frozenset({
    "t5", "mt5", "umt5", "longt5", "switch_transformers", "pop2piano", "bart", "mbart", "plbart", "mvp", "pegasus",
    "pegasus_x", "bigbird_pegasus", "blenderbot", "blenderbot-small", "led", "m2m_100", "nllb-moe"})
# model types some architecture of which has a tied output layer not named lm_head: without `architectures` in
# config.json, lorafuse cannot tell which head the checkpoint has
_OTHER_OUTPUT_TYPES = frozenset({
    "bert", "big_bird", "megatron-bert", "deberta", "deberta-v2", "ernie", "fnet", "mobilebert", "roc_bert",
    "roformer", "layoutlm", "mra", "nomic_bert", "nystromformer", "squeezebert", "tapas", "visual_bert", "yoso",
    "lxmert", "blip", "albert", "camembert", "jina_embeddings_v3", "roberta", "xlm-roberta", "xlm-roberta-xl", "xmod",
    "data2vec-text", "roberta-prelayernorm", "bert-generation", "longformer", "mpnet", "esm", "gte", "whisper",
    "moonshine", "moonshine_streaming", "canary", "cohere_asr", "distilbert", "electra", "convbert", "modernbert",
    "modernbert-decoder", "biogpt", "trocr", "flaubert", "xlm", "gpt_neox_japanese", "git", "kosmos-2", "rwkv",
    "speecht5", "t5gemma", "ultrabert", "xlnet", "luke", "funnel", "flava", "csm", "blt", "neomme", "udop",
    "seamless_m4t", "seamless_m4t_v2", "prophetnet", "fsmt", "granite_speech5_ctc", "t5gemma2"})
_LM_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")  # `lm_head` unless the table says otherwise
_NO_TIED_OUTPUT = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
                   "ForMultipleChoice", "ForImageClassification", "ForAudioClassification", "ForCTC",
                   "ForAudioFrameClassification", "ForXVector", "ForNextSentencePrediction", "EncoderModel")
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.]+\.(weight|bias)")


@dataclass
class TiedLayers:
    """What a checkpoint's model ties (keys as the checkpoint spells them, or, for a layer it does not store, as
    apply writes it)."""

    virtual: dict[str, str] = field(default_factory=dict)  # a tied layer the checkpoint does not store -> its source
    stored: dict[str, str] = field(default_factory=dict)  # a tied layer the checkpoint stores too -> its source
    unknown: str | None = None  # why the output layer tied to the embedding cannot be known (None: it can)
    model: str = "the model"  # the architecture, for messages


def _architecture(config: Mapping[str, object]) -> str | None:
    archs = config.get("architectures")
    return archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None


def _transformers_ties(arch: str) -> dict[str, str] | None:
    """transformers' own `_tied_weights_keys` of the architecture (5.x: a dict), plain parameter names only; None
    when transformers is not installed, does not know it, or is 4.x (a list of names, no sources)."""
    try:
        import transformers

        cls = getattr(transformers, arch, None)
    except Exception:  # not installed, or broken  # noqa: BLE001
        return None
    ties = getattr(cls, "_tied_weights_keys", None) if cls is not None else None
    if cls is None or not (ties is None or isinstance(ties, dict)):
        return None
    return {k: v for k, v in (ties or {}).items()
            if isinstance(k, str) and isinstance(v, str) and _PLAIN_KEY.fullmatch(k) and _PLAIN_KEY.fullmatch(v)}


def _declared(config: Mapping[str, object], arch: str | None) -> dict[str, str | None] | str:
    """The architecture's tied layers, {layer: the layer it reads, None for 'the one input embedding'}, or why
    they cannot be known."""
    model_type = config.get("model_type")
    if arch is not None:
        if arch in TIED_OUTPUTS:
            return dict(TIED_OUTPUTS[arch])
        if model_type in SHARED_EMBEDDING_TYPES or arch.endswith(_NO_TIED_OUTPUT):
            return {}
        lm_head = arch.endswith(_LM_HEADS) or arch.endswith("DoubleHeadsModel")
        if lm_head and model_type not in _OTHER_OUTPUT_TYPES:
            return {"lm_head.weight": None}  # (no import of transformers for the common case)
        known = _transformers_ties(arch)
        if known is not None:
            return dict(known)
        if arch.endswith("Model") and not arch.endswith(("HeadModel", "HeadsModel")):
            return {}
        return (f"lorafuse does not know which output layer {arch} ties to its input embedding (not in its table, "
                "nor in an installed transformers 5)")
    if not isinstance(model_type, str):
        return "config.json names neither the architecture nor the model_type"
    if model_type in SHARED_EMBEDDING_TYPES:
        return {}
    if model_type in _OTHER_OUTPUT_TYPES:
        return (f"config.json names no architecture, and {model_type!r} models name their tied output layer by "
                "their head (BERT's masked-LM head: cls.predictions.decoder)")
    return {"lm_head.weight": None}


def tied_layers(config: Mapping[str, object], keys: Collection[str], find: FindKey, tied: bool) -> TiedLayers:
    """The layers the checkpoint's model ties (`tied`: config.json's tie_word_embeddings, or its default); `find`
    maps a layer's name onto the checkpoint's key (ops.match's chain), None where it does not store it."""
    arch = _architecture(config)
    out = TiedLayers(model=arch or str(config.get("model_type") or "the model"))
    if not tied:
        return out
    declared = _declared(config, arch)
    if isinstance(declared, str):
        out.unknown = declared
        return out
    find = _quiet(find)
    embeddings = [k for k in keys if k.endswith(EMBEDDING_SUFFIXES)]
    for layer, source in declared.items():
        if source is None and len(embeddings) != 1 and arch is not None:  # not one input embedding: ask transformers
            source = (_transformers_ties(arch) or {}).get(layer)
        src = find(source) if source is not None else embeddings[0] if len(embeddings) == 1 else None
        stored = find(layer)
        if src is None:
            if stored is None and layer.endswith(".weight"):
                found = "" if source is not None else f" ({plural(len(embeddings), 'candidate')})"
                out.unknown = (f"{out.model} ties {layer} to {source or 'the input embedding'}, which lorafuse does "
                               f"not find in the checkpoint{found}")
            continue
        (out.stored if stored is not None else out.virtual)[stored or layer] = src
    if config.get("model_type") in SHARED_EMBEDDING_TYPES:
        _shared(out, keys, find, arch)
    return out


def _quiet(find: FindKey) -> FindKey:
    """`find`, with a name that matches several keys taken as not found (that layer is not one key)."""
    def quiet(name: str) -> str | None:
        try:
            return find(name)
        except LorafuseError:
            return None
    return quiet


def _shared(out: TiedLayers, keys: Collection[str], find: FindKey, arch: str | None) -> None:
    """The encoder's and decoder's embed_tokens (and the output layer) that read `<prefix>shared.weight`."""
    shared = [k for k in keys if k == "shared.weight" or k.endswith(".shared.weight")]
    if len(shared) != 1:
        return
    prefix = shared[0][: -len("shared.weight")]
    readers = [f"{prefix}encoder.embed_tokens.weight", f"{prefix}decoder.embed_tokens.weight"]
    if arch is None or arch.endswith(_LM_HEADS):
        readers.append("lm_head.weight")
    for layer in readers:
        stored = find(layer)
        (out.stored if stored is not None else out.virtual)[stored or layer] = shared[0]


def _is_input_embedding(key: str) -> bool:
    return key.endswith(".weight") and key[: -len(".weight")].rsplit(".", 1)[-1] in INPUT_EMBEDDINGS


def untie(tied: TiedLayers, changed: Mapping[str, str]) -> dict[str, str] | None:
    """The tied layers apply writes apart (layer -> the stored key it copies) when the adapters' changes
    (`changed`: base key -> who changes it, for messages) need the model untied; None when they do not.
    Refused (UnsupportedError): a change that needs the output layer's name where it cannot be known, and one to
    a layer that reads a weight several layers share (T5 / BART `shared`)."""
    if tied.unknown is not None:
        emb = next((k for k in changed if _is_input_embedding(k)), None)
        if emb is not None:
            raise UnsupportedError(
                f"{changed[emb]} changes {emb!r}, the input embedding, and config.json ties the model's output layer "
                f"to it (tie_word_embeddings), but {tied.unknown}: lorafuse cannot tell which layer to write apart "
                "(its name depends on the architecture), and merged into the embedding the change would reach the "
                "output layer too, which the adapter leaves unchanged. Give the base folder a config.json with its "
                "architectures entry (as save_pretrained writes it)")
        return None
    readers: dict[str, list[str]] = {}
    for layer, src in {**tied.virtual, **tied.stored}.items():
        readers.setdefault(src, []).append(layer)
    need = False
    for src, layers in readers.items():
        hit = [t for t in layers if t in changed]
        if len(layers) > 1:  # `shared`: a change to it is merged into it, for every reader (as PEFT's merge)
            if hit:
                others = [t for t in layers if t != hit[0]]
                raise UnsupportedError(
                    f"{changed[hit[0]]} changes {hit[0]!r}, which {tied.model} ties to {src!r} together with "
                    f"{_listed(others)}: merged into {src!r} the change would reach those layers too, while the "
                    f"adapter changes {hit[0]!r} alone, and lorafuse does not untie a weight several layers share "
                    "(T5 also reads tie_word_embeddings for its output scaling). PEFT's merge_and_unload merges it "
                    f"into {src!r}, for all of them")
            continue
        need = need or bool(hit) or src in changed
    if not need:
        return None
    several = next((src for src, layers in readers.items() if len(layers) > 1), None)
    if several is not None:
        first = next(k for k in changed if k in readers or any(k in ls for ls in readers.values()))
        raise UnsupportedError(
            f"{changed[first]} changes {first!r}, and the merged model needs it apart from the layer tied to it "
            f"(tie_word_embeddings=false), which would also untie the layers that read {several!r} "
            f"({_listed(readers[several])}): lorafuse does not untie a weight several layers share")
    return dict(tied.virtual)


def _listed(keys: list[str]) -> str:
    return ", ".join(repr(k) for k in keys[:-1]) + (" and " if len(keys) > 1 else "") + repr(keys[-1]) if keys else ""
