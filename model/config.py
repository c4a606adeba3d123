"""Architecture presets for Stable Diffusion 1.x / 2.x / XL as small dataclasses.

The numbers are those of the official inference configs (LDM's v1-inference.yaml,
v2-inference.yaml and v2-inference-v.yaml, generative-models' sd_xl_base.yaml). `TINY` (SD1-like)
and `TINY_SD2` (SD2-like: linear projections, 16-channel heads, OpenCLIP-style text encoder padded
with 0) keep the exact structure (12 input blocks, 12 output blocks, transformers at the top three
levels) with few channels, so tests and offline runs exercise every code path in seconds;
`TINY_SDXL` does the same for SDXL's (9 input and 9 output blocks, no transformer at the top level,
two text encoders, the added conditioning).
"""
import json
from dataclasses import asdict, dataclass, replace

# what the UNet outputs: the noise (SD1, SD2-512) or v = √ᾱ·eps − √(1−ᾱ)·x0 (SD2-768)
PREDICTIONS = ("eps", "v")


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple = (0, 1, 2)  # levels with a SpatialTransformer (LDM: 4,2,1)
    transformer_depth: int | tuple = 1   # blocks per SpatialTransformer: one, or one per level
    transformer_depth_middle: int = 1    # ... in the middle block's
    adm_in_channels: int = 0             # width of the added conditioning y (SDXL); 0: none
    num_heads: int = 8                   # SD1: fixed head count ...
    head_channels: int = 0               # ... SD2: fixed head width (64); 0 = use num_heads
    context_dim: int = 768
    linear_proj: bool = False            # SD2 uses Linear proj_in/proj_out, SD1 1x1 convs
    upcast_attention: bool = False       # SD2's attention logits overflow fp16: compute it in fp32

    def transformer_depth_at(self, level):
        """Transformer blocks per SpatialTransformer at resolution `level` (0: none)."""
        if level not in self.attention_levels:
            return 0
        depth = self.transformer_depth
        return depth if isinstance(depth, int) else depth[level]

    def heads(self, channels):
        """(number of heads, head width) of a transformer with `channels` channels."""
        if self.head_channels:
            return channels // self.head_channels, self.head_channels
        return self.num_heads, channels // self.num_heads


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    out_ch: int = 3
    in_ch: int = 3
    force_upcast: bool = False   # decode in fp32 when the model runs in fp16 (SDXL's VAE overflows)

    @property
    def factor(self):
        """Pixels per latent position along each side: one x2 resampling between levels (SD: 8)."""
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextConfig:
    width: int = 768
    layers: int = 12             # layers that are run (SD2 stops one before OpenCLIP's last)
    heads: int = 12
    mlp: int = 3072
    act: str = "quick_gelu"      # OpenAI CLIP (SD1): quick_gelu; OpenCLIP ViT-H (SD2): gelu
    pad_id: int = 49407          # SD1 pads with <|endoftext|>, SD2 (open_clip.tokenize) with 0
    vocab_size: int = 49408
    max_length: int = 77         # tokens per prompt, <|startoftext|> and <|endoftext|> included
    bos_id: int = 49406          # <|startoftext|> and <|endoftext|> in the tokenizer's vocabulary
    eos_id: int = 49407
    layer: str = "last"          # the context: "last" (after the final norm) or "penultimate"
    projection: int = 0          # pooled output's width through text_projection (bigG: 1280)


TEXT_LAYERS = ("last", "penultimate")


@dataclass(frozen=True)
class SDConfig:
    version: str                 # "sd1" | "sd2" | "sdxl"
    prediction: str              # "eps" | "v"
    unet: UNetConfig
    vae: VAEConfig
    text: TextConfig
    scale_factor: float = 0.18215
    image_size: int = 512        # native resolution in pixels
    guidance: float = 7.5        # recommended classifier-free guidance scale
    text2: TextConfig | None = None   # SDXL's second text encoder (bigG): contexts concatenated
    force_zeros_for_empty_prompt: bool = False   # SDXL: an empty negative prompt embeds to 0

    @property
    def size_embed_dim(self):
        """Width of the Fourier embedding of each of the six size and crop ids in SDXL's y (256),
        after the pooled text embedding: adm_in_channels = projection + 6 * this."""
        return (self.unet.adm_in_channels - self.text2.projection) // 6 if self.text2 else 0


