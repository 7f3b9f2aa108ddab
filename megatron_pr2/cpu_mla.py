# CPU mode for Megatron-Core's Multi-Latent Attention (MLA, DeepSeek-V2/V3) without Transformer
# Engine: the patches megatron_pr2.cpu.apply_cpu_patches() applies for MLA.
#
# Megatron builds MLA with Transformer Engine's attention and linears; on a machine without TE
# (every CPU machine) the local spec (`get_gpt_decoder_block_spec(..., use_transformer_engine=
# False)` with `multi_latent_attention=True`) fails at construction in two places:
#   a. MLASelfAttention passes `k_channels` (qk_head_dim + qk_pos_emb_head_dim) and `v_channels`
#      (v_head_dim) to its core attention. Only TE's attention takes them; the local
#      DotProductAttention rejects them (TypeError), and it sizes its output as
#      kv_channels * heads, which is wrong when v_head_dim != kv_channels. Its math already
#      works for any head dims (its views use -1), so the patch accepts the two arguments and
#      sizes the output from v_channels. MLA always passes its own softmax_scale.
#   b. megatron-core 0.16: `isinstance(self.linear_proj, TELinear)` in MLA's __init__, where the
#      TE extension module left TELinear a MagicMock (not a type) -> TypeError. The patch binds
#      the module's TELinear name to a class nothing is an instance of (TE is absent, so no
#      linear can be a TELinear).
# Nothing is patched unless apply_cpu_patches() runs (never on a CUDA machine). Shapes: none.

import functools
from typing import Any, Callable, List, Optional, Tuple

__all__ = ["mla_patches"]


class _NoTransformerEngineLinear:
    """Stands in for TELinear where Transformer Engine is absent: no module is an instance."""


def _make_dot_product_attention_init(original: Callable) -> Callable:
    """DotProductAttention.__init__ that accepts MLA's k_channels / v_channels (patch a)."""

    @functools.wraps(original)
    def init(
        self: Any,
        *args: Any,
        k_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        original(self, *args, **kwargs)
        if v_channels is not None:
            # The context is [sq, b, heads_per_partition * v_head_dim]; the query/key head dim
            # (k_channels) is read from the tensors.
            self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    return init


def mla_patches() -> List[Tuple[Any, str, Any]]:
    """(owner, attribute, new value) of every MLA patch this megatron-core release needs."""
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    patches: List[Tuple[Any, str, Any]] = [
        (
            DotProductAttention,
            "__init__",
            _make_dot_product_attention_init(DotProductAttention.__dict__["__init__"]),
        )
    ]
    if not isinstance(multi_latent_attention.__dict__.get("TELinear"), type):
        patches.append((multi_latent_attention, "TELinear", _NoTransformerEngineLinear))
    return patches
