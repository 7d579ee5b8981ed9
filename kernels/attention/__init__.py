"""Attention: the backend chosen per GPU, and FLUX's attention inputs (q/k norm + RoPE) in one kernel."""
