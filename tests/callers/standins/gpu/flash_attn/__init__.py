"""A stand-in for flash-attn (a CUDA kernel package) so that OpenRLHF's model modules import; calling it fails."""
