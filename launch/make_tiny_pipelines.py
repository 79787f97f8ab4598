#!/usr/bin/env python
"""Write tiny diffusers pipelines with random weights to a directory: try --model-path offline.

    python launch/make_tiny_pipelines.py /tmp/tiny-wan --family wan
    python launch/make_tiny_pipelines.py /tmp/tiny-flux --family flux
    python launch/make_tiny_pipelines.py /tmp/tiny-cogvideox --family cogvideox
    torchrun --nproc-per-node 4 launch/generate.py --model-path /tmp/tiny-flux --ulysses-degree 2 \\
        --ring-degree 2 --height 64 --width 64 --output flux.png

Everything is built from configs (no download): word-level tokenizers over a few words, 1-layer text encoders
(UMT5 for Wan, CLIP + T5 for Flux, T5 for CogVideoX), a 2-block transformer (4 heads of 16) and a minimal VAE.
The output is noise-like; the point is the code path. Needs ``pip install 'usp-attn[diffusers]'``.
"""

from __future__ import annotations

import argparse

import torch

FAMILIES = ("wan", "flux", "cogvideox")
WORDS = "a red panda drinking tea in the garden cinematic".split()


def _randomize(model, seed: int):
    """diffusers zero-initialises some weights; randomise them so every path acts."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 / p.shape[-1] ** 0.5)
    return model


def _tokenizer(max_length: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=max_length)


def _t5(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(WORDS) + 3, d_model=d_model, d_kv=8, d_ff=64, num_layers=1,
                                   num_heads=4))


def build_wan(seed: int):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(WORDS) + 3, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                               num_heads=4))
    transformer = _randomize(WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, rope_max_seq_len=64), seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    return WanPipeline(tokenizer=_tokenizer(512), text_encoder=text_encoder, transformer=transformer, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))


def build_flux(seed: int):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(WORDS) + 3, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=77,
                                        eos_token_id=1, pad_token_id=0, bos_token_id=1))
    transformer = _randomize(FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)), seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, shift_factor=0.0,
                        scaling_factor=1.0, use_quant_conv=False, use_post_quant_conv=False)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
                        tokenizer=_tokenizer(77), text_encoder_2=_t5(), tokenizer_2=_tokenizer(512),
                        transformer=transformer)


def build_cogvideox(seed: int):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    transformer = _randomize(CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        max_text_seq_length=226, use_rotary_positional_embeddings=True), seed)
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                 latent_channels=4, layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
    return CogVideoXPipeline(tokenizer=_tokenizer(226), text_encoder=_t5(), vae=vae, transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler())


BUILDERS = {"wan": build_wan, "flux": build_flux, "cogvideox": build_cogvideox}


def build(family: str = "wan", seed: int = 0):
    """The tiny pipeline of ``family`` (CPU, fp32)."""
    return BUILDERS[family](seed)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--family", choices=FAMILIES, default="wan")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pipe = build(args.family, args.seed)
    pipe.save_pretrained(args.directory)
    print(f"wrote a tiny random {type(pipe).__name__} to {args.directory}")


if __name__ == "__main__":
    main()
