"""The LoPT step on any Hugging Face decoder, in plain torch: the config, the wrapped model and its hooks (model),
where the blocks are (architectures), the local objectives (heads, lens, anchor), the optimizer groups (optim) and
the FSDP2/DDP sync (distributed). Imports nothing else of lopt but errors and io.
"""
