"""The two weight converters the project needs; everything else loads by name.

- OpenCLIP (SD2's text encoder in the official single files) -> transformers' CLIPTextModel.
- diffusers-format folders (unet/, vae/, text_encoder/) -> the LDM names our modules use.

Each is a list of rename rules applied to every key, to check against diffusers' own tables
(see docs/loading.md).
"""
import re


def rename_key(key, rules):
    """Apply the first matching (pattern, replacement) rule; keys no rule matches are kept."""
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def openclip_to_hf(state, layers, projection=0):
    """OpenCLIP text-tower keys (`cond_stage_model.model.` or SDXL's
    `conditioner.embedders.1.model.` stripped) -> CLIPTextModel keys (`text_model.` prefix).
    Blocks from index `layers` on are dropped (SD2 runs 23 of 24), and the unused `logit_scale`;
    `text_projection` ([width, projection], applied as x @ P) becomes CLIPTextModelWithProjection's
    Linear weight P^T when `projection` (SDXL's pooled embedding), else it is dropped (SD2)."""
    split = {}
    for key, value in state.items():
        m = re.match(r"transformer\.resblocks\.(\d+)\.", key)
        if key == "text_projection" and projection:
            split["text_projection.weight"] = value.T.contiguous()
            continue
        if m and int(m[1]) >= layers or key in ("text_projection", "logit_scale"):
            continue
        if m and key.endswith(("attn.in_proj_weight", "attn.in_proj_bias")):
            # fused rows [q; k; v] -> three projections
            kind = key.rsplit("_", 1)[1]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0),
                                  strict=True):
                split[f"{m[0]}attn.{name}.{kind}"] = part
        else:
            split[key] = value
    layer = r"text_model.encoder.layers.\1."
    rules = [
        (r"^text_projection\.weight$", "text_projection.weight"),
        (r"^token_embedding\.weight$", "text_model.embeddings.token_embedding.weight"),
        (r"^positional_embedding$", "text_model.embeddings.position_embedding.weight"),
        (r"^ln_final\.", "text_model.final_layer_norm."),
        (r"^transformer\.resblocks\.(\d+)\.attn\.", layer + "self_attn."),
        (r"^transformer\.resblocks\.(\d+)\.ln_1\.", layer + "layer_norm1."),
        (r"^transformer\.resblocks\.(\d+)\.ln_2\.", layer + "layer_norm2."),
        (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", layer + "mlp.fc1."),
        (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", layer + "mlp.fc2."),
    ]
    return {rename_key(k, rules): v for k, v in split.items()}


# inside a diffusers resnet -> inside an LDM ResBlock
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def diffusers_unet_to_ldm(state):
    """diffusers UNet2DConditionModel keys -> UNetModel keys (SD1, SD2, SDXL).

    diffusers groups by level (down_blocks.i holds resnets.j, attentions.j, downsamplers.0);
    LDM numbers the blocks consecutively, num_res_blocks + 1 per level. Both numbers that the
    renaming needs come from the keys themselves: num_res_blocks from down_blocks.0's resnets, and
    which up levels have transformers (their upsampler comes after it)."""
    per_level = 2 + max((int(m[1]) for k in state
                         if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))), default=0)
    with_attention = {int(m[1]) for k in state
                      if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}

    def up_sampler(i):  # after the ResBlock, and after the transformer if the level has one
        return 2 if i in with_attention else 1

    rules = [
        (r"^conv_in\.", "input_blocks.0.0."),
        (r"^time_embedding\.linear_1\.", "time_embed.0."),
        (r"^time_embedding\.linear_2\.", "time_embed.2."),
        (r"^add_embedding\.linear_1\.", "label_emb.0.0."),   # SDXL's added conditioning
        (r"^add_embedding\.linear_2\.", "label_emb.0.2."),
        (r"^down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.",
         lambda m: f"input_blocks.{per_level * int(m[1]) + int(m[2]) + 1}.0.{UNET_RESNET[m[3]]}."),
        (r"^down_blocks\.(\d+)\.attentions\.(\d+)\.",
         lambda m: f"input_blocks.{per_level * int(m[1]) + int(m[2]) + 1}.1."),
        (r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.",
         lambda m: f"input_blocks.{per_level * (int(m[1]) + 1)}.0.op."),
        (r"^mid_block\.resnets\.(\d+)\.(\w+)\.",
         lambda m: f"middle_block.{2 * int(m[1])}.{UNET_RESNET[m[2]]}."),
        (r"^mid_block\.attentions\.0\.", "middle_block.1."),
        (r"^up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.",
         lambda m: f"output_blocks.{per_level * int(m[1]) + int(m[2])}.0.{UNET_RESNET[m[3]]}."),
        (r"^up_blocks\.(\d+)\.attentions\.(\d+)\.",
         lambda m: f"output_blocks.{per_level * int(m[1]) + int(m[2])}.1."),
        (r"^up_blocks\.(\d+)\.upsamplers\.0\.",
         lambda m: f"output_blocks.{per_level * int(m[1]) + per_level - 1}."
                   f"{up_sampler(int(m[1]))}."),
        (r"^conv_norm_out\.", "out.0."),
        (r"^conv_out\.", "out.2."),
    ]
    return {rename_key(k, rules): v for k, v in state.items()}


# diffusers' VAE mid attention (current and pre-0.14 names) -> LDM's AttnBlock
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "query": "q", "to_k": "k", "key": "k",
                 "to_v": "v", "value": "v", "to_out.0": "proj_out", "proj_attn": "proj_out"}


def diffusers_vae_to_ldm(state, cfg):
    """diffusers AutoencoderKL keys -> AutoencoderKL (decoder-only) keys; encoder keys dropped.
    Decoder levels are numbered in reverse (diffusers up_blocks.0 = LDM up.3). Attention
    projections are Linear [C, C] in diffusers and 1x1 convs [C, C, 1, 1] here."""
    last = len(cfg.ch_mult) - 1
    shortcut = lambda name: "nin_shortcut" if name == "conv_shortcut" else name  # noqa: E731
    rules = [
        (r"^decoder\.mid_block\.resnets\.(\d+)\.(\w+)\.",
         lambda m: f"decoder.mid.block_{int(m[1]) + 1}.{m[2]}."),
        (r"^decoder\.mid_block\.attentions\.0\.(\w+?(?:\.0)?)\.",
         lambda m: f"decoder.mid.attn_1.{VAE_ATTENTION[m[1]]}."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.",
         lambda m: f"decoder.up.{last - int(m[1])}.block.{m[2]}.{shortcut(m[3])}."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
         lambda m: f"decoder.up.{last - int(m[1])}.upsample."),
        (r"^decoder\.conv_norm_out\.", "decoder.norm_out."),
    ]
    out = {}
    for key, value in state.items():
        if key.startswith(("encoder.", "quant_conv.")):
            continue
        key = rename_key(key, rules)
        if ".attn_1." in key and value.ndim == 2:
            value = value[:, :, None, None]
        out[key] = value
    return out
