# MoE-layer numbering: global MoE-layer ids (the columns of a canonical RouteBatch) and the
# ones a pipeline (virtual) stage holds (get_transformer_layer_offset / get_num_layers_to_build,
# or the custom pipeline layout), MTP layers after the decoder's.

import copy
from types import SimpleNamespace
from typing import Any, List, Optional, Sequence, Union

import torch


def moe_layer_pattern(config: Any) -> List[int]:
    """1/0 per transformer layer (0-based) from config.moe_layer_freq, as Megatron's GPT spec
    builder parses it: an int f means every f-th layer starting at layer 0; a list is the
    pattern itself (dense first layers: [0, 0, 1, 1, ...])."""
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        if freq < 1:
            raise ValueError(f"moe_layer_freq={freq} must be >= 1")
        return [1 if i % freq == 0 else 0 for i in range(config.num_layers)]
    if isinstance(freq, (list, tuple)):
        if len(freq) != config.num_layers or any(x not in (0, 1) for x in freq):
            raise ValueError(
                f"moe_layer_freq has {len(freq)} entries {list(freq)}: it must be a 0/1 list of "
                f"num_layers={config.num_layers} entries"
            )
        return [int(x) for x in freq]
    raise ValueError(f"moe_layer_freq={freq!r} must be an int or a list")


def _decoder_layers_of_stage(config: Any, pp_rank: int, vp_stage: Optional[int]) -> range:
    """0-based global transformer-layer numbers built by (pp_rank, vp_stage)."""
    layout = getattr(config, "pipeline_model_parallel_layout", None)
    if layout is not None and not isinstance(layout, (str, list)):
        # PipelineParallelLayerLayout.get_layer_offset reads the *global* virtual-pipeline world
        # size from parallel_state (and forces vp_stage=0 when it is unset), so read the layout
        # table directly: offset = decoders of all earlier (vp, pp) stages, vp-major.
        from megatron.core.transformer.enums import LayerType

        vp = 0 if vp_stage is None else vp_stage
        table = layout.layout
        offset = sum(
            table[p][v].count(LayerType.decoder)
            for v in range(vp + 1)
            for p in range(layout.pipeline_model_parallel_size if v < vp else pp_rank)
        )
        return range(offset, offset + table[pp_rank][vp].count(LayerType.decoder))
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return range(
        offset, offset + get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    )


def _stage_has_mtp(
    config: Any, pp_rank: int, pp_size: int, vp_stage: Optional[int], vp_size: Optional[int]
) -> bool:
    layout = getattr(config, "pipeline_model_parallel_layout", None)
    if layout is not None and not isinstance(layout, (str, list)):
        from megatron.core.transformer.enums import LayerType

        return layout.layout[pp_rank][0 if vp_stage is None else vp_stage].count(LayerType.mtp) > 0
    last_vp = vp_size is None or vp_stage == vp_size - 1
    return pp_rank == pp_size - 1 and last_vp


