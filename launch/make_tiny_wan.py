#!/usr/bin/env python
"""Write a tiny diffusers Wan pipeline with random weights to a directory: try --model-path offline.

    python launch/make_tiny_wan.py /tmp/tiny-wan
    torchrun --nproc-per-node 4 launch/generate.py --model-path /tmp/tiny-wan --ulysses-degree 2 \\
        --ring-degree 2 --num-frames 9 --height 64 --width 96 --output wan.npz

Everything is built from configs (no download): a word-level tokenizer over a few words,
a 1-layer UMT5 text encoder, a 2-layer WanTransformer3DModel (4 heads of 16) and a
minimal AutoencoderKLWan. The video is noise-like; the point is the code path.
Needs ``pip install 'usp-attn[diffusers]'``.
"""

from __future__ import annotations

import argparse

import torch


def build(seed: int = 0):
    """The tiny ``WanPipeline`` (CPU, fp32)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    words = "a red panda drinking tea in the garden cinematic".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>")
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                               num_heads=4))
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, rope_max_seq_len=64,
    )
    with torch.no_grad():  # diffusers zero-initialises some weights; randomise all so every path acts
        for p in transformer.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn_like(p) * 0.5 / p.shape[-1] ** 0.5)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    build(args.seed).save_pretrained(args.directory)
    print(f"wrote a tiny random WanPipeline to {args.directory}")


if __name__ == "__main__":
    main()
