# EngineLayout: which columns of an inference engine's route arrays are MoE layers.
#
# vLLM and SGLang record routes in a [tokens, num_hidden_layers, k] buffer that covers every
# transformer layer and is zero-initialised; only MoE layers write their top-k, so dense layers
# (DeepSeek's first_k_dense_replace, Qwen's mlp_only_layers / decoder_sparse_step, Megatron's
# moe_layer_freq) read back as the fill value 0. A RouteBatch holds MoE layers only: column j is
# the j-th MoE layer, which is Megatron's global MoE-layer id j. This module derives the MoE
# columns from the model config (Hugging Face config.json or Megatron's TransformerConfig) so
# that nobody has to list them by hand.

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Tuple

__all__ = ["EngineLayout"]

# Families whose every decoder layer is an MoE layer (no dense-layer field in their config).
_ALL_MOE_MODEL_TYPES = ("mixtral", "olmoe", "phimoe", "gpt_oss", "minimax", "grok-1")


def _get(config: Any, name: str, default: Any = None) -> Any:
    """A field of a Hugging Face config object or config.json dict."""
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def _text_config(config: Any) -> Any:
    """The language-model part of a (possibly multimodal) Hugging Face config."""
    text = _get(config, "text_config")
    return config if text is None or _get(config, "num_hidden_layers") is not None else text


@dataclass(frozen=True)
class EngineLayout:
    """The shape of an engine's per-token route array and which of its layers are MoE layers."""

    num_layers: int
    """Transformer layers the engine reports per token: the second axis of its
    [tokens, num_layers, k] arrays (the Hugging Face config's num_hidden_layers)."""

    moe_layers: Tuple[int, ...]
    """0-based indices (ascending) of the MoE layers among those columns. RouteBatch column j holds
    layer moe_layers[j]; every other column is a dense layer and must hold `fill_value`."""

    num_experts: int
    """Routed experts E per MoE layer (logical ids 0..E-1; shared experts are not routed)."""

    topk: int
    """Experts per token k (num_experts_per_tok / moe_router_topk)."""

    fill_value: int = 0
    """What the engine writes where no route was recorded: dense-layer columns, and the padding
    rows of verl-style batches. vLLM, SGLang and verl all zero-initialise their buffers."""

    def __post_init__(self) -> None:
        moe = tuple(int(i) for i in self.moe_layers)
        object.__setattr__(self, "moe_layers", moe)
        if self.num_layers < 1:
            raise ValueError(f"EngineLayout num_layers={self.num_layers}: must be >= 1")
        if not moe:
            raise ValueError("EngineLayout moe_layers=(): the model has no MoE layer")
        if list(moe) != sorted(set(moe)) or moe[0] < 0 or moe[-1] >= self.num_layers:
            raise ValueError(
                f"EngineLayout moe_layers={moe}: must be distinct ascending layer indices in "
                f"[0, num_layers={self.num_layers})"
            )
        if self.num_experts < 1:
            raise ValueError(f"EngineLayout num_experts={self.num_experts}: must be >= 1")
        if not 1 <= self.topk <= self.num_experts:
            raise ValueError(
                f"EngineLayout topk={self.topk}: must be in [1, num_experts={self.num_experts}]"
            )

    @property
    def dense_layers(self) -> Tuple[int, ...]:
        """Indices of the dense layers (columns the engine fills with `fill_value`)."""
        moe = set(self.moe_layers)
        return tuple(i for i in range(self.num_layers) if i not in moe)

    @classmethod
    def from_hf_config(cls, config: Any) -> "EngineLayout":
        """Layout from a Hugging Face config (a transformers config object or config.json dict).

        MoE layers follow the modeling code of each family: DeepSeek-V2/V3 (and Kimi-K2, GLM-4.5
        style configs) `i >= first_k_dense_replace and i % moe_layer_freq == 0`; Qwen2/Qwen3-MoE
        `i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0`; Mixtral, OLMoE and
        other all-MoE families every layer. Other families raise: build EngineLayout directly.
        """
        config = _text_config(config)
        num_layers = _get(config, "num_hidden_layers")
        if num_layers is None:
            raise ValueError("EngineLayout.from_hf_config: the config has no num_hidden_layers")
        num_layers = int(num_layers)
        experts = None
        for name in ("n_routed_experts", "num_experts", "num_local_experts"):
            experts = _get(config, name)
            if experts is not None:
                break
        topk = _get(config, "num_experts_per_tok")
        model_type = _get(config, "model_type")
        if experts is None or topk is None:
            raise ValueError(
                f"EngineLayout.from_hf_config: model_type={model_type!r} has no "
                "n_routed_experts/num_experts/num_local_experts and num_experts_per_tok fields; "
                "is it an MoE model?"
            )
        layers = range(num_layers)
        if _get(config, "first_k_dense_replace") is not None:
            first_dense = int(_get(config, "first_k_dense_replace"))
            freq = int(_get(config, "moe_layer_freq", 1) or 1)
            moe = [i for i in layers if i >= first_dense and i % freq == 0]
        elif (
            _get(config, "decoder_sparse_step") is not None
            or _get(config, "mlp_only_layers") is not None
        ):
            step = int(_get(config, "decoder_sparse_step", 1) or 1)
            dense = {int(i) for i in (_get(config, "mlp_only_layers") or ())}
            moe = [i for i in layers if i not in dense and (i + 1) % step == 0]
        elif model_type in _ALL_MOE_MODEL_TYPES or _get(config, "num_local_experts") is not None:
            moe = list(layers)
        else:
            raise ValueError(
                f"EngineLayout.from_hf_config: model_type={model_type!r} is not a family whose "
                "dense layers this module knows (DeepSeek first_k_dense_replace, Qwen "
                "mlp_only_layers/decoder_sparse_step, all-MoE Mixtral/OLMoE); build "
                "EngineLayout(num_layers=..., moe_layers=..., num_experts=..., topk=...) directly"
            )
        return cls(num_layers, tuple(moe), int(experts), int(topk))

    @classmethod
    def from_megatron_config(
        cls, config: Any, moe_layer_freq: Optional[Sequence[int]] = None
    ) -> "EngineLayout":
        """Layout from a Megatron-Core TransformerConfig (num_layers, moe_layer_freq,
        num_moe_experts, moe_router_topk): layer i is MoE when moe_layer_freq[i] == 1 (list)
        or i % moe_layer_freq == 0 (int), as in Megatron's decoder block spec."""
        freq = config.moe_layer_freq if moe_layer_freq is None else moe_layer_freq
        num_layers = int(config.num_layers)
        if isinstance(freq, int):
            moe = [i for i in range(num_layers) if i % freq == 0]
        elif isinstance(freq, (list, tuple)) and len(freq) == num_layers:
            moe = [i for i, flag in enumerate(freq) if int(flag) == 1]
        else:
            raise ValueError(
                f"EngineLayout.from_megatron_config: moe_layer_freq={freq!r} must be an int or a "
                f"list of num_layers={num_layers} 0/1 flags"
            )
        if not config.num_moe_experts:
            raise ValueError(
                f"EngineLayout.from_megatron_config: num_moe_experts={config.num_moe_experts} "
                "(not an MoE model)"
            )
        return cls(num_layers, tuple(moe), int(config.num_moe_experts), int(config.moe_router_topk))

    @classmethod
    def from_config(cls, config: Any) -> "EngineLayout":
        """from_megatron_config for a TransformerConfig (it has num_moe_experts), else
        from_hf_config."""
        if not isinstance(config, Mapping) and hasattr(config, "num_moe_experts"):
            return cls.from_megatron_config(config)
        return cls.from_hf_config(config)