def moe_layer_ids(
    config: Any,
    pp_rank: int,
    pp_size: int,
    vp_stage: Optional[int] = None,
    vp_size: Optional[int] = None,
    *,
    include_mtp: bool = False,
) -> torch.Tensor:
    """Global MoE-layer ids (0-based, in model order) held by one pipeline (virtual) stage.

    Args:
        config: the model's TransformerConfig (num_layers, moe_layer_freq, uneven-PP fields,
            pipeline_model_parallel_layout, account_for_*_in_pipeline_split).
        pp_rank, pp_size: pipeline stage and pipeline size (may differ from the config's, e.g.
            to re-shard routes recorded under another layout; not with a custom layout).
        vp_stage, vp_size: virtual pipeline stage and size (interleaved schedule), or None.
        include_mtp: also return the ids of multi-token-prediction layers held by this stage
            (numbered after the decoder's MoE layers, see global_moe_layer_id).

    Returns:
        int64 tensor [L_stage].
    """
    if pp_size < 1 or not 0 <= pp_rank < pp_size:
        raise ValueError(f"moe_layer_ids: pp_rank={pp_rank} not in [0, pp_size={pp_size})")
    if vp_size is not None and vp_size > 1:
        if vp_stage is None or not 0 <= vp_stage < vp_size:
            raise ValueError(f"moe_layer_ids: vp_stage={vp_stage} not in [0, vp_size={vp_size})")
    else:
        if vp_stage not in (None, 0):
            raise ValueError(f"moe_layer_ids: vp_stage={vp_stage} given without vp_size > 1")
        vp_size, vp_stage = None, None
    cfg_vp = config.virtual_pipeline_model_parallel_size
    cfg_vp = cfg_vp if cfg_vp is not None and cfg_vp > 1 else None
    if config.pipeline_model_parallel_size != pp_size or cfg_vp != vp_size:
        if getattr(config, "pipeline_model_parallel_layout", None) is not None:
            raise ValueError(
                f"moe_layer_ids: pp_size={pp_size}, vp_size={vp_size} differ from the config's "
                f"custom pipeline_model_parallel_layout ({config.pipeline_model_parallel_size}, "
                f"{cfg_vp})"
            )
        # Shallow copy: TransformerConfig.__post_init__ is not re-run, only the sizes change.
        config = copy.copy(config)
        config.pipeline_model_parallel_size = pp_size
        config.virtual_pipeline_model_parallel_size = vp_size
    pattern = moe_layer_pattern(config)
    moe_id = torch.cumsum(torch.tensor(pattern, dtype=torch.int64), 0) - 1
    layers = [
        layer for layer in _decoder_layers_of_stage(config, pp_rank, vp_stage) if pattern[layer]
    ]
    ids = (
        moe_id[torch.tensor(layers, dtype=torch.int64)]
        if layers
        else torch.empty(0, dtype=torch.int64)
    )
    if include_mtp and (getattr(config, "mtp_num_layers", None) or 0) > 0:
        if _stage_has_mtp(config, pp_rank, pp_size, vp_stage, vp_size):
            first = sum(pattern)
            ids = torch.cat([ids, torch.arange(first, first + config.mtp_num_layers)])
    return ids


def global_moe_layer_id(config: Any, layer_number: int) -> int:
    """Global MoE-layer id (0-based) of Megatron's global 1-based `layer_number`.

    Decoder layers: the rank of the layer among the MoE layers of moe_layer_freq. Multi-token
    prediction layers (layer_number = num_layers + j, j = 1..mtp_num_layers, as Megatron numbers
    the MTP block's transformer layer) follow them: num_moe_decoder_layers + j - 1.
    """
    pattern = moe_layer_pattern(config)
    num_layers = config.num_layers
    mtp = getattr(config, "mtp_num_layers", None) or 0
    if 1 <= layer_number <= num_layers:
        if not pattern[layer_number - 1]:
            raise ValueError(
                f"global_moe_layer_id: layer_number={layer_number} is a dense layer per "
                f"moe_layer_freq={config.moe_layer_freq}"
            )
        return sum(pattern[: layer_number - 1])
    if num_layers < layer_number <= num_layers + mtp:
        return sum(pattern) + layer_number - num_layers - 1
    raise ValueError(
        f"global_moe_layer_id: layer_number={layer_number} outside 1..num_layers + "
        f"mtp_num_layers={num_layers + mtp}"
    )


def moe_layer_numbers(
    num_layers: int,
    moe_layer_freq: Union[int, Sequence[int]] = 1,
    mtp_num_layers: Optional[int] = None,
) -> List[int]:
    """1-based transformer layer numbers of the MoE layers, indexed by global MoE-layer id.

    Multi-token-prediction layers follow the decoder (layer number num_layers + j, MoE-layer id
    after the decoder's), as Megatron numbers them and moe_layer_ids counts them.
    """
    mtp = [num_layers + j for j in range(1, (mtp_num_layers or 0) + 1)]
    config = SimpleNamespace(num_layers=num_layers, moe_layer_freq=moe_layer_freq)
    return [i + 1 for i, is_moe in enumerate(moe_layer_pattern(config)) if is_moe] + mtp
