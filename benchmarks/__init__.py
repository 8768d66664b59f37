"""Benchmarks for llmlb-node against its peers (curl, hf_hub_download, Llama.from_pretrained).

Not tests: `python -m benchmarks` measures on this machine; `--quick` only proves they still run.
"""