SD1 = SDConfig("sd1", "eps", UNetConfig(), VAEConfig(), TextConfig())

SD2 = SDConfig(
    "sd2", "eps",
    UNetConfig(head_channels=64, context_dim=1024, linear_proj=True, upcast_attention=True),
    VAEConfig(),
    TextConfig(width=1024, layers=23, heads=16, mlp=4096, act="gelu", pad_id=0),
    guidance=9.0,
)

SD2_V = replace(SD2, prediction="v", image_size=768)

TINY = SDConfig(
    "sd1", "eps",
    UNetConfig(model_channels=32, num_heads=2, context_dim=32),
    VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
    TextConfig(width=32, layers=2, heads=2, mlp=64),
    image_size=64,
)

TINY_SD2 = SDConfig(
    "sd2", "eps",
    UNetConfig(model_channels=32, head_channels=16, context_dim=64, linear_proj=True,
               upcast_attention=True),
    TINY.vae,
    TextConfig(width=64, layers=2, heads=2, mlp=128, act="gelu", pad_id=0),
    image_size=64, guidance=9.0,
)

# SDXL base 1.0 (generative-models' sd_xl_base.yaml): three levels, no transformer at the top one,
# 2 and 10 transformer blocks deeper; CLIP ViT-L and OpenCLIP ViT-bigG, each at its penultimate
# layer, give a 768 + 1280 = 2048-wide context; y = bigG's pooled 1280 + 6 size/crop ids x 256.
SDXL = SDConfig(
    "sdxl", "eps",
    UNetConfig(channel_mult=(1, 2, 4), attention_levels=(1, 2), transformer_depth=(0, 2, 10),
               transformer_depth_middle=10, head_channels=64, context_dim=2048, linear_proj=True,
               adm_in_channels=2816),
    VAEConfig(force_upcast=True),
    TextConfig(layer="penultimate"),
    scale_factor=0.13025, image_size=1024, guidance=5.0,
    text2=TextConfig(width=1280, layers=32, heads=20, mlp=5120, act="gelu", pad_id=0,
                     layer="penultimate", projection=1280),
    force_zeros_for_empty_prompt=True,
)

TINY_SDXL = SDConfig(
    "sdxl", "eps",
    UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attention_levels=(1, 2),
               transformer_depth=(0, 1, 2), transformer_depth_middle=2, head_channels=16,
               context_dim=80, linear_proj=True, adm_in_channels=144),
    replace(TINY.vae, force_upcast=True),
    TextConfig(width=32, layers=2, heads=2, mlp=64, layer="penultimate"),
    scale_factor=0.13025, image_size=64, guidance=5.0,
    text2=TextConfig(width=48, layers=3, heads=2, mlp=96, act="gelu", pad_id=0,
                     layer="penultimate", projection=48),
    force_zeros_for_empty_prompt=True,
)

MODELS = {"sd1": SD1, "sd2": SD2, "sd2-v": SD2_V, "sdxl": SDXL, "tiny": TINY, "tiny-sd2": TINY_SD2,
           "tiny-sdxl": TINY_SDXL}


def config_to_json(config):
    """SDConfig -> JSON text (what a checkpoint's metadata carries)."""
    return json.dumps(asdict(config))


def _tuples(fields):
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


def config_from_json(text):
    """JSON text from config_to_json -> SDConfig (lists become the dataclasses' tuples).
    Raises ValueError naming the fields that do not belong."""
    data = json.loads(text)
    try:
        text2 = data.pop("text2", None)
        parts = {"unet": UNetConfig(**_tuples(data.pop("unet"))),
                 "vae": VAEConfig(**_tuples(data.pop("vae"))),
                 "text": TextConfig(**data.pop("text")),
                 "text2": TextConfig(**text2) if text2 else None}
        return SDConfig(**data, **parts)
    except (KeyError, TypeError) as e:
        raise ValueError(f"not an SDConfig: {e}") from None
