"""Integrations of usp_attn with other libraries (each an optional extra).

Nothing here is imported by ``import usp_attn``; import the integration you want:

    usp_attn.integrations.diffusers    sequence parallelism for diffusers transformers (Wan, Flux, Qwen-Image, ...)
                                       (needs ``pip install 'usp-attn[diffusers]'``)
"""
