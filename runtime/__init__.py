"""ComfyUI glue between the nodes and the pure method code: loading files, checks, and the patches that
inject each control into the denoiser."""
